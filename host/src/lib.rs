//! orch: a host runtime for sandboxed agents compiled to WebAssembly components.
//!
//! The library loads components that implement the `orch:agent/agent` world
//! (see `wit/agent.wit`), checks them, and runs tasks against them in fresh
//! stores under fuel, memory, time and data limits. The `orch` binary is a thin
//! command-line layer over it.
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
//! - [`daemon`]: the long-running host: task journal, recovery after a
//!   crash, plugin changes while serving, retention.
//! - [`api`]: the HTTP+JSON control API over [`daemon`] (axum).
//! - [`cluster`]: many hosts over NATS (the only module that talks to it).
//! - [`config`]: the host's configuration file (limit maxima, signature policy).
//! - [`units`]: parsing of sizes and durations given by users.

pub mod api;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod kv;
pub mod plugin;
pub mod sandbox;
pub mod scheduler;
pub mod text;
pub mod units;

pub use engine::{ComponentInfo, Engine, EngineConfig};
pub use error::{LoadError, TaskError};
pub use sandbox::{
    Agent, CallReport, Capability, Descriptor, DirGrant, Grants, Limits, TaskOutput, TaskRequest,
};

/// The WIT world every agent implements.
pub const WORLD: &str = "orch:agent/agent@0.1.0";
