//! Test fixture: direct access to the kv import. The payload is a command:
//! `get KEY`, `set KEY VALUE` (VALUE is the rest of the payload, any bytes),
//! `fill KEY N` (stores N bytes of `x`), or `delete KEY`. `get` returns the
//! value or an `invalid-input` error when missing; the others return `ok`.

use orch_sdk::{export_agent, kv, Agent, Descriptor, Task, TaskError};

struct KvTool;

impl Agent for KvTool {
    fn describe() -> Descriptor {
        Descriptor::new("kvtool", "0.1.0").capability("test.kv", "1.0.0", "reads and writes kv entries on command")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let payload = task.payload;
        let mut parts = payload.splitn(3, |&b| b == b' ');
        let command = parts.next().unwrap_or_default();
        let key = parts
            .next()
            .and_then(|k| std::str::from_utf8(k).ok())
            .ok_or_else(|| TaskError::InvalidInput("expected: COMMAND KEY [VALUE]".into()))?;
        let rest = parts.next().unwrap_or_default();
        let ok = || Ok(b"ok".to_vec());
        match command {
            b"get" => kv::get(key).ok_or_else(|| TaskError::InvalidInput(format!("no value for {key}"))),
            b"set" => kv::set(key, rest).map_err(TaskError::Failed).and_then(|_| ok()),
            b"fill" => {
                let n: usize = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| TaskError::InvalidInput("fill needs a byte count".into()))?;
                kv::set(key, &vec![b'x'; n]).map_err(TaskError::Failed).and_then(|_| ok())
            }
            b"delete" => kv::delete(key).map_err(TaskError::Failed).and_then(|_| ok()),
            other => Err(TaskError::InvalidInput(format!(
                "unknown command {:?}",
                String::from_utf8_lossy(other)
            ))),
        }
    }
}

export_agent!(KvTool);
