//! What exporting task traces costs: the same workloads with the OTLP
//! trace layer off and on, in alternating rounds of one run, the spans
//! sent by OTLP/HTTP to a receiver in this process that decodes them
//! (metrics are always on: they have no off switch). Workloads:
//! - `scheduler`: echo tasks straight into the in-process scheduler, 64 in
//!   flight (spans: attempt, instantiate, handle);
//! - `lone`: echo tasks through a lone host's task service (journal
//!   commits), 32 in flight (all of a task's spans);
//! - `cluster`: host A submits, host B runs, over a real nats-server, 64 in
//!   flight.
//!
//! `cargo bench -p orch-benches --bench telemetry` after `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use orch::config::HostConfig;
use orch::node::{Node, NodeOptions};
use orch::scheduler::{Scheduler, SchedulerConfig, Submit};
use orch::{Agent, Engine, EngineConfig, Limits};
use prost::Message;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, Layer, Registry};

type Traces = Option<Box<dyn Layer<Registry> + Send + Sync>>;

/// Spans the receiver decoded.
static RECEIVED: AtomicU64 = AtomicU64::new(0);

fn receiver(rt: &tokio::runtime::Runtime) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(async move {
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(|body: axum::body::Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                let n: usize = request
                    .resource_spans
                    .iter()
                    .flat_map(|r| &r.scope_spans)
                    .map(|s| s.spans.len())
                    .sum();
                RECEIVED.fetch_add(n as u64, Ordering::Relaxed);
                ""
            }),
        );
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(listener, app).await.unwrap();
    });
    url
}

/// The layer `orch host start` installs with an endpoint.
fn traces(endpoint: &str) -> (Traces, opentelemetry_sdk::trace::SdkTracerProvider) {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Without the host's per-layer filter on orch::trace: a filtered layer
    // cannot be swapped in by `reload` (its filter is never registered),
    // and every span the library makes has that target anyway.
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("orch"));
    (Some(Box::new(layer)), provider)
}

/// Tasks per second of `run(n)`.
async fn rate<F: std::future::Future<Output = ()>>(n: usize, run: impl Fn(usize) -> F) -> f64 {
    let t = Instant::now();
    run(n).await;
    n as f64 / t.elapsed().as_secs_f64()
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

async fn echo_service(tasks: orch::service::TaskService, n: usize, in_flight: usize) {
    let mut workers = Vec::new();
    for _ in 0..in_flight {
        let tasks = tasks.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..n / in_flight {
                orch_benches::echo_through(&tasks).await;
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

async fn echo_scheduler(s: Scheduler, n: usize) {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (s, next) = (s.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            for _ in 0..n / 64 {
                let i = next.fetch_add(1, Ordering::Relaxed);
                s.submit(Submit {
                    id: format!("t{i}"),
                    capability: "echo".into(),
                    payload: b"hello, orch".to_vec(),
                    ..Submit::default()
                })
                .unwrap()
                .wait()
                .await
                .unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
}

fn main() {
    let rt = orch_benches::runtime();
    let endpoint = receiver(&rt);
    let (layer, handle) = reload::Layer::new(None as Traces);
    tracing_subscriber::registry().with(layer).init();
    let rounds: usize = std::env::var("ORCH_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let server = orch_benches::nats::NatsServer::start();
    rt.block_on(async {
        // The scheduler alone, two echo agents of 8 slots.
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::new(EngineConfig::default()).unwrap();
        let kv = Arc::new(orch::kv::KvStore::new(dir.path().join("kv.redb")));
        let scheduler = Scheduler::new(SchedulerConfig::default());
        for label in ["echo-1", "echo-2"] {
            let agent = Agent::load(
                &engine,
                &orch_benches::plugin("echo"),
                kv.clone(),
                Default::default(),
                &Limits::default(),
            )
            .await
            .unwrap();
            scheduler.add_agent(label, Arc::new(agent), Limits::default(), 8);
        }
        // A lone host.
        let lone_home = tempfile::tempdir().unwrap();
        let config = HostConfig::default();
        let engine = Engine::new(EngineConfig::default()).unwrap();
        orch_benches::install(lone_home.path(), &engine, &config, &["echo"]).await;
        let lone = Node::start(lone_home.path(), config.clone(), engine, NodeOptions::default())
            .await
            .unwrap();
        // Two hosts over NATS: A submits, B runs.
        let nats = NodeOptions {
            nats: Some(orch::cluster::NatsOptions {
                url: server.url.clone(),
                ..Default::default()
            }),
            api: None,
        };
        let (home_a, home_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let engine_b = Engine::new(EngineConfig::default()).unwrap();
        orch_benches::install(home_b.path(), &engine_b, &config, &["echo"]).await;
        let _b = Node::start(home_b.path(), config.clone(), engine_b, nats.clone())
            .await
            .unwrap();
        let a = Node::start(
            home_a.path(),
            config.clone(),
            Engine::new(EngineConfig::default()).unwrap(),
            nats,
        )
        .await
        .unwrap();
        let started = Instant::now();
        while !a.cluster().unwrap().capabilities().contains("echo") {
            assert!(started.elapsed() < Duration::from_secs(10));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Warm up every path once.
        echo_scheduler(scheduler.clone(), 640).await;
        echo_service(lone.tasks().clone(), 320, 32).await;
        echo_service(a.tasks().clone(), 640, 64).await;

        let mut provider = None;
        let workloads = ["scheduler", "lone", "cluster"];
        let mut figures: Vec<[Vec<f64>; 2]> = vec![Default::default(); workloads.len()];
        for round in 0..rounds * 2 {
            let on = round % 2 == 1;
            if on {
                let (layer, p) = traces(&endpoint);
                handle.reload(layer).unwrap();
                provider = Some(p);
            } else {
                handle.reload(None as Traces).unwrap();
                if let Some(p) = provider.take() {
                    // Off the runtime: the last export blocks.
                    tokio::task::spawn_blocking(move || p.shutdown().unwrap())
                        .await
                        .unwrap();
                }
            }
            let s = scheduler.clone();
            figures[0][on as usize]
                .push(rate(4_000, |n| echo_scheduler(s.clone(), n)).await);
            figures[1][on as usize]
                .push(rate(2_000, |n| echo_service(lone.tasks().clone(), n, 32)).await);
            figures[2][on as usize]
                .push(rate(2_000, |n| echo_service(a.tasks().clone(), n, 64)).await);
        }
        if let Some(p) = provider.take() {
            tokio::task::spawn_blocking(move || p.shutdown().unwrap())
                .await
                .unwrap();
        }
        println!("tasks/s, {rounds} rounds each, off and on alternating (min / median / max):");
        for (name, [off, on]) in workloads.iter().zip(figures) {
            let (off, on) = (stats(off), stats(on));
            println!(
                "{name:>9}: off {:.0} / {:.0} / {:.0}   on {:.0} / {:.0} / {:.0}   on/off medians {:.3}",
                off.0, off.1, off.2, on.0, on.1, on.2, on.1 / off.1
            );
        }
        println!(
            "spans received by the OTLP receiver: {}",
            RECEIVED.load(Ordering::Relaxed)
        );
    });
    drop(server);
}
