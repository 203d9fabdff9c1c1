//! Per-task cost of `[limits] reuse` (one instance serves many tasks in a
//! row) against a fresh instance per task, in each guest language, beside
//! two baselines in the same run:
//! - bare wasmtime calling `handle` on one live instance of the same echo
//!   component, with fuel and epoch metering on (the floor);
//! - Extism 1.30 calling an extism-pdk echo on a live plugin, and on a
//!   fresh plugin made from the compiled one, with `--features extism`
//!   (a second wasmtime build; the plugin comes from
//!   `benches/extism-echo/build.sh`).
//!
//! Every orch case is `Agent::handle` of one echo task at a time: the whole
//! task (limits, deadline, slot, store, call), as the scheduler runs it.
//! Each round times every case once; the figures are min/median/max of the
//! per-task time over the rounds.
//!
//! ```sh
//! bash plugins/build.sh && bash benches/extism-echo/build.sh
//! cargo bench -p orch-benches --bench reuse --features extism   # ORCH_BENCH_ROUNDS=N (default 7)
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use orch::engine::bindings::orch::agent as wit;
use orch::kv::KvStore;
use orch::{Agent, Engine, EngineConfig, Limits, TaskRequest};
use orch_benches::plugin;

const PAYLOAD: &[u8] = b"hello, orch";

/// A case: its name, tasks per round, and a run of that many tasks.
type Case<'a> = (String, u32, Box<dyn FnMut(u32) + 'a>);

fn main() {
    let rounds: usize = std::env::var("ORCH_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
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
    let fresh = Limits::default();
    let reuse = Limits {
        reuse: orch::plugin::manifest::MAX_REUSE,
        ..Limits::default()
    };

    let mut cases: Vec<Case> = Vec::new();
    cases.push(("bare wasmtime, live instance".into(), 20_000, bare_live()));
    for (lang, name, capability, fresh_n, reuse_n) in [
        ("rust", "echo", "echo", 5_000, 20_000),
        ("c", "fixture-c", "test.echo", 5_000, 20_000),
        ("javascript", "fixture-js", "test.echo", 300, 3_000),
        ("python", "fixture-py", "test.echo", 300, 5_000),
    ] {
        let agent = Arc::new(
            rt.block_on(Agent::load(
                &engine,
                &plugin(name),
                kv.clone(),
                Default::default(),
                &fresh,
            ))
            .unwrap(),
        );
        for (mode, limits, n) in [("fresh", &fresh, fresh_n), ("reuse", &reuse, reuse_n)] {
            let agent = agent.clone();
            let rt = &rt;
            cases.push((
                format!("orch {lang}, {mode}"),
                n,
                Box::new(move |n| {
                    rt.block_on(async {
                        for _ in 0..n {
                            let out = agent.handle(request(capability), limits).await.unwrap();
                            assert_eq!(out.result, PAYLOAD);
                        }
                    })
                }),
            ));
        }
    }
    extism_cases(&mut cases);

    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, (_, n, run)) in cases.iter_mut().enumerate() {
            // A short warm-up, untimed: the kept instance, caches.
            run((*n / 20).max(1));
            let started = Instant::now();
            run(*n);
            figures[i].push(started.elapsed().as_secs_f64() * 1e6 / f64::from(*n));
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!("per task, µs over {rounds} rounds: min / median / max");
    let mut medians = std::collections::HashMap::new();
    for ((name, n, _), mut v) in cases.iter().zip(figures) {
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        println!(
            "{name:<34} {:>9.2} {:>9.2} {:>9.2}   ({n} tasks a round)",
            v[0],
            median,
            v[v.len() - 1]
        );
        medians.insert(name.clone(), median);
    }
    let ratio = |a: &str, b: &str| match (medians.get(a), medians.get(b)) {
        (Some(a), Some(b)) => format!("{:.2}", a / b),
        _ => "n/a".into(),
    };
    println!("ratios of the medians:");
    for lang in ["rust", "c", "javascript", "python"] {
        println!(
            "  {lang}: fresh / reuse = {}",
            ratio(
                &format!("orch {lang}, fresh"),
                &format!("orch {lang}, reuse")
            )
        );
    }
    println!(
        "  orch rust reuse / Extism live call = {}",
        ratio("orch rust, reuse", "extism, live plugin")
    );
    println!(
        "  orch rust fresh / Extism fresh plugin = {}",
        ratio("orch rust, fresh", "extism, fresh plugin")
    );
    println!(
        "  orch rust reuse / bare wasmtime live = {}",
        ratio("orch rust, reuse", "bare wasmtime, live instance")
    );
}

fn request(capability: &str) -> TaskRequest {
    TaskRequest {
        id: "bench".into(),
        capability: capability.into(),
        payload: PAYLOAD.to_vec(),
        content_type: "application/octet-stream".into(),
        attempt: 1,
        calls: None,
    }
}

/// Bare wasmtime: one instance of the echo component, `handle` called on it
/// again and again, fuel set before each call as orch does.
fn bare_live<'a>() -> Box<dyn FnMut(u32) + 'a> {
    let (engine, pre) = orch_benches::bare_echo(true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut store = wasmtime::Store::new(&engine, orch_benches::Bare);
    store.set_epoch_deadline(u64::MAX / 2);
    store.set_fuel(1_000_000_000).unwrap();
    let instance = rt.block_on(pre.instantiate_async(&mut store)).unwrap();
    let task = wit::types::Task {
        id: "bench".into(),
        capability: "echo".into(),
        payload: PAYLOAD.to_vec(),
        content_type: String::new(),
        attempt: 1,
        deadline_ms: None,
    };
    Box::new(move |n| {
        rt.block_on(async {
            for _ in 0..n {
                store.set_fuel(1_000_000_000).unwrap();
                let out = instance
                    .call_handle(&mut store, &task)
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(out, PAYLOAD);
            }
        })
    })
}

#[cfg(feature = "extism")]
fn extism_cases(cases: &mut Vec<Case>) {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins/extism-echo.wasm");
    let wasm = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build it with `bash benches/extism-echo/build.sh`",
            path.display()
        )
    });
    let compiled =
        extism::CompiledPlugin::new(extism::PluginBuilder::new(extism::Manifest::new([
            extism::Wasm::data(wasm),
        ])))
        .unwrap();
    let mut live = extism::Plugin::new_from_compiled(&compiled).unwrap();
    cases.push((
        "extism, live plugin".into(),
        20_000,
        Box::new(move |n| {
            for _ in 0..n {
                let out: Vec<u8> = live.call("echo", PAYLOAD).unwrap();
                assert_eq!(out, PAYLOAD);
            }
        }),
    ));
    cases.push((
        "extism, fresh plugin".into(),
        2_000,
        Box::new(move |n| {
            for _ in 0..n {
                let mut plugin = extism::Plugin::new_from_compiled(&compiled).unwrap();
                let out: Vec<u8> = plugin.call("echo", PAYLOAD).unwrap();
                assert_eq!(out, PAYLOAD);
            }
        }),
    ));
}

#[cfg(not(feature = "extism"))]
fn extism_cases(_: &mut Vec<Case>) {
    println!("(Extism baseline off: run with --features extism)");
}
