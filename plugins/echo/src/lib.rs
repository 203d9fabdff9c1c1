//! Returns the payload unchanged.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Echo;

impl Agent for Echo {
    fn describe() -> Descriptor {
        Descriptor::new("echo", "0.1.0").capability("echo", "1.0.0", "returns the payload unchanged")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        Ok(task.payload)
    }
}

export_agent!(Echo);
