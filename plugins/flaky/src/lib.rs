//! Test fixture for retries and circuit breakers. Payloads:
//! - `ok`: succeeds;
//! - `fail`: a `retryable` error every time;
//! - `recover KEY N`: a `retryable` error on the first N calls for KEY (counted
//!   in kv, so across instances), then success with the call number.

use orch_sdk::{export_agent, kv, Agent, Descriptor, Task, TaskError};

struct Flaky;

impl Agent for Flaky {
    fn describe() -> Descriptor {
        Descriptor::new("flaky", "0.1.0").capability("test.flaky", "1.0.0", "fails on demand")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let text = String::from_utf8_lossy(&task.payload).into_owned();
        let parts: Vec<&str> = text.split_whitespace().collect();
        match parts.as_slice() {
            ["ok"] => Ok(b"ok".to_vec()),
            ["fail"] => Err(TaskError::Retryable("asked to fail".into())),
            ["recover", key, n] => {
                let failures: u64 = n.parse().map_err(|_| TaskError::InvalidInput("N must be a number".into()))?;
                let call = kv::get_u64(key).unwrap_or(0) + 1;
                kv::set_u64(key, call).map_err(TaskError::Retryable)?;
                if call <= failures {
                    Err(TaskError::Retryable(format!("call {call} of {key} fails")))
                } else {
                    Ok(call.to_string().into_bytes())
                }
            }
            _ => Err(TaskError::InvalidInput(format!("unknown payload {text:?}"))),
        }
    }
}

export_agent!(Flaky);
