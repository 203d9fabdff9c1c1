//! Counts words, lines and bytes of UTF-8 text, like `wc`.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct WordCount;

impl Agent for WordCount {
    fn describe() -> Descriptor {
        Descriptor::new("wordcount", "0.1.0").capability(
            "text.wordcount",
            "1.0.0",
            "counts words, lines and bytes of UTF-8 text; returns JSON {\"words\":N,\"lines\":N,\"bytes\":N}",
        )
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let text = std::str::from_utf8(&task.payload).map_err(|e| {
            TaskError::InvalidInput(format!("payload is not UTF-8: {e}"))
        })?;
        // Lines are counted as newline characters, as `wc -l` does, so the
        // count agrees with the tool most users check against.
        let words = text.split_whitespace().count();
        let lines = text.bytes().filter(|&b| b == b'\n').count();
        let bytes = text.len();
        Ok(format!("{{\"words\":{words},\"lines\":{lines},\"bytes\":{bytes}}}").into_bytes())
    }
}

export_agent!(WordCount);
