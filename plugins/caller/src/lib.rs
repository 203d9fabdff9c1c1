//! Test fixture for `tasks.call`.
//! - `test.call`: payload `CAPABILITY [TIMEOUT_MS]\nPAYLOAD`; calls it once
//!   and returns the callee's result, or `call-error KIND: MESSAGE` when the
//!   call failed (KIND as in `CallError::kind`).
//! - `test.recurse`: payload `N`; calls itself with `N-1` until 0 and returns
//!   `N`, so `N` is the depth the chain reaches.
//! - `test.fanout`: payload `N`; calls `echo` N times at once with `call-all`
//!   and returns how many answered.
//! - `test.tree`: payload `W D`; with D > 0 calls itself W times at once
//!   with `W D-1` (`call-all`); at D = 0 it spins until its deadline. Every
//!   call tree it makes ends on a deadline: a stress case for slot
//!   accounting.

use orch_sdk::{export_agent, tasks, Agent, Descriptor, Task, TaskError};

struct Caller;

impl Agent for Caller {
    fn describe() -> Descriptor {
        Descriptor::new("caller", "0.1.0")
            .capability("test.call", "1.0.0", "calls another capability once")
            .capability("test.recurse", "1.0.0", "calls itself N times deep")
            .capability("test.fanout", "1.0.0", "calls echo N times at once")
            .capability("test.tree", "1.0.0", "calls itself W wide and D deep, then spins")
    }

    fn handle(task: Task) -> Result<Vec<u8>, TaskError> {
        let text = String::from_utf8_lossy(&task.payload).into_owned();
        match task.capability.as_str() {
            "test.call" => {
                let (head, payload) = text.split_once('\n').unwrap_or((text.as_str(), ""));
                let (capability, timeout) = match head.split_once(' ') {
                    Some((c, ms)) => (
                        c,
                        ms.trim().parse().ok().map(std::time::Duration::from_millis),
                    ),
                    None => (head, None),
                };
                match tasks::call(capability, payload.as_bytes(), timeout) {
                    Ok(result) => Ok(result),
                    Err(e) => Ok(format!("call-error {}", e.text()).into_bytes()),
                }
            }
            "test.recurse" => {
                let n: u32 = text
                    .trim()
                    .parse()
                    .map_err(|_| TaskError::InvalidInput(format!("{text:?} is not a number")))?;
                if n == 0 {
                    return Ok(b"0".to_vec());
                }
                let below = tasks::call("test.recurse", (n - 1).to_string().as_bytes(), None)
                    .map_err(|e| TaskError::Failed(format!("at depth {n}: {}", e.text())))?;
                let below: u32 = String::from_utf8_lossy(&below).parse().unwrap_or(0);
                Ok((below + 1).to_string().into_bytes())
            }
            "test.fanout" => {
                let n: usize = text
                    .trim()
                    .parse()
                    .map_err(|_| TaskError::InvalidInput(format!("{text:?} is not a number")))?;
                let requests: Vec<_> = (0..n)
                    .map(|i| tasks::request("echo", i.to_string().as_bytes(), None))
                    .collect();
                let results = tasks::call_all(&requests);
                let mut answered = 0;
                for result in results {
                    match result {
                        Ok(_) => answered += 1,
                        Err(e) => return Err(TaskError::Failed(e.text())),
                    }
                }
                Ok(answered.to_string().into_bytes())
            }
            "test.tree" => {
                let mut numbers = text.split_whitespace().map(|n| n.parse::<u32>());
                let (Some(Ok(width)), Some(Ok(depth))) = (numbers.next(), numbers.next()) else {
                    return Err(TaskError::InvalidInput(format!("{text:?} is not `W D`")));
                };
                if depth == 0 {
                    let mut x = width as u64;
                    loop {
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                }
                let payload = format!("{width} {}", depth - 1);
                let requests: Vec<_> = (0..width)
                    .map(|_| tasks::request("test.tree", payload.as_bytes(), None))
                    .collect();
                let done = tasks::call_all(&requests).iter().filter(|r| r.is_ok()).count();
                Ok(done.to_string().into_bytes())
            }
            other => Err(TaskError::InvalidInput(format!(
                "unknown capability {other}"
            ))),
        }
    }
}

export_agent!(Caller);
