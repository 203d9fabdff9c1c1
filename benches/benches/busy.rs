//! How long the HTTP API of a running `orch host start` takes to answer
//! while guests spin on every worker thread of its runtime. The host runs
//! the `sleep` fixture (it busy-waits on the clock, so it never waits in a
//! host call), as many tasks at once as the machine has cores, and a
//! client times `GET /v1/status` one request at a time meanwhile. The
//! baseline in the same run is the same request on the idle host.
//!
//! A running guest gives its worker back to the runtime at every epoch
//! tick (10 ms); what this measures is whether the runtime then serves the
//! host's own I/O (HTTP, NATS) or goes back to the guest.
//!
//! `cargo build --release -p orch-cli && cargo bench -p orch-benches --bench
//! busy` after `bash plugins/build.sh`; `ORCH_BENCH_ROUNDS=N` (default 3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use orch_benches::{plugin, HostProc};

const GETS: usize = 100;
/// Within the fuel a manifest may ask for (10^10; the spin costs about
/// 2.3 million a millisecond). Requests stop at 2.5 s, while the tasks run.
const TASK_MS: u64 = 3_500;
const BUSY_FOR: Duration = Duration::from_millis(2_500);

fn start_host(home: &Path) -> (HostProc, String) {
    let dir = home.join("sleep");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(plugin("sleep"), dir.join("sleep.wasm")).unwrap();
    std::fs::write(
        dir.join("sleep.toml"),
        "[plugin]\nname = \"sleep\"\nversion = \"0.1.0\"\ncapabilities = [\"test.sleep\"]\n[limits]\nfuel = 10000000000\ntimeout = \"60s\"\n",
    )
    .unwrap();
    HostProc::start(home, &[dir.join("sleep.wasm")], &[])
}

/// Up to GETS status requests one after another, until `until`: p50, p99,
/// max, and how many.
fn statuses(agent: &ureq::Agent, url: &str, until: Instant) -> ([Duration; 3], usize) {
    let mut lat: Vec<Duration> = (0..GETS)
        .map_while(|_| {
            let t = Instant::now();
            if t >= until {
                return None;
            }
            agent
                .get(&format!("{url}/v1/status"))
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap();
            Some(t.elapsed())
        })
        .collect();
    lat.sort();
    let n = lat.len();
    ([lat[n / 2], lat[n * 99 / 100], lat[n - 1]], n)
}

fn main() {
    let rounds: usize = std::env::var("ORCH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let home = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(home.path());
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let show = |what: &str, ([p50, p99, max], n): ([Duration; 3], usize)| {
        println!("{what}: p50 {p50:.1?}, p99 {p99:.1?}, max {max:.1?} ({n} requests)");
    };
    for round in 1..=rounds {
        let far = Instant::now() + Duration::from_secs(60);
        show(
            &format!("round {round}, idle host"),
            statuses(&agent, &url, far),
        );
        let ids: Vec<String> = (0..cores)
            .map(|_| {
                let body =
                    serde_json::json!({ "capability": "test.sleep", "input": TASK_MS.to_string() });
                let mut r = agent
                    .post(&format!("{url}/v1/tasks"))
                    .header("content-type", "application/json")
                    .send(body.to_string().as_str())
                    .unwrap();
                let v: serde_json::Value =
                    serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
                v["id"].as_str().unwrap().to_string()
            })
            .collect();
        let busy = statuses(&agent, &url, Instant::now() + BUSY_FOR);
        show(&format!("round {round}, {cores} guests spinning"), busy);
        for id in ids {
            agent
                .get(&format!("{url}/v1/tasks/{id}?wait=60s"))
                .call()
                .unwrap();
        }
    }
}
