//! orch: a host runtime for sandboxed agents compiled to WebAssembly components.
//!
//! The library loads components that implement the `orch:agent/agent` world
//! (see `wit/agent.wit`), checks them, and runs tasks against them in fresh
//! stores under fuel, memory, time and data limits. The `orch` binary (the
//! `orch-cli` crate, `cli/`) is a thin command-line layer over it.
//!
//! Module map:
//! - [`engine`]: the only module that configures wasmtime; compiles, caches and
//!   pre-links components.
//! - [`sandbox`]: per-task store state, host imports (`log`, `kv`, `tasks`,
//!   `messaging`), limits and the mapping of traps to typed errors.
//! - [`kv`]: the embedded key-value store behind the `kv` import.
//! - [`plugin`]: manifests, grants, signatures and the install store.
//! - [`scheduler`]: queues by capability, placement, retries, breakers,
//!   and the sub-tasks of `tasks.call`.
//! - [`service`]: the task service (admission, events, cancel) over a
//!   store: the journal or JetStream.
//! - [`daemon`]: the long-running host: task journal, recovery after a
//!   crash, plugin changes while serving, retention.
//! - [`node`]: a whole host, alone or in a cluster, for embedding.
//! - [`api`]: the HTTP+JSON control API over [`daemon`] (axum).
//! - [`cluster`]: many hosts over NATS (the only module that talks to it).
//! - [`config`]: the host's configuration file (limit maxima, signature policy).
//! - [`units`]: parsing of sizes and durations given by users.
//! - [`workflow`]: durable workflows (task graphs, checkpoints,
//!   compensation) over the task service.

pub mod api;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod daemon;
pub(crate) mod localdb;
pub mod metrics;
pub mod node;
pub mod plugin;
pub mod scheduler;
pub mod service;
pub mod trace;
pub mod units;
pub mod workflow;

// The engine and sandbox are their own crate (`engine/`), which knows
// nothing of what is built here; re-exported so that `orch::engine`,
// `crate::sandbox` and the rest name them as before.
pub use orch_engine::{engine, error, kv, sandbox, text, WORLD};

pub use engine::{ComponentInfo, EngineConfig};
pub use error::{LoadError, TaskError};
pub use sandbox::{
    Agent, CallReport, Capability, Descriptor, DirGrant, Engine, Grants, Limits, TaskOutput,
    TaskRequest,
};

/// The layering rules of ARCHITECTURE.md that neither the crates nor the
/// module tree enforce by themselves, checked on the source text. (That
/// the engine and sandbox know nothing above them is the compiler's: they
/// are the `orch-engine` crate, which depends on none of it.)
#[cfg(test)]
mod layering {
    use std::path::{Path, PathBuf};

    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    /// Files under `src/` whose code (not comments) names `crate_path`,
    /// outside the modules in `allowed`.
    fn users_outside(crate_path: &str, allowed: &[&str]) -> Vec<String> {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&src, &mut files);
        let mut found = Vec::new();
        for file in files {
            let rel = file
                .strip_prefix(&src)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if allowed.iter().any(|a| rel.starts_with(a)) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            // This module names them all as text.
            let code = text.split("mod layering {").next().unwrap_or_default();
            let uses = code
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains(crate_path));
            if uses {
                found.push(rel);
            }
        }
        found.sort();
        found
    }

    #[test]
    fn only_cluster_talks_to_nats() {
        assert_eq!(
            users_outside("async_nats", &["cluster/"]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn only_api_uses_axum() {
        assert_eq!(users_outside("axum", &["api/"]), Vec::<String>::new());
    }

    /// Argument parsing, log output and HTTP requests are the CLI's
    /// (`cli/`, another crate): the library does not depend on clap, ureq
    /// or tracing-subscriber, so the compiler holds that. Printing it can
    /// only be kept from by looking.
    #[test]
    fn the_library_never_prints() {
        for name in ["println!", "eprintln!", "print!(", "eprint!("] {
            assert_eq!(users_outside(name, &[]), Vec::<String>::new(), "{name}");
        }
    }

    /// Task events come from the service, the daemon's attempt hook and
    /// outcome writer, and the cluster's outcome writer; never from the
    /// API or elsewhere (`metrics.rs` only reads their kinds).
    #[test]
    fn only_the_service_and_its_executors_emit_task_events() {
        assert_eq!(
            users_outside(
                "EventKind::",
                &["service/", "daemon/", "cluster/tasks.rs", "metrics.rs"]
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn only_the_engine_configures_wasmtime() {
        for name in ["wasmtime::Config", "Linker::new", "PoolingAllocationConfig"] {
            assert_eq!(
                users_outside(name, &["engine/"]),
                Vec::<String>::new(),
                "{name}"
            );
        }
    }
}
