//! Cross-host `echo` tasks through NATS: host A submits, host B (the only
//! one serving `echo`) runs them, A waits for the result. Baselines in the
//! same run, against the same nats-server: a core NATS request/reply round
//! trip; a raw JetStream task round trip (publish with ack → pull consumer
//! on another connection → ack + core reply); the same with the result
//! stored by a KV `create` before the reply; and that durable pipeline's
//! throughput with 64 in flight. Prints p50/p99 of each at one task in
//! flight, and the throughput of orch with 64 in flight.
//!
//! `cargo bench -p orch-benches --bench cluster` after `bash plugins/build.sh`
//! (which installs nats-server into target/tools/nats).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use orch::cluster::tasks::TaskRouter;
use orch::cluster::{Cluster, Heartbeat, NatsOptions};
use orch::config::HostConfig;
use orch::daemon::Host;
use orch::service::TaskService;
use orch::{Engine, EngineConfig};
use orch_benches::nats::SAMPLES;

async fn host_with(
    url: &str,
    home: &std::path::Path,
    plugins: &[&str],
) -> (Host, Arc<Cluster>, Arc<TaskRouter>) {
    let config = HostConfig::default();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    orch_benches::install(home, &engine, &config, plugins).await;
    let host = Host::start(home, config, engine).await.unwrap();
    let beat = host.clone();
    let cluster = Arc::new(
        Cluster::join(
            &NatsOptions {
                url: url.to_string(),
                ..Default::default()
            },
            host.id(),
            move || {
                let (capabilities, free, running, queued) = beat.load();
                Heartbeat {
                    host: beat.id().to_string(),
                    capabilities,
                    free,
                    running,
                    queued,
                    ..Default::default()
                }
            },
        )
        .await
        .unwrap(),
    );
    let router = TaskRouter::start(&cluster, host.clone(), 3).await.unwrap();
    (host, cluster, router)
}

fn main() {
    let rt = orch_benches::runtime();
    let server = orch_benches::nats::NatsServer::start();
    let url = server.url.clone();
    rt.block_on(async {
        let base = orch_benches::nats::baselines(&server).await;
        // orch: A submits, B runs.
        let (ha, hb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (host_a, cluster_a, router_a) = host_with(&url, ha.path(), &[]).await;
        let (_b, _cluster_b, _router_b) = host_with(&url, hb.path(), &["echo"]).await;
        let started = Instant::now();
        while !cluster_a.capabilities().contains("echo") {
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Through the task service, as the API submits.
        let service = TaskService::new(host_a.clone(), router_a.clone());
        let submit = |service: TaskService| async move { orch_benches::echo_through(&service).await };
        for _ in 0..200 {
            submit(service.clone()).await;
        }
        let mut lat = Vec::new();
        for _ in 0..SAMPLES {
            let t = Instant::now();
            submit(service.clone()).await;
            lat.push(t.elapsed());
        }
        let orch_p50 = orch_benches::nats::report("orch cross-host echo task", lat);
        println!(
            "orch p50 / raw JetStream p50 = {:.2}x; / raw with stored result = {:.2}x; / core request p50 = {:.2}x",
            orch_p50.as_secs_f64() / base.raw.as_secs_f64(),
            orch_p50.as_secs_f64() / base.stored.as_secs_f64(),
            orch_p50.as_secs_f64() / base.core.as_secs_f64()
        );

        // Throughput: 64 submitters against B's 16 echo slots.
        // ORCH_BENCH_TASKS sets a longer run, e.g. to profile it.
        let n: usize = std::env::var("ORCH_BENCH_TASKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4_000);
        let t = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..64 {
            let service = service.clone();
            workers.push(tokio::spawn(async move {
                for _ in 0..n / 64 {
                    submit(service.clone()).await;
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
        let elapsed = t.elapsed();
        println!(
            "orch cross-host throughput, 64 in flight: {:.0} tasks/s ({} tasks in {elapsed:?})",
            (n / 64 * 64) as f64 / elapsed.as_secs_f64(),
            n / 64 * 64
        );
    });
    drop(server);
}
