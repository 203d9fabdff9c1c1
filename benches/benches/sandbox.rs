//! Per-task cost of `echo` through orch's sandbox (fresh store, fuel, memory
//! limiter, deadline, instantiate, `handle`) against a bare wasmtime
//! instantiate + call of the same component, measured in the same run.
//!
//! The baseline uses wasmtime directly: the same pooling allocator and async
//! calls, no fuel, no epoch interruption, no limiter, and host imports that
//! do nothing. Run with `cargo bench -p orch-benches --bench sandbox` after
//! `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use orch::engine::bindings;
use orch::kv::KvStore;
use orch::{Agent, Engine, EngineConfig, Limits, TaskRequest};
use orch_benches::{bare_echo, plugin, Bare};
use wasmtime::Store;

fn task(payload: &[u8]) -> TaskRequest {
    TaskRequest {
        id: "bench".into(),
        capability: "echo".into(),
        payload: payload.to_vec(),
        content_type: "application/octet-stream".into(),
        attempt: 1,
        calls: None,
    }
}

fn echo(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let payload = b"hello, orch".to_vec();

    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let kv = Arc::new(KvStore::new(dir.path().join("kv.redb")));
    let limits = Limits::default();
    let agent = rt
        .block_on(Agent::load(
            &engine,
            &plugin("echo"),
            kv,
            Default::default(),
            &limits,
        ))
        .unwrap();

    let (bare_engine, bare) = bare_echo(false);
    let (metered_engine, metered) = bare_echo(true);
    let wit_task = bindings::orch::agent::types::Task {
        id: "bench".into(),
        capability: "echo".into(),
        payload: payload.clone(),
        content_type: "application/octet-stream".into(),
        attempt: 1,
        deadline_ms: None,
    };

    let mut group = c.benchmark_group("echo_task");
    group.bench_function("bare_wasmtime", |b| {
        b.to_async(&rt).iter(|| async {
            let mut store = Store::new(&bare_engine, Bare);
            let instance = bare.instantiate_async(&mut store).await.unwrap();
            let out = instance.call_handle(&mut store, &wit_task).await.unwrap();
            assert_eq!(out.as_deref().ok(), Some(payload.as_slice()));
        })
    });
    group.bench_function("bare_wasmtime_fuel_epoch", |b| {
        b.to_async(&rt).iter(|| async {
            let mut store = Store::new(&metered_engine, Bare);
            store.set_fuel(u64::MAX).unwrap();
            store.set_epoch_deadline(u64::MAX / 2);
            let instance = metered.instantiate_async(&mut store).await.unwrap();
            let out = instance.call_handle(&mut store, &wit_task).await.unwrap();
            assert_eq!(out.as_deref().ok(), Some(payload.as_slice()));
        })
    });
    group.bench_function("orch_sandbox", |b| {
        b.to_async(&rt).iter(|| async {
            let out = agent.handle(task(&payload), &limits).await.unwrap();
            assert_eq!(out.result, payload);
        })
    });
    group.finish();
}

criterion_group!(benches, echo);
criterion_main!(benches);
