//! How late a deadline stops a guest that never returns (`spin`), through
//! `Agent::handle`, for deadlines from 1 ms to 1 s (10 s too with
//! `ORCH_BENCH_LONG=1`), on an otherwise idle runtime.
//!
//! Baseline, in the same run: bare wasmtime with epoch interruption set to
//! trap, and a thread that sleeps for the deadline and then advances the
//! epoch: what a timer thread can do at best.
//!
//! `cargo bench -p orch-benches --bench deadline` after `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use orch::engine::bindings::orch::agent::types as wit;
use orch::kv::KvStore;
use orch::{Agent, Engine, EngineConfig, Limits, TaskError, TaskRequest};
use orch_benches::{bare_component, plugin, Bare};

/// Lateness in microseconds: min, median, p99, max.
fn summary(mut late: Vec<f64>) -> String {
    late.sort_by(f64::total_cmp);
    let at = |q: f64| late[((late.len() - 1) as f64 * q).round() as usize];
    format!(
        "min {:.0} / median {:.0} / p99 {:.0} / max {:.0} µs",
        at(0.0),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

fn runs(deadline: Duration) -> usize {
    match deadline.as_millis() {
        0..=20 => 200,
        21..=100 => 50,
        101..=1000 => 10,
        _ => 3,
    }
}

fn main() {
    let rt = orch_benches::runtime();
    let mut deadlines: Vec<Duration> = [1, 5, 15, 50, 200, 1000]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    if std::env::var_os("ORCH_BENCH_LONG").is_some() {
        deadlines.push(Duration::from_secs(10));
    }

    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(EngineConfig::default()).unwrap();
    let kv = Arc::new(KvStore::new(dir.path().join("kv.redb")));
    let agent = rt
        .block_on(Agent::load(
            &engine,
            &plugin("spin"),
            kv,
            Default::default(),
            &Limits::default(),
        ))
        .unwrap();
    let (bare_engine, bare) = bare_component("spin");
    let wit_task = wit::Task {
        id: "bench".into(),
        capability: "test.spin".into(),
        payload: Vec::new(),
        content_type: String::new(),
        attempt: 1,
        deadline_ms: None,
    };

    for deadline in deadlines {
        let limits = Limits {
            timeout: deadline,
            fuel: u64::MAX / 4,
            ..Limits::default()
        };
        let mut orch_late = Vec::new();
        let mut bare_late = Vec::new();
        for _ in 0..runs(deadline) {
            let started = Instant::now();
            let out = rt.block_on(agent.handle(
                TaskRequest {
                    id: "bench".into(),
                    capability: "test.spin".into(),
                    payload: Vec::new(),
                    content_type: String::new(),
                    attempt: 1,
                    calls: None,
                },
                &limits,
            ));
            let took = started.elapsed();
            assert!(
                matches!(out, Err(TaskError::DeadlineExceeded { .. })),
                "{out:?}"
            );
            orch_late.push((took.as_secs_f64() - deadline.as_secs_f64()) * 1e6);

            let started = Instant::now();
            let e = bare_engine.clone();
            let timer = std::thread::spawn(move || {
                std::thread::sleep(deadline.saturating_sub(started.elapsed()));
                e.increment_epoch();
            });
            let trapped = rt.block_on(async {
                let mut store = wasmtime::Store::new(&bare_engine, Bare);
                store.set_epoch_deadline(1);
                store.epoch_deadline_trap();
                let instance = bare.instantiate_async(&mut store).await.unwrap();
                instance.call_handle(&mut store, &wit_task).await.is_err()
            });
            let took = started.elapsed();
            timer.join().unwrap();
            assert!(trapped);
            bare_late.push((took.as_secs_f64() - deadline.as_secs_f64()) * 1e6);
        }
        println!(
            "deadline {deadline:?}, {} runs: orch late by {}; bare timer thread late by {}",
            orch_late.len(),
            summary(orch_late),
            summary(bare_late)
        );
    }
}
