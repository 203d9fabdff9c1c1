//! Bench fixture: a fixed amount of CPU work and nothing else. The payload
//! is a decimal round count; each round is one step of a linear
//! congruential generator, and the result is the last value, so the work
//! cannot be optimised away. The `overhead` bench calibrates the count to
//! about 1 ms of CPU.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Burn;

impl Agent for Burn {
    fn describe() -> Descriptor {
        Descriptor::new("burn", "0.1.0").capability("test.burn", "1.0.0", "does N rounds of CPU work")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let rounds: u64 = std::str::from_utf8(&task.payload)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| TaskError::InvalidInput("payload must be a round count".into()))?;
        let mut x: u64 = rounds;
        for _ in 0..rounds {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
        }
        Ok(x.to_string().into_bytes())
    }
}

export_agent!(Burn);
