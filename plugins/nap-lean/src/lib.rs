//! Test fixture: `nap` with a smaller footprint. It sleeps for the number
//! of milliseconds given as decimal text in the payload by blocking on a
//! `wasi:clocks/monotonic-clock` pollable, a host call that waits without
//! burning CPU. Unlike `nap` it calls WASI's component interfaces directly
//! instead of through std and the preview-1 adapter, so a waiting instance
//! has one linear memory and one core instance of guest code: the density
//! bench uses both to show what the guest's side of a waiting task costs.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};
use wasip2::clocks::monotonic_clock;

struct NapLean;

impl Agent for NapLean {
    fn describe() -> Descriptor {
        Descriptor::new("nap-lean", "0.1.0").capability(
            "test.nap-lean",
            "1.0.0",
            "sleeps N milliseconds in the host, without the WASI adapter",
        )
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let ms: u64 = std::str::from_utf8(&task.payload)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| TaskError::InvalidInput("payload must be a number of milliseconds".into()))?;
        let start = monotonic_clock::now();
        monotonic_clock::subscribe_duration(ms.saturating_mul(1_000_000)).block();
        let slept = monotonic_clock::now().saturating_sub(start) / 1_000_000;
        Ok(slept.to_string().into_bytes())
    }
}

export_agent!(NapLean);
