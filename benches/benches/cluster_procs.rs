//! Echo tasks through two `orch host start` processes that both serve echo,
//! joined through one nats-server, submitted by a plain NATS client the way
//! docs/cluster.md describes (a JetStream publish on `orch.v1.task.echo`,
//! the result from `orch.v1.results.<task id>`). Unlike the `cluster` bench,
//! each host has its own process and runtime, as in a deployment. The
//! baselines of `orch_benches::nats` run first, against the same server.
//!
//! `cargo build --release -p orch-cli && cargo bench -p orch-benches --bench
//! cluster_procs` after `bash plugins/build.sh`; `ORCH_BENCH_TASKS=N` for the
//! load phase, `ORCH_BENCH_REUSE=N` to install echo with `[limits] reuse = N`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use orch_benches::nats::{cpu_time, print_cpu, report, NatsServer, SAMPLES};
use orch_benches::{plugin, HostProc};

type Waiters = Arc<Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>>;

/// Installs echo into `home` and starts a host on it joined to `url`;
/// returns once the host prints its address. With `reuse`, echo's manifest
/// declares `[limits] reuse = N`: one instance serves N tasks in a row.
fn start_host(home: &Path, url: &str, reuse: Option<u32>) -> HostProc {
    let component = match reuse {
        None => plugin("echo"),
        Some(n) => {
            let dir = home.join("echo-reuse");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(plugin("echo"), dir.join("echo.wasm")).unwrap();
            let manifest = std::fs::read_to_string(plugin("echo").with_extension("toml")).unwrap();
            std::fs::write(
                dir.join("echo.toml"),
                format!("{manifest}\n[limits]\nreuse = {n}\n"),
            )
            .unwrap();
            dir.join("echo.wasm")
        }
    };
    HostProc::start(home, &[component], &["--nats", url]).0
}

/// Submits one echo task and waits for its result notification.
async fn one_task(js: &async_nats::jetstream::Context, waiters: &Waiters, id: String) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    waiters.lock().unwrap().insert(id.clone(), tx);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    headers.insert("Orch-Task-Id", id.as_str());
    js.publish_with_headers("orch.v1.task.echo", headers, "hello, orch".into())
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), rx)
        .await
        .expect("no result within 30 s")
        .unwrap();
}

fn main() {
    let rt = orch_benches::runtime();
    let server = NatsServer::start();
    let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // ORCH_BENCH_REUSE=N: echo keeps its instance for N tasks.
    let reuse: Option<u32> = std::env::var("ORCH_BENCH_REUSE")
        .ok()
        .and_then(|v| v.parse().ok());
    if let Some(n) = reuse {
        println!("echo declares [limits] reuse = {n}");
    }
    let a = start_host(home_a.path(), &server.url, reuse);
    let b = start_host(home_b.path(), &server.url, reuse);
    let pids = [
        ("nats-server", server.pid()),
        ("host A", a.0.id()),
        ("host B", b.0.id()),
        ("bench client", std::process::id()),
    ];
    rt.block_on(async {
        let base = orch_benches::nats::baselines(&server).await;
        let client = async_nats::connect(server.url.as_str()).await.unwrap();
        let waiters: Waiters = Arc::default();
        let mut results = client.subscribe("orch.v1.results.>").await.unwrap();
        {
            let waiters = waiters.clone();
            tokio::spawn(async move {
                while let Some(m) = results.next().await {
                    let id = m.subject.as_str().trim_start_matches("orch.v1.results.");
                    if let Some(tx) = waiters.lock().unwrap().remove(id) {
                        let _ = tx.send(());
                    }
                }
            });
        }
        let js = async_nats::jetstream::new(client);
        // Both hosts pull from the capability's consumer once they serve it.
        let started = Instant::now();
        loop {
            let info = async {
                let mut consumer = js
                    .get_stream("ORCH_TASKS")
                    .await
                    .ok()?
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>("cap_echo")
                    .await
                    .ok()?;
                Some(consumer.info().await.ok()?.num_waiting)
            };
            if info.await.unwrap_or(0) >= 2 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "hosts not pulling");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut next = 0u64;
        let mut id = || {
            next += 1;
            format!("bench-{next}")
        };
        for _ in 0..200 {
            one_task(&js, &waiters, id()).await;
        }
        let mut lat = Vec::new();
        for _ in 0..SAMPLES {
            let t = Instant::now();
            one_task(&js, &waiters, id()).await;
            lat.push(t.elapsed());
        }
        let p50 = report("orch, hosts as processes, echo task", lat);
        println!(
            "orch p50 / raw JetStream p50 = {:.2}x; / raw with stored result = {:.2}x",
            p50.as_secs_f64() / base.raw.as_secs_f64(),
            p50.as_secs_f64() / base.stored.as_secs_f64()
        );
        let n: u64 = std::env::var("ORCH_BENCH_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8_000)
            / 64
            * 64;
        let cpu_before: Vec<Duration> = pids.iter().map(|(_, pid)| cpu_time(*pid)).collect();
        let t = Instant::now();
        let workers: Vec<_> = (0..64)
            .map(|w| {
                let (js, waiters) = (js.clone(), waiters.clone());
                tokio::spawn(async move {
                    for i in 0..n / 64 {
                        one_task(&js, &waiters, format!("load-{w}-{i}")).await;
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        let elapsed = t.elapsed();
        // Where the two cores went during the run, per task.
        let mut total = Duration::ZERO;
        for ((name, pid), before) in pids.iter().zip(cpu_before) {
            let used = cpu_time(*pid) - before;
            total += used;
            print_cpu(name, used, n, elapsed);
        }
        print_cpu("all", total, n, elapsed);
        println!(
            "orch, hosts as processes, 64 in flight: {:.0} tasks/s ({n} in {elapsed:?}); raw durable pipeline {:.0} tasks/s",
            n as f64 / elapsed.as_secs_f64(),
            base.pipeline_per_s
        );
    });
}
