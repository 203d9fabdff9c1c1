//! Throughput of `echo` tasks through the in-process scheduler (submit,
//! queue, placement, sandboxed run, result) against a bare wasmtime
//! instantiate + call loop of the same component, both on a 2-worker tokio
//! runtime in the same run. Also prints p50/p99 submit-to-result latency at a
//! steady 16 tasks in flight.
//!
//! `cargo bench -p orch-benches --bench scheduler` after `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use orch::kv::KvStore;
use orch::scheduler::{Scheduler, SchedulerConfig, Submit};
use orch::{Agent, Engine, EngineConfig, Limits};
use orch_benches::{bare_echo, bare_echo_calls, plugin};

const BATCH: u64 = 4_000;

fn echo_task(i: u64) -> Submit {
    Submit {
        id: i.to_string(),
        capability: "echo".into(),
        payload: b"hello, orch".to_vec(),
        ..Submit::default()
    }
}

fn scheduler(c: &mut Criterion) {
    let rt = orch_benches::runtime();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let kv = Arc::new(KvStore::new(dir.path().join("kv.redb")));
    let s = rt.block_on(async {
        let s = Scheduler::new(SchedulerConfig::default());
        for label in ["echo-1", "echo-2"] {
            let agent = Agent::load(
                &engine,
                &plugin("echo"),
                kv.clone(),
                Default::default(),
                &Limits::default(),
            )
            .await
            .unwrap();
            s.add_agent(label, Arc::new(agent), Limits::default(), 8);
        }
        s
    });
    let (bare_engine, bare) = bare_echo(false);
    let bare = Arc::new(bare);
    let bare_engine = Arc::new(bare_engine);

    let mut group = c.benchmark_group("echo_throughput");
    group
        .throughput(Throughput::Elements(BATCH))
        .sample_size(20);
    group.bench_function("bare_wasmtime_2_threads", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (engine, pre) = (bare_engine.clone(), bare.clone());
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    let mut workers = Vec::new();
                    for _ in 0..2 {
                        let (engine, pre) = (engine.clone(), pre.clone());
                        workers.push(tokio::spawn(async move {
                            bare_echo_calls(&engine, &pre, BATCH / 2).await
                        }));
                    }
                    for w in workers {
                        w.await.unwrap();
                    }
                }
                started.elapsed()
            }
        })
    });
    group.bench_function("orch_scheduler", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let s = s.clone();
            async move {
                let started = Instant::now();
                for _ in 0..iters {
                    let handles: Vec<_> = (0..BATCH)
                        .map(|i| s.submit(echo_task(i)).unwrap())
                        .collect();
                    for h in handles {
                        h.wait().await.unwrap();
                    }
                }
                started.elapsed()
            }
        })
    });
    group.finish();

    // Latency at a steady load: 16 submitters, each waiting for its result.
    let latencies = rt.block_on(async {
        let mut all = Vec::new();
        let mut workers = Vec::new();
        for w in 0..16u64 {
            let s = s.clone();
            workers.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in 0..1_000 {
                    let t = Instant::now();
                    s.submit(echo_task(w * 1_000 + i))
                        .unwrap()
                        .wait()
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all
    });
    let mut sorted: Vec<Duration> = latencies;
    sorted.sort();
    let pct = |p: f64| sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)];
    println!(
        "scheduler latency, 16 in flight, {} tasks: p50 {:?}, p99 {:?}",
        sorted.len(),
        pct(0.50),
        pct(0.99)
    );
}

criterion_group!(benches, scheduler);
criterion_main!(benches);
