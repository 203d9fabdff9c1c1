//! Test fixture: panics with a message that includes the payload.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Panic;

impl Agent for Panic {
    fn describe() -> Descriptor {
        Descriptor::new("panic", "0.1.0").capability("test.panic", "1.0.0", "panics with a message")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        panic!("agent gave up: {}", String::from_utf8_lossy(&task.payload));
    }
}

export_agent!(Panic);
