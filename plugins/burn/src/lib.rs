//! Bench fixture: a fixed amount of CPU work and nothing else. The payload
//! is a decimal round count; each round is one step of a linear
//! congruential generator, and the result is the last value, so the work
//! cannot be optimised away. The `overhead` bench calibrates the count to
//! about 1 ms of CPU. An optional second number pads the result with
//! spaces to that many bytes (a test's large result).

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Burn;

impl Agent for Burn {
    fn describe() -> Descriptor {
        Descriptor::new("burn", "0.1.0").capability("test.burn", "1.0.0", "does N rounds of CPU work")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let invalid = || TaskError::InvalidInput("payload must be `ROUNDS [BYTES]`".into());
        let text = std::str::from_utf8(&task.payload).map_err(|_| invalid())?;
        let mut numbers = text.split_whitespace().map(str::parse::<u64>);
        let rounds = numbers.next().and_then(Result::ok).ok_or_else(invalid)?;
        let pad = match numbers.next() {
            Some(n) => n.map_err(|_| invalid())?,
            None => 0,
        };
        let mut x: u64 = rounds;
        for _ in 0..rounds {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407));
        }
        let mut result = x.to_string().into_bytes();
        let pad = usize::try_from(pad).map_err(|_| invalid())?;
        if result.len() < pad {
            result.resize(pad, b' ');
        }
        Ok(result)
    }
}

export_agent!(Burn);
