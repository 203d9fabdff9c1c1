//! The workflow routes: definitions (`/v1/workflows`) and runs
//! (`/v1/runs`). Shapes in `docs/api.md`; a run is shown as stored
//! (`workflow::RunRecord`), whose field names are stable.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad_request, parse_wait, query_error, ApiError, ApiState, Client, WaitQuery};
use crate::audit::Kind;
use crate::units::parse_duration;
use crate::workflow::{Definition, RunStatus, WorkflowError, Workflows};

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        let code = match &e {
            WorkflowError::Invalid(_) => StatusCode::BAD_REQUEST,
            WorkflowError::Exists { .. } => StatusCode::CONFLICT,
            WorkflowError::InputTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            WorkflowError::NotFound(_) => StatusCode::NOT_FOUND,
            WorkflowError::NoCapacity { .. } | WorkflowError::TooManyDefinitions { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            WorkflowError::ShuttingDown | WorkflowError::Store { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError(code, e.kind(), e.to_string())
    }
}

fn service(state: &ApiState) -> Result<&Workflows, ApiError> {
    let workflows = state.workflows.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this host serves no workflows".into(),
        )
    })?;
    // Every workflow request reads or writes the store: while a cluster
    // host is cut off from NATS it answers at once, not after a timeout.
    state.tasks.store().reachable()?;
    Ok(workflows)
}

/// `POST /v1/workflows`: a definition as TOML (`content-type:
/// application/toml`) or JSON.
pub(super) async fn register(
    State(state): State<ApiState>,
    Client(by): Client,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    let toml = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("toml"));
    let def = if toml {
        let text = std::str::from_utf8(&body)
            .map_err(|_| bad_request("the definition is not UTF-8 text".into()))?;
        Definition::from_toml(text)
    } else {
        Definition::from_json(&body)
    }
    .map_err(WorkflowError::from)?;
    let r = service(&state)?.register(def).await?;
    state.host().audit().record(
        Kind::WorkflowRegister,
        &by,
        json!({
            "workflow": r.registered.definition.name,
            "version": r.registered.definition.version,
        }),
    );
    let body = json!({
        "name": r.registered.definition.name,
        "version": r.registered.definition.version,
        "registered_at_ms": r.registered.registered_at_ms,
        "warnings": r.warnings,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /v1/workflows`: every definition, by name then version.
pub(super) async fn list_definitions(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let all = service(&state)?.definitions().await?;
    let workflows: Vec<Value> = all
        .iter()
        .map(|r| {
            json!({
                "name": r.definition.name,
                "version": r.definition.version,
                "description": r.definition.description,
                "steps": r.definition.steps.len(),
                "registered_at_ms": r.registered_at_ms,
            })
        })
        .collect();
    Ok(Json(json!({ "workflows": workflows })).into_response())
}

/// `GET /v1/workflows/{name}`: its versions, with their definitions.
pub(super) async fn inspect(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let versions = service(&state)?.versions(&name).await?;
    Ok(Json(json!({ "name": name, "versions": versions })).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct StartBody {
    #[serde(default)]
    input: Value,
    #[serde(default)]
    version: Option<u32>,
    /// The run's deadline ("30s"), counted from its start; default the
    /// definition's.
    #[serde(default)]
    deadline: Option<String>,
}

/// `POST /v1/workflows/{name}/runs[?wait=30s]`: starts a run.
pub(super) async fn start(
    State(state): State<ApiState>,
    Client(by): Client,
    Path(name): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
    body: bytes::Bytes,
) -> Result<Response, ApiError> {
    // Every field is optional, so is the body; JSON with or without its
    // content type, as for a definition.
    let body: StartBody = if body.iter().all(u8::is_ascii_whitespace) {
        StartBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("the body: {e}")))?
    };
    let Query(q) = q.map_err(query_error)?;
    let wait = parse_wait(q.wait.as_deref())?;
    let deadline = body
        .deadline
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(|e| bad_request(format!("deadline: {e}")))?;
    if deadline.is_some_and(|d| d.is_zero()) {
        return Err(bad_request("deadline: must be more than 0".into()));
    }
    let workflows = service(&state)?;
    let mut run = workflows
        .start_run(&name, body.version, body.input, deadline)
        .await?;
    state.host().audit().record(
        Kind::WorkflowStart,
        &by,
        json!({ "run": run.id, "workflow": run.workflow, "version": run.version }),
    );
    if let Some(w) = wait {
        run = workflows.wait(&run.id, w).await?;
    }
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RunsQuery {
    status: Option<String>,
    workflow: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/runs[?status=&workflow=&limit=]`: newest first.
pub(super) async fn runs(
    State(state): State<ApiState>,
    q: Result<Query<RunsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            bad_request(format!(
                "status: {s:?} is not one of running, completed, failed, compensating, compensated, compensation-failed, cancelled"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(100).min(10_000);
    let runs = service(&state)?
        .list(status, q.workflow.as_deref(), limit)
        .await?;
    Ok(Json(json!({ "runs": runs })).into_response())
}

/// `GET /v1/runs/{id}[?wait=30s]`.
pub(super) async fn run(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(query_error)?;
    let workflows = service(&state)?;
    let run = match parse_wait(q.wait.as_deref())? {
        Some(w) => workflows.wait(&id, w).await?,
        None => workflows.get(&id).await?,
    };
    Ok(Json(run).into_response())
}

/// `POST /v1/runs/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<ApiState>,
    Client(by): Client,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let run = service(&state)?.cancel(&id).await?;
    state.host().audit().record(
        Kind::WorkflowCancel,
        &by,
        json!({ "run": run.id, "workflow": run.workflow, "status": run.status }),
    );
    Ok(Json(run).into_response())
}

/// `GET /v1/triggers`: the schedules of each workflow's latest version,
/// with their next tick.
pub(super) async fn triggers(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let triggers = service(&state)?.triggers().await?;
    Ok(Json(json!({ "triggers": triggers })).into_response())
}
