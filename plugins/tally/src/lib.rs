//! Test fixture for `[limits] reuse`: keeps state in its instance, which a
//! fresh instance per task would never show. Every task counts itself and
//! answers with how many tasks this instance has served, after doing what
//! its payload says:
//! - `count`: nothing more;
//! - `leak N`: keeps N more MiB for the instance's life;
//! - `probe N`: asks for N MiB it can do without (a fallible allocation,
//!   freed at once), and ends well whether it got them or not;
//! - `trap`: panics;
//! - `fail`: returns an error;
//! - `spin`: loops until fuel or the deadline stops it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

const MIB: usize = 1 << 20;

static SERVED: AtomicU32 = AtomicU32::new(0);
static KEPT: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

struct Tally;

impl Agent for Tally {
    fn describe() -> Descriptor {
        Descriptor::new("tally", "0.1.0").capability(
            "test.tally",
            "1.0.0",
            "counts the tasks its instance has served",
        )
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let served = SERVED.fetch_add(1, Ordering::Relaxed) + 1;
        let text = String::from_utf8_lossy(&task.payload);
        let mut words = text.split_whitespace();
        match words.next() {
            Some("count") | None => {}
            Some("leak") => {
                let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(1);
                let mut kept = KEPT.lock().map_err(|_| TaskError::Failed("poisoned".into()))?;
                for _ in 0..n {
                    let mut block = vec![0u8; MIB];
                    block[MIB - 1] = 1;
                    kept.push(std::hint::black_box(block));
                }
            }
            Some("probe") => {
                let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(1);
                let mut block: Vec<u8> = Vec::new();
                let got = block.try_reserve_exact(n * MIB).is_ok();
                std::hint::black_box(&block);
                return Ok(format!("{served} {}", if got { "got" } else { "refused" }).into_bytes());
            }
            Some("trap") => panic!("told to trap on task {served}"),
            Some("fail") => return Err(TaskError::Failed(format!("told to fail on task {served}"))),
            Some("spin") => loop {
                std::hint::black_box(served);
            },
            Some(other) => return Err(TaskError::InvalidInput(format!("unknown command {other:?}"))),
        }
        Ok(served.to_string().into_bytes())
    }
}

export_agent!(Tally);
