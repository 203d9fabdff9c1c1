//! Running tasks: a fresh store per call with fuel, a memory limiter, a
//! deadline and host-call data caps; the host imports (`log`, `kv`, WASI with
//! nothing granted); and the mapping of every way a call can end to a
//! [`TaskError`].

mod host;
mod stderr;
pub mod subject;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;
use wasmtime::component::ResourceTable;
use wasmtime::{CallHook, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};

use crate::engine::bindings;
use crate::engine::{ComponentInfo, EngineConfig, InstancePermit};
use crate::error::{LoadError, TaskError};
use crate::kv::KvStore;
use bindings::{orch::agent::types as wit, AgentPre};

/// Per-task limits. Every field is enforced; see each for what happens past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Fuel (roughly, wasm instructions) for one task, instantiation included.
    pub fuel: u64,
    /// Total linear memory of the instance, in bytes.
    pub memory: u64,
    /// Wall-clock time for one task, instantiation and host calls included.
    pub timeout: Duration,
    /// Largest payload accepted, in bytes.
    pub max_payload: u64,
    /// Largest result accepted from the agent, in bytes.
    pub max_result: u64,
    /// Most bytes the agent may pass to the host in one host call (a log
    /// line, a kv value). wasmtime counts the lifting of the task's result
    /// against the same budget, so the budget in force is at least
    /// `max_result` plus a small allowance; see [`Limits::hostcall_budget`].
    pub max_hostcall_data: u64,
    /// Largest value the agent may store under one kv key, in bytes.
    pub max_kv_value: u64,
    /// Deepest chain of `tasks.call`: a top-level task is depth 0, the
    /// sub-tasks it calls are depth 1, and so on.
    pub max_call_depth: u32,
    /// Most sub-tasks one task may start through `tasks.call` in total.
    pub max_subtasks: u32,
    /// Not a limit, but how `tasks.call` behaves: each call's outcome is
    /// recorded, and a run of the same task again gets the recorded
    /// outcomes instead of new sub-tasks (manifest `[plugin] durable`).
    pub durable: bool,
    /// How many tasks in a row one instance may serve (manifest `[limits]
    /// reuse`); 0 and 1 give every task a fresh instance. See
    /// [`Agent::run`] for when a kept instance is dropped.
    pub reuse: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 1_000_000_000,
            memory: 128 << 20,
            timeout: Duration::from_secs(10),
            max_payload: 16 << 20,
            max_result: 16 << 20,
            max_hostcall_data: 4 << 20,
            max_kv_value: 1 << 20,
            max_call_depth: 4,
            max_subtasks: 32,
            durable: false,
            reuse: 0,
        }
    }
}

/// Room for the `result<list<u8>, task-error>` framing around a result of
/// `max_result` bytes.
const RESULT_FRAMING: u64 = 64 << 10;

impl Limits {
    /// The per-call data budget given to wasmtime (`set_hostcall_fuel`).
    pub fn hostcall_budget(&self) -> u64 {
        self.max_hostcall_data
            .max(self.max_result.saturating_add(RESULT_FRAMING))
    }
}

/// What a plugin may touch beyond its own memory. The default grants nothing:
/// no kv namespace, an empty environment, no directories, no network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// The kv namespace the agent's `kv` calls use.
    pub kv: Option<String>,
    /// Environment variables the agent sees, with their values.
    pub env: Vec<(String, String)>,
    /// Host directories mapped into the agent's filesystem.
    pub dirs: Vec<DirGrant>,
    /// Subject patterns the agent may publish and send requests to.
    pub messaging: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    pub host: std::path::PathBuf,
    pub guest: String,
    pub writable: bool,
}

/// What the agent says about itself (from `describe`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Descriptor {
    pub name: String,
    pub version: String,
    pub capabilities: Vec<Capability>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Capability {
    pub name: String,
    pub version: String,
    pub description: String,
}

/// One task as the host hands it to an agent.
#[derive(Debug, Clone, Default)]
pub struct TaskRequest {
    pub id: String,
    pub capability: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub attempt: u32,
    /// How the task reaches other agents through `tasks.call`; without it
    /// every call is refused (a lone agent under `orch run`).
    pub calls: Option<CallContext>,
}

/// How a task ended, with the fuel it used whichever way that was.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<TaskOutput, TaskError>,
    /// Fuel the task used, its sub-tasks' included; 0 when it never ran.
    pub fuel_used: u64,
    /// The most linear memory its instance had (memories only grow, so
    /// the size at its end); 0 when it never ran here.
    pub memory: u64,
}

impl Outcome {
    /// A task that ended before any guest code ran.
    pub fn failed(error: TaskError) -> Outcome {
        Outcome {
            result: Err(error),
            fuel_used: 0,
            memory: 0,
        }
    }
}

/// A successful task.
#[derive(Debug, Clone, Default)]
pub struct TaskOutput {
    pub result: Vec<u8>,
    /// Fuel the task used, the fuel charged for its sub-tasks included.
    pub fuel_used: u64,
    pub elapsed: Duration,
    /// Sub-tasks started through `tasks.call`.
    pub subtasks: u32,
    /// The part of `fuel_used` charged for sub-tasks.
    pub subtask_fuel: u64,
    /// Each sub-task in the order they ended.
    pub calls: Vec<CallReport>,
}

/// What one `tasks.call` sub-task got and used, for the caller's result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallReport {
    pub capability: String,
    /// The time the sub-task was given, in milliseconds: the caller's
    /// remaining time, or less when the call set a timeout.
    pub deadline_ms: u64,
    /// The fuel it was allowed (the caller's remaining fuel, shared).
    pub fuel_limit: u64,
    /// The fuel charged to the caller for it.
    pub fuel_used: u64,
    /// `ok`, or the error kind (`trap`, `deadline-exceeded`, ...).
    pub outcome: String,
}

/// A sub-task an agent asked for through `tasks.call`.
#[derive(Debug, Clone)]
pub struct SubCall {
    /// The calling task's id.
    pub parent: String,
    pub capability: String,
    pub payload: Vec<u8>,
    /// The caller's own deadline, or earlier when the call set a timeout.
    pub deadline: Instant,
    /// The most fuel the sub-task may use: the caller's remaining fuel
    /// (shared evenly among the calls of one `call-all`).
    pub fuel: u64,
    /// The sub-task's depth in the call tree (1 for a call from a top-level task).
    pub depth: u32,
}

/// A sub-task's end and the fuel it used, which is charged to its caller
/// whatever the outcome.
pub type SubCallFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

pub type BusFuture<T> = Pin<Box<dyn Future<Output = Result<T, BusError>> + Send>>;

/// Why a message was not delivered or answered. The guest gets its text.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no agent subscribes to {subject}")]
    NoSubscriber { subject: String },
    #[error("no reply on {subject} within {ms} ms")]
    Timeout { subject: String, ms: u64 },
    /// The subscriber's task failed; `message` is its error as text (it
    /// may come from another host).
    #[error("the subscriber failed: {message}")]
    Failed { message: String },
    /// The host cannot take the message now (shutting down, queues full).
    #[error("{subject}: {source}")]
    Refused {
        subject: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the host is shutting down")]
    ShuttingDown,
    /// The NATS connection failed the request.
    #[error("{what} on {subject}: {source}")]
    Transport {
        what: &'static str,
        subject: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Carries the `messaging` import's messages: within one host, or between
/// hosts over NATS. The sandbox checks grants before it calls this.
pub trait Bus: Send + Sync {
    fn publish(&self, subject: String, payload: Vec<u8>) -> BusFuture<()>;
    fn request(&self, subject: String, payload: Vec<u8>, timeout: Duration) -> BusFuture<Vec<u8>>;
    /// Told of each message `agent` published while running `task`, once
    /// it went (the host's audit trail records it).
    fn published(&self, _agent: &str, _task: &str, _subject: &str, _bytes: usize) {}
}

/// The `tracing` target of the spans of a task's trace (the host exports
/// those by OTLP when configured; see the host's `trace` module).
pub const TRACE_TARGET: &str = "orch::trace";

/// A span of the task's trace under the current span, or no span when the
/// current one is not recorded (traces off, or the task's trace not
/// sampled): an unsampled task costs no span below its first.
#[macro_export]
macro_rules! trace_span {
    ($($arg:tt)*) => {
        if ::tracing::Span::current().is_disabled() {
            ::tracing::Span::none()
        } else {
            ::tracing::info_span!(target: $crate::sandbox::TRACE_TARGET, $($arg)*)
        }
    };
}

/// The content type of a task that delivers a message.
pub const MESSAGE_CONTENT_TYPE: &str = "application/vnd.orch.message";

/// Runs the sub-tasks of `tasks.call`. The scheduler implements it; the
/// sandbox knows nothing else about how sub-tasks are placed.
pub trait SubTasks: Send + Sync {
    fn call(&self, call: SubCall) -> SubCallFuture;
}

/// Where a task sits in a call tree and how it reaches other agents.
#[derive(Clone)]
pub struct CallContext {
    /// 0 for a top-level task.
    pub depth: u32,
    pub tasks: Arc<dyn SubTasks>,
    /// Where `messaging` calls go; without it they fail.
    pub bus: Option<Arc<dyn Bus>>,
    /// The id of the task's trace, for its log lines.
    pub trace_id: Option<String>,
}

impl std::fmt::Debug for CallContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContext")
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

/// A task's `tasks.call` state, kept in its store.
struct CallState {
    ctx: CallContext,
    task_id: String,
    deadline: Instant,
    max_depth: u32,
    max_subtasks: u32,
    started: u32,
    /// The store's fuel when the guest last entered the host, set by the
    /// call hook: the budget the next sub-tasks may use.
    fuel_left: u64,
    /// Fuel the sub-tasks used that the call hook has not yet taken from
    /// the caller's store.
    charge: u64,
    /// How many host calls deep the guest is: the hook acts only on the
    /// outermost (see [`on_host_call`]).
    host_depth: u32,
    charged: u64,
    reports: Vec<CallReport>,
}

/// The engine the sandbox runs agents on: stores hold [`StoreData`].
pub type Engine = crate::engine::Engine<StoreData>;

/// A component compiled and pre-linked for [`Engine`].
pub type Compiled = crate::engine::Compiled<StoreData>;

impl crate::engine::Engine<StoreData> {
    /// An engine whose linker has WASI preview 2 and the `agent` world's
    /// imports (`log`, `kv`, `tasks`, `messaging`), implemented in
    /// `host.rs`.
    pub fn new(config: EngineConfig) -> Result<Engine, crate::error::LoadError> {
        crate::engine::Engine::with_imports(config, |linker| {
            wasmtime_wasi::p2::add_to_linker_async(linker)?;
            bindings::Agent::add_to_linker::<StoreData, wasmtime::component::HasSelf<StoreData>>(
                linker,
                |data| data,
            )
        })
    }
}

/// Everything a task's store holds. Dropped with the store after every call.
pub struct StoreData {
    limiter: MemoryLimiter,
    table: ResourceTable,
    /// Created on first use: agents that never call WASI do not pay for it.
    wasi: Option<WasiCtx>,
    kv: KvState,
    grants: Arc<Grants>,
    agent: Arc<str>,
    /// The task's id, for its log lines; empty in `describe`.
    task: Arc<str>,
    /// Text of a guest panic reported through `log` just before a trap.
    panic: Option<String>,
    /// The guest's stderr, present once WASI is in use.
    stderr: Option<stderr::StderrTail>,
    /// `tasks.call` state; `None` refuses every call.
    calls: Option<CallState>,
    /// Where `messaging` goes, if anywhere.
    bus: Option<Arc<dyn Bus>>,
}

/// How much of a guest's stderr is kept for error messages.
const STDERR_TAIL: usize = 4 << 10;

enum KvState {
    /// `describe` runs before the host has checked anything; no kv there.
    Describe,
    NotGranted,
    Granted(KvAccess),
}

struct KvAccess {
    store: Arc<KvStore>,
    namespace: Arc<str>,
    max_value: u64,
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        // Only what the grants name: environment variables and directories.
        // No arguments and no network (the default socket check denies every
        // address). Clocks and randomness work; stderr is kept (its tail) for
        // error messages.
        let stderr = &mut self.stderr;
        let grants = &self.grants;
        let agent = &self.agent;
        let ctx = self.wasi.get_or_insert_with(|| {
            let tail = stderr::StderrTail::new(STDERR_TAIL);
            *stderr = Some(tail.clone());
            let mut builder = WasiCtx::builder();
            builder.stderr(tail).envs(&grants.env);
            for dir in &grants.dirs {
                let perms = if dir.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
                if let Err(error) = builder.preopened_dir(&dir.host, &dir.guest, perms) {
                    // Checked at load; a directory removed since then is
                    // simply not there for this task.
                    tracing::error!(agent = &**agent, dir = %dir.host.display(), error = %error, "cannot open granted directory");
                }
            }
            builder.build()
        });
        WasiCtxView {
            ctx,
            table: &mut self.table,
        }
    }
}

/// Caps the instance's total linear memory (all memories together) and
/// remembers the request it refused, so a later trap can be reported as a
/// memory limit rather than a bare `unreachable`.
struct MemoryLimiter {
    limit: u64,
    used: u64,
    refused: Option<u64>,
    /// Elements a table was asked to grow to, past the limit.
    table_refused: Option<u64>,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current) as u64;
        let total = self.used.saturating_add(growth);
        if total > self.limit {
            self.refused = Some(total);
            return Ok(false);
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Stopped here, before wasmtime fills the new elements (for a huge
        // grow that ran out of fuel first and was reported as such).
        if desired > crate::engine::MAX_TABLE_ELEMENTS {
            self.table_refused = Some(desired as u64);
            return Err(wasmtime::Error::msg(format!(
                "table grow to {desired} elements refused"
            )));
        }
        Ok(true)
    }
}

/// A loaded agent: a checked, pre-linked component and its descriptor.
/// Cheap to share between tasks; every task gets a fresh instance, unless
/// its limits allow reuse ([`Limits::reuse`]), see [`Agent::run`].
pub struct Agent {
    engine: Engine,
    pre: AgentPre<StoreData>,
    info: ComponentInfo,
    descriptor: Descriptor,
    kv: Arc<KvStore>,
    grants: Arc<Grants>,
    /// `grants.kv`, built once so that tasks do not allocate it.
    kv_namespace: Option<Arc<str>>,
    /// Bounds the plugin's instances alive at once (`max_instances`): the
    /// slots and how many there are.
    instances: Option<(Arc<tokio::sync::Semaphore>, u32)>,
    name: Arc<str>,
    subscriptions: Vec<String>,
    /// This agent's key for the instances it parks in the engine.
    owner: u64,
}

/// An instance kept for the agent's next task, parked in its slot
/// ([`InstancePermit::keep`]).
struct Warm {
    store: Store<StoreData>,
    instance: bindings::Agent,
    /// Tasks it has served.
    served: u32,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.engine.evict(self.owner);
    }
}

impl Agent {
    /// Compiles (or loads from the cache) the component at `path`, checks it
    /// against the world, and calls `describe` under `limits`.
    pub async fn load(
        engine: &Engine,
        path: &Path,
        kv: Arc<KvStore>,
        grants: Grants,
        limits: &Limits,
    ) -> Result<Agent, LoadError> {
        let compiled = {
            let engine = engine.clone();
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || engine.compile_file(&path))
                .await
                .map_err(|e| LoadError::Engine(format!("compile task failed: {e}")))??
        };
        Agent::from_compiled(engine, compiled, kv, grants, limits).await
    }

    pub async fn from_compiled(
        engine: &Engine,
        compiled: Compiled,
        kv: Arc<KvStore>,
        grants: Grants,
        limits: &Limits,
    ) -> Result<Agent, LoadError> {
        for dir in &grants.dirs {
            if !dir.host.is_dir() {
                return Err(LoadError::Grant {
                    path: compiled.info.path.clone(),
                    reason: format!(
                        "granted directory {} does not exist or is not a directory",
                        dir.host.display()
                    ),
                });
            }
        }
        let Compiled { pre, info } = compiled;
        let path = info.path.clone();
        let mut agent = Agent {
            engine: engine.clone(),
            pre,
            info,
            descriptor: Descriptor {
                name: String::new(),
                version: String::new(),
                capabilities: Vec::new(),
            },
            kv,
            kv_namespace: grants.kv.as_deref().map(Arc::from),
            grants: Arc::new(grants),
            instances: None,
            name: Arc::from(""),
            subscriptions: Vec::new(),
            owner: engine.new_owner(),
        };
        let descriptor = agent
            .describe(limits)
            .await
            .map_err(|e| LoadError::Describe {
                path: path.clone(),
                source: Box::new(e),
            })?;
        validate_descriptor(&descriptor)
            .map_err(|reason| LoadError::InvalidDescriptor { path, reason })?;
        agent.name = Arc::from(descriptor.name.as_str());
        agent.descriptor = descriptor;
        Ok(agent)
    }

    pub fn descriptor(&self) -> &Descriptor {
        &self.descriptor
    }

    /// The engine the agent runs on (its instance slots are shared by every
    /// agent of that engine).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn info(&self) -> &ComponentInfo {
        &self.info
    }

    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// How many instance slots are taken, when the agent has a
    /// `max_instances` limit.
    pub fn instances_in_use(&self) -> Option<usize> {
        self.instances
            .as_ref()
            .map(|(slots, max)| (*max as usize).saturating_sub(slots.available_permits()))
    }

    /// Message subjects delivered to this agent (from its manifest).
    pub fn subscriptions(&self) -> &[String] {
        &self.subscriptions
    }

    pub fn set_subscriptions(&mut self, subjects: Vec<String>) {
        self.subscriptions = subjects;
    }

    /// A slot for one of this agent's tasks if one is free now, or one
    /// holding an instance this agent kept, which the task then runs on
    /// (see [`crate::engine::Engine::try_instance_permit_for`]).
    pub fn try_instance_permit(&self) -> Option<InstancePermit> {
        self.engine.try_instance_permit_for(Some(self.owner))
    }

    /// The `max_instances` limit, if the agent has one.
    pub fn max_instances(&self) -> Option<u32> {
        self.instances.as_ref().map(|(_, max)| *max)
    }

    /// Caps how many tasks of this agent run at once; later tasks wait for a
    /// free slot (their deadline keeps counting).
    pub fn set_max_instances(&mut self, max: Option<u32>) {
        self.instances = max.map(|n| (Arc::new(tokio::sync::Semaphore::new(n as usize)), n));
    }

    /// Calls `describe` in a fresh instance. kv is not available here: the
    /// agent's namespace is not known until `describe` has answered.
    pub async fn describe(&self, limits: &Limits) -> Result<Descriptor, TaskError> {
        let started = Instant::now();
        // Declared before the store, so the slot is free only after the
        // instance is.
        let mut _held: Option<InstancePermit> = None;
        let mut store = self.new_store(limits, KvState::Describe, None, "", started);
        let _deadline = started
            .checked_add(limits.timeout)
            .map(|at| self.engine.arm_deadline(at));
        let outcome = tokio::time::timeout(limits.timeout, async {
            _held = Some(self.engine.instance_permit().await);
            let instance = self.pre.instantiate_async(&mut store).await?;
            instance.call_describe(&mut store).await
        })
        .await;
        match outcome {
            Err(_) => Err(deadline(limits)),
            Ok(Err(e)) => Err(classify(e, store.data(), limits, self.slots())),
            Ok(Ok(d)) => Ok(Descriptor {
                name: d.name,
                version: d.version,
                capabilities: d
                    .capabilities
                    .into_iter()
                    .map(|c| Capability {
                        name: c.name,
                        version: c.version,
                        description: c.description,
                    })
                    .collect(),
            }),
        }
    }

    /// Runs one task in a fresh instance under `limits`. The instance is
    /// dropped afterwards whatever happened, so a trap never leaks into the
    /// next task. Waits for a free instance slot of the engine first (within
    /// the deadline).
    ///
    /// With `limits.reuse` above 1 (and not durable), the task runs on an
    /// instance the agent kept from an earlier task when there is one, and
    /// its instance is kept in turn if the task ended well, the instance
    /// has served fewer than `reuse` tasks, was never refused memory or a
    /// table, and has at least half its memory limit free. Fuel, the
    /// deadline and the host-call budget are set again for every task.
    pub async fn handle(
        &self,
        task: TaskRequest,
        limits: &Limits,
    ) -> Result<TaskOutput, TaskError> {
        self.run(task, limits, None).await.result
    }

    /// Like [`Agent::handle`], and reports the fuel the task used however it
    /// ended (a caller of `tasks.call` is charged it). With `permit`, the
    /// task uses that instance slot instead of waiting for one.
    pub async fn run(
        &self,
        task: TaskRequest,
        limits: &Limits,
        permit: Option<InstancePermit>,
    ) -> Outcome {
        let size = task.payload.len() as u64;
        if size > limits.max_payload {
            return Outcome::failed(TaskError::PayloadTooLarge {
                size,
                limit: limits.max_payload,
            });
        }
        let started = Instant::now();
        let kv = match &self.kv_namespace {
            Some(namespace) => KvState::Granted(KvAccess {
                store: self.kv.clone(),
                namespace: namespace.clone(),
                max_value: limits.max_kv_value,
            }),
            None => KvState::NotGranted,
        };
        let bus = task.calls.as_ref().and_then(|c| c.bus.clone());
        let calls = task.calls.map(|ctx| CallState {
            ctx,
            task_id: task.id.clone(),
            deadline: started + limits.timeout,
            max_depth: limits.max_call_depth,
            max_subtasks: limits.max_subtasks,
            started: 0,
            fuel_left: 0,
            charge: 0,
            host_depth: 0,
            charged: 0,
            reports: Vec::new(),
        });
        // A durable task's calls are replayed against its record, which
        // state carried over from another task could make it diverge from.
        let reusable = limits.reuse > 1 && !limits.durable;
        // An instance this agent kept from an earlier task, if it may use
        // one: in the slot it was given, or parked in the engine.
        let mut slot = permit;
        let mut warm: Option<Box<Warm>> = None;
        if reusable {
            if let Some(kept) = slot.as_mut().and_then(InstancePermit::take_kept) {
                warm = kept.downcast::<Warm>().ok();
            } else if let Some(mut parked) = self.engine.unpark(self.owner) {
                warm = parked.take_kept().and_then(|k| k.downcast::<Warm>().ok());
                if let Some(given) = slot.take() {
                    // The given slot is spare; what it carries (the
                    // agent's slot) goes with the parked one.
                    parked.take_over(given);
                }
                slot = Some(parked);
            }
        } else if let Some(given) = slot.as_mut() {
            // An instance kept in the slot is not for this task, and the
            // slot holds one instance at a time.
            drop(given.take_kept());
        }
        // Declared before the store, so dropped after it: the slot is free
        // only once the instance is (another task instantiating in between
        // would find the pool full).
        let mut held: Option<InstancePermit>;
        let (mut store, mut kept, served) = match warm {
            Some(warm) => {
                let Warm {
                    mut store,
                    instance,
                    served,
                } = *warm;
                self.prepare_store(&mut store, limits, kv, calls, &task.id, started);
                (store, Some(instance), served)
            }
            None => {
                let store = self.new_store(limits, kv, calls, &task.id, started);
                (store, None, 0)
            }
        };
        held = slot;
        let _deadline = started
            .checked_add(limits.timeout)
            .map(|at| self.engine.arm_deadline(at));
        store.data_mut().bus = bus;
        let task = wit::Task {
            id: task.id,
            capability: task.capability,
            payload: task.payload,
            content_type: task.content_type,
            attempt: task.attempt,
            deadline_ms: Some(limits.timeout.as_millis() as u64),
        };
        let outcome = tokio::time::timeout(limits.timeout, async {
            // Waiting for a free slot counts against the deadline.
            if held.is_none() {
                held = Some(self.engine.instance_permit().await);
            }
            let _permit = match &self.instances {
                Some((slots, _)) => Some(
                    slots
                        .clone()
                        .acquire_owned()
                        .await
                        .map_err(wasmtime::Error::msg)?,
                ),
                None => None,
            };
            let instance = match kept.take() {
                Some(instance) => instance,
                None => {
                    self.pre
                        .instantiate_async(&mut store)
                        .instrument(crate::trace_span!("wasm.instantiate"))
                        .await?
                }
            };
            let result = instance
                .call_handle(&mut store, &task)
                .instrument(crate::trace_span!("guest.handle"))
                .await;
            kept = Some(instance);
            result
        })
        .await;
        // A charge the call hook has not applied yet (the deadline cut the
        // task inside a call) is fuel used all the same.
        let pending = store.data().calls.as_ref().map_or(0, |c| c.charge);
        let fuel_used = limits
            .fuel
            .saturating_sub(store.get_fuel().unwrap_or(0))
            .saturating_add(pending)
            .min(limits.fuel);
        let (subtasks, subtask_fuel, calls) = store
            .data_mut()
            .calls
            .as_mut()
            .map_or((0, 0, Vec::new()), |c| {
                (c.started, c.charged, std::mem::take(&mut c.reports))
            });
        let memory = store.data().limiter.used;
        let failed = |error| Outcome {
            result: Err(error),
            fuel_used,
            memory,
        };
        let result = match outcome {
            Err(_) => return failed(deadline(limits)),
            Ok(Err(e)) => return failed(classify(e, store.data(), limits, self.slots())),
            Ok(Ok(Err(e))) => return failed(guest_error(e)),
            Ok(Ok(Ok(result))) => result,
        };
        let size = result.len() as u64;
        if size > limits.max_result {
            return failed(TaskError::ResultTooLarge {
                size,
                limit: limits.max_result,
            });
        }
        // Kept for the next task only after a task that ended well, while
        // it has tasks left to serve and at least half its memory limit
        // free: any trap, limit or error drops it, and a guest that grows
        // its memory task after task gets a fresh instance before a task
        // could fail for the growth of earlier ones.
        let served = served.saturating_add(1);
        let limiter = &store.data().limiter;
        let within = memory <= limiter.limit / 2
            && limiter.refused.is_none()
            && limiter.table_refused.is_none();
        if reusable && served < limits.reuse && within {
            if let (Some(instance), Some(mut permit)) = (kept.take(), held.take()) {
                // The engine slot stays with the instance; the agent's slot
                // is free with the task, once the instance is parked.
                let agent_slot = permit.detach();
                let data = store.data_mut();
                data.calls = None;
                data.bus = None;
                permit.keep(Box::new(Warm {
                    store,
                    instance,
                    served,
                }));
                self.engine.park(self.owner, permit);
                drop(agent_slot);
            }
        }
        Outcome {
            result: Ok(TaskOutput {
                result,
                fuel_used,
                elapsed: started.elapsed(),
                subtasks,
                subtask_fuel,
                calls,
            }),
            fuel_used,
            memory,
        }
    }

    fn slots(&self) -> u32 {
        self.engine.config().instance_slots
    }

    /// Readies a kept store for its next task: what [`Agent::new_store`]
    /// sets per task, set again. The instance's memory, globals, WASI
    /// context and resource table stay: that is what reuse keeps.
    fn prepare_store(
        &self,
        store: &mut Store<StoreData>,
        limits: &Limits,
        kv: KvState,
        calls: Option<CallState>,
        task: &str,
        started: Instant,
    ) {
        let metered_calls = calls.is_some();
        let data = store.data_mut();
        data.limiter.limit = limits.memory.min(self.engine.config().max_memory);
        // A kept instance never hit a limit (it would not have been kept).
        data.limiter.refused = None;
        data.limiter.table_refused = None;
        data.kv = kv;
        data.task = task.into();
        data.panic = None;
        data.calls = calls;
        if let Some(stderr) = &data.stderr {
            stderr.clear();
        }
        if metered_calls {
            store.call_hook(on_host_call);
        }
        self.set_budgets(store, limits, started);
    }

    /// A store for one call that started at `started`: past its deadline
    /// the guest is stopped at its next epoch check (see
    /// [`crate::engine::Engine::arm_deadline`]).
    fn new_store(
        &self,
        limits: &Limits,
        kv: KvState,
        calls: Option<CallState>,
        task: &str,
        started: Instant,
    ) -> Store<StoreData> {
        let metered_calls = calls.is_some();
        // `describe` runs before anyone confirmed the grants (at install, at
        // `orch run FILE`): it gets none of them.
        let grants = match kv {
            KvState::Describe => Arc::new(Grants::default()),
            _ => self.grants.clone(),
        };
        let data = StoreData {
            limiter: MemoryLimiter {
                limit: limits.memory.min(self.engine.config().max_memory),
                used: 0,
                refused: None,
                table_refused: None,
            },
            table: ResourceTable::new(),
            wasi: None,
            kv,
            grants,
            agent: self.name.clone(),
            task: task.into(),
            panic: None,
            stderr: None,
            calls,
            bus: None,
        };
        let mut store = Store::new(self.engine.wasmtime(), data);
        store.limiter(|d| &mut d.limiter);
        if metered_calls {
            store.call_hook(on_host_call);
        }
        self.set_budgets(&mut store, limits, started);
        store
    }

    /// The per-call budgets: fuel, host-call data, and the deadline.
    fn set_budgets(&self, store: &mut Store<StoreData>, limits: &Limits, started: Instant) {
        // Fuel cannot fail to be set: the engine always has fuel enabled.
        let _ = store.set_fuel(limits.fuel);
        store.set_hostcall_fuel(usize::try_from(limits.hostcall_budget()).unwrap_or(usize::MAX));
        // Arm the epoch before anything runs: the guest yields to the executor
        // at every advance from the first instruction on, so the timeout
        // around the call can always fire, and one past its deadline traps
        // at once (the epoch advances at the deadline too).
        store.set_epoch_deadline(1);
        // A timeout too large for an Instant never passes.
        let deadline = started.checked_add(limits.timeout);
        store.epoch_deadline_callback(move |_| {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                Err(Trap::Interrupt.into())
            } else {
                // tokio's `yield_now`, not a plain wake: a task that wakes
                // itself is polled again before the worker looks for I/O
                // (it does that every 61 polls), so two guests spinning on
                // two workers kept the host's HTTP and NATS traffic waiting
                // for hundreds of milliseconds. `yield_now` lets the worker
                // poll for I/O first.
                Ok(wasmtime::UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
    }
}

/// Host functions cannot touch the store's fuel, so `tasks.call` works
/// through this hook: on the way into the host it notes the fuel left (the
/// budget for sub-tasks), and on the way back it takes what the sub-tasks
/// used. A caller left with no fuel traps on its next instruction.
///
/// Only the outermost host call counts. Lowering a call's result runs the
/// guest's allocator inside the host call, and its libcalls (`memory.grow`,
/// an epoch check) enter the host again, without the compiled code saving
/// its fuel first or loading it after: fuel set there is overwritten when
/// the allocator returns, and the charge was lost (a caller whose callee
/// used all its fuel ran on).
fn on_host_call(
    mut store: wasmtime::StoreContextMut<'_, StoreData>,
    hook: CallHook,
) -> wasmtime::Result<()> {
    match hook {
        CallHook::CallingHost => {
            let fuel = store.get_fuel()?;
            if let Some(calls) = store.data_mut().calls.as_mut() {
                calls.host_depth += 1;
                if calls.host_depth == 1 {
                    calls.fuel_left = fuel;
                }
            }
        }
        CallHook::ReturningFromHost => {
            let charge = store.data_mut().calls.as_mut().map_or(0, |c| {
                c.host_depth = c.host_depth.saturating_sub(1);
                if c.host_depth == 0 {
                    std::mem::take(&mut c.charge)
                } else {
                    0
                }
            });
            if charge > 0 {
                let fuel = store.get_fuel()?;
                store.set_fuel(fuel.saturating_sub(charge))?;
            }
        }
        CallHook::CallingWasm | CallHook::ReturningFromWasm => {}
    }
    Ok(())
}

fn deadline(limits: &Limits) -> TaskError {
    TaskError::DeadlineExceeded {
        ms: limits.timeout.as_millis() as u64,
    }
}

/// A host call that could not do its work for a reason of the host's (its
/// kv store cannot be read) and has no error case in the WIT to say so:
/// the call traps, and the task fails with a `host` error naming it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostFault(pub(crate) String);

/// Maps a wasmtime error (trap, instantiation failure, host error) to the
/// typed error a user sees.
fn classify(err: wasmtime::Error, data: &StoreData, limits: &Limits, slots: u32) -> TaskError {
    if let Some(fault) = err.chain().find_map(|e| e.downcast_ref::<HostFault>()) {
        return TaskError::Host(fault.0.clone());
    }
    if let Some(requested) = data.limiter.table_refused {
        return TaskError::TableLimit {
            limit: crate::engine::MAX_TABLE_ELEMENTS as u64,
            requested,
        };
    }
    if let Some(trap) = err.downcast_ref::<Trap>() {
        match trap {
            Trap::OutOfFuel => return TaskError::FuelExhausted { limit: limits.fuel },
            Trap::Interrupt => return deadline(limits),
            _ => {}
        }
    }
    if let Some(requested) = data.limiter.refused {
        return TaskError::MemoryLimit {
            limit: data.limiter.limit,
            requested,
        };
    }
    let text = format!("{err:#}");
    if text.contains("fuel allocated for hostcalls has been exhausted") {
        // An error raised in a host call passes through the guest's frames
        // and carries their backtrace; reading the result happens after the
        // guest returned, with no guest frame in between.
        if err.downcast_ref::<wasmtime::WasmBacktrace>().is_none() {
            return TaskError::ResultTooLargeToRead {
                read: limits.hostcall_budget(),
                limit: limits.max_result,
            };
        }
        return TaskError::HostCallDataLimit {
            limit: limits.hostcall_budget(),
        };
    }
    if err
        .chain()
        .any(|e| e.is::<wasmtime::PoolConcurrencyLimitError>())
    {
        return TaskError::NoCapacity {
            limit: u64::from(slots),
        };
    }
    // wasmtime's text names guest functions: the guest chose those names.
    let message = match err.downcast_ref::<Trap>() {
        Some(trap) => trap.to_string(),
        None => crate::text::escape_terminal(&text).into_owned(),
    };
    let guest = data.panic.clone().or_else(|| {
        data.stderr
            .as_ref()
            .and_then(|s| s.text())
            .map(|text| crate::text::escape_control(&stderr_account(&text)).into_owned())
    });
    TaskError::Trap { message, guest }
}

/// What a guest's stderr says about its failure. componentize-js reports
/// an exception thrown out of `handle` (a stack overflow's `InternalError`
/// too) as a thrown value that is not a task-error variant; the exception is
/// the text in backticks after "received".
fn stderr_account(text: &str) -> String {
    const JS: &str = "invalid variant tag value `undefined` (received `";
    if let Some(start) = text.find(JS) {
        let rest = &text[start + JS.len()..];
        if let Some(end) = rest.find("`)") {
            return format!("threw an uncaught exception: {}", &rest[..end]);
        }
    }
    format!("wrote to stderr: {text}")
}

/// What a capability name may be. Other characters (':' in particular) are
/// reserved, so that no capability can be mistaken for anything else the
/// host routes, such as a message subject.
pub const CAPABILITY_NAME_RULE: &str =
    "a capability name is 1-128 characters of letters, digits, '.', '-' and '_'";

/// Whether `name` follows [`CAPABILITY_NAME_RULE`].
pub fn is_capability_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Longest message of an agent's own error that is kept: it is stored with
/// the task, travels between hosts and is shown to people.
const MAX_ERROR_MESSAGE: usize = 16 << 10;

/// The agent's own error, its message cut to [`MAX_ERROR_MESSAGE`] and its
/// control characters escaped: the text reaches logs and terminals.
fn guest_error(e: wit::TaskError) -> TaskError {
    let clean = |m: String| crate::text::escape_capped(&m, MAX_ERROR_MESSAGE);
    match e {
        wit::TaskError::InvalidInput(m) => TaskError::InvalidInput(clean(m)),
        wit::TaskError::Failed(m) => TaskError::Failed(clean(m)),
        wit::TaskError::Retryable(m) => TaskError::Retryable(clean(m)),
    }
}

fn validate_descriptor(d: &Descriptor) -> Result<(), String> {
    if d.name.trim().is_empty() {
        return Err("name is empty".into());
    }
    if d.capabilities.is_empty() {
        return Err(format!("agent {} declares no capabilities", d.name));
    }
    // What `describe` says is shown to people (`orch inspect`, errors).
    let texts = [&d.name, &d.version].into_iter().chain(
        d.capabilities
            .iter()
            .flat_map(|c| [&c.version, &c.description]),
    );
    for text in texts {
        if text.chars().any(char::is_control) {
            return Err(format!(
                "{} contains a control character; none is allowed",
                crate::text::escape_control(&format!("{text:?}"))
            ));
        }
    }
    for c in &d.capabilities {
        if !is_capability_name(&c.name) {
            return Err(format!(
                "capability name {:?}: {CAPABILITY_NAME_RULE}",
                c.name
            ));
        }
    }
    Ok(())
}
