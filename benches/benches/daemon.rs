//! `echo` tasks through the host daemon's HTTP API: `POST /v1/tasks?wait=`
//! from 16 client threads, each waiting for its result, so every task pays
//! for HTTP, the journal's fsynced accept and result writes, the scheduler
//! and the sandbox. Baselines in the same run: a bare wasmtime
//! instantiate + call loop on two threads, and `GET /v1/status` over the
//! same HTTP stack (no task, no disk). Also the same tasks as one
//! `POST /v1/tasks:batch?wait=` whose results stream back. Prints p50/p99
//! submit-to-result latency of the HTTP path at 16 in flight, and at one
//! in flight beside its floors in the same run: `GET /v1/status` on one
//! connection, the journal's own commit time (from its histogram), and
//! `fdatasync` after writing 1 and 10 pages of 4 KiB in place in a file of
//! the host's data directory (a task waits for two commits: its accept and
//! its result; each writes about ten B-tree pages).
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
    // One in flight, one keep-alive connection, and the floors under it.
    const ONE: usize = 1000;
    let timed = |f: &dyn Fn()| {
        let mut v: Vec<Duration> = (0..ONE)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        v.sort();
        (v[ONE / 2], v[ONE * 99 / 100])
    };
    let agent = client();
    let (status_p50, status_p99) = timed(&|| {
        agent.get(&status_url).call().unwrap();
    });
    let commits = || journal_commits(&agent, &format!("{base}/metrics"));
    let before = commits();
    let (task_p50, task_p99) = timed(&|| submit(&agent, &tasks_url));
    let after = commits();
    let per_commit = (after.1 - before.1) / (after.0 - before.0) as f64;
    // In place in a file already written, as redb writes its pages: no
    // block to allocate, no size to sync.
    const PROBE_PAGES: u64 = 16 << 10;
    let file = std::fs::File::create(home.path().join("fsync-probe")).unwrap();
    std::io::Write::write_all(&mut &file, &vec![0u8; (PROBE_PAGES * 4096) as usize]).unwrap();
    file.sync_all().unwrap();
    let page = |n: u64| {
        let at = (n * 7919 % PROBE_PAGES) * 4096;
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096], at).unwrap();
    };
    let round = std::cell::Cell::new(0u64);
    let sync = |pages: u64| {
        for p in 0..pages {
            page(round.get() * pages + p);
        }
        round.set(round.get() + 1);
        file.sync_data().unwrap();
    };
    let (one_p50, one_p99) = timed(&|| sync(1));
    let (ten_p50, ten_p99) = timed(&|| sync(10));
    println!(
        "one in flight, {ONE} each: submit->result p50 {task_p50:?} p99 {task_p99:?}; \
         GET /v1/status p50 {status_p50:?} p99 {status_p99:?}; \
         journal commit mean {:?} ({} commits); \
         fdatasync after 1 page p50 {one_p50:?} p99 {one_p99:?}, after 10 pages p50 {ten_p50:?} p99 {ten_p99:?}",
        Duration::from_secs_f64(per_commit),
        after.0 - before.0,
    );
    drop(host);
}

/// `orch_journal_commit_seconds`: (count, sum) so far, from `/metrics`.
fn journal_commits(agent: &ureq::Agent, url: &str) -> (u64, f64) {
    let text = agent
        .get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap()
    };
    (
        value("orch_journal_commit_seconds_count ") as u64,
        value("orch_journal_commit_seconds_sum "),
    )
}

criterion_group!(benches, daemon);
criterion_main!(benches);
