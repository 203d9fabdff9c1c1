//! Test fixture: loops forever, so only fuel or the deadline can stop it.
//! A payload of "describe" is not special; `describe` itself returns normally.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Spin;

impl Agent for Spin {
    fn describe() -> Descriptor {
        Descriptor::new("spin", "0.1.0").capability("test.spin", "1.0.0", "never returns")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        // The payload length feeds the loop so the optimiser cannot prove it
        // has no effect and remove it.
        let mut x = task.payload.len() as u64;
        loop {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }
}

export_agent!(Spin);
