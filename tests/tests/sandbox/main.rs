//! Integration tests of the sandbox against real components from plugins/.
//! One binary, so it links once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agents;
mod cache;
mod conformance;
mod grants;
mod kv;
mod limits;
mod malformed;
mod reuse;
mod scheduler;
mod teams;
mod traps;
