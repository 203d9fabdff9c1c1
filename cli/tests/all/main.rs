//! The `orch` binary as operators use it, in one test binary (one link):
//! real processes, real components from plugins/, a fresh ORCH_HOME per
//! test, and a real nats-server on a free port for the cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod cli;
mod cluster;
mod common;
mod contract;
mod daemon;
mod dashboard;
mod logs;
mod metrics;
mod plugin;
mod traces;
mod workflow;
