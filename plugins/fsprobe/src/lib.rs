//! Test fixture: tries filesystem and environment access on command, to
//! test what the host's grants allow. The payload is one of
//! `read PATH`, `write PATH DATA`, `list PATH`, `env NAME`, `envall`;
//! a refused operation returns `failed` with the OS error text.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

struct FsProbe;

fn failed(e: impl std::fmt::Display) -> TaskError {
    TaskError::Failed(e.to_string())
}

impl Agent for FsProbe {
    fn describe() -> Descriptor {
        Descriptor::new("fsprobe", "0.1.0").capability("test.fs", "1.0.0", "tries filesystem and environment access")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let text = String::from_utf8(task.payload).map_err(|_| TaskError::InvalidInput("not UTF-8".into()))?;
        let mut parts = text.splitn(3, ' ');
        let command = parts.next().unwrap_or_default();
        let arg = parts.next().unwrap_or_default();
        match command {
            "read" => std::fs::read(arg).map_err(failed),
            "write" => std::fs::write(arg, parts.next().unwrap_or_default())
                .map(|_| b"ok".to_vec())
                .map_err(failed),
            "list" => {
                let mut names: Vec<String> = std::fs::read_dir(arg)
                    .map_err(failed)?
                    .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect();
                names.sort();
                Ok(names.join("\n").into_bytes())
            }
            "env" => std::env::var(arg).map(String::into_bytes).map_err(failed),
            "envall" => {
                let mut names: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                names.sort();
                Ok(names.join("\n").into_bytes())
            }
            other => Err(TaskError::InvalidInput(format!("unknown command {other:?}"))),
        }
    }
}

export_agent!(FsProbe);
