//! Test fixture: busy-waits on the wall clock for the number of milliseconds
//! given as decimal text in the payload, then returns the elapsed time. It
//! burns CPU instead of blocking, so it tests the host's deadline rather than
//! a host call.

use std::time::{Duration, Instant};

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Sleep;

impl Agent for Sleep {
    fn describe() -> Descriptor {
        Descriptor::new("sleep", "0.1.0").capability("test.sleep", "1.0.0", "busy-waits for N milliseconds")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let ms: u64 = std::str::from_utf8(&task.payload)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| TaskError::InvalidInput("payload must be a number of milliseconds".into()))?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(ms) {
            std::hint::spin_loop();
        }
        Ok(start.elapsed().as_millis().to_string().into_bytes())
    }
}

export_agent!(Sleep);
