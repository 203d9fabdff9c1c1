//! Durable `tasks.call`: for an agent whose manifest says `durable = true`,
//! each call's outcome is recorded against the calling task's id and the
//! call's place in its sequence before the caller gets it; when that task
//! runs again (a retry, a restart, another host), a call that was recorded
//! gets the recorded outcome instead of a new sub-task, once checked
//! against the capability and a hash of the payload. A call that does not
//! match fails the task as `non-deterministic`, naming the call.
//!
//! Where records are kept is a [`CallLog`]: a redb file on a lone host
//! (`daemon::calls`), a JetStream KV bucket in a cluster
//! (`cluster::calls`).

use std::future::Future;
use std::pin::Pin;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::error::TaskError;
use crate::sandbox::{Outcome, TaskOutput};

pub type LogFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// Where call records are kept. Keys are `<caller task id>/<n>`, n from 1
/// in the order the caller made its calls.
pub trait CallLog: Send + Sync {
    fn get<'a>(&'a self, key: &'a str) -> LogFuture<'a, Option<CallRecord>>;
    /// Stores a record unless the key has one: the first outcome of a call
    /// stays (two hosts running the same task, one of them late).
    fn put<'a>(&'a self, key: &'a str, record: &'a CallRecord) -> LogFuture<'a, ()>;
}

/// One call's outcome as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRecord {
    pub capability: String,
    /// sha256 of the payload, hex.
    pub payload_sha256: String,
    pub result_base64: Option<String>,
    pub error: Option<TaskError>,
    pub fuel_used: u64,
    pub subtasks: u32,
    pub subtask_fuel: u64,
    /// When it was recorded (Unix ms), for retention.
    pub at_ms: u64,
}

/// Whether an outcome is the same on another run: a result, or an error the
/// callee gives for this input (invalid input, a declared failure, a
/// limit). Retryable failures, traps, deadlines, cancels and a host with
/// no room are not recorded: a run again calls again.
pub fn is_recordable(outcome: &Outcome) -> bool {
    match &outcome.result {
        Ok(_) => true,
        Err(e) => matches!(
            e,
            TaskError::InvalidInput(_)
                | TaskError::Failed(_)
                | TaskError::FuelExhausted { .. }
                | TaskError::MemoryLimit { .. }
                | TaskError::TableLimit { .. }
                | TaskError::PayloadTooLarge { .. }
                | TaskError::ResultTooLarge { .. }
                | TaskError::ResultTooLargeToRead { .. }
                | TaskError::HostCallDataLimit { .. }
        ),
    }
}

pub fn payload_hash(payload: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(payload))
}

impl CallRecord {
    pub fn of(
        capability: &str,
        payload_sha256: String,
        outcome: &Outcome,
        at_ms: u64,
    ) -> CallRecord {
        let (result_base64, error, subtasks, subtask_fuel) = match &outcome.result {
            Ok(out) => (
                Some(base64::engine::general_purpose::STANDARD.encode(&out.result)),
                None,
                out.subtasks,
                out.subtask_fuel,
            ),
            Err(e) => (None, Some(e.clone()), 0, 0),
        };
        CallRecord {
            capability: capability.to_string(),
            payload_sha256,
            result_base64,
            error,
            fuel_used: outcome.fuel_used,
            subtasks,
            subtask_fuel,
            at_ms,
        }
    }

    /// The outcome the caller gets again.
    pub fn outcome(&self) -> Outcome {
        let result = match (&self.error, &self.result_base64) {
            (Some(e), _) => Err(e.clone()),
            (None, b64) => Ok(TaskOutput {
                result: b64
                    .as_deref()
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .unwrap_or_default(),
                fuel_used: self.fuel_used,
                subtasks: self.subtasks,
                subtask_fuel: self.subtask_fuel,
                ..TaskOutput::default()
            }),
        };
        Outcome {
            result,
            fuel_used: self.fuel_used,
            memory: 0,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_record_gives_back_the_outcome_it_was_made_from() {
        let ok = Outcome {
            result: Ok(TaskOutput {
                result: b"{\"words\":2}".to_vec(),
                fuel_used: 10,
                ..TaskOutput::default()
            }),
            fuel_used: 10,
            memory: 0,
        };
        let r = CallRecord::of("text.wordcount", payload_hash(b"a b"), &ok, 1);
        let again = r.outcome();
        assert_eq!(again.result.unwrap().result, b"{\"words\":2}");
        assert_eq!(again.fuel_used, 10);
        let failed = Outcome::failed(TaskError::Failed("no".into()));
        let r = CallRecord::of("x", payload_hash(b""), &failed, 1);
        assert_eq!(
            r.outcome().result.unwrap_err(),
            TaskError::Failed("no".into())
        );
    }
}
