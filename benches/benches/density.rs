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
//! `cargo bench -p orch-benches --bench density` after `bash
//! plugins/build.sh`; `ORCH_BENCH_DENSITY=1000,5000` sets the Ns, and
//! `ORCH_BENCH_SMAPS=1` prints, half-way through each wait, where the
//! resident memory is (mappings of /proc/self/smaps grouped by size).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orch::config::HostConfig;
use orch::daemon::{Status, SubmitRequest};
use orch::node::{Node, NodeOptions};
use orch::{Engine, EngineConfig};

const NAP_MS: u64 = 5000;

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
    for ((size, perms), (count, rss)) in groups.into_iter().take(8) {
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
    let rt = orch_benches::runtime();
    for n in ns {
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
            orch_benches::install(home.path(), &engine, &config, &["nap"]).await;
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
            let started = Instant::now();
            let mut submitted = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let request = SubmitRequest {
                    capability: "test.nap".into(),
                    payload: NAP_MS.to_string().into_bytes(),
                    priority: 0,
                    deadline: Some(Duration::from_secs(60)),
                    idempotency_key: None,
                    trace: None,
                };
                let tasks = tasks.clone();
                submitted.push(tokio::spawn(async move {
                    let id = tasks.submit(request).await.unwrap().task.id;
                    let accepted = started.elapsed();
                    (accepted, tasks.wait(&id, Duration::from_secs(60)).await.unwrap())
                }));
            }
            if std::env::var_os("ORCH_BENCH_SMAPS").is_some() {
                tokio::time::sleep(Duration::from_millis(NAP_MS / 2)).await;
                smaps(n);
            }
            let (mut failed, mut submitted_in) = (0, Duration::ZERO);
            for t in submitted {
                let (accepted, stored) = t.await.unwrap();
                submitted_in = submitted_in.max(accepted);
                if stored.record.status != Status::Completed {
                    failed += 1;
                }
            }
            let took = started.elapsed();
            done.store(true, Ordering::Relaxed);
            sampler.join().unwrap();
            let peak = peak.load(Ordering::Relaxed);
            node.shutdown(Duration::from_secs(5)).await;
            println!(
                "{n:>6} tasks waiting {NAP_MS} ms: RSS before {:.0} MiB, peak {:.0} MiB \
                 ({:.1} KiB per task); all accepted after {:.0} ms, all ended after {:.2} s; {failed} failed",
                mib(before),
                mib(peak),
                (peak.saturating_sub(before)) as f64 / 1024.0 / f64::from(n),
                submitted_in.as_secs_f64() * 1e3,
                took.as_secs_f64(),
            );
        });
    }
}
