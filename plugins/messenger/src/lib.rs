//! Test fixture for `messaging`.
//! - `test.request`: payload `SUBJECT\nPAYLOAD`; sends a request and returns
//!   the reply, or `error: MESSAGE` when the request failed.
//! - `test.publish`: the same with `publish`; returns `sent` or `error: ...`.
//! - a message on a subscribed subject: answers `pong: PAYLOAD`, or fails
//!   when the payload is `fail`.

use orch_sdk::{export_agent, messaging, Agent, Descriptor, Task, TaskError};

struct Messenger;

impl Agent for Messenger {
    fn describe() -> Descriptor {
        Descriptor::new("messenger", "0.1.0")
            .capability("test.request", "1.0.0", "sends a request")
            .capability("test.publish", "1.0.0", "publishes a message")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let text = String::from_utf8_lossy(&task.payload).into_owned();
        if task.content_type == messaging::MESSAGE_CONTENT_TYPE {
            if text == "fail" {
                return Err(TaskError::Failed(format!("refused {} on {}", text, task.capability)));
            }
            return Ok(format!("pong: {text}").into_bytes());
        }
        let (subject, payload) = text.split_once('\n').unwrap_or((text.as_str(), ""));
        let answer = match task.capability.as_str() {
            "test.request" => messaging::request(subject, payload.as_bytes(), std::time::Duration::from_secs(5))
                .map(|reply| String::from_utf8_lossy(&reply).into_owned()),
            _ => messaging::publish(subject, payload.as_bytes()).map(|()| "sent".to_string()),
        };
        Ok(answer.unwrap_or_else(|e| format!("error: {e}")).into_bytes())
    }
}

export_agent!(Messenger);
