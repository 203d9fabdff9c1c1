//! `echo` tasks through the host daemon's HTTP API: `POST /v1/tasks?wait=`
//! from 16 client threads, each waiting for its result, so every task pays
//! for HTTP, the journal's fsynced accept and result writes, the scheduler
//! and the sandbox. Baselines in the same run: a bare wasmtime
//! instantiate + call loop on two threads, and `GET /v1/status` over the
//! same HTTP stack (no task, no disk). Also the same tasks as one
//! `POST /v1/tasks:batch?wait=` whose results stream back. Prints p50/p99
//! submit-to-result latency of the HTTP path.
//!
//! `cargo bench -p orch-benches --bench daemon` after `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use orch::config::HostConfig;
use orch::daemon::Host;
use orch::kv::KvStore;
use orch::plugin::store::Mode;
use orch::plugin::PluginStore;
use orch::{Engine, EngineConfig};
use orch_benches::{bare_echo, bare_echo_calls, plugin};

const CLIENTS: usize = 16;
const PER_CLIENT: usize = 100;
const BATCH: u64 = (CLIENTS * PER_CLIENT) as u64;

fn client() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Runs `f` PER_CLIENT times on each of CLIENTS threads; returns the
/// latency of every call.
fn load(f: impl Fn(&ureq::Agent) + Sync) -> Vec<Duration> {
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                s.spawn(|| {
                    let agent = client();
                    (0..PER_CLIENT)
                        .map(|_| {
                            let t = Instant::now();
                            f(&agent);
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

fn submit(agent: &ureq::Agent, url: &str) {
    let mut r = agent
        .post(url)
        .header("content-type", "application/json")
        .send(r#"{"capability":"echo","input":"hello, orch"}"#)
        .unwrap();
    let body = r.body_mut().read_to_string().unwrap();
    assert!(body.contains(r#""status":"completed""#), "{body}");
}

fn daemon(c: &mut Criterion) {
    let rt = orch_benches::runtime();
    let home = tempfile::tempdir().unwrap();
    let config = HostConfig::default();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let (base, host) = rt.block_on(async {
        let kv = Arc::new(KvStore::new(home.path().join("kv.redb")));
        let checked = orch::plugin::check(&engine, kv, &config, &plugin("echo"), None)
            .await
            .unwrap();
        PluginStore::new(home.path())
            .commit(&checked, Mode::Install)
            .unwrap();
        let host = Host::start(home.path(), config.clone(), engine.clone())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = orch::api::ApiState::local(host.clone());
        tokio::spawn(orch::api::serve(
            state,
            listener,
            16 << 20,
            std::future::pending(),
        ));
        (base, host)
    });
    let tasks_url = format!("{base}/v1/tasks?wait=30s");
    let status_url = format!("{base}/v1/status");
    let (bare_engine, bare) = bare_echo(false);

    let mut group = c.benchmark_group("daemon_echo_throughput");
    group
        .throughput(Throughput::Elements(BATCH))
        .sample_size(10);
    group.bench_function("bare_wasmtime_2_threads", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                std::thread::scope(|s| {
                    for _ in 0..2 {
                        s.spawn(|| rt.block_on(bare_echo_calls(&bare_engine, &bare, BATCH / 2)));
                    }
                });
            }
            started.elapsed()
        })
    });
    group.bench_function("http_status_no_task", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                load(|agent| {
                    agent.get(&status_url).call().unwrap();
                });
            }
            started.elapsed()
        })
    });
    // The same 1,600 tasks as one `POST /v1/tasks:batch?wait=` from one
    // client: each result streams back as its task ends.
    let batch_url = format!("{base}/v1/tasks:batch?wait=30s");
    let batch_body =
        vec![r#"{"capability":"echo","input":"hello, orch"}"#; BATCH as usize].join("\n");
    group.bench_function("http_batch_wait", |b| {
        b.iter_custom(|iters| {
            let agent = client();
            let started = Instant::now();
            for _ in 0..iters {
                let mut r = agent
                    .post(&batch_url)
                    .header("content-type", "application/x-ndjson")
                    .send(&batch_body)
                    .unwrap();
                let body = r
                    .body_mut()
                    .with_config()
                    .limit(64 << 20)
                    .read_to_string()
                    .unwrap();
                assert_eq!(
                    body.matches(r#""status":"completed""#).count(),
                    BATCH as usize
                );
            }
            started.elapsed()
        })
    });
    group.bench_function("http_submit_wait", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                load(|agent| submit(agent, &tasks_url));
            }
            started.elapsed()
        })
    });
    group.finish();

    let mut latencies = load(|agent| submit(agent, &tasks_url));
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "http submit->result latency, {CLIENTS} clients, {} tasks: p50 {:?}, p99 {:?}",
        latencies.len(),
        pct(0.50),
        pct(0.99)
    );
    drop(host);
}

criterion_group!(benches, daemon);
criterion_main!(benches);
