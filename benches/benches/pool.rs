//! Bare wasmtime instantiate + `handle` of echo with four pool settings,
//! on one tokio task and on two at once (a 2-worker runtime): wasmtime's
//! defaults, orch's batched decommit (`orch::engine::DECOMMIT_BATCH`),
//! batched decommit without copy-on-write memory images, and batched
//! decommit with up to 64 KiB of written pages reset in place (found with
//! Linux's `PAGEMAP_SCAN`; skipped where the kernel lacks it), which orch
//! does not use: see benches/README.md.
//!
//! Why: with the defaults, two threads instantiating at once did fewer
//! tasks per second than one. A profile showed the time in TLB-flush
//! interrupts from `madvise` (one per freed slot) and copy-on-write faults.
//!
//! `cargo bench -p orch-benches --bench pool` after `bash plugins/build.sh`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use orch_benches::{bare_echo_calls, bare_echo_with};
use wasmtime::PoolingAllocationConfig;

const TASKS: u64 = 10_000;

fn main() {
    let rt = orch_benches::runtime();
    let settings: [(&str, usize, bool, bool); 4] = [
        ("wasmtime defaults", 1, true, false),
        (
            "batched decommit (orch)",
            orch::engine::DECOMMIT_BATCH,
            true,
            false,
        ),
        (
            "batched decommit, no copy-on-write",
            orch::engine::DECOMMIT_BATCH,
            false,
            false,
        ),
        (
            "batched decommit, 64 KiB reset in place",
            orch::engine::DECOMMIT_BATCH,
            true,
            true,
        ),
    ];
    for (name, batch, cow, in_place) in settings {
        let mut pool = PoolingAllocationConfig::default();
        pool.decommit_batch_size(batch);
        if in_place {
            if !PoolingAllocationConfig::is_pagemap_scan_available() {
                println!("{name}: skipped, this kernel has no PAGEMAP_SCAN");
                continue;
            }
            pool.pagemap_scan(wasmtime::Enabled::Yes)
                .linear_memory_keep_resident(64 << 10)
                .table_keep_resident(64 << 10);
        }
        let mut config = wasmtime::Config::new();
        config.memory_init_cow(cow);
        let (engine, pre) = bare_echo_with(false, pool, config);
        rt.block_on(async {
            bare_echo_calls(&engine, &pre, 500).await;
            let t = Instant::now();
            bare_echo_calls(&engine, &pre, TASKS).await;
            let one = TASKS as f64 / t.elapsed().as_secs_f64();
            let t = Instant::now();
            let two: Vec<_> = (0..2)
                .map(|_| {
                    let (engine, pre) = (engine.clone(), pre.clone());
                    tokio::spawn(async move { bare_echo_calls(&engine, &pre, TASKS / 2).await })
                })
                .collect();
            for task in two {
                task.await.unwrap();
            }
            let two = TASKS as f64 / t.elapsed().as_secs_f64();
            println!("{name}: one task {one:.0} tasks/s, two tasks {two:.0} tasks/s");
        });
    }
}
