//! What exporting task traces costs: the same workloads with the OTLP
//! trace layer off and on, in alternating rounds of one run, the spans
//! sent by OTLP/HTTP to a receiver in this process that decodes them
//! (metrics are always on: they have no off switch). The subscriber is the
//! one `orch host start` installs with an endpoint (a log layer at `warn`,
//! and the OTLP layer filtered to the `orch::trace` target), with a switch
//! in the OTLP layer's filter: off, it takes no span, as a host without an
//! endpoint has no such layer. Workloads:
//! - `scheduler`: echo tasks straight into the in-process scheduler, 64 in
//!   flight (spans: attempt, instantiate, handle);
//! - `lone`: echo tasks through a lone host's task service (journal
//!   commits), 32 in flight (all of a task's spans);
//! - `cluster`: host A submits, host B runs, over a real nats-server, 64 in
//!   flight.
//!
//! Tasks are sampled as a host samples them: `OTEL_TRACES_SAMPLER` (all by
//! default), at most `ORCH_BENCH_TRACES_PER_SECOND` new traces a second
//! (100, the host's default; 0 for no cap).
//!
//! `cargo bench -p orch-benches --bench telemetry` after `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use tracing_subscriber::Layer;

/// Whether the OTLP layer takes spans (the "on" rounds).
static ON: AtomicBool = AtomicBool::new(false);

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

/// The subscriber and sampling `orch host start` installs with an endpoint
/// (`cli::telemetry::init`), its OTLP layer's filter switched by [`ON`].
/// The sampling is set in both arms (it cannot be unset): in the "off"
/// rounds a task not taken still gets its unsampled `traceparent`, which a
/// host without an endpoint does not make (well under a microsecond).
fn install(endpoint: &str) -> opentelemetry_sdk::trace::SdkTracerProvider {
    use tracing::metadata::LevelFilter;
    use tracing_subscriber::filter;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .build()
        .unwrap();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::AlwaysOn,
        )))
        .build();
    // As the host's `[telemetry] max_traces_per_second` (100 unless set).
    let per_second = std::env::var("ORCH_BENCH_TRACES_PER_SECOND")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    orch::trace::set_sampling(orch::trace::Sampling {
        sampler: opentelemetry_sdk::trace::Config::default().sampler,
        per_second: std::num::NonZeroU32::new(per_second),
    });
    opentelemetry::global::set_tracer_provider(provider.clone());
    let target = |m: &tracing::Metadata<'_>| m.target().starts_with(orch::trace::TARGET);
    // The host's filter is `Targets` (orch::trace at INFO); this one is
    // the same plus the switch, asked at each span of that target.
    let only = filter::dynamic_filter_fn(move |m, _| ON.load(Ordering::Relaxed) && target(m))
        .with_callsite_filter(move |m| {
            if target(m) {
                tracing::subscriber::Interest::sometimes()
            } else {
                tracing::subscriber::Interest::never()
            }
        })
        .with_max_level_hint(LevelFilter::INFO);
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::registry()
        .with(logs)
        .with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("orch"))
                .with_filter(only),
        )
        .init();
    provider
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
    let provider = install(&endpoint);
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

        let workloads = ["scheduler", "lone", "cluster"];
        let mut figures: Vec<[Vec<f64>; 2]> = vec![Default::default(); workloads.len()];
        for round in 0..rounds * 2 {
            let on = round % 2 == 1;
            ON.store(on, Ordering::Relaxed);
            if !on {
                // The spans of the last round sent before this one starts.
                let p = provider.clone();
                tokio::task::spawn_blocking(move || p.force_flush().unwrap())
                    .await
                    .unwrap();
            }
            let s = scheduler.clone();
            figures[0][on as usize]
                .push(rate(4_000, |n| echo_scheduler(s.clone(), n)).await);
            figures[1][on as usize]
                .push(rate(2_000, |n| echo_service(lone.tasks().clone(), n, 32)).await);
            figures[2][on as usize]
                .push(rate(2_000, |n| echo_service(a.tasks().clone(), n, 64)).await);
        }
        // Off the runtime: the last export blocks.
        let p = provider.clone();
        tokio::task::spawn_blocking(move || p.shutdown().unwrap())
            .await
            .unwrap();
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
