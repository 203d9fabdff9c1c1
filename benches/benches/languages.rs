//! Startup and per-task cost of agents in each guest language, measured in
//! one run so they can be compared with Rust's:
//! - cold compile: `Engine::compile_file` with an empty cache (timed once per
//!   language and printed, since a JS compile takes seconds);
//! - cached load: `Engine::compile_file` with the compiled code in the on-disk
//!   cache (deserialize, world check, pre-link);
//! - task: `Agent::handle` of an echo task (fresh instance, limits, call).
//!
//! Run with `cargo bench -p orch-benches --bench languages` after
//! `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use orch::kv::KvStore;
use orch::{Agent, Engine, EngineConfig, Limits, TaskRequest};
use orch_benches::plugin;

/// (language, plugin, capability that echoes the payload)
const LANGUAGES: &[(&str, &str, &str)] = &[
    ("rust", "echo", "echo"),
    ("c", "fixture-c", "test.echo"),
    ("javascript", "fixture-js", "test.echo"),
    ("python", "fixture-py", "test.echo"),
];

fn languages(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(EngineConfig {
        cache_dir: Some(dir.path().join("cache")),
        ..EngineConfig::default()
    })
    .unwrap();
    let kv = Arc::new(KvStore::new(dir.path().join("kv.redb")));
    let limits = Limits::default();

    for &(lang, name, _) in LANGUAGES {
        let path = plugin(name);
        let size = std::fs::metadata(&path).unwrap().len();
        let started = Instant::now();
        let compiled = engine.compile_file(&path).unwrap();
        assert!(!compiled.info.from_cache);
        println!(
            "cold compile {lang}: {:.1} ms ({:.1} MB component)",
            started.elapsed().as_secs_f64() * 1e3,
            size as f64 / 1e6
        );
    }

    let mut load = c.benchmark_group("cached_load");
    load.sample_size(20)
        .measurement_time(Duration::from_secs(4));
    for &(lang, name, _) in LANGUAGES {
        let path = plugin(name);
        load.bench_function(lang, |b| {
            b.iter(|| {
                let compiled = engine.compile_file(&path).unwrap();
                assert!(compiled.info.from_cache);
            })
        });
    }
    load.finish();

    let mut task = c.benchmark_group("task");
    for &(lang, name, capability) in LANGUAGES {
        let agent = rt
            .block_on(Agent::load(
                &engine,
                &plugin(name),
                kv.clone(),
                Default::default(),
                &limits,
            ))
            .unwrap();
        let payload = b"hello, orch".to_vec();
        task.bench_function(lang, |b| {
            b.to_async(&rt).iter(|| async {
                let request = TaskRequest {
                    id: "bench".into(),
                    capability: capability.into(),
                    payload: payload.clone(),
                    content_type: "application/octet-stream".into(),
                    attempt: 1,
                    calls: None,
                };
                let out = agent.handle(request, &limits).await.unwrap();
                assert_eq!(out.result, payload);
            })
        });
        let out = rt
            .block_on(agent.handle(
                TaskRequest {
                    id: "fuel".into(),
                    capability: capability.into(),
                    payload: payload.clone(),
                    ..TaskRequest::default()
                },
                &limits,
            ))
            .unwrap();
        println!("fuel per echo task {lang}: {}", out.fuel_used);
    }
    task.finish();
}

criterion_group!(benches, languages);
criterion_main!(benches);
