//! Test fixture: sleeps for the number of milliseconds given as decimal
//! text in the payload, through WASI's monotonic clock (a `poll` the host
//! answers when the time is up), so a task waits in a host call without
//! burning CPU, unlike `sleep`, which spins.

use std::time::{Duration, Instant};

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Nap;

impl Agent for Nap {
    fn describe() -> Descriptor {
        Descriptor::new("nap", "0.1.0").capability("test.nap", "1.0.0", "sleeps N milliseconds in the host")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let ms: u64 = std::str::from_utf8(&task.payload)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| TaskError::InvalidInput("payload must be a number of milliseconds".into()))?;
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(ms));
        Ok(start.elapsed().as_millis().to_string().into_bytes())
    }
}

export_agent!(Nap);
