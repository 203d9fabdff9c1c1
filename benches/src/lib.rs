//! Shared pieces of the benchmarks in `benches/`: where the built plugins
//! are, and a bare wasmtime host for the same-run baselines. Figures are in
//! README.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

pub mod nats;

use orch::engine::bindings::{self, orch::agent as wit};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{InstanceAllocationStrategy, PoolingAllocationConfig};

/// A component built by `plugins/build.sh`.
pub fn plugin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run `bash plugins/build.sh` first",
        path.display()
    );
    path
}

/// Installs built plugins into the data directory `home`, as `orch
/// plugin install` would.
pub async fn install(
    home: &std::path::Path,
    engine: &orch::Engine,
    config: &orch::config::HostConfig,
    plugins: &[&str],
) {
    let kv = std::sync::Arc::new(orch::kv::KvStore::new(home.join("kv.redb")));
    for p in plugins {
        let checked = orch::plugin::check(engine, kv.clone(), config, &plugin(p), None)
            .await
            .unwrap();
        orch::plugin::PluginStore::new(home)
            .commit(&checked, orch::plugin::store::Mode::Install)
            .unwrap();
    }
}

/// The runtime every bench runs on: 2 worker threads, one per core here.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Host state of the bare baseline: imports that do nothing.
pub struct Bare;

impl wit::types::Host for Bare {}

impl wit::log::Host for Bare {
    fn log(&mut self, _level: wit::log::Level, _message: String) {}
}

impl wit::kv::Host for Bare {
    async fn get(&mut self, _key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        Ok(None)
    }
    async fn set(&mut self, _key: String, _value: Vec<u8>) -> Result<(), String> {
        Ok(())
    }
    async fn delete(&mut self, _key: String) -> Result<(), String> {
        Ok(())
    }
}

impl wit::messaging::Host for Bare {
    async fn publish(&mut self, _subject: String, _payload: Vec<u8>) -> Result<(), String> {
        Err("not in a bare host".into())
    }
    async fn request(
        &mut self,
        _subject: String,
        _payload: Vec<u8>,
        _timeout_ms: u32,
    ) -> Result<Vec<u8>, String> {
        Err("not in a bare host".into())
    }
}

impl wit::tasks::Host for Bare {
    async fn call(
        &mut self,
        _capability: String,
        _payload: Vec<u8>,
        _timeout_ms: u32,
    ) -> Result<Vec<u8>, wit::tasks::CallError> {
        Err(wit::tasks::CallError::Refused("not in a bare host".into()))
    }
    async fn call_all(
        &mut self,
        requests: Vec<wit::tasks::CallRequest>,
    ) -> Vec<Result<Vec<u8>, wit::tasks::CallError>> {
        requests
            .iter()
            .map(|_| Err(wit::tasks::CallError::Refused("not in a bare host".into())))
            .collect()
    }
}

/// A host process started by a bench, killed when dropped.
pub struct HostProc(pub std::process::Child);

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl HostProc {
    /// Installs each component into `home` (`orch plugin install -y`, its
    /// manifest beside it), then starts `orch host start --listen
    /// 127.0.0.1:0` with `extra` arguments; returns the host and its API's
    /// URL once it prints it.
    pub fn start(
        home: &std::path::Path,
        components: &[PathBuf],
        extra: &[&str],
    ) -> (HostProc, String) {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        for component in components {
            let installed = Command::new(orch_binary())
                .args(["plugin", "install", "-y"])
                .arg(component)
                .env("ORCH_HOME", home)
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(
                installed.success(),
                "cannot install {}",
                component.display()
            );
        }
        let mut child = Command::new(orch_binary())
            .args(["host", "start", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("ORCH_HOME", home)
            .env("ORCH_LOG", "warn")
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("host exited").unwrap();
            if let Some(at) = line.find("http://") {
                break line[at..].split_whitespace().next().unwrap().to_string();
            }
        };
        // Keep reading, so the host never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        (HostProc(child), url)
    }
}

/// The `orch` binary of `cargo build --release -p orch-cli`.
pub fn orch_binary() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/orch");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release -p orch-cli` first",
        path.display()
    );
    path
}

/// A bare wasmtime engine and the pre-linked echo component. `metered`
/// turns on the same fuel and epoch instrumentation orch uses, to separate
/// wasmtime's metering cost from orch's own.
/// The pool returns freed slots to the kernel in orch's batch size, so that
/// the baseline does not pay a cost orch does not (see the `pool` bench).
pub fn bare_echo(metered: bool) -> (wasmtime::Engine, bindings::AgentPre<Bare>) {
    let mut pool = PoolingAllocationConfig::default();
    pool.decommit_batch_size(orch::engine::DECOMMIT_BATCH);
    bare_echo_with(metered, pool, wasmtime::Config::new())
}

/// [`bare_echo`] with the given pool and engine settings.
pub fn bare_echo_with(
    metered: bool,
    pool: PoolingAllocationConfig,
    config: wasmtime::Config,
) -> (wasmtime::Engine, bindings::AgentPre<Bare>) {
    bare_pooled("echo", metered, pool, config)
}

/// [`bare_echo_with`] for the component `name` (from `target/plugins`).
pub fn bare_pooled(
    name: &str,
    metered: bool,
    pool: PoolingAllocationConfig,
    mut config: wasmtime::Config,
) -> (wasmtime::Engine, bindings::AgentPre<Bare>) {
    config
        .wasm_component_model(true)
        .consume_fuel(metered)
        .epoch_interruption(metered)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = wasmtime::Engine::new(&config).unwrap();
    let component = Component::from_file(&engine, plugin(name)).unwrap();
    let mut linker = Linker::new(&engine);
    bindings::Agent::add_to_linker::<Bare, HasSelf<Bare>>(&mut linker, |b| b).unwrap();
    let pre = bindings::AgentPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    (engine, pre)
}

/// A bare wasmtime engine with epoch interruption and the pre-linked
/// component `name` (from `target/plugins`).
pub fn bare_component(name: &str) -> (wasmtime::Engine, bindings::AgentPre<Bare>) {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true).epoch_interruption(true);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let component = Component::from_file(&engine, plugin(name)).unwrap();
    let mut linker = Linker::new(&engine);
    bindings::Agent::add_to_linker::<Bare, HasSelf<Bare>>(&mut linker, |b| b).unwrap();
    let pre = bindings::AgentPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    (engine, pre)
}

/// `n` bare instantiate + `handle` calls of echo, one after the other: the
/// baseline loop the throughput benches run on two threads.
pub async fn bare_echo_calls(engine: &wasmtime::Engine, pre: &bindings::AgentPre<Bare>, n: u64) {
    let task = wit::types::Task {
        id: "bench".into(),
        capability: "echo".into(),
        payload: b"hello, orch".to_vec(),
        content_type: String::new(),
        attempt: 1,
        deadline_ms: None,
    };
    for _ in 0..n {
        let mut store = wasmtime::Store::new(engine, Bare);
        let instance = pre.instantiate_async(&mut store).await.unwrap();
        instance
            .call_handle(&mut store, &task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// One echo task through a task service, as the API submits it, waited
/// for; panics unless it echoed.
pub async fn echo_through(service: &orch::service::TaskService) {
    let (done, _) = service
        .submit_and_wait(
            orch::daemon::SubmitRequest {
                capability: "echo".into(),
                payload: b"hello, orch".to_vec(),
                ..Default::default()
            },
            Some(std::time::Duration::from_secs(30)),
        )
        .await
        .unwrap();
    assert_eq!(
        done.result.as_deref(),
        Some(&b"hello, orch"[..]),
        "{:?}",
        done.record
    );
}
