//! Density: N tasks in flight at once on one lone host (the library's
//! whole host: task service, journal, scheduler, engine), each waiting 5 s
//! in a host call (the `nap` fixture sleeps through WASI's monotonic clock,
//! so a waiting task burns no CPU), all submitted at once through the task
//! service, with `[host] instance_slots` and `instances` set to N. Prints,
//! for each N: the process's RSS before (the baseline: host started, pool
//! reserved, agent loaded, nothing running) and at its peak while the
//! tasks wait (sampled every 100 ms from /proc/self/status), the RSS per
//! waiting task, the time to submit them all and to the last result, and
//! how many did not complete.
//!
//! Each N runs with two agents that do the same: `nap` (Rust std on
//! wasm32-wasip1, through the preview-1 adapter: two linear memories and
//! wasi-libc's state) and `nap-lean` (the same sleep called through WASI's
//! component interfaces directly: one memory, no adapter), so the guest's
//! share of a waiting task shows beside the host's.
//!
//! `cargo bench -p orch-benches --bench density` after `bash
//! plugins/build.sh`; `ORCH_BENCH_DENSITY=1000,5000` sets the Ns,
//! `ORCH_BENCH_AGENTS=nap-lean` the agents, and
//! `ORCH_BENCH_SMAPS=1` prints, half-way through each wait, where the
//! resident memory is (mappings of /proc/self/smaps grouped by size).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use orch::config::HostConfig;
use orch::daemon::{Status, SubmitRequest};
use orch::node::{Node, NodeOptions};
use orch::{Engine, EngineConfig};

const NAP_MS: u64 = 5000;

/// Submissions the bench's client has in flight at once.
const SUBMITTING: usize = 256;

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// The largest resident groups of mappings of equal size and permissions.
fn smaps(n: u32) {
    let text = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let kb = |v: &str| -> u64 { v.trim().trim_end_matches("kB").trim().parse().unwrap() };
    let mut groups: std::collections::HashMap<(u64, String), (u64, u64)> = Default::default();
    let (mut perms, mut size) = (String::new(), 0);
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = kb(v);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let g = groups.entry((size, perms.clone())).or_default();
            g.0 += 1;
            g.1 += kb(v);
        } else if !line.starts_with(|c: char| c.is_ascii_uppercase()) {
            perms = line.split_whitespace().nth(1).unwrap_or("").to_string();
        }
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|g| std::cmp::Reverse((g.1).1));
    for ((size, perms), (count, rss)) in groups.into_iter().take(16) {
        println!(
            "  {count:>6} mappings of {size} KiB {perms}: {rss} KiB resident ({:.1} KiB per task)",
            rss as f64 / f64::from(n)
        );
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() {
    let ns: Vec<u32> = std::env::var("ORCH_BENCH_DENSITY")
        .unwrap_or_else(|_| "1000,4000".into())
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let agents: Vec<String> = std::env::var("ORCH_BENCH_AGENTS")
        .unwrap_or_else(|_| "nap,nap-lean".into())
        .split(',')
        .map(|a| a.trim().to_string())
        .collect();
    // Each measurement in a process of its own: the heap one leaves behind
    // stays resident (glibc keeps freed memory) and would count in the
    // next one's baseline.
    if let Ok(one) = std::env::var(ONE) {
        let (n, agent) = one.split_once(',').unwrap();
        measure(n.parse().unwrap(), agent);
        return;
    }
    for n in ns {
        for agent in &agents {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args(std::env::args_os().skip(1))
                .env(ONE, format!("{n},{agent}"))
                .status()
                .unwrap();
            assert!(
                status.success(),
                "the measurement of {n} tasks of {agent} failed"
            );
        }
    }
}

/// Set in the child process that measures one N and agent.
const ONE: &str = "ORCH_BENCH_DENSITY_ONE";

fn measure(n: u32, agent: &str) {
    let rt = orch_benches::runtime();
    rt.block_on(async {
            let home = tempfile::tempdir().unwrap();
            let mut config = HostConfig::default();
            config.host.instance_slots = n;
            config.host.instances = n;
            let engine = Engine::new(EngineConfig {
                instance_slots: n,
                ..EngineConfig::default()
            })
            .unwrap();
            orch_benches::install(home.path(), &engine, &config, &[agent]).await;
            let node = Node::start(home.path(), config, engine, NodeOptions::default())
                .await
                .unwrap();
            let tasks = node.tasks().clone();
            let before = rss();
            let peak = Arc::new(AtomicU64::new(before));
            let done = Arc::new(AtomicBool::new(false));
            let sampler = {
                let (peak, done) = (peak.clone(), done.clone());
                std::thread::spawn(move || {
                    while !done.load(Ordering::Relaxed) {
                        peak.fetch_max(rss(), Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                })
            };
            // The bench's client keeps as little per task as it can, so
            // that the RSS is the host's: at most SUBMITTING submissions
            // in flight, then one wait future per task in one list (a
            // spawned client task per task held 1.6 KiB each).
            let started = Instant::now();
            let ids: Vec<String> = futures_util::stream::iter(0..n)
                .map(|_| {
                    let tasks = tasks.clone();
                    async move {
                        let request = SubmitRequest {
                            capability: format!("test.{agent}"),
                            payload: NAP_MS.to_string().into_bytes(),
                            priority: 0,
                            deadline: Some(Duration::from_secs(60)),
                            idempotency_key: None,
                            trace: None,
                        };
                        tasks.submit(request).await.unwrap().task.id
                    }
                })
                .buffer_unordered(SUBMITTING)
                .collect()
                .await;
            let submitted_in = started.elapsed();
            let waits: futures_util::stream::FuturesUnordered<_> = ids
                .iter()
                .map(|id| tasks.wait(id, Duration::from_secs(60)))
                .collect();
            let smaps_at = async {
                if std::env::var_os("ORCH_BENCH_SMAPS").is_some() {
                    tokio::time::sleep(Duration::from_millis(NAP_MS / 2)).await;
                    smaps(n);
                }
            };
            let (ended, ()) = tokio::join!(waits.collect::<Vec<_>>(), smaps_at);
            let failed = ended
                .iter()
                .filter(|stored| stored.as_ref().unwrap().record.status != Status::Completed)
                .count();
            let took = started.elapsed();
            done.store(true, Ordering::Relaxed);
            sampler.join().unwrap();
            let peak = peak.load(Ordering::Relaxed);
            node.shutdown(Duration::from_secs(5)).await;
            println!(
                "{n:>6} tasks of {agent:<8} waiting {NAP_MS} ms: RSS before {:.0} MiB, peak {:.0} MiB \
                 ({:.1} KiB per task); all accepted after {:.0} ms, all ended after {:.2} s; {failed} failed",
                mib(before),
                mib(peak),
                (peak.saturating_sub(before)) as f64 / 1024.0 / f64::from(n),
                submitted_in.as_secs_f64() * 1e3,
                took.as_secs_f64(),
            );
        });
}
