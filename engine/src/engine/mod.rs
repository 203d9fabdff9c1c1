//! The one place that configures wasmtime: engine settings (pooling
//! allocator, fuel, epoch interruption, stack size), the epoch ticker, the
//! linker (the host imports are added by whoever makes the engine, through
//! [`Engine::with_imports`]), the on-disk cache of compiled components, the
//! bindings of the `agent` world, and checking a component against it.
//!
//! Generic over the store data `T` (as spin-core's `Engine<T>`), so that the
//! engine knows nothing of the sandbox: `sandbox::Engine` is
//! `Engine<sandbox::StoreData>`.

pub mod bindings;
mod cache;

use std::any::Any;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::Linker;
use wasmtime::{InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::error::LoadError;
use crate::WORLD;
use bindings::AgentPre;

/// Host-wide engine settings. Per-task limits are in [`crate::Limits`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Largest linear memory any one instance may have, in bytes. Each pool
    /// slot is sized for it, and a task's memory limit cannot exceed it.
    pub max_memory: u64,
    /// How many instances may be alive at once. Every instantiation first
    /// takes one of this many permits ([`Engine::instance_permit`]), so a task
    /// waits for a free slot instead of finding the pool exhausted.
    pub instance_slots: u32,
    /// How often the epoch advances; a running guest yields to the host at
    /// every tick. Deadlines do not wait for a tick: the epoch also
    /// advances at each armed deadline ([`Engine::arm_deadline`]).
    pub epoch_tick: Duration,
    /// Maximum wasm stack per instance, in bytes.
    pub max_wasm_stack: usize,
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// How long an instance kept for reuse may wait for its next task
    /// before it is dropped (checked at every epoch tick), so a quiet host
    /// does not hold the memory of a past burst.
    pub keep_idle: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_memory: 1 << 30,
            instance_slots: 256,
            epoch_tick: Duration::from_millis(10),
            max_wasm_stack: 512 << 10,
            cache_dir: None,
            keep_idle: Duration::from_secs(30),
        }
    }
}

/// A shared, cheaply cloned handle to the wasmtime engine and linker, for
/// stores holding `T`.
pub struct Engine<T: 'static> {
    inner: Arc<Inner<T>>,
}

impl<T: 'static> Clone for Engine<T> {
    fn clone(&self) -> Self {
        Engine {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<T: 'static> {
    wasmtime: wasmtime::Engine,
    linker: Linker<T>,
    config: EngineConfig,
    /// Hex digest of wasmtime's compatibility hash: part of every cache key.
    compat: String,
    /// One permit per pool slot: whoever instantiates holds one for as long
    /// as the instance lives.
    instances: Arc<tokio::sync::Semaphore>,
    idle: Arc<Idle>,
    ticker: EpochTicker,
}

/// Instances kept alive between tasks (`[limits] reuse`), each holding its
/// slot's permit. They count as free slots: whoever needs a slot and finds
/// none evicts the one parked longest ago, and while anyone waits for a
/// slot nothing stays parked, so a kept instance never makes a task wait.
struct Idle {
    parked: Mutex<VecDeque<Parked>>,
    /// Callers inside [`Engine::instance_permit`] that found no slot.
    waiters: AtomicUsize,
    next_owner: AtomicU64,
}

struct Parked {
    owner: u64,
    since: Instant,
    /// The slot, with the owner's instance kept in it.
    permit: InstancePermit,
}

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Parked>> {
        // Nothing in here can be left half-done by a panic.
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes out at most `most` of the instances parked `keep_idle` or
    /// longer before `now` (the list is in the order they were parked).
    fn expired(&self, now: Instant, keep_idle: Duration, most: usize) -> Vec<Parked> {
        let mut parked = self.lock();
        let mut gone = Vec::new();
        while gone.len() < most
            && parked
                .front()
                .is_some_and(|p| now.saturating_duration_since(p.since) >= keep_idle)
        {
            gone.extend(parked.pop_front());
        }
        gone
    }

    /// Drops the instance parked longest ago; false when there is none.
    fn evict_oldest(&self) -> bool {
        let evicted = self.lock().pop_front();
        // Dropped outside the lock: freeing an instance is not free.
        evicted.is_some()
    }
}

/// Counts a caller waiting for a slot for as long as it waits (the wait can
/// be cancelled with its task).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The right to one instance slot of the engine's pool, released when
/// dropped. The scheduler takes one when it places a task; `Agent::handle`
/// takes one itself when called without.
pub struct InstancePermit {
    /// An instance kept in the slot for its owner's next task (see
    /// [`Engine::park`]). Fields drop in order: the instance first.
    kept: Option<Box<dyn Any + Send>>,
    /// Dropped before the permit: what the holder counts as busy for as
    /// long as the slot is (see [`Self::attach`]).
    attached: Option<Box<dyn Any + Send + Sync>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl InstancePermit {
    fn new(permit: tokio::sync::OwnedSemaphorePermit) -> InstancePermit {
        InstancePermit {
            kept: None,
            attached: None,
            _permit: permit,
        }
    }

    /// Puts an instance in the slot, to be parked with it.
    pub fn keep(&mut self, instance: Box<dyn Any + Send>) {
        self.kept = Some(instance);
    }

    /// The instance kept in this slot, if any: a permit from
    /// [`Engine::unpark`] or [`Engine::try_instance_permit_for`] may hold one.
    pub fn take_kept(&mut self) -> Option<Box<dyn Any + Send>> {
        self.kept.take()
    }

    /// Releases `guard` just before the slot, wherever the permit is
    /// dropped: the scheduler attaches the agent's slot, so that no one can
    /// see the engine slot free while the agent still counts it in use.
    pub fn attach(&mut self, guard: impl std::any::Any + Send + Sync) {
        self.attached = Some(Box::new(guard));
    }

    /// Moves what `other` has attached to this permit and releases
    /// `other`'s slot: a task given a slot that runs on a kept instance
    /// (which has its own) gives the spare one back.
    pub fn take_over(&mut self, mut other: InstancePermit) {
        if let Some(guard) = other.attached.take() {
            self.attached = Some(guard);
        }
    }

    /// Takes out what is attached, keeping the slot (an instance parked for
    /// the next task holds its slot but no agent's). The caller drops it
    /// once the instance is parked, so that no one sees the agent's slot
    /// free while its instance is in neither place.
    pub fn detach(&mut self) -> Option<Box<dyn Any + Send + Sync>> {
        self.attached.take()
    }
}

impl std::fmt::Debug for InstancePermit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePermit")
            .field("kept", &self.kept.is_some())
            .field("attached", &self.attached.is_some())
            .finish()
    }
}

/// Facts about a loaded component, for `orch inspect` and logs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ComponentInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
}

/// A component that passed the world check, pre-linked and ready to
/// instantiate once per task.
pub struct Compiled<T: 'static> {
    pub pre: AgentPre<T>,
    pub info: ComponentInfo,
}

/// The most elements any one table may have (each pool slot is sized for
/// it); a task asking for more is stopped with a table limit.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Most idle instances the epoch thread drops per tick: freeing one takes
/// microseconds to a millisecond (a large memory's pages go back to the
/// kernel), and the thread's next deadline waits meanwhile.
const EXPIRE_PER_TICK: usize = 4;

/// Freed pool slots are returned to the kernel (`madvise`) in batches of
/// this many. Each `madvise` makes the kernel flush the TLB of every CPU
/// running one of this process's threads, an inter-processor interrupt per
/// CPU; one call per slot made two threads instantiating at once slower than
/// one (`pool` bench in benches/README.md). A batch is also flushed when the
/// pool runs out of free slots, so no allocation waits for it.
pub const DECOMMIT_BATCH: usize = 64;

impl<T: 'static> Engine<T> {
    /// Makes the engine; `imports` adds the host's imports to the linker
    /// (WASI and the world's own).
    pub fn with_imports(
        config: EngineConfig,
        imports: impl FnOnce(&mut Linker<T>) -> wasmtime::Result<()>,
    ) -> Result<Engine<T>, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        let max_memory = usize::try_from(config.max_memory)
            .map_err(|_| LoadError::Engine("max_memory does not fit this platform".into()))?;
        let slots = config.instance_slots.max(1);

        let mut pool = PoolingAllocationConfig::default();
        // Slot counts are derived from the instance count: components built
        // from JS or Python hold several core instances, memories and tables
        // (a componentize-py component has 14 core modules, so 16 core
        // instances a slot: with 8, half the slots could be taken by Python
        // instances and the rest refused for want of core instances).
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(16))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .total_stacks(slots)
            .max_memory_size(max_memory)
            .max_memories_per_component(4)
            .max_tables_per_component(8)
            .max_core_instances_per_component(64)
            .table_elements(MAX_TABLE_ELEMENTS)
            .decommit_batch_size(DECOMMIT_BATCH);

        // wasmtime's default fuel costs, but a `table.grow` is not charged
        // per element asked for: it was charged before the limiter could
        // refuse, so a huge request ran out of fuel and was reported as
        // that. The elements are bounded by MAX_TABLE_ELEMENTS instead.
        let mut costs = wasmtime::OperatorCost::new();
        costs.variable.table_grow_per_element = 0;
        let mut wt = wasmtime::Config::new();
        wt.wasm_component_model(true)
            .consume_fuel(true)
            .operator_cost(costs)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let wasmtime = wasmtime::Engine::new(&wt).map_err(engine_err)?;

        let mut linker = Linker::new(&wasmtime);
        imports(&mut linker).map_err(engine_err)?;

        let compat = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            wasmtime.precompile_compatibility_hash().hash(&mut h);
            format!("{:016x}", h.finish())
        };
        let idle = Arc::new(Idle {
            parked: Mutex::new(VecDeque::new()),
            waiters: AtomicUsize::new(0),
            next_owner: AtomicU64::new(1),
        });
        let ticker = EpochTicker::start(
            wasmtime.clone(),
            config.epoch_tick,
            (idle.clone(), config.keep_idle),
        )?;
        let instances = Arc::new(tokio::sync::Semaphore::new(slots as usize));
        Ok(Engine {
            inner: Arc::new(Inner {
                wasmtime,
                linker,
                config,
                compat,
                instances,
                idle,
                ticker,
            }),
        })
    }

    /// An instance slot if one is free now, or held by a parked instance
    /// (which is dropped for it).
    pub fn try_instance_permit(&self) -> Option<InstancePermit> {
        self.try_instance_permit_for(None)
    }

    /// Like [`Engine::try_instance_permit`] for a task of `owner`: when no
    /// slot is free and `owner` has an instance parked, the slot comes with
    /// that instance in it ([`InstancePermit::take_kept`]) instead of
    /// another instance being dropped for it.
    pub fn try_instance_permit_for(&self, owner: Option<u64>) -> Option<InstancePermit> {
        loop {
            if let Ok(p) = self.inner.instances.clone().try_acquire_owned() {
                return Some(InstancePermit::new(p));
            }
            if let Some(kept) = owner.and_then(|o| self.unpark(o)) {
                return Some(kept);
            }
            if !self.inner.idle.evict_oldest() {
                return None;
            }
        }
    }

    /// A key for [`Engine::park`], one per owner of parked instances.
    pub fn new_owner(&self) -> u64 {
        self.inner.idle.next_owner.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps `permit`'s slot and the instance in it
    /// ([`InstancePermit::keep`]) for `owner`'s next task. It is dropped
    /// instead when someone waits for a slot, and later when a slot is
    /// needed and none is free.
    pub fn park(&self, owner: u64, permit: InstancePermit) {
        let evicted = {
            let mut parked = self.inner.idle.lock();
            parked.push_back(Parked {
                owner,
                since: Instant::now(),
                permit,
            });
            // Read under the lock: a waiter counts itself before it looks
            // here, so either it sees this entry or this sees it.
            (self.inner.idle.waiters.load(Ordering::SeqCst) > 0)
                .then(|| parked.pop_front())
                .flatten()
        };
        drop(evicted);
    }

    /// The slot `owner` parked most recently, with its instance, if it is
    /// still there.
    pub fn unpark(&self, owner: u64) -> Option<InstancePermit> {
        let mut parked = self.inner.idle.lock();
        let at = parked.iter().rposition(|p| p.owner == owner)?;
        parked.remove(at).map(|p| p.permit)
    }

    /// Drops every instance `owner` parked (the agent is being unloaded).
    pub fn evict(&self, owner: u64) {
        let evicted: VecDeque<Parked> = {
            let mut parked = self.inner.idle.lock();
            let (gone, kept) = std::mem::take(&mut *parked)
                .into_iter()
                .partition(|p| p.owner == owner);
            *parked = kept;
            gone
        };
        drop(evicted);
    }

    /// Instances parked now.
    pub fn parked_instances(&self) -> usize {
        self.inner.idle.lock().len()
    }

    /// Advances the epoch at `at` as well as at every tick, for as long as
    /// the returned guard lives: a guest running past `at` yields (and its
    /// epoch callback stops it) within about the thread's wake-up time.
    pub fn arm_deadline(&self, at: Instant) -> Deadline {
        self.inner.ticker.arm(at)
    }

    /// Waits for a free instance slot. The semaphore is never closed, so
    /// this only ends with a permit (or is cancelled with its caller).
    pub async fn instance_permit(&self) -> InstancePermit {
        let idle = &self.inner.idle;
        if let Some(p) = self.try_instance_permit() {
            return p;
        }
        idle.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&idle.waiters);
        // Counted first, then looked: an instance parked in between is
        // evicted by `park` itself.
        while idle.evict_oldest() {}
        loop {
            if let Ok(p) = self.inner.instances.clone().acquire_owned().await {
                return InstancePermit::new(p);
            }
        }
    }

    /// Instance slots free now, those held by parked instances included.
    pub fn free_instances(&self) -> usize {
        self.inner.instances.available_permits() + self.parked_instances()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub(crate) fn wasmtime(&self) -> &wasmtime::Engine {
        &self.inner.wasmtime
    }

    /// Reads, checks, compiles (or loads from the cache) and pre-links a
    /// component. CPU-heavy for large components: call it off the async
    /// executor.
    pub fn compile_file(&self, path: &Path) -> Result<Compiled<T>, LoadError> {
        let bytes = read_component(path)?;
        self.compile(path, &bytes)
    }

    /// Like [`Engine::compile_file`] for bytes already in memory; `path` is
    /// only used in messages and [`ComponentInfo`].
    pub fn compile(&self, path: &Path, bytes: &[u8]) -> Result<Compiled<T>, LoadError> {
        check_header(path, bytes)?;
        let sha256 = hex::encode(Sha256::digest(bytes));
        let (component, from_cache) = cache::load_or_compile(self, path, bytes, &sha256)?;
        let wasmtime = &self.inner.wasmtime;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(wasmtime).map(|(n, _)| n.to_string()).collect();
        let exports: Vec<String> = ty.exports(wasmtime).map(|(n, _)| n.to_string()).collect();
        check_world(path, &imports, &exports)?;

        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            path: path.to_path_buf(),
            world: WORLD,
            details: format!("{e:#}"),
        };
        let instance_pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = AgentPre::new(instance_pre).map_err(wrong_world)?;
        Ok(Compiled {
            pre,
            info: ComponentInfo {
                path: path.to_path_buf(),
                sha256,
                size: bytes.len() as u64,
                imports,
                exports,
                from_cache,
            },
        })
    }
}

/// The largest component file the host reads (the same as a download).
pub const MAX_COMPONENT_SIZE: u64 = 256 << 20;

/// Reads a component file: refused when it is not a regular file (a device
/// such as /dev/zero, a FIFO that would block, a directory) or larger than
/// [`MAX_COMPONENT_SIZE`], and never more than that is read.
pub fn read_component(path: &Path) -> Result<Vec<u8>, LoadError> {
    read_regular(path, MAX_COMPONENT_SIZE).map_err(|e| match e {
        ReadError::Io(source) => LoadError::Io {
            path: path.to_path_buf(),
            source,
        },
        ReadError::NotAFile(kind) => LoadError::NotAFile {
            path: path.to_path_buf(),
            kind,
        },
        ReadError::TooLarge(size) => LoadError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_COMPONENT_SIZE,
        },
    })
}

/// Why [`read_regular`] refused a file.
#[derive(Debug)]
pub enum ReadError {
    Io(std::io::Error),
    NotAFile(&'static str),
    /// The size seen (at least `limit + 1` when the file grew while read).
    TooLarge(u64),
}

/// Reads a regular file of at most `limit` bytes. The type is checked on the
/// opened file (no window for a swap), and the read stops past `limit` even
/// if the file grows meanwhile.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    // O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(ReadError::Io)?
    };
    let meta = file.metadata().map_err(ReadError::Io)?;
    let ft = meta.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(ReadError::NotAFile(kind));
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLarge(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Distinguishes "not wasm" and "core module" from a broken component, so
/// that the error tells the user what they actually have.
pub fn check_header(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotWasm {
            path: path.to_path_buf(),
        });
    }
    // Bytes 4..8 are the version and layer: 1.0 for core modules, 0x0d with
    // layer 1 for components.
    if bytes[4..8] == [1, 0, 0, 0] {
        return Err(LoadError::CoreModule {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Imports the host can serve: our own interfaces at any 0.1 version and WASI
/// preview 2 (checked precisely by the linker afterwards).
fn import_offered(name: &str) -> bool {
    name.starts_with("orch:agent/") || name.starts_with("wasi:")
}

fn check_world(path: &Path, imports: &[String], exports: &[String]) -> Result<(), LoadError> {
    let missing: Vec<&str> = ["describe", "handle"]
        .into_iter()
        .filter(|e| !exports.iter().any(|x| x == e))
        .collect();
    let unsupported: Vec<&str> = imports
        .iter()
        .map(String::as_str)
        .filter(|i| !import_offered(i))
        .collect();
    if missing.is_empty() && unsupported.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing exports: {}", missing.join(", ")));
    }
    if !unsupported.is_empty() {
        parts.push(format!(
            "imports this host does not offer: {}",
            unsupported.join(", ")
        ));
    }
    Err(LoadError::WrongWorld {
        path: path.to_path_buf(),
        world: WORLD,
        details: parts.join("; "),
    })
}

/// Advances the engine's epoch on a background thread: every tick, and at
/// each armed task deadline. Running guests yield at each advance, which
/// lets the task's timeout fire even inside a tight loop; the advance at a
/// deadline stops a guest past it within the thread's wake-up time instead
/// of at a later tick (tokio's timers cannot: they are only seen when the
/// guest yields).
struct EpochTicker {
    clock: Arc<Clock>,
}

/// What the epoch thread and the tasks share.
struct Clock {
    state: std::sync::Mutex<ClockState>,
    wake: std::sync::Condvar,
}

struct ClockState {
    /// Deadlines of running tasks, each with a number that tells equal
    /// instants apart. One entry per live [`Deadline`], so at most one per
    /// running task.
    deadlines: std::collections::BTreeSet<(Instant, u64)>,
    next_id: u64,
    /// When the thread wakes next if no deadline comes first.
    next_tick: Instant,
    stop: bool,
}

/// An armed deadline, disarmed when dropped.
pub struct Deadline {
    clock: Arc<Clock>,
    key: (Instant, u64),
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let mut state = self.clock.state.lock().unwrap_or_else(|p| p.into_inner());
        state.deadlines.remove(&self.key);
    }
}

impl EpochTicker {
    /// Fails when the thread cannot start: an engine without a ticker could
    /// not interrupt a looping guest, so it must not exist.
    fn start(
        engine: wasmtime::Engine,
        tick: Duration,
        idle: (Arc<Idle>, Duration),
    ) -> Result<EpochTicker, LoadError> {
        let clock = Arc::new(Clock {
            state: std::sync::Mutex::new(ClockState {
                deadlines: std::collections::BTreeSet::new(),
                next_id: 0,
                next_tick: Instant::now() + tick,
                stop: false,
            }),
            wake: std::sync::Condvar::new(),
        });
        let shared = clock.clone();
        std::thread::Builder::new()
            .name("orch-epoch".into())
            .spawn(move || run_clock(&shared, &engine, tick, &idle))
            .map_err(|e| {
                LoadError::Engine(format!(
                    "cannot start the epoch ticker thread, without which deadlines cannot interrupt a guest: {e}"
                ))
            })?;
        Ok(EpochTicker { clock })
    }

    fn arm(&self, at: Instant) -> Deadline {
        let mut state = self.clock.state.lock().unwrap_or_else(|p| p.into_inner());
        let key = (at, state.next_id);
        state.next_id = state.next_id.wrapping_add(1);
        // The thread wakes by the next tick anyway; only a deadline before
        // that and before every other one needs it woken now (a short
        // deadline; a task's usual seconds never do).
        let sooner = at < state.next_tick && state.deadlines.first().is_none_or(|f| at < f.0);
        state.deadlines.insert(key);
        drop(state);
        if sooner {
            self.clock.wake.notify_one();
        }
        Deadline {
            clock: self.clock.clone(),
            key,
        }
    }
}

fn run_clock(
    clock: &Clock,
    engine: &wasmtime::Engine,
    tick: Duration,
    (idle, keep_idle): &(Arc<Idle>, Duration),
) {
    let mut state = clock.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if state.stop {
            return;
        }
        let now = Instant::now();
        let mut advance = false;
        let mut ticked = false;
        if now >= state.next_tick {
            advance = true;
            ticked = true;
            // From now, not from the missed tick: no burst after a stall.
            state.next_tick = now + tick;
        }
        while let Some(&first) = state.deadlines.first() {
            if first.0 > now {
                break;
            }
            state.deadlines.remove(&first);
            advance = true;
        }
        if advance {
            engine.increment_epoch();
        }
        if ticked {
            let expired = idle.expired(now, *keep_idle, EXPIRE_PER_TICK);
            if !expired.is_empty() {
                // Freed after this tick's work and without the clock's
                // lock (tasks arm deadlines under it), then round again
                // from the time it is then: a deadline armed meanwhile is
                // not waited past.
                drop(state);
                drop(expired);
                state = clock.state.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
        }
        let until = state
            .deadlines
            .first()
            .map_or(state.next_tick, |f| f.0.min(state.next_tick));
        state = clock
            .wake
            .wait_timeout(state, until.saturating_duration_since(now))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.clock
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.clock.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_classification() {
        let p = Path::new("x.wasm");
        assert!(matches!(
            check_header(p, b"hello world"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header(p, b"\0asm"),
            Err(LoadError::NotWasm { .. })
        ));
        assert!(matches!(
            check_header(p, b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule { .. })
        ));
        assert!(check_header(p, b"\0asm\x0d\0\x01\0").is_ok());
    }

    #[test]
    fn world_check_names_what_is_wrong() {
        let p = Path::new("x.wasm");
        let ok = check_world(
            p,
            &[
                "orch:agent/log@0.1.0".into(),
                "wasi:clocks/wall-clock@0.2.3".into(),
            ],
            &["describe".into(), "handle".into()],
        );
        assert!(ok.is_ok());
        let err = check_world(p, &["test:other/clock@0.1.0".into()], &["add".into()])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("missing exports: describe, handle"), "{err}");
        assert!(
            err.contains("imports this host does not offer: test:other/clock@0.1.0"),
            "{err}"
        );
    }
}
