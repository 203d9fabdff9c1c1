//! Coordination overhead on 1 ms tasks: the `burn` fixture (a fixed amount
//! of CPU work, calibrated here to about 1 ms in bare wasmtime) run
//! 2,000 times through a running `orch host start` process over its HTTP
//! API, against the same 2,000 tasks in a bare wasmtime loop in the same
//! run (fresh instance per task, fuel and epoch metering on, two threads:
//! one per core). The host's side is measured two ways:
//! - `POST /v1/tasks?wait=` from 16 client threads, each waiting for its
//!   result (what a client without batching does);
//! - one `POST /v1/tasks:batch?wait=` of all 2,000, whose results stream
//!   back as they end.
//!
//! Reported per round: wall time against the bare loop's, and CPU per task
//! of the host process, of this process (the HTTP clients) and of both,
//! against the bare loop's CPU per task. Rounds alternate the three, and
//! the figures are min/median/max over the rounds.
//!
//! ```sh
//! bash plugins/build.sh && cargo build --release -p orch-cli
//! cargo bench -p orch-benches --bench overhead   # ORCH_BENCH_ROUNDS=N (default 5)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use orch::engine::bindings::{self, orch::agent as wit};
use orch_benches::nats::cpu_time;
use orch_benches::{plugin, Bare, HostProc};
use wasmtime::PoolingAllocationConfig;

const TASKS: usize = 2_000;
const CLIENTS: usize = 16;

/// Installs burn into `home` and starts a lone host on it; returns the
/// process and its API address once it prints it.
fn start_host(home: &Path) -> (HostProc, String) {
    HostProc::start(home, &[plugin("burn")], &[])
}

/// Bare wasmtime with orch's metering (fuel, epochs) and a pool, and the
/// pre-linked burn component.
fn bare_burn() -> (wasmtime::Engine, bindings::AgentPre<Bare>) {
    let mut pool = PoolingAllocationConfig::default();
    pool.decommit_batch_size(orch::engine::DECOMMIT_BATCH);
    orch_benches::bare_pooled("burn", true, pool, wasmtime::Config::new())
}

/// `n` fresh-instance burn tasks, one after the other.
fn bare_tasks(engine: &wasmtime::Engine, pre: &bindings::AgentPre<Bare>, rounds: u64, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let task = wit::types::Task {
        id: "bench".into(),
        capability: "test.burn".into(),
        payload: rounds.to_string().into_bytes(),
        content_type: String::new(),
        attempt: 1,
        deadline_ms: None,
    };
    rt.block_on(async {
        for _ in 0..n {
            let mut store = wasmtime::Store::new(engine, Bare);
            store.set_fuel(u64::MAX / 2).unwrap();
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = pre.instantiate_async(&mut store).await.unwrap();
            instance
                .call_handle(&mut store, &task)
                .await
                .unwrap()
                .unwrap();
        }
    })
}

/// What one way of running the 2,000 tasks took.
struct Run {
    wall: Duration,
    /// CPU of the host process (zero for the bare loop).
    host: Duration,
    /// CPU of this process: the HTTP clients, or the bare loop.
    here: Duration,
}

fn measure(host_pid: Option<u32>, f: impl FnOnce()) -> Run {
    let me = std::process::id();
    let (host0, here0) = (host_pid.map(cpu_time).unwrap_or_default(), cpu_time(me));
    let started = Instant::now();
    f();
    let wall = started.elapsed();
    Run {
        wall,
        host: host_pid.map(cpu_time).unwrap_or_default() - host0,
        here: cpu_time(me) - here0,
    }
}

fn main() {
    let rounds: usize = std::env::var("ORCH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let (engine, pre) = bare_burn();
    // Calibrate: the round count that takes about 1 ms in a bare task.
    let probe = 200_000u64;
    bare_tasks(&engine, &pre, probe, 20);
    let started = Instant::now();
    bare_tasks(&engine, &pre, probe, 200);
    let per_task = started.elapsed().as_secs_f64() / 200.0;
    let burn = ((probe as f64) * 0.001 / per_task) as u64;
    println!(
        "burn: {burn} rounds a task (about 1 ms bare; {:.0} µs for {probe})",
        per_task * 1e6
    );

    let home = tempfile::tempdir().unwrap();
    let (host, url) = start_host(home.path());
    let pid = host.0.id();
    let input = burn.to_string();
    let body = serde_json::json!({ "capability": "test.burn", "input": input }).to_string();
    let batch = vec![body.as_str(); TASKS].join("\n");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let submit_url = format!("{url}/v1/tasks?wait=60s");
    let batch_url = format!("{url}/v1/tasks:batch?wait=120s");

    let bare = || {
        measure(None, || {
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| bare_tasks(&engine, &pre, burn, TASKS / 2));
                }
            })
        })
    };
    let clients = || {
        measure(Some(pid), || {
            std::thread::scope(|s| {
                for _ in 0..CLIENTS {
                    s.spawn(|| {
                        let agent: ureq::Agent = ureq::Agent::config_builder()
                            .timeout_global(Some(Duration::from_secs(120)))
                            .build()
                            .into();
                        for _ in 0..TASKS / CLIENTS {
                            let text = agent
                                .post(&submit_url)
                                .header("content-type", "application/json")
                                .send(body.as_str())
                                .unwrap()
                                .body_mut()
                                .read_to_string()
                                .unwrap();
                            assert!(text.contains(r#""status":"completed""#), "{text}");
                        }
                    });
                }
            })
        })
    };
    let batched = || {
        measure(Some(pid), || {
            let text = agent
                .post(&batch_url)
                .header("content-type", "application/x-ndjson")
                .send(batch.as_str())
                .unwrap()
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
                .unwrap();
            assert_eq!(text.matches(r#""status":"completed""#).count(), TASKS);
        })
    };
    // Warm-up: the host's first tasks, the bare pool.
    let _ = (bare(), batched());

    let mut runs: Vec<[Run; 3]> = Vec::new();
    for round in 0..rounds {
        runs.push([bare(), clients(), batched()]);
        eprintln!("round {} of {rounds} done", round + 1);
    }
    let per_task = |d: Duration| d.as_secs_f64() * 1e6 / TASKS as f64;
    let stats = |name: &str, unit: &str, mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        println!(
            "{name:<52} {:>8.1} {:>8.1} {:>8.1} {unit}",
            v[0],
            v[v.len() / 2],
            v[v.len() - 1]
        );
    };
    println!("{TASKS} tasks of ~1 ms CPU, {rounds} rounds: min / median / max");
    stats(
        "bare wasmtime, 2 threads: wall per task",
        "µs",
        runs.iter().map(|r| per_task(r[0].wall)).collect(),
    );
    stats(
        "bare wasmtime: CPU per task",
        "µs",
        runs.iter().map(|r| per_task(r[0].here)).collect(),
    );
    for (i, name) in [
        (1, "HTTP, 16 clients, submit+wait"),
        (2, "HTTP, one batch, streamed"),
    ] {
        stats(
            &format!("{name}: wall over bare"),
            "%",
            runs.iter()
                .map(|r| (r[i].wall.as_secs_f64() / r[0].wall.as_secs_f64() - 1.0) * 100.0)
                .collect(),
        );
        stats(
            &format!("{name}: host CPU per task"),
            "µs",
            runs.iter().map(|r| per_task(r[i].host)).collect(),
        );
        stats(
            &format!("{name}: client CPU per task"),
            "µs",
            runs.iter().map(|r| per_task(r[i].here)).collect(),
        );
        stats(
            &format!("{name}: all CPU per task over bare"),
            "µs",
            runs.iter()
                .map(|r| per_task(r[i].host + r[i].here) - per_task(r[0].here))
                .collect(),
        );
    }
    drop(host);
}
