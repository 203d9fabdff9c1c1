//! Increments a counter in the agent's key-value store on every task and
//! returns the new value as decimal text. Shows that kv outlives instances.

use orch_sdk::{export_agent, kv, log, Agent, Descriptor, Task, TaskError};

const KEY: &str = "count";

struct Counter;

impl Agent for Counter {
    fn describe() -> Descriptor {
        Descriptor::new("counter", env!("CARGO_PKG_VERSION")).capability(
            "counter",
            "1.0.0",
            "increments a stored counter and returns the new value",
        )
    }

    fn handle(_task: Task) -> Result<Vec<u8>, TaskError> {
        let next = kv::get_u64(KEY).unwrap_or(0) + 1;
        kv::set_u64(KEY, next).map_err(TaskError::Retryable)?;
        log::debug(&format!("counter is now {next}"));
        Ok(next.to_string().into_bytes())
    }
}

export_agent!(Counter);
