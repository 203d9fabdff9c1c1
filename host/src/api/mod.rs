//! The HTTP+JSON control API of a running host (axum). It binds to a
//! loopback address and has no authentication: anyone who can reach it can
//! submit tasks and reload plugins. The JSON shapes are documented in
//! `docs/api.md`; field names are stable.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cluster::tasks::TaskRouter;
use crate::cluster::Cluster;
use crate::daemon::{Host, HostError, Status, SubmitRequest, TaskRecord};
use crate::units::parse_duration;

/// The longest a request may wait for a task to end.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// What the handlers share: the host, and its cluster membership when it
/// joined one.
#[derive(Clone)]
pub struct ApiState {
    pub host: Host,
    pub cluster: Option<Arc<Cluster>>,
    /// In a cluster, tasks go through JetStream instead of the journal.
    pub router: Option<Arc<TaskRouter>>,
}

pub fn router(state: ApiState, max_payload: u64) -> Router {
    // A payload may come base64-encoded in JSON: 4/3 of its size plus room.
    let body_limit = usize::try_from(max_payload / 3 * 4 + (64 << 10)).unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/agents", get(agents))
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/plugins", get(plugins))
        .route("/v1/plugins/sync", post(sync))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    state: ApiState,
    listener: tokio::net::TcpListener,
    max_payload: u64,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state, max_payload))
        .with_graceful_shutdown(shutdown)
        .await
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "kind": self.1, "message": self.2 } });
        (self.0, Json(body)).into_response()
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        let code = match &e {
            HostError::UnknownCapability(_) | HostError::InvalidRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            HostError::NotFound(_) => StatusCode::NOT_FOUND,
            HostError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HostError::NoCapacity { .. } => StatusCode::TOO_MANY_REQUESTS,
            HostError::ShuttingDown | HostError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HostError::Journal(_) | HostError::Plugin(_) | HostError::Corrupt(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError(code, e.kind(), e.to_string())
    }
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid-request", message)
}

/// A task record as JSON, with the result when asked for: `result` holds
/// UTF-8 text, `result_base64` anything else.
pub fn task_json(record: &TaskRecord, result: Option<&[u8]>) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if let (Some(obj), Some(bytes)) = (value.as_object_mut(), result) {
        match std::str::from_utf8(bytes) {
            Ok(text) => obj.insert("result".into(), Value::String(text.into())),
            Err(_) => obj.insert(
                "result_base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ),
        };
    }
    value
}

fn with_result(host: &Host, record: &TaskRecord) -> Result<Value, ApiError> {
    let result = if record.status == Status::Completed {
        host.result(&record.id)?
    } else {
        None
    };
    Ok(task_json(record, result.as_deref()))
}

fn parse_wait(wait: Option<&str>) -> Result<Option<Duration>, ApiError> {
    wait.map(|w| {
        parse_duration(w)
            .map(|d| d.min(MAX_WAIT))
            .map_err(|e| bad_request(format!("wait: {e}")))
    })
    .transpose()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    capability: String,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    input_base64: Option<String>,
    #[serde(default)]
    priority: i32,
    /// A duration such as "2s" or "500ms", counted from submission.
    #[serde(default)]
    deadline: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Deserialize)]
struct WaitQuery {
    wait: Option<String>,
}

async fn submit(
    State(ApiState {
        host,
        cluster,
        router,
    }): State<ApiState>,
    Query(q): Query<WaitQuery>,
    body: Result<Json<SubmitBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| bad_request(e.body_text()))?;
    let wait = parse_wait(q.wait.as_deref())?;
    let payload = match (body.input, body.input_base64) {
        (Some(_), Some(_)) => {
            return Err(bad_request("give input or input_base64, not both".into()))
        }
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| bad_request(format!("input_base64: {e}")))?,
        (None, None) => Vec::new(),
    };
    let deadline = body
        .deadline
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|e| bad_request(format!("deadline: {e}")))?;
    let request = SubmitRequest {
        capability: body.capability,
        payload,
        priority: body.priority,
        deadline,
        idempotency_key: body.idempotency_key,
    };
    if let (Some(router), Some(cluster)) = (router, cluster) {
        let (task, existing) = router.submit(request, &cluster.capabilities()).await?;
        let (record, result) = match wait {
            // An idempotent replay may have its result already.
            Some(w) if existing => router.wait(&task.id, w).await?,
            Some(w) => router.wait_submitted(&task.id, w).await?,
            None => (task, None),
        };
        let code = if existing {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        return Ok((code, Json(task_json(&record, result.as_deref()))).into_response());
    }
    let submitted = host.submit(request).await?;
    let record = match wait {
        Some(w) => host.wait(&submitted.task.id, w).await?,
        None => submitted.task,
    };
    let code = if submitted.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((code, Json(with_result(&host, &record)?)).into_response())
}

async fn task(
    State(ApiState { host, router, .. }): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<Value>, ApiError> {
    if let Some(router) = router {
        let (record, result) = match parse_wait(q.wait.as_deref())? {
            Some(w) => router.wait(&id, w).await?,
            None => router.get_with_result(&id).await?,
        };
        return Ok(Json(task_json(&record, result.as_deref())));
    }
    let record = match parse_wait(q.wait.as_deref())? {
        Some(w) => host.wait(&id, w).await?,
        None => host.get(&id)?,
    };
    Ok(Json(with_result(&host, &record)?))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    capability: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(ApiState { host, router, .. }): State<ApiState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            bad_request(format!(
                "status {s:?}: expected queued, running, completed, failed or dead"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    let tasks = match router {
        Some(router) => router.list(status, q.capability.as_deref(), limit).await?,
        None => host.list(status, q.capability.as_deref(), limit)?,
    };
    let tasks: Vec<Value> = tasks.iter().map(|t| task_json(t, None)).collect();
    Ok(Json(json!({ "tasks": tasks })))
}

fn agents_json(host: &Host) -> Vec<Value> {
    host.agents()
        .into_iter()
        .map(|a| {
            json!({
                "label": a.label,
                "capabilities": a.capabilities,
                "instances": a.max_in_flight,
                "in_flight": a.in_flight,
                "completed": a.completed,
                "failed": a.failed,
                "score": a.score,
                "breaker": match a.breaker {
                    crate::scheduler::breaker::State::Closed => "closed",
                    crate::scheduler::breaker::State::Open => "open",
                    crate::scheduler::breaker::State::HalfOpen => "half-open",
                },
            })
        })
        .collect()
}

async fn agents(State(ApiState { host, .. }): State<ApiState>) -> Json<Value> {
    Json(json!({ "agents": agents_json(&host) }))
}

async fn status(
    State(ApiState {
        host,
        cluster,
        router,
    }): State<ApiState>,
) -> Json<Value> {
    let (queued, running) = host.live_counts();
    // In a cluster: the tasks on the stream (all hosts') and the attempts
    // the live hosts reported running in their last heartbeats.
    let on_stream = match &router {
        Some(r) => r.on_stream().await.ok(),
        None => None,
    };
    let errors: Vec<Value> = host
        .plugin_errors()
        .into_iter()
        .map(|(plugin, error)| json!({ "plugin": plugin, "error": error }))
        .collect();
    Json(json!({
        "host": host.id(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_ms": host.uptime().as_millis() as u64,
        "tasks": { "queued": queued, "running": running },
        "capabilities": host.scheduler().capabilities(),
        "agents": agents_json(&host),
        "plugin_errors": errors,
        "cluster": cluster.map(|c| json!({
            "nats": c.url(),
            "hosts": c.members(),
            "tasks": {
                "on_stream": on_stream,
                "running": c.members().iter().filter(|m| m.state == "alive").map(|m| m.running).sum::<u64>(),
            },
            "fenced": router.as_ref().map_or(0, |r| r.fenced()),
            "redelivered": router.as_ref().map_or(0, |r| r.redelivered()),
            "terminated": router.as_ref().map_or(0, |r| r.terminated()),
            "duplicates": router.as_ref().map_or(0, |r| r.duplicates()),
        })),
    }))
}

async fn plugins(State(ApiState { host, .. }): State<ApiState>) -> Json<Value> {
    let errors: Vec<Value> = host
        .plugin_errors()
        .into_iter()
        .map(|(plugin, error)| json!({ "plugin": plugin, "error": error }))
        .collect();
    Json(json!({ "plugins": host.plugins(), "errors": errors }))
}

async fn sync(State(ApiState { host, .. }): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let report = host.sync_plugins().await?;
    let errors: Vec<Value> = report
        .errors
        .iter()
        .map(|(plugin, error)| json!({ "plugin": plugin, "error": error }))
        .collect();
    Ok(Json(json!({
        "loaded": report.loaded,
        "removed": report.removed,
        "errors": errors,
    })))
}
