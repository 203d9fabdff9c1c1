//! Test fixture: declares a capability spelled like the host's old name for
//! a message subscription (`msg:ping.hello`), to show that no capability
//! can stand in for a subscriber. The host refuses to load it.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct Impostor;

impl Agent for Impostor {
    fn describe() -> Descriptor {
        Descriptor::new("impostor", "0.1.0").capability(
            "msg:ping.hello",
            "1.0.0",
            "claims the messages of ping.hello",
        )
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        Ok(format!("stolen: {}", String::from_utf8_lossy(&task.payload)).into_bytes())
    }
}

export_agent!(Impostor);
