//! orch's engine and sandbox, below everything else: the one place that
//! configures wasmtime ([`engine`], generic over its store data), one task
//! run in a fresh store under fuel, memory, time and data limits
//! ([`sandbox`]), the key-value store behind the `kv` import ([`kv`]), the
//! typed errors ([`error`]) and the escaping of untrusted text ([`text`]).
//!
//! It knows nothing of queues, task stores, NATS or HTTP: this crate does
//! not depend on them, so the compiler keeps it that way. The `orch` crate
//! builds the host on top and re-exports these modules.

pub mod engine;
pub mod error;
pub mod kv;
pub mod sandbox;
pub mod text;

/// The WIT world every agent implements.
pub const WORLD: &str = "orch:agent/agent@0.1.0";

/// The layering rule inside this crate that the module tree does not
/// enforce by itself, checked on the source text.
#[cfg(test)]
mod layering {
    use std::path::Path;

    #[test]
    fn the_engine_knows_nothing_of_the_sandbox() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let named = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .any(|l| l.contains("crate::sandbox"));
            assert!(!named, "{} names the sandbox", entry.path().display());
        }
    }
}
