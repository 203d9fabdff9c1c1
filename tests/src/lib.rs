//! Shared helpers for the integration tests: where the built plugins are, and
//! a small harness that owns an engine, a kv store and a temporary data
//! directory.

// Test support code: panicking with a message is the right failure mode here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use orch::config::HostConfig;
use orch::kv::KvStore;
use orch::plugin::PluginError;
use orch::{Agent, Engine, EngineConfig, Limits, TaskError, TaskOutput, TaskRequest};

/// The repository root (this crate lives in `tests/`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of a component built by `plugins/build.sh`. Panics with the command
/// to run when it is missing, so a forgotten build reads as such.
pub fn plugin(name: &str) -> PathBuf {
    let path = repo_root()
        .join("target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins first with `bash plugins/build.sh`",
        path.display()
    );
    path
}

/// The core module (not a component) that the build keeps for echo.
pub fn core_module() -> PathBuf {
    let path = repo_root().join("target/plugins/core/echo.wasm");
    assert!(
        path.exists(),
        "{} is missing: run `bash plugins/build.sh`",
        path.display()
    );
    path
}

pub struct Harness {
    pub engine: Engine,
    pub kv: Arc<KvStore>,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// An engine with a small instance pool (tests run in parallel, and each
    /// pool reserves address space) and a compile cache shared by all tests
    /// under `target/test-cache`, so the large JS and Python components are
    /// compiled once rather than once per test. Entries are keyed by content
    /// hash and engine, so a rebuilt plugin never hits a stale entry.
    pub fn new() -> Harness {
        Harness::with_config(EngineConfig {
            instance_slots: 16,
            cache_dir: Some(repo_root().join("target/test-cache/components")),
            ..EngineConfig::default()
        })
    }

    pub fn with_config(config: EngineConfig) -> Harness {
        let dir = tempfile::tempdir().expect("temporary directory");
        let engine = Engine::new(config).expect("engine");
        let kv = Arc::new(KvStore::new(dir.path().join("kv.redb")));
        Harness { engine, kv, dir }
    }

    pub async fn load(&self, name: &str) -> Agent {
        self.try_load(&plugin(name))
            .await
            .unwrap_or_else(|e| panic!("loading {name}: {e}"))
    }

    /// Loads a component file as `orch run` does: with the grants and limits
    /// of its manifest when it has one, with none otherwise.
    pub async fn try_load(&self, path: &std::path::Path) -> Result<Agent, PluginError> {
        let store = orch::plugin::PluginStore::new(self.dir.path());
        orch::plugin::load_file(&self.engine, self.kv.clone(), &HostConfig::default(), path)
            .await?
            .into_parts(&store)
            .map(|(agent, _limits)| agent)
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

/// Runs one task with `payload` under `limits` against the agent's first capability.
pub async fn run(agent: &Agent, payload: &[u8], limits: &Limits) -> Result<TaskOutput, TaskError> {
    let capability = agent.descriptor().capabilities[0].name.clone();
    run_capability(agent, &capability, payload, limits).await
}

/// Runs one task for a named capability of the agent.
pub async fn run_capability(
    agent: &Agent,
    capability: &str,
    payload: &[u8],
    limits: &Limits,
) -> Result<TaskOutput, TaskError> {
    let task = TaskRequest {
        id: "test-task".into(),
        capability: capability.into(),
        payload: payload.to_vec(),
        content_type: "application/octet-stream".into(),
        attempt: 1,
        calls: None,
    };
    agent.handle(task, limits).await
}

/// Like [`run`] but returns the result bytes as text and panics on failure.
pub async fn run_ok(agent: &Agent, payload: &[u8], limits: &Limits) -> String {
    match run(agent, payload, limits).await {
        Ok(out) => String::from_utf8_lossy(&out.result).into_owned(),
        Err(e) => panic!("task on {} failed: {e}", agent.descriptor().name),
    }
}
