//! The HTTP+JSON control API of a running host (axum). It binds to a
//! loopback address and has no authentication: anyone who can reach it can
//! submit tasks and reload plugins. The JSON shapes are documented in
//! `docs/api.md`; field names are stable.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::cluster::tasks::TaskRouter;
use crate::cluster::Cluster;
use crate::daemon::{AttemptInfo, ErrorInfo, Host, HostError, Status, SubmitRequest, TaskRecord};
use crate::service::{ListQuery, Stored, TaskEvent, TaskService};
use crate::units::parse_duration;
use crate::workflow::Workflows;

mod workflows;

/// The longest a request may wait for a task to end.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// What the handlers share: the task service, and the cluster membership
/// and JetStream store for the status when the host joined a cluster.
#[derive(Clone)]
pub struct ApiState {
    pub tasks: TaskService,
    /// None for an API over a bare `Host` (`ApiState::local`).
    pub workflows: Option<Workflows>,
    pub cluster: Option<Arc<Cluster>>,
    pub router: Option<Arc<TaskRouter>>,
}

impl ApiState {
    /// A lone host's API.
    pub fn local(host: Host) -> ApiState {
        ApiState {
            tasks: TaskService::local(host),
            workflows: None,
            cluster: None,
            router: None,
        }
    }

    fn host(&self) -> &Host {
        self.tasks.host()
    }
}

/// The largest request body: a payload may come base64-encoded in JSON,
/// 4/3 of its size, plus room for the rest of the body.
pub fn body_limit(max_payload: u64) -> usize {
    usize::try_from(max_payload / 3 * 4 + (64 << 10)).unwrap_or(usize::MAX)
}

pub fn router(state: ApiState, max_payload: u64) -> Router {
    let body_limit = body_limit(max_payload);
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/agents", get(agents))
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks:batch", post(submit_batch))
        .route("/v1/tasks/{id}", get(task))
        .route("/v1/tasks/{id}/cancel", post(cancel))
        .route("/v1/events", get(events))
        .route("/v1/plugins", get(plugins))
        .route("/v1/plugins/sync", post(sync))
        .route(
            "/v1/workflows",
            post(workflows::register).get(workflows::list_definitions),
        )
        .route("/v1/workflows/{name}", get(workflows::inspect))
        .route("/v1/workflows/{name}/runs", post(workflows::start))
        .route("/v1/triggers", get(workflows::triggers))
        .route("/v1/runs", get(workflows::runs))
        .route("/v1/runs/{id}", get(workflows::run))
        .route("/v1/runs/{id}/cancel", post(workflows::cancel))
        .route("/", get(dashboard))
        .route("/v1/stats", get(stats))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_refusals,
        ))
        .with_state(state)
}

/// Error answers that axum makes itself (a path segment that is not
/// UTF-8, a body that is not JSON, ...) come as plain text; they are given
/// the API's JSON form here, so that every error answer has one shape.
async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error())
        || response.extensions().get::<Refusal>().is_some()
    {
        return response;
    }
    let kind = match status {
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::PAYLOAD_TOO_LARGE => "payload-too-large",
        s if s.is_server_error() => "host",
        _ => "invalid-request",
    };
    // Rejections' texts are a line or two; one past 4 KiB (none is) would
    // give the status's text instead.
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.to_string()
    } else {
        text
    };
    ApiError(status, kind, message).into_response()
}

async fn no_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "not-found",
        format!("no such endpoint: {method} {}", uri.path()),
    )
}

async fn no_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid-request",
        format!("{} does not take {method}", uri.path()),
    )
}

/// Who sent a request, for the audit trail: the client's address (the API
/// has no tokens yet), or `unknown` when served without one.
pub struct Client(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Client, Self::Rejection> {
        Ok(Client(client_of(&parts.extensions)))
    }
}

fn client_of(extensions: &axum::http::Extensions) -> String {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |c| c.0.to_string())
}

/// What an error answer refused, for the audit trail.
#[derive(Clone)]
struct Refusal {
    kind: &'static str,
    message: String,
}

/// Records every POST the API answers with an error (reads change
/// nothing, so their errors are not audited).
async fn audit_refusals(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let by = client_of(request.extensions());
    let response = next.run(request).await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        let (kind, message) = match response.extensions().get::<Refusal>() {
            Some(r) => (r.kind, r.message.clone()),
            None => ("invalid-request", status.to_string()),
        };
        refused(&state, &by, &path, status.as_u16(), kind, &message);
    }
    response
}

fn refused(state: &ApiState, by: &str, path: &str, status: u16, kind: &str, message: &str) {
    state.host().audit().record(
        crate::audit::Kind::RequestRefused,
        by,
        json!({
            "method": "POST",
            "path": path.chars().take(512).collect::<String>(),
            "status": status,
            "error": kind,
            // Bounded: an error may quote the request.
            "message": message.chars().take(512).collect::<String>(),
        }),
    );
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    state: ApiState,
    listener: tokio::net::TcpListener,
    max_payload: u64,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app =
        router(state, max_payload).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "kind": self.1, "message": self.2 } });
        let refusal = Refusal {
            kind: self.1,
            message: self.2,
        };
        let mut response = (self.0, Json(body)).into_response();
        response.extensions_mut().insert(refusal);
        response
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        let code = match &e {
            HostError::UnknownCapability(_) | HostError::InvalidRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            HostError::NotFound(_) => StatusCode::NOT_FOUND,
            HostError::Fenced(_) => StatusCode::CONFLICT,
            HostError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HostError::NoCapacity { .. } | HostError::TooManyWaits { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            HostError::ShuttingDown | HostError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            HostError::Journal(_)
            | HostError::Plugin(_)
            | HostError::Corrupt { .. }
            | HostError::DataDir { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.kind(), e.to_string())
    }
}

/// A query string that does not parse, as the API's JSON error.
fn query_error(e: QueryRejection) -> ApiError {
    bad_request(e.body_text())
}

/// A JSON body that does not decode, in serde's words (where and what),
/// without axum's preamble ("Failed to deserialize the JSON body into the
/// target type").
fn json_error(e: &axum::extract::rejection::JsonRejection) -> ApiError {
    use axum::extract::rejection::JsonRejection as R;
    use std::error::Error as _;
    let message = match e {
        // A body of the wrong type altogether (an array, say) fails
        // before its first character: no position to name.
        R::JsonDataError(e) => e.source().map(|s| {
            let s = s.to_string();
            format!(
                "the request body: {}",
                s.strip_suffix(" at line 1 column 0").unwrap_or(&s)
            )
        }),
        R::JsonSyntaxError(e) => e
            .source()
            .map(|s| format!("the request body is not valid JSON: {s}")),
        _ => None,
    };
    bad_request(message.unwrap_or_else(|| e.body_text()))
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, "invalid-request", message)
}

/// A task as the API shows it (`docs/api.md`): the stable shape, kept
/// apart from the stores' record so that either can change alone.
#[derive(Serialize)]
pub struct TaskJson<'a> {
    id: &'a str,
    capability: &'a str,
    status: &'static str,
    priority: i32,
    deadline_ms: Option<u64>,
    idempotency_key: Option<&'a str>,
    submitted_at_ms: u64,
    finished_at_ms: Option<u64>,
    attempts: u32,
    agent: Option<&'a str>,
    host: Option<&'a str>,
    error: Option<&'a ErrorInfo>,
    attempt_errors: &'a [AttemptInfo],
    fuel_used: Option<u64>,
    subtask_fuel: Option<u64>,
    subtasks: Option<u32>,
    calls: &'a [crate::sandbox::CallReport],
    payload_bytes: u64,
    /// The trace id of the task's trace (32 hex digits), when it has one.
    trace_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_base64: Option<String>,
}

impl<'a> TaskJson<'a> {
    /// `result` holds UTF-8 text, `result_base64` anything else.
    pub fn new(record: &'a TaskRecord, result: Option<&[u8]>) -> TaskJson<'a> {
        let (text, b64) = match result.map(std::str::from_utf8) {
            None => (None, None),
            Some(Ok(text)) => (Some(text.to_string()), None),
            Some(Err(_)) => (
                None,
                result.map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            ),
        };
        TaskJson {
            id: &record.id,
            capability: &record.capability,
            status: record.status.as_str(),
            priority: record.priority,
            deadline_ms: record.deadline_ms,
            idempotency_key: record.idempotency_key.as_deref(),
            submitted_at_ms: record.submitted_at_ms,
            finished_at_ms: record.finished_at_ms,
            attempts: record.attempts,
            agent: record.agent.as_deref(),
            host: record.host.as_deref(),
            error: record.error.as_ref(),
            attempt_errors: &record.attempt_errors,
            fuel_used: record.fuel_used,
            subtask_fuel: record.subtask_fuel,
            subtasks: record.subtasks,
            calls: &record.calls,
            payload_bytes: record.payload_bytes,
            trace_id: record.trace.as_deref().and_then(crate::trace::trace_id),
            result: text,
            result_base64: b64,
        }
    }
}

/// The task's JSON, serialized once, straight from the record.
fn task_response(code: StatusCode, stored: &Stored) -> Response {
    (
        code,
        Json(TaskJson::new(&stored.record, stored.result.as_deref())),
    )
        .into_response()
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
// serde reads a struct from a JSON array too; a message for `[]` should
// not name a Rust type.
#[serde(
    deny_unknown_fields,
    expecting = "a task: a JSON object such as {\"capability\": \"echo\", \"input\": \"hi\"}"
)]
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

/// A submission's body: a JSON object only. serde reads a struct from an
/// array too, as its fields in order, so `["echo", "hi"]` would be a task.
struct TaskBody(SubmitBody);

impl<'de> Deserialize<'de> for TaskBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> serde::de::Visitor<'de> for Object {
            type Value = TaskBody;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a task: a JSON object such as {\"capability\": \"echo\", \"input\": \"hi\"}",
                )
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<TaskBody, A::Error> {
                SubmitBody::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(TaskBody)
            }
        }
        d.deserialize_map(Object)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    wait: Option<String>,
}

/// The W3C `traceparent` a request carries, when valid (an invalid one is
/// ignored, as the W3C recommendation says).
fn traceparent(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(crate::trace::HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| crate::trace::is_valid(v))
        .map(String::from)
}

/// The request a submission body asks for.
fn submit_request(body: SubmitBody) -> Result<SubmitRequest, ApiError> {
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
    Ok(SubmitRequest {
        capability: body.capability,
        payload,
        priority: body.priority,
        deadline,
        idempotency_key: body.idempotency_key,
        trace: None,
    })
}

async fn submit(
    State(state): State<ApiState>,
    Client(by): Client,
    headers: axum::http::HeaderMap,
    q: Result<Query<WaitQuery>, QueryRejection>,
    body: Result<Json<TaskBody>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(TaskBody(body)) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            let max = state.tasks.store().max_payload();
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                format!(
                    "the request body is past the limit of {} bytes (a payload of the limit of {max} bytes, base64-encoded, and room for the rest); a text payload whose JSON escapes make it longer than that can go as input_base64",
                    body_limit(max)
                ),
            )
        }
        _ => json_error(&e),
    })?;
    let Query(q) = q.map_err(query_error)?;
    let wait = parse_wait(q.wait.as_deref())?;
    let request = SubmitRequest {
        trace: traceparent(&headers),
        ..submit_request(body)?
    };
    let (stored, existing) = state
        .tasks
        .submit_then_wait(request, wait, |s| {
            if !s.existing {
                audit_submit(&state.tasks, &by, &s.task);
            }
        })
        .await?;
    let code = if existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(task_response(code, &stored))
}

/// The audit entry of a task a client submitted.
fn audit_submit(tasks: &TaskService, by: &str, record: &TaskRecord) {
    tasks.host().audit().record(
        crate::audit::Kind::TaskSubmit,
        by,
        json!({
            "task": record.id,
            "capability": record.capability,
            "priority": record.priority,
            "payload_bytes": record.payload_bytes,
            "idempotency_key": record.idempotency_key,
        }),
    );
}

/// Most tasks one batch may hold.
pub const MAX_BATCH: usize = 10_000;

/// Submissions of one batch in flight at once when the answers come in
/// the batch's order: enough for the journal to commit many in one
/// transaction, or for the stream to take many at once.
const BATCH_IN_FLIGHT: usize = 256;

/// One answer line of a batch: the task, or why its line was refused.
fn batch_line(index: usize, outcome: Result<(Stored, bool), ApiError>) -> bytes::Bytes {
    #[derive(Serialize)]
    struct Accepted<'a> {
        index: usize,
        existing: bool,
        task: TaskJson<'a>,
    }
    let mut line = match outcome {
        Ok((stored, existing)) => serde_json::to_vec(&Accepted {
            index,
            existing,
            task: TaskJson::new(&stored.record, stored.result.as_deref()),
        })
        .unwrap_or_default(),
        Err(ApiError(code, kind, message)) => json!({
            "index": index,
            "code": code.as_u16(),
            "error": { "kind": kind, "message": message },
        })
        .to_string()
        .into_bytes(),
    };
    line.push(b'\n');
    line.into()
}

/// `POST /v1/tasks:batch`: one submission per line of the body (JSON
/// lines, blank lines skipped), answered as JSON lines: in the batch's
/// order without `wait`, and as each task ends with it, so that many
/// results arrive without polling. A line that is refused does not stop
/// the others.
async fn submit_batch(
    State(state): State<ApiState>,
    Client(by): Client,
    headers: axum::http::HeaderMap,
    q: Result<Query<WaitQuery>, QueryRejection>,
    body: Result<bytes::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    use futures_util::StreamExt;
    let Query(q) = q.map_err(query_error)?;
    let wait = parse_wait(q.wait.as_deref())?;
    // The whole batch is one request body, under the same limit as one
    // submission's.
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!(
                "the batch is past the limit of {} bytes of one request body (as for one submission); send it as several batches",
                body_limit(state.tasks.store().max_payload())
            ),
        ),
        _ => bad_request(e.body_text()),
    })?;
    // With their line numbers in the body (from 1), blank lines skipped.
    // Each line is decoded on its own: one that is not UTF-8 is refused
    // alone, like one that is not JSON.
    let lines: Vec<(usize, &[u8])> = body
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .enumerate()
        .filter(|(_, l)| !l.trim_ascii().is_empty())
        .collect();
    if lines.is_empty() {
        return Err(bad_request("the batch holds no task".into()));
    }
    if lines.len() > MAX_BATCH {
        return Err(bad_request(format!(
            "a batch holds at most {MAX_BATCH} tasks; this one has {}",
            lines.len()
        )));
    }
    // Each with its line number in the body, from 1.
    let requests: Vec<(usize, Result<SubmitRequest, ApiError>)> = lines
        .iter()
        .map(|(n, line)| {
            let request = std::str::from_utf8(line)
                .map_err(|e| bad_request(format!("line {}: not UTF-8: {e}", n + 1)))
                .and_then(|line| {
                    // serde would read an array as the fields in order.
                    if !line.trim_start().starts_with('{') {
                        return Err(bad_request(format!(
                            "line {}: expected a task: a JSON object such as {{\"capability\": \"echo\", \"input\": \"hi\"}}",
                            n + 1
                        )));
                    }
                    serde_json::from_str::<SubmitBody>(line)
                        .map_err(|e| bad_request(format!("line {}: {e}", n + 1)))
                })
                .and_then(submit_request)
                .map(|r| SubmitRequest {
                    trace: traceparent(&headers),
                    ..r
                });
            (n + 1, request)
        })
        .collect();
    let tasks = state.tasks.clone();
    let by: Arc<str> = Arc::from(by);
    let answers = futures_util::stream::iter(requests.into_iter().enumerate()).map(
        move |(index, (line, request))| {
            let (tasks, by, state) = (tasks.clone(), by.clone(), state.clone());
            async move {
                let outcome = match request {
                    Ok(request) => tasks
                        .submit_then_wait(request, wait, |s| {
                            if !s.existing {
                                audit_submit(&tasks, &by, &s.task);
                            }
                        })
                        .await
                        .map_err(ApiError::from),
                    Err(e) => Err(e),
                };
                match &outcome {
                    Ok(_) => {}
                    Err(ApiError(code, kind, message)) => refused(
                        &state,
                        &by,
                        &format!("/v1/tasks:batch (line {line})"),
                        code.as_u16(),
                        kind,
                        message,
                    ),
                }
                Ok::<_, std::convert::Infallible>(batch_line(index, outcome))
            }
        },
    );
    let body = match wait {
        None => axum::body::Body::from_stream(answers.buffered(BATCH_IN_FLIGHT)),
        // All at once: each waits for its own task (bounded by MAX_BATCH,
        // and by `[host] max_waits` through the wait slots).
        Some(_) => axum::body::Body::from_stream(answers.buffer_unordered(MAX_BATCH)),
    };
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

async fn task(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let stored = match parse_wait(q.wait.as_deref())? {
        Some(w) => state.tasks.wait(&id, w).await?,
        None => state.tasks.get(&id).await?,
    };
    Ok(task_response(StatusCode::OK, &stored))
}

async fn cancel(
    State(state): State<ApiState>,
    Client(by): Client,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stored = state.tasks.cancel(&id).await?;
    state.host().audit().record(
        crate::audit::Kind::TaskCancel,
        &by,
        json!({
            "task": stored.record.id,
            "capability": stored.record.capability,
            "status": stored.record.status.as_str(),
        }),
    );
    Ok(task_response(StatusCode::OK, &stored))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Unix milliseconds.
    since_ms: Option<u64>,
    /// A kind, or the start of kinds (`plugin`).
    kind: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/audit`: the last `limit` (default 100, at most 10,000)
/// entries from `since_ms` on, oldest first.
async fn audit_list(
    State(state): State<ApiState>,
    q: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let entries = state
        .host()
        .audit()
        .list(q.since_ms.unwrap_or(0), q.kind.as_deref(), limit)
        .await
        .map_err(audit_error)?;
    Ok(Json(json!({ "entries": entries })).into_response())
}

/// `GET /v1/audit/verify`: checks every chain (200 either way; `ok` says).
async fn audit_verify(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let verdict = state.host().audit().verify().await.map_err(audit_error)?;
    Ok(Json(verdict).into_response())
}

fn audit_error(e: crate::audit::AuditError) -> ApiError {
    ApiError(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        e.to_string(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only this task's events, and its sub-tasks' (`ID.N`).
    task: Option<String>,
    capability: Option<String>,
}

/// The host's task events as server-sent events: one `data:` line of JSON
/// per event (`docs/api.md`), an `event: lagged` with the number missed
/// when the client reads slower than the host emits.
async fn events(
    State(state): State<ApiState>,
    q: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<
    Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>>,
    ApiError,
> {
    let Query(q) = q.map_err(query_error)?;
    let rx = state.tasks.watch();
    let keep = move |e: &TaskEvent| {
        q.task.as_deref().is_none_or(|t| {
            e.task == t
                || e.task
                    .strip_prefix(t)
                    .is_some_and(|rest| rest.starts_with('.'))
        }) && q.capability.as_deref().is_none_or(|c| e.capability == c)
    };
    let stream = futures_util::stream::unfold((rx, keep), |(mut rx, keep)| async move {
        loop {
            match rx.recv().await {
                Ok(event) if keep(&event) => {
                    let data = serde_json::to_string(event.as_ref()).unwrap_or_default();
                    let sse = SseEvent::default().event(event.kind.as_str()).data(data);
                    return Some((Ok(sse), (rx, keep)));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let sse = SseEvent::default()
                        .event("lagged")
                        .data(json!({ "missed": n }).to_string());
                    return Some((Ok(sse), (rx, keep)));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    // Ends when the host stops: a graceful stop waits for open requests.
    let stream =
        futures_util::StreamExt::take_until(stream, state.host().stopped().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQueryParams {
    status: Option<String>,
    capability: Option<String>,
    limit: Option<usize>,
}

async fn list(
    State(state): State<ApiState>,
    q: Result<Query<ListQueryParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            bad_request(format!(
                "status {s:?}: expected queued, running, completed, failed, dead or cancelled"
            ))
        })?),
    };
    // A filter is a capability name, never a pattern: a cluster matches it
    // against subjects, where `*` would match every capability.
    if let Some(c) = q.capability.as_deref() {
        if !crate::sandbox::subject::is_subject(c) {
            return Err(bad_request(format!(
                "capability {c:?}: expected a capability name (tokens of letters, digits, - and _, separated by dots)"
            )));
        }
    }
    let query = ListQuery {
        status,
        capability: q.capability,
        limit: q.limit.unwrap_or(100).min(10_000),
    };
    let tasks = state.tasks.list(&query).await?;
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|t| serde_json::to_value(TaskJson::new(t, None)).unwrap_or(Value::Null))
        .collect();
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

async fn agents(State(state): State<ApiState>) -> Json<Value> {
    Json(json!({ "agents": agents_json(state.host()) }))
}

async fn status(State(state): State<ApiState>) -> Json<Value> {
    let (host, cluster, router) = (state.host(), state.cluster.clone(), state.router.clone());
    let (queued, running) = state.tasks.store().counts();
    // In a cluster: the tasks on the stream (all hosts') and the attempts
    // the live hosts reported running in their last heartbeats.
    // Not asked while cut off from the server: it would not answer, and
    // the status would wait for the request's timeout.
    let connected = cluster.as_ref().is_some_and(|c| c.connected());
    let on_stream = match &router {
        Some(r) if connected => r.on_stream().await.ok(),
        _ => None,
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
        "queues": host.scheduler().queued().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "capabilities": host.scheduler().capabilities(),
        "agents": agents_json(host),
        "plugin_errors": errors,
        "cluster": cluster.map(|c| json!({
            "nats": c.url(),
            "connected": c.connected(),
            "hosts": c.members(),
            "tasks": {
                "on_stream": on_stream,
                // Unknown while this host hears no one.
                "running": c.connected().then(|| c.members().iter().filter(|m| m.state == "alive").map(|m| m.running).sum::<u64>()),
            },
            "fenced": router.as_ref().map_or(0, |r| r.fenced()),
            "redelivered": router.as_ref().map_or(0, |r| r.redelivered()),
            "terminated": router.as_ref().map_or(0, |r| r.terminated()),
            "duplicates": router.as_ref().map_or(0, |r| r.duplicates()),
        })),
    }))
}

/// `GET /`: the dashboard, one page with its script and styles inline
/// (no request leaves the host, so it works offline). It reads the API
/// like any client.
async fn dashboard() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // The page runs only its own inline code and talks only to
            // this host.
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

/// `GET /v1/stats`: tasks that ended on this host, totals and the last
/// minutes in buckets, for the dashboard's chart.
async fn stats(State(state): State<ApiState>) -> Json<crate::metrics::RecentJson> {
    Json(
        state
            .host()
            .events()
            .metrics()
            .recent(crate::daemon::now_ms()),
    )
}

/// `GET /metrics`: the host's metrics in the OpenMetrics text format.
async fn metrics(State(state): State<ApiState>) -> Response {
    use crate::scheduler::breaker::State as Breaker;
    let host = state.host();
    let agents = host
        .agents()
        .into_iter()
        .map(|a| {
            let breaker = match a.breaker {
                Breaker::Closed => 0,
                Breaker::HalfOpen => 1,
                Breaker::Open => 2,
            };
            (a.label, a.in_flight, a.max_in_flight, breaker, a.score)
        })
        .collect();
    let mut members = std::collections::BTreeMap::<String, i64>::new();
    let mut heartbeats = Vec::new();
    if let Some(c) = &state.cluster {
        for m in c.members() {
            *members.entry(m.state.to_string()).or_default() += 1;
            if m.state != "left" {
                heartbeats.push((m.host, m.last_heartbeat_ms as f64 / 1000.0));
            }
        }
    }
    let router = state.router.as_ref();
    let snapshot = crate::metrics::Snapshot {
        queued: host.scheduler().queued(),
        agents,
        members: members.into_iter().collect(),
        heartbeats,
        redelivered: router.map_or(0, |r| r.redelivered()),
        terminated: router.map_or(0, |r| r.terminated()),
        duplicates: router.map_or(0, |r| r.duplicates()),
        free_instances: host.engine().free_instances(),
        kept_instances: host.engine().parked_instances(),
    };
    let text = host.events().metrics().render(snapshot);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn plugins(State(state): State<ApiState>) -> Json<Value> {
    let host = state.host();
    let errors: Vec<Value> = host
        .plugin_errors()
        .into_iter()
        .map(|(plugin, error)| json!({ "plugin": plugin, "error": error }))
        .collect();
    Json(json!({ "plugins": host.plugins(), "errors": errors }))
}

async fn sync(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let report = state.host().sync_plugins().await?;
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
