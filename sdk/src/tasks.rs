//! Calls to other agents by capability (`tasks.call`). The host schedules a
//! sub-task and suspends this instance until it ends. The sub-task gets at
//! most the time and fuel this task has left, and the fuel it uses is taken
//! from this task's fuel.

use std::time::Duration;

use crate::bindings::orch::agent::tasks;
pub use crate::bindings::orch::agent::tasks::{CallError, CallRequest};

/// Runs one sub-task on an agent that provides `capability` and waits for
/// its result. `timeout` shortens the sub-task's deadline; `None` gives it
/// all the time this task has left.
pub fn call(
    capability: &str,
    payload: &[u8],
    timeout: Option<Duration>,
) -> Result<Vec<u8>, CallError> {
    tasks::call(capability, payload, timeout_ms(timeout))
}

/// Runs several sub-tasks at the same time and waits for all of them. The
/// results are in the order of `requests`; the fuel this task has left is
/// shared evenly among them.
pub fn call_all(requests: &[CallRequest]) -> Vec<Result<Vec<u8>, CallError>> {
    tasks::call_all(requests)
}

/// A request for [`call_all`].
pub fn request(capability: &str, payload: &[u8], timeout: Option<Duration>) -> CallRequest {
    CallRequest {
        capability: capability.to_string(),
        payload: payload.to_vec(),
        timeout_ms: timeout_ms(timeout),
    }
}

fn timeout_ms(timeout: Option<Duration>) -> u32 {
    // 0 means "whatever the caller has left"; a set timeout is at least 1 ms.
    timeout.map_or(0, |t| t.as_millis().clamp(1, u128::from(u32::MAX)) as u32)
}

impl CallError {
    /// A short, stable name for the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Task(_) => "task",
            CallError::Trapped(_) => "trapped",
            CallError::Limit(_) => "limit",
            CallError::DeadlineExceeded => "deadline-exceeded",
            CallError::Unavailable(_) => "unavailable",
            CallError::Refused(_) => "refused",
        }
    }

    /// A one-line account of the failure for messages. (wit-bindgen's own
    /// `Display` for this type prints the `Debug` form.)
    pub fn text(&self) -> String {
        match self {
            CallError::Task(crate::TaskError::InvalidInput(m)) => format!("invalid input: {m}"),
            CallError::Task(crate::TaskError::Failed(m)) => format!("failed: {m}"),
            CallError::Task(crate::TaskError::Retryable(m)) => format!("retryable: {m}"),
            CallError::Trapped(m) => format!("trapped: {m}"),
            CallError::Limit(m) => format!("limit: {m}"),
            CallError::DeadlineExceeded => "deadline exceeded".to_string(),
            CallError::Unavailable(m) => format!("unavailable: {m}"),
            CallError::Refused(m) => format!("refused: {m}"),
        }
    }
}
