//! Test fixture: allocates memory 1 MiB at a time. With a payload of decimal
//! text N it stops after N MiB and returns how many it got; with any other
//! payload it keeps going until allocation fails.

use orch_sdk::{export_agent, Agent, Descriptor, Task, TaskError};

const MIB: usize = 1 << 20;

struct Hog;

impl Agent for Hog {
    fn describe() -> Descriptor {
        Descriptor::new("hog", "0.1.0").capability("test.hog", "1.0.0", "allocates memory until told to stop or it fails")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let limit = std::str::from_utf8(&task.payload)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(usize::MAX);
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        while blocks.len() < limit {
            // An infallible allocation: past the host's memory cap the
            // allocator fails and Rust aborts, which the host reports as a
            // memory limit error.
            let mut block = vec![0u8; MIB];
            // Touch the block so the allocation is real.
            block[MIB - 1] = 1;
            blocks.push(std::hint::black_box(block));
        }
        Ok(blocks.len().to_string().into_bytes())
    }
}

export_agent!(Hog);
