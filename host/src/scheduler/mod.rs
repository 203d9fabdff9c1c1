//! The in-process scheduler: tasks are submitted by capability, wait in one
//! queue per capability (highest priority first, then earliest deadline,
//! then first come), and are placed on an agent that provides the
//! capability, has a free slot and whose circuit breaker lets tasks through.
//! Among those, the choice is random, weighted by each agent's reliability
//! score (an EWMA of success and latency), so identical agents share work
//! evenly and a failing or slow one gets less. Retryable failures and traps
//! are retried with exponential backoff and jitter; a task that fails every
//! attempt becomes a dead letter carrying each attempt's error.

// A task's outcome (`Result<Completed, Failure>`) crosses one oneshot channel
// per task; boxing the large error side would add an allocation for nothing.
#![allow(clippy::result_large_err)]

pub mod breaker;
pub mod calls;

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
pub use tokio_util::sync::CancellationToken;

use crate::engine::InstancePermit;
use crate::error::TaskError;
use crate::sandbox::{
    Agent, Bus, CallContext, Limits, Outcome, SubCall, SubCallFuture, SubTasks, TaskOutput,
    TaskRequest, MESSAGE_CONTENT_TYPE,
};
use breaker::Breaker;

/// What a queued task is for: a capability an agent declares, or a message
/// on a subject an agent subscribes to. The two are separate name spaces,
/// so no capability name reaches a subscriber and no subject reaches an
/// agent that merely declares a capability of the same spelling.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    Capability(String),
    Message(String),
}

impl Route {
    /// The capability or the subject, without saying which.
    pub fn name(&self) -> &str {
        match self {
            Route::Capability(c) | Route::Message(c) => c,
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Capability(c) => f.write_str(c),
            Route::Message(s) => write!(f, "message {s}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Attempts per task, the first one included.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles for each later one.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Consecutive failures that open an agent's breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker keeps tasks away before one probe.
    pub breaker_cool_down: Duration,
    /// Most tasks waiting in the queues at once for a message or a sub-task
    /// to be queued; past it those are refused with `QueueFull`, so a guest
    /// publishing or calling in a loop cannot grow the queues. (Tasks from
    /// [`Scheduler::submit`] are bounded by whoever accepts them.)
    pub max_queued: usize,
    /// Most payload bytes of queued tasks for a message or a sub-task to be
    /// queued; past it those are refused with `QueueBytesFull`, so a guest
    /// publishing large messages in a loop cannot grow host memory.
    pub max_queued_bytes: u64,
    /// Dead letters kept in memory (the newest; the daemon's journal and the
    /// cluster's results bucket keep them all for the retention time).
    pub max_dead_letters: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_attempts: 3,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(2),
            max_queued: 100_000,
            max_queued_bytes: 256 << 20,
            max_dead_letters: 1_000,
        }
    }
}

/// A task as submitted.
#[derive(Debug, Clone, Default)]
pub struct Submit {
    pub id: String,
    pub capability: String,
    pub payload: Vec<u8>,
    /// Higher runs first.
    pub priority: i32,
    pub deadline: Option<Instant>,
    /// Attempts for this task, instead of the scheduler's setting (a host in
    /// a cluster makes one and leaves redelivery to JetStream).
    pub max_attempts: Option<u32>,
    /// Cancelling it ends the task: taken out of its queue when it is next
    /// looked at, its running attempt dropped (which frees the instance),
    /// and no retry. Sub-tasks get a child token.
    pub cancel: Option<CancellationToken>,
    /// Attempts made before this submission (in a cluster, on earlier
    /// deliveries): attempt numbers, and the ids of sub-tasks, go on from
    /// there.
    pub attempts_before: u32,
    /// The task's trace context (a W3C `traceparent`): its attempts' spans
    /// are children of it.
    pub trace: Option<String>,
    /// When the task was accepted (Unix ms), for the `started` event.
    pub submitted_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("no agent provides capability {0}")]
    UnknownCapability(String),
    #[error("no agent subscribes to {0}")]
    NoSubscriber(String),
    #[error("capability {capability} cannot run: every one of its {slots} instance slot(s) is held by this task's own callers, which wait for it")]
    HeldByCallers { capability: String, slots: u32 },
    #[error("the task's deadline has already passed")]
    DeadlinePassed,
    #[error("the host is shutting down and takes no new tasks")]
    ShuttingDown,
    #[error("no capacity: {limit} tasks are queued on this host, its limit; retry later")]
    QueueFull { limit: usize },
    #[error("no capacity: the tasks queued on this host hold {queued} bytes of payload; {size} more would pass its limit of {limit} bytes; retry later")]
    QueueBytesFull { queued: u64, size: u64, limit: u64 },
}

/// Runs the sub-tasks no local agent can take: the cluster implements it,
/// so that `tasks.call` reaches agents on other hosts. `call.parent` holds
/// the sub-task's own id here.
pub trait Remote: Send + Sync {
    /// `trace`: the sub-task's trace context (a `traceparent`).
    fn call(&self, call: SubCall, priority: i32, trace: Option<String>) -> SubCallFuture;
}

/// What happens to a task between submission and its end, for whoever shows
/// task states (the daemon).
#[derive(Debug, Clone, Copy)]
pub enum AttemptEvent<'a> {
    /// An attempt starts on `agent`; `attempt` is 1 for the first.
    /// `capability` is the capability or the message subject.
    Started {
        id: &'a str,
        capability: &'a str,
        agent: &'a str,
        attempt: u32,
        /// For the task's first attempt: since the task entered this
        /// scheduler (its queue wait, then for a slot).
        waited: Option<Duration>,
        /// When the task was accepted (Unix ms), if it was submitted with it.
        submitted_at_ms: Option<u64>,
    },
    /// An attempt ended (before `Retrying`, or the task's end): how long
    /// it ran, the most linear memory it had, and its error if it failed.
    Ended {
        capability: &'a str,
        agent: &'a str,
        ran: Duration,
        memory: u64,
        error: Option<&'a TaskError>,
    },
    /// An attempt failed with `error` and the task waits for its next one.
    Retrying {
        id: &'a str,
        capability: &'a str,
        agent: &'a str,
        attempt: u32,
        error: &'a TaskError,
        submitted_at_ms: Option<u64>,
    },
}

pub type AttemptHook = Arc<dyn Fn(AttemptEvent<'_>) + Send + Sync>;

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    pub agent: String,
    pub error: TaskError,
}

#[derive(Debug, Clone)]
pub struct Completed {
    pub id: String,
    pub agent: String,
    pub output: TaskOutput,
    /// When the successful attempt was handed to the agent.
    pub started_at: Instant,
    /// Attempts that failed before the one that succeeded.
    pub failed_attempts: Vec<AttemptError>,
}

#[derive(Debug, Clone)]
pub struct Failure {
    pub id: String,
    pub capability: String,
    /// The last error.
    pub error: TaskError,
    /// Every failed attempt, in order (empty when the task never ran).
    pub attempts: Vec<AttemptError>,
    /// Whether the task used up its attempts on retryable failures.
    pub dead_letter: bool,
    /// Fuel the last attempt used (0 when the task never ran).
    pub fuel_used: u64,
}

/// Per-agent figures, for `orch status` and tests.
#[derive(Debug, Clone)]
pub struct AgentStats {
    pub label: String,
    pub capabilities: Vec<String>,
    pub max_in_flight: u32,
    pub completed: u64,
    pub failed: u64,
    pub in_flight: u32,
    pub score: f64,
    pub breaker: breaker::State,
}

/// Waits for one task's end.
pub struct TaskHandle {
    pub id: String,
    rx: oneshot::Receiver<Result<Completed, Failure>>,
}

impl TaskHandle {
    pub async fn wait(self) -> Result<Completed, Failure> {
        let id = self.id;
        self.rx.await.unwrap_or_else(|_| {
            Err(Failure {
                id,
                capability: String::new(),
                error: TaskError::Host("the scheduler stopped before the task ended".into()),
                attempts: Vec::new(),
                dead_letter: false,
                fuel_used: 0,
            })
        })
    }
}

struct Pending {
    id: String,
    route: Route,
    payload: Vec<u8>,
    priority: i32,
    deadline: Option<Instant>,
    attempts: Vec<AttemptError>,
    reply: oneshot::Sender<Result<Completed, Failure>>,
    /// 0 for a submitted task; sub-tasks of `tasks.call` count up.
    depth: u32,
    /// For sub-tasks: the caller's remaining fuel, which caps the callee's.
    fuel_cap: Option<u64>,
    max_attempts: Option<u32>,
    /// For sub-tasks: the agents (`Entry::id`) of the callers above it, one
    /// entry per caller, each holding one slot of that agent while it waits.
    chain: Arc<[u64]>,
    submitted: Instant,
    cancel: Option<CancellationToken>,
    attempts_before: u32,
    trace: Option<String>,
    submitted_at_ms: Option<u64>,
    /// Payload bytes counted against `max_queued_bytes` while queued: a
    /// message's or sub-task's (guest-made); 0 for a submitted task, which
    /// whoever accepted it bounds.
    counted_bytes: u64,
}

impl Pending {
    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| c.is_cancelled())
    }
}

impl Pending {
    /// The deadline as it was given (from submission), for error messages.
    fn deadline_error(&self) -> TaskError {
        let ms = self.deadline.map_or(0, |d| {
            d.saturating_duration_since(self.submitted).as_millis() as u64
        });
        TaskError::DeadlineExceeded { ms }
    }
}

impl Pending {
    /// Sub-tasks get one attempt: their caller decides what to do with a
    /// failure, and a retry would spend fuel the caller cannot see.
    fn max_attempts(&self, config: &SchedulerConfig) -> u32 {
        if self.depth > 0 {
            1
        } else {
            self.max_attempts.unwrap_or(config.max_attempts).max(1)
        }
    }
}

struct Queued {
    seq: u64,
    task: Pending,
}

impl Ord for Queued {
    /// Greater runs first: higher priority, then earlier deadline (none is
    /// latest), then earlier submission.
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (&self.task, &other.task);
        a.priority
            .cmp(&b.priority)
            .then_with(|| match (a.deadline, b.deadline) {
                (Some(x), Some(y)) => y.cmp(&x),
                (Some(_), None) => Ordering::Greater,
                (None, Some(_)) => Ordering::Less,
                (None, None) => Ordering::Equal,
            })
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}

impl Eq for Queued {}

struct Entry {
    /// Unique for the scheduler's life: a retired entry's place in
    /// `State::agents` is given to the next agent added, so an attempt and a
    /// caller chain name their agent by this, not by the place.
    id: u64,
    label: String,
    /// `None` once retired: its running attempts hold their own handle, so
    /// the compiled component is freed when the last of them ends.
    agent: Option<Arc<Agent>>,
    engine: crate::sandbox::Engine,
    capabilities: Vec<String>,
    limits: Limits,
    max_in_flight: u32,
    /// One permit per slot. A placed task owns one until its attempt ends
    /// (also while it waits for sub-tasks), and dropping it is the only way
    /// to give it back, so busy slots are always the attempts in progress.
    slots: Arc<Semaphore>,
    /// EWMA of 1 for success, 0 for failure.
    success: f64,
    /// EWMA of task latency in milliseconds.
    latency_ms: f64,
    breaker: Breaker,
    completed: u64,
    failed: u64,
    /// Removed or replaced: takes no new tasks; its running tasks finish.
    retired: bool,
}

impl Entry {
    fn in_flight(&self) -> u32 {
        let free = u32::try_from(self.slots.available_permits()).unwrap_or(u32::MAX);
        self.max_in_flight.saturating_sub(free)
    }

    /// The reliability score: failures weigh heavily, latency gently.
    fn score(&self) -> f64 {
        self.success.powi(4) / (1.0 + self.latency_ms / 100.0)
    }
}

struct State {
    agents: Vec<Entry>,
    index: HashMap<Route, Vec<usize>>,
    queues: HashMap<Route, BinaryHeap<Queued>>,
    /// The deadlines of queued tasks, earliest first, with the task's
    /// `seq` and queue: the dispatcher wakes at the earliest and fails every
    /// task of that queue past its deadline, wherever it is in the queue.
    /// Entries of tasks that left the queue (not in `with_deadline`) are
    /// skipped at their time; the heap is built again from the queues when
    /// it holds many more than they do.
    deadlines: BinaryHeap<std::cmp::Reverse<(Instant, u64, Route)>>,
    /// The `seq` of each queued task that has a deadline.
    with_deadline: std::collections::HashSet<u64>,
    dead: std::collections::VecDeque<Failure>,
    seq: u64,
    /// The next `Entry::id`.
    next_entry: u64,
    rng: u64,
    /// Payload bytes of the messages and sub-tasks in `queues`.
    queued_bytes: u64,
    /// Whether a task waits in `queues`: set by each enqueue and after each
    /// placement pass, read without the lock ([`Scheduler::backlog`]).
    waiting: Arc<AtomicBool>,
}

impl State {
    fn random(&mut self) -> f64 {
        // xorshift64: placement and jitter need spread, not cryptography.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An agent for `route` with a free slot, a closed (or probing)
    /// breaker and a share of the engine's instance slots, chosen at random
    /// weighted by score.
    fn pick(&mut self, route: &Route, now: Instant) -> Option<usize> {
        let candidates: Vec<(usize, f64)> = self
            .index
            .get(route)?
            .iter()
            .filter(|&&i| {
                let e = &self.agents[i];
                e.slots.available_permits() > 0
                    && e.breaker.allows(now)
                    && self.may_take_instance(i)
            })
            .map(|&i| (i, self.agents[i].score().max(1e-6)))
            .collect();
        let total: f64 = candidates.iter().map(|c| c.1).sum();
        let mut r = self.random() * total;
        for &(i, w) in &candidates {
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        candidates.last().map(|c| c.0)
    }
}

impl State {
    /// Each agent is guaranteed its share of the engine's instance slots:
    /// `min(its slots, engine slots / agents)`. It may take a slot beyond its
    /// share only while enough stay free for the others: the unused share of
    /// every agent with queued work, and one slot for every idle agent (so
    /// an idle host lends almost everything, and a plugin whose work
    /// arrives later always has a slot to start with). No plugin, however
    /// many callers it keeps waiting, can starve another of instances.
    fn may_take_instance(&self, i: usize) -> bool {
        let engine = &self.agents[i].engine;
        let free = engine.free_instances() as u64;
        if free == 0 {
            return false;
        }
        // Called for every candidate of every placement: no allocation, and
        // the common case (within its own share) decided first.
        let live = self.agents.iter().filter(|e| !e.retired).count();
        let total = u64::from(engine.config().instance_slots.max(1));
        let fair = (total / live.max(1) as u64).max(1);
        let share = |e: &Entry| u64::from(e.max_in_flight).min(fair);
        let e = &self.agents[i];
        if u64::from(e.in_flight()) < share(e) {
            return true;
        }
        // Whether agent `j` serves a capability or subject with queued work.
        let has_work = |j: usize| {
            self.queues.iter().any(|(route, queue)| {
                !queue.is_empty() && self.index.get(route).is_some_and(|a| a.contains(&j))
            })
        };
        let reserved: u64 = self
            .agents
            .iter()
            .enumerate()
            .filter(|&(j, o)| j != i && !o.retired)
            .map(|(j, o)| {
                let want = if has_work(j) {
                    share(o)
                } else {
                    share(o).min(1)
                };
                want.saturating_sub(u64::from(o.in_flight()))
            })
            .sum();
        free > reserved
    }

    /// Whether a sub-task for `route` can never be placed because the
    /// callers above it hold every slot of every agent that could take it.
    fn held_by_callers(&self, route: &Route, chain: &[u64]) -> Option<u32> {
        let agents = self.index.get(route)?;
        let mut slots = 0;
        for &i in agents {
            let id = self.agents[i].id;
            let held = chain.iter().filter(|&&j| j == id).count() as u32;
            let max = self.agents[i].max_in_flight;
            if held < max {
                return None;
            }
            slots += max;
        }
        Some(slots)
    }
}

/// A task placed on an agent, waiting for a runner.
struct Job {
    agent_index: usize,
    agent_id: u64,
    agent: Arc<Agent>,
    label: String,
    limits: Limits,
    task: Pending,
    slot: OwnedSemaphorePermit,
    instance: InstancePermit,
}

struct Inner {
    config: SchedulerConfig,
    on_attempt: Option<AttemptHook>,
    remote: Mutex<Option<Arc<dyn Remote>>>,
    bus: Mutex<Option<Arc<dyn Bus>>>,
    /// Where durable agents' calls are recorded.
    call_log: Mutex<Option<Arc<dyn calls::CallLog>>>,
    /// Attempts running now, for draining at shutdown.
    running: AtomicU64,
    /// Signalled whenever an attempt ends.
    finished: Notify,
    /// Set by [`Scheduler::drain`]: nothing new is placed or accepted.
    draining: AtomicBool,
    state: Mutex<State>,
    /// Placed tasks in placement order. Each spawned runner takes the oldest,
    /// so tasks run in the order they were placed even though tokio may poll
    /// a newly spawned runner first; without this an agent whose slot frees
    /// first keeps winning the next slot, and identical agents drift apart.
    ready: Mutex<std::collections::VecDeque<Job>>,
    wake: Notify,
    stopped: std::sync::atomic::AtomicBool,
}

/// Stops the dispatcher when the last [`Scheduler`] handle is dropped.
struct StopOnDrop(Arc<Inner>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0
            .stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.0.wake.notify_one();
    }
}

impl Inner {
    fn remote(&self) -> Option<Arc<dyn Remote>> {
        self.remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // update is a few field writes), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A cheaply cloned handle; the dispatcher runs while any handle exists.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
    _stop: Arc<StopOnDrop>,
}

impl Scheduler {
    /// Starts the dispatcher on the current tokio runtime.
    pub fn new(config: SchedulerConfig) -> Scheduler {
        Scheduler::build(config, None)
    }

    /// Like [`Scheduler::new`], with a hook called as attempts start and
    /// as failed ones wait for a retry.
    pub fn with_attempt_hook(config: SchedulerConfig, hook: AttemptHook) -> Scheduler {
        Scheduler::build(config, Some(hook))
    }

    fn build(config: SchedulerConfig, on_attempt: Option<AttemptHook>) -> Scheduler {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15)
            | 1;
        let inner = Arc::new(Inner {
            config,
            on_attempt,
            remote: Mutex::new(None),
            bus: Mutex::new(None),
            call_log: Mutex::new(None),
            running: AtomicU64::new(0),
            finished: Notify::new(),
            draining: AtomicBool::new(false),
            state: Mutex::new(State {
                agents: Vec::new(),
                index: HashMap::new(),
                queues: HashMap::new(),
                deadlines: BinaryHeap::new(),
                with_deadline: std::collections::HashSet::new(),
                dead: std::collections::VecDeque::new(),
                seq: 0,
                next_entry: 0,
                rng: seed,
                queued_bytes: 0,
                waiting: Arc::new(AtomicBool::new(false)),
            }),
            ready: Mutex::new(std::collections::VecDeque::new()),
            wake: Notify::new(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        tokio::spawn(dispatch(inner.clone()));
        Scheduler {
            _stop: Arc::new(StopOnDrop(inner.clone())),
            inner,
        }
    }

    /// Makes an agent available for the capabilities it declares. `label`
    /// names it in stats and errors; `max_in_flight` bounds its tasks at once.
    pub fn add_agent(&self, label: &str, agent: Arc<Agent>, limits: Limits, max_in_flight: u32) {
        self.replace_agent(None, Some((label, agent, limits, max_in_flight)));
    }

    /// Takes the agent labelled `label` out of placement; tasks it is running
    /// finish. Queued tasks whose capability nobody provides any more fail
    /// as unavailable. Returns whether there was such an agent.
    pub fn remove_agent(&self, label: &str) -> bool {
        self.replace_agent(Some(label), None)
    }

    /// Removes `old` and adds `new` under one lock, so that no task sees a
    /// moment with neither (a hot upgrade). Returns whether `old` was found.
    pub fn replace_agent(
        &self,
        old: Option<&str>,
        new: Option<(&str, Arc<Agent>, Limits, u32)>,
    ) -> bool {
        let mut state = self.inner.state();
        let mut found = false;
        if let Some(old) = old {
            for i in 0..state.agents.len() {
                if state.agents[i].label == old && !state.agents[i].retired {
                    state.agents[i].retired = true;
                    state.agents[i].agent = None;
                    found = true;
                    for list in state.index.values_mut() {
                        list.retain(|&j| j != i);
                    }
                }
            }
            state.index.retain(|_, list| !list.is_empty());
        }
        if let Some((label, agent, limits, max_in_flight)) = new {
            let i = self.push_entry(&mut state, label, &agent, limits, max_in_flight);
            for c in &agent.descriptor().capabilities {
                state
                    .index
                    .entry(Route::Capability(c.name.clone()))
                    .or_default()
                    .push(i);
            }
            for subject in agent.subscriptions() {
                state
                    .index
                    .entry(Route::Message(subject.clone()))
                    .or_default()
                    .push(i);
            }
        }
        // Retired places no attempt holds are dropped from the end (a
        // place in the middle waits for the next agent added).
        while state
            .agents
            .last()
            .is_some_and(|e| e.retired && e.in_flight() == 0)
        {
            state.agents.pop();
        }
        drop(state);
        self.inner.wake.notify_one();
        found
    }

    /// Adds an entry for `agent` and returns its place. The place of a
    /// retired entry that no attempt holds any more is taken first, so
    /// that upgrades and removals do not grow the table: it is never longer
    /// than the most agents it had at once, live or retired and still
    /// running a task.
    fn push_entry(
        &self,
        state: &mut State,
        label: &str,
        agent: &Arc<Agent>,
        limits: Limits,
        max_in_flight: u32,
    ) -> usize {
        let capabilities = agent
            .descriptor()
            .capabilities
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let id = state.next_entry;
        state.next_entry += 1;
        let entry = Entry {
            id,
            label: label.to_string(),
            engine: agent.engine().clone(),
            agent: Some(agent.clone()),
            capabilities,
            limits,
            max_in_flight: max_in_flight.max(1),
            slots: Arc::new(Semaphore::new(max_in_flight.max(1) as usize)),
            success: 1.0,
            latency_ms: 0.0,
            breaker: Breaker::new(
                self.inner.config.breaker_threshold,
                self.inner.config.breaker_cool_down,
            ),
            completed: 0,
            failed: 0,
            retired: false,
        };
        match state
            .agents
            .iter()
            .position(|e| e.retired && e.in_flight() == 0)
        {
            Some(i) => {
                state.agents[i] = entry;
                i
            }
            None => {
                state.agents.push(entry);
                state.agents.len() - 1
            }
        }
    }

    /// How many places the scheduler's agent table has: the live agents,
    /// the removed or replaced ones whose tasks have not all ended, and
    /// places of ended ones not yet given to an agent added since.
    pub fn entries(&self) -> usize {
        self.inner.state().agents.len()
    }

    /// Whether some agent provides `capability` now.
    pub fn provides(&self, capability: &str) -> bool {
        self.inner
            .state()
            .index
            .contains_key(&Route::Capability(capability.to_string()))
    }

    /// The capabilities some agent provides now.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = self
            .inner
            .state()
            .index
            .keys()
            .filter_map(|k| match k {
                Route::Capability(c) => Some(c.clone()),
                Route::Message(_) => None,
            })
            .collect();
        caps.sort();
        caps
    }

    /// The message subjects some agent subscribes to now.
    pub fn subscriptions(&self) -> Vec<String> {
        let mut subjects: Vec<String> = self
            .inner
            .state()
            .index
            .keys()
            .filter_map(|k| match k {
                Route::Message(s) => Some(s.clone()),
                Route::Capability(_) => None,
            })
            .collect();
        subjects.sort();
        subjects
    }

    /// Tasks waiting in the queues, per capability (messages as `message
    /// SUBJECT`).
    pub fn queued(&self) -> Vec<(String, usize)> {
        let mut q: Vec<(String, usize)> = self
            .inner
            .state()
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(r, q)| (r.to_string(), q.len()))
            .collect();
        q.sort();
        q
    }

    /// Whether any task waits in a queue (for an agent, an instance or an
    /// engine slot, a breaker's cool-down, or the next placement pass), as
    /// of the last enqueue or placement pass; read without the scheduler's
    /// lock, which a placement pass holds.
    pub fn backlog(&self) -> impl Fn() -> bool + Send + Sync + 'static {
        let waiting = self.inner.state().waiting.clone();
        move || waiting.load(AtomicOrdering::Relaxed)
    }

    /// Attempts running now.
    pub fn running(&self) -> u64 {
        self.inner.running.load(AtomicOrdering::Relaxed)
    }

    /// Stops placing and accepting tasks, then waits up to `grace` for the
    /// running attempts to end. Returns how many were still running.
    pub async fn drain(&self, grace: Duration) -> u64 {
        self.inner.draining.store(true, AtomicOrdering::Relaxed);
        self.idle(grace).await
    }

    /// Waits up to `grace` until no attempt is running (without stopping
    /// anything). Returns how many still were.
    pub async fn idle(&self, grace: Duration) -> u64 {
        let until = tokio::time::Instant::now() + grace;
        loop {
            let finished = self.inner.finished.notified();
            let running = self.running();
            if running == 0 {
                return 0;
            }
            if tokio::time::timeout_at(until, finished).await.is_err() {
                return self.running();
            }
        }
    }

    /// Queues a task. Refused at once when no agent provides the capability
    /// or the deadline has passed.
    pub fn submit(&self, task: Submit) -> Result<TaskHandle, SubmitError> {
        let route = Route::Capability(task.capability.clone());
        submit(&self.inner, task, route, 0, None, Arc::from([]), false)
    }

    /// Queues a message for an agent that subscribes to `subject` (the
    /// `capability` field of `task` is ignored). One attempt: messages are
    /// at most once.
    pub fn submit_message(&self, subject: &str, task: Submit) -> Result<TaskHandle, SubmitError> {
        let route = Route::Message(subject.to_string());
        let task = Submit {
            capability: subject.to_string(),
            max_attempts: Some(1),
            ..task
        };
        submit(&self.inner, task, route, 0, None, Arc::from([]), true)
    }

    /// Queues a sub-task that another host's agent started (`tasks.call`
    /// across hosts): `depth` and `fuel_cap` come from its caller.
    pub fn submit_sub_task(
        &self,
        task: Submit,
        depth: u32,
        fuel_cap: u64,
    ) -> Result<TaskHandle, SubmitError> {
        let route = Route::Capability(task.capability.clone());
        submit(
            &self.inner,
            task,
            route,
            depth,
            Some(fuel_cap),
            Arc::from([]),
            true,
        )
    }

    /// Takes every cancelled task out of the queues at once (each ends as
    /// `cancelled`), so that a cancelled task's payload does not wait in
    /// memory until it reaches the head of its queue. Call after
    /// cancelling tokens of queued tasks.
    pub fn forget_cancelled(&self) {
        let gone: Vec<Pending> = {
            let mut state = self.inner.state();
            let mut gone = Vec::new();
            let mut seqs = Vec::new();
            let mut freed = 0;
            for queue in state.queues.values_mut() {
                if !queue.iter().any(|q| q.task.cancelled()) {
                    continue;
                }
                let kept: BinaryHeap<Queued> = std::mem::take(queue)
                    .into_iter()
                    .filter_map(|q| {
                        if q.task.cancelled() {
                            freed += q.task.counted_bytes;
                            seqs.push(q.seq);
                            gone.push(q.task);
                            None
                        } else {
                            Some(q)
                        }
                    })
                    .collect();
                *queue = kept;
            }
            state.queued_bytes -= freed;
            for seq in seqs {
                state.with_deadline.remove(&seq);
            }
            // No placement pass may follow to clear it.
            let waiting = state.queues.values().any(|q| !q.is_empty());
            state.waiting.store(waiting, AtomicOrdering::Relaxed);
            gone
        };
        for task in gone {
            fail(&self.inner, task, TaskError::Cancelled, false);
        }
    }

    /// Where agents' `messaging` calls go.
    pub fn set_bus(&self, bus: Arc<dyn Bus>) {
        *self.inner.bus.lock().unwrap_or_else(|p| p.into_inner()) = Some(bus);
    }

    /// Where durable agents' `tasks.call` outcomes are recorded; without
    /// one, `durable` plugins' calls are not recorded.
    pub fn set_call_log(&self, log: Arc<dyn calls::CallLog>) {
        *self
            .inner
            .call_log
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(log);
    }

    /// Where sub-tasks for capabilities no local agent provides go.
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        *self.inner.remote.lock().unwrap_or_else(|p| p.into_inner()) = Some(remote);
    }

    /// Tasks that failed every attempt, oldest first.
    pub fn dead_letters(&self) -> Vec<Failure> {
        self.inner.state().dead.iter().cloned().collect()
    }

    pub fn stats(&self) -> Vec<AgentStats> {
        let now = Instant::now();
        self.inner
            .state()
            .agents
            .iter()
            .filter(|e| !e.retired || e.in_flight() > 0)
            .map(|e| AgentStats {
                label: e.label.clone(),
                capabilities: e.capabilities.clone(),
                max_in_flight: e.max_in_flight,
                completed: e.completed,
                failed: e.failed,
                in_flight: e.in_flight(),
                score: e.score(),
                breaker: e.breaker.state(now),
            })
            .collect()
    }
}

fn submit(
    inner: &Inner,
    task: Submit,
    route: Route,
    depth: u32,
    fuel_cap: Option<u64>,
    chain: Arc<[u64]>,
    bounded: bool,
) -> Result<TaskHandle, SubmitError> {
    if inner.draining.load(AtomicOrdering::Relaxed) {
        return Err(SubmitError::ShuttingDown);
    }
    if task.deadline.is_some_and(|d| d <= Instant::now()) {
        return Err(SubmitError::DeadlinePassed);
    }
    let (tx, rx) = oneshot::channel();
    let id = task.id.clone();
    {
        let mut state = inner.state();
        if !state.index.contains_key(&route) {
            return Err(match route {
                Route::Capability(c) => SubmitError::UnknownCapability(c),
                Route::Message(s) => SubmitError::NoSubscriber(s),
            });
        }
        let queued: usize = state.queues.values().map(BinaryHeap::len).sum();
        if bounded && queued >= inner.config.max_queued {
            return Err(SubmitError::QueueFull {
                limit: inner.config.max_queued,
            });
        }
        let size = task.payload.len() as u64;
        if bounded && state.queued_bytes.saturating_add(size) > inner.config.max_queued_bytes {
            return Err(SubmitError::QueueBytesFull {
                queued: state.queued_bytes,
                size,
                limit: inner.config.max_queued_bytes,
            });
        }
        if let Some(slots) = state.held_by_callers(&route, &chain) {
            return Err(SubmitError::HeldByCallers {
                capability: route.to_string(),
                slots,
            });
        }
        let pending = Pending {
            id: task.id,
            route,
            payload: task.payload,
            priority: task.priority,
            deadline: task.deadline,
            attempts: Vec::new(),
            reply: tx,
            depth,
            fuel_cap,
            max_attempts: task.max_attempts,
            attempts_before: task.attempts_before,
            counted_bytes: if bounded { size } else { 0 },
            chain,
            submitted: Instant::now(),
            cancel: task.cancel,
            trace: task.trace,
            submitted_at_ms: task.submitted_at_ms,
        };
        enqueue(&mut state, pending);
    }
    inner.wake.notify_one();
    Ok(TaskHandle { id, rx })
}

fn enqueue(state: &mut State, task: Pending) {
    state.queued_bytes += task.counted_bytes;
    state.seq += 1;
    state.waiting.store(true, AtomicOrdering::Relaxed);
    let seq = state.seq;
    if let Some(d) = task.deadline {
        if state.deadlines.len() > 2 * state.with_deadline.len() + 1024 {
            state.deadlines = state
                .queues
                .iter()
                .flat_map(|(route, q)| {
                    q.iter().filter_map(|q| {
                        let d = q.task.deadline?;
                        Some(std::cmp::Reverse((d, q.seq, route.clone())))
                    })
                })
                .collect();
        }
        state
            .deadlines
            .push(std::cmp::Reverse((d, seq, task.route.clone())));
        state.with_deadline.insert(seq);
    }
    state
        .queues
        .entry(task.route.clone())
        .or_default()
        .push(Queued { seq, task });
}

/// The dispatcher: places queued tasks while agents have room, then sleeps
/// until something changes (a submit, a finished task, a retry coming due)
/// or an open breaker's cool-down ends.
async fn dispatch(inner: Arc<Inner>) {
    loop {
        if inner.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        let mut starts = Vec::new();
        let mut expired = Vec::new();
        let mut orphaned = Vec::new();
        let draining = inner.draining.load(std::sync::atomic::Ordering::Relaxed);
        let (next_breaker, next_deadline) = {
            let mut state = inner.state();
            // Tasks past their deadline anywhere in their queue (the
            // placement below sees only each queue's head).
            let mut past: Vec<Route> = Vec::new();
            while let Some(std::cmp::Reverse((d, _, _))) = state.deadlines.peek() {
                if *d > now {
                    break;
                }
                if let Some(std::cmp::Reverse((_, seq, route))) = state.deadlines.pop() {
                    if state.with_deadline.contains(&seq) && !past.contains(&route) {
                        past.push(route);
                    }
                }
            }
            for route in past {
                let Some(queue) = state.queues.get_mut(&route) else {
                    continue;
                };
                let (gone, kept): (Vec<Queued>, Vec<Queued>) = std::mem::take(queue)
                    .into_iter()
                    .partition(|q| q.task.deadline.is_some_and(|d| d <= now));
                *queue = kept.into_iter().collect();
                for q in gone {
                    state.queued_bytes -= q.task.counted_bytes;
                    state.with_deadline.remove(&q.seq);
                    expired.push(q.task);
                }
            }
            let caps: Vec<Route> = state.queues.keys().cloned().collect();
            for cap in caps {
                if !state.index.contains_key(&cap) {
                    // The last agent for it was removed.
                    if let Some(q) = state.queues.remove(&cap) {
                        for q in q {
                            state.queued_bytes -= q.task.counted_bytes;
                            state.with_deadline.remove(&q.seq);
                            orphaned.push(q.task);
                        }
                    }
                    continue;
                }
                if draining {
                    continue;
                }
                while let Some(head) = state.queues.get(&cap).and_then(|q| q.peek()) {
                    if head.task.deadline.is_some_and(|d| d <= now) || head.task.cancelled() {
                        if let Some(q) = state.queues.get_mut(&cap).and_then(|q| q.pop()) {
                            state.queued_bytes -= q.task.counted_bytes;
                            state.with_deadline.remove(&q.seq);
                            expired.push(q.task);
                        }
                        continue;
                    }
                    let Some(i) = state.pick(&cap, now) else {
                        break;
                    };
                    let e = &state.agents[i];
                    // Only live agents are in the index.
                    let Some(agent) = e.agent.clone() else {
                        break;
                    };
                    // `pick` saw both free; nothing else takes agent slots,
                    // but a `describe` may take the last engine slot.
                    let Ok(slot) = e.slots.clone().try_acquire_owned() else {
                        break;
                    };
                    let Some(instance) = agent.try_instance_permit() else {
                        break;
                    };
                    let Some(q) = state.queues.get_mut(&cap).and_then(|q| q.pop()) else {
                        break;
                    };
                    state.queued_bytes -= q.task.counted_bytes;
                    state.with_deadline.remove(&q.seq);
                    let e = &mut state.agents[i];
                    e.breaker.on_send(now);
                    starts.push(Job {
                        agent_index: i,
                        agent_id: e.id,
                        agent,
                        label: e.label.clone(),
                        limits: e.limits.clone(),
                        task: q.task,
                        slot,
                        instance,
                    });
                }
            }
            let waiting = state.queues.values().any(|q| !q.is_empty());
            state.waiting.store(waiting, AtomicOrdering::Relaxed);
            let next_breaker = if waiting {
                state
                    .agents
                    .iter()
                    .filter_map(|e| e.breaker.open_until())
                    .min()
            } else {
                None
            };
            let next_deadline = state.deadlines.peek().map(|r| r.0 .0);
            (next_breaker, next_deadline)
        };
        for task in expired {
            let error = if task.cancelled() {
                TaskError::Cancelled
            } else {
                task.deadline_error()
            };
            fail(&inner, task, error, false);
        }
        for task in orphaned {
            let error = TaskError::Unavailable(match &task.route {
                Route::Capability(c) => format!("no agent provides capability {c} any more"),
                Route::Message(s) => format!("no agent subscribes to {s} any more"),
            });
            fail(&inner, task, error, false);
        }
        let runners = starts.len();
        // Counted as running from placement on, so that `idle` and `drain`
        // also wait for placed attempts whose runner has not started yet.
        inner
            .running
            .fetch_add(runners as u64, AtomicOrdering::Relaxed);
        inner
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(starts);
        for _ in 0..runners {
            tokio::spawn(run_oldest(inner.clone()));
        }
        let notified = inner.wake.notified();
        let until = match (next_breaker, next_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match until {
            Some(until) => {
                let _ = tokio::time::timeout_at(until.into(), notified).await;
            }
            None => notified.await,
        }
    }
}

fn fail(inner: &Inner, task: Pending, error: TaskError, dead_letter: bool) {
    fail_after(inner, task, error, dead_letter, 0);
}

fn fail_after(inner: &Inner, task: Pending, error: TaskError, dead_letter: bool, fuel_used: u64) {
    let failure = Failure {
        id: task.id,
        capability: task.route.to_string(),
        error,
        attempts: task.attempts,
        dead_letter,
        fuel_used,
    };
    if dead_letter {
        let mut state = inner.state();
        state.dead.push_back(failure.clone());
        while state.dead.len() > inner.config.max_dead_letters {
            state.dead.pop_front();
        }
    }
    let _ = task.reply.send(Err(failure));
}

async fn run_oldest(inner: Arc<Inner>) {
    run(&inner).await;
    inner.running.fetch_sub(1, AtomicOrdering::Relaxed);
    inner.finished.notify_waiters();
}

/// Runs the oldest placed job. It is taken here rather than passed in: a
/// job held by the caller's future as well as this one's kept 850 bytes
/// more per running task (`density` bench).
async fn run(inner: &Arc<Inner>) {
    // One runner is spawned per placed job, so there is always one to take.
    let job = inner
        .ready
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    let Some(Job {
        agent_index: i,
        agent_id,
        agent,
        label,
        mut limits,
        mut task,
        slot,
        mut instance,
    }) = job
    else {
        return;
    };
    // The agent's slot is free the moment the engine's is, not after: a
    // placement in between would count the agent busy and the engine slot
    // free, and could give the slot away that an idle agent is kept.
    instance.attach(slot);
    let started = Instant::now();
    let mut by_deadline = false;
    if let Some(deadline) = task.deadline {
        let left = deadline.saturating_duration_since(started);
        by_deadline = left < limits.timeout;
        limits.timeout = limits.timeout.min(left);
    }
    if let Some(cap) = task.fuel_cap {
        limits.fuel = limits.fuel.min(cap);
    }
    let attempt = task.attempts_before + task.attempts.len() as u32 + 1;
    if let Some(hook) = &inner.on_attempt {
        hook(AttemptEvent::Started {
            id: &task.id,
            capability: task.route.name(),
            agent: &label,
            attempt,
            // The first attempt only, as on a lone host: a cluster's
            // retry comes to a scheduler as a new delivery, with the
            // attempts before it counted in `attempts_before`.
            waited: (attempt == 1).then(|| started.saturating_duration_since(task.submitted)),
            submitted_at_ms: task.submitted_at_ms,
        });
    }
    // A message for a subscription reaches the agent with its subject as
    // the capability.
    let (capability, content_type) = match &task.route {
        Route::Message(subject) => (subject.clone(), MESSAGE_CONTENT_TYPE),
        Route::Capability(c) => (c.clone(), "application/octet-stream"),
    };
    let mut chain = task.chain.to_vec();
    chain.push(agent_id);
    // A durable agent's calls are recorded and replayed; a replayed call
    // that does not match its record fails the task, whatever it returns.
    let durable_log = if limits.durable {
        inner
            .call_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    } else {
        None
    };
    // Only a durable attempt can diverge from its record.
    let mismatch: Option<Mismatch> = durable_log.as_ref().map(|_| Arc::new(Mutex::new(None)));
    let request = TaskRequest {
        id: task.id.clone(),
        capability,
        payload: task.payload.clone(),
        content_type: content_type.into(),
        attempt,
        calls: Some(CallContext {
            depth: task.depth,
            tasks: Arc::new(Router {
                inner: inner.clone(),
                chain: Arc::from(chain),
                priority: task.priority,
                seq: Arc::new(AtomicU64::new(0)),
                cancel: task.cancel.clone(),
                attempt,
                durable: durable_log.zip(mismatch.clone()),
                trace: task.trace.clone(),
            }),
            bus: inner.bus.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            trace_id: task
                .trace
                .as_deref()
                .and_then(crate::trace::trace_id)
                .map(String::from),
        }),
    };
    // The trace: the wait in this host's queue up to the placement on an
    // agent (first attempt only), then the attempt, under which the
    // engine's spans (instantiate, the guest's handle, host calls) fall.
    if task.attempts.is_empty() && crate::trace::sampled(task.trace.as_deref()) {
        let now = std::time::SystemTime::now();
        crate::trace::ended(
            "task.queue",
            task.trace.as_deref(),
            now - started.saturating_duration_since(task.submitted),
            now,
            vec![
                opentelemetry::KeyValue::new("task.id", task.id.clone()),
                opentelemetry::KeyValue::new("orch.agent", label.clone()),
            ],
        );
    }
    let span = crate::trace::under(task.trace.as_deref(), || {
        tracing::info_span!(
            target: crate::trace::TARGET,
            "task.attempt",
            task.id = %task.id,
            task.capability = %task.route.name(),
            task.attempt = attempt,
            orch.agent = %label,
            error = tracing::field::Empty,
        )
    });
    let attempt_run =
        tracing::Instrument::instrument(agent.run(request, &limits, Some(instance)), span.clone());
    let Outcome {
        mut result,
        fuel_used,
        memory,
    } = match task.cancel.clone() {
        // Dropping the run drops its store: the instance is freed at once.
        Some(cancel) => tokio::select! {
            outcome = attempt_run => outcome,
            () = cancel.cancelled() => Outcome::failed(TaskError::Cancelled),
        },
        None => attempt_run.await,
    };
    if let Err(e) = &result {
        span.record("error", e.kind());
    }
    if let Some(m) = mismatch
        .as_ref()
        .and_then(|m| m.lock().unwrap_or_else(|p| p.into_inner()).take())
    {
        result = Err(TaskError::NonDeterministic(m));
    }
    if by_deadline && matches!(result, Err(TaskError::DeadlineExceeded { .. })) {
        // Cut by the task's deadline, not the agent's timeout: name that one.
        result = Err(task.deadline_error());
    }
    if let Some(hook) = &inner.on_attempt {
        hook(AttemptEvent::Ended {
            capability: task.route.name(),
            agent: &label,
            ran: started.elapsed(),
            memory,
            error: result.as_ref().err(),
        });
    }
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let now = Instant::now();
    let backoff = {
        let mut state = inner.state();
        // The entry's place holds another agent once this one was retired
        // and its last slot freed (the instance gave it back above).
        if let Some(e) = state.agents.get_mut(i).filter(|e| e.id == agent_id) {
            e.latency_ms = 0.9 * e.latency_ms + 0.1 * elapsed_ms;
            match &result {
                Ok(_) => {
                    e.completed += 1;
                    e.success = 0.9 * e.success + 0.1;
                    e.breaker.on_success();
                }
                // Bad input says nothing about the agent's health; a half-open
                // probe with bad input leaves the next task to probe.
                Err(TaskError::InvalidInput(_)) => {
                    e.completed += 1;
                    e.breaker.on_inconclusive();
                }
                Err(_) => {
                    e.failed += 1;
                    e.success *= 0.9;
                    e.breaker.on_failure(now);
                }
            }
        }
        let attempt = task.attempts.len() as u32 + 1;
        let exp = inner.config.backoff_base.as_secs_f64() * 2f64.powi(attempt as i32 - 1);
        let jitter = 0.5 + state.random();
        Duration::from_secs_f64(exp.min(inner.config.backoff_max.as_secs_f64()) * jitter)
    };
    inner.wake.notify_one();
    match result {
        Ok(output) => {
            let _ = task.reply.send(Ok(Completed {
                id: task.id,
                agent: label,
                output,
                started_at: started,
                failed_attempts: task.attempts,
            }));
        }
        Err(error) => {
            task.attempts.push(AttemptError {
                agent: label,
                error: error.clone(),
            });
            if !error.is_retryable() || task.cancelled() {
                fail_after(inner, task, error, false, fuel_used);
            } else if task.attempts.len() as u32 >= task.max_attempts(&inner.config)
                || task.deadline.is_some_and(|d| d <= now + backoff)
            {
                // A sub-task's failure goes back to its caller, not to the
                // dead letters.
                let dead = task.depth == 0;
                fail_after(inner, task, error, dead, fuel_used);
            } else {
                if let Some(hook) = &inner.on_attempt {
                    if let Some(last) = task.attempts.last() {
                        hook(AttemptEvent::Retrying {
                            id: &task.id,
                            capability: task.route.name(),
                            agent: &last.agent,
                            attempt: task.attempts_before + task.attempts.len() as u32,
                            error: &last.error,
                            submitted_at_ms: task.submitted_at_ms,
                        });
                    }
                }
                tokio::time::sleep(backoff).await;
                enqueue(&mut inner.state(), task);
                inner.wake.notify_one();
            }
        }
    }
}

/// Runs the `tasks.call` sub-tasks of one task through the same queues as
/// every other task. The caller keeps its slot while it waits: a plugin's
/// instances, waiting callers included, never exceed its slots.
#[derive(Clone)]
struct Router {
    inner: Arc<Inner>,
    /// The agents (`Entry::id`) of this task and of its callers, one
    /// entry each.
    chain: Arc<[u64]>,
    priority: i32,
    seq: Arc<AtomicU64>,
    /// The caller's: cancelling a task cancels its sub-tasks.
    cancel: Option<CancellationToken>,
    /// The caller's attempt: a retried caller's sub-tasks get new ids.
    attempt: u32,
    /// For a durable caller: where its calls are recorded, and what is set
    /// when a replayed call does not match its record.
    durable: Option<(Arc<dyn calls::CallLog>, Mismatch)>,
    /// The caller's trace context: a sub-task's spans are under the call's
    /// span, or under this when spans are not recorded.
    trace: Option<String>,
}

/// The first call of a durable attempt that did not match its record.
type Mismatch = Arc<Mutex<Option<String>>>;

impl SubTasks for Router {
    fn call(&self, call: SubCall) -> SubCallFuture {
        let n = self.seq.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        let Some((log, mismatch)) = self.durable.clone() else {
            return self.dispatch(call, n);
        };
        let router = self.clone();
        Box::pin(async move {
            // A task that already diverged from its record starts nothing
            // more: it fails anyway.
            if let Some(m) = mismatch.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                return Outcome::failed(TaskError::NonDeterministic(m));
            }
            let key = format!("{}/{n}", call.parent);
            let hash = calls::payload_hash(&call.payload);
            match log.get(&key).await {
                Ok(Some(record))
                    if record.capability == call.capability && record.payload_sha256 == hash =>
                {
                    return record.outcome();
                }
                Ok(Some(record)) => {
                    let m = format!(
                        "call {n} asks {} with a payload of sha256 {hash}, but the recorded call {n} asked {} with sha256 {}",
                        call.capability, record.capability, record.payload_sha256
                    );
                    *mismatch.lock().unwrap_or_else(|p| p.into_inner()) = Some(m.clone());
                    return Outcome::failed(TaskError::NonDeterministic(m));
                }
                Ok(None) => {}
                // Without its record the call runs; it is the same call.
                Err(e) => tracing::warn!(key, error = %e, "reading a call record failed"),
            }
            let capability = call.capability.clone();
            let outcome = router.dispatch(call, n).await;
            // Recorded before the caller sees it: a run again gets this.
            if calls::is_recordable(&outcome) {
                let record = calls::CallRecord::of(&capability, hash, &outcome, now_ms());
                if let Err(e) = log.put(&key, &record).await {
                    tracing::warn!(key, error = %e, "recording a call failed; a run again would call again");
                }
            }
            outcome
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Router {
    /// Starts the sub-task of call `n`.
    fn dispatch(&self, mut call: SubCall, n: u64) -> SubCallFuture {
        // A retry of the caller makes the same calls again: they are new
        // sub-tasks (in a cluster, the stream would drop a repeated id as
        // a duplicate and the retry would get the old outcome).
        let id = if self.attempt > 1 {
            format!("{}.{n}-{}", call.parent, self.attempt)
        } else {
            format!("{}.{n}", call.parent)
        };
        let route = Route::Capability(call.capability.clone());
        let trace = crate::trace::current(self.trace.as_deref());
        if !self.inner.state().index.contains_key(&route) {
            if let Some(remote) = self.inner.remote() {
                // No local agent: another host's, through the cluster.
                let priority = self.priority;
                return Box::pin(async move {
                    call.parent = id;
                    remote.call(call, priority, trace).await
                });
            }
        }
        let task = Submit {
            id,
            capability: call.capability,
            payload: call.payload,
            priority: self.priority,
            deadline: Some(call.deadline),
            max_attempts: Some(1),
            cancel: self.cancel.as_ref().map(CancellationToken::child_token),
            attempts_before: 0,
            trace,
            submitted_at_ms: Some(crate::daemon::now_ms()),
        };
        let submitted = submit(
            &self.inner,
            task,
            route,
            call.depth,
            Some(call.fuel),
            self.chain.clone(),
            true,
        );
        Box::pin(async move {
            let handle = match submitted {
                Ok(h) => h,
                Err(SubmitError::DeadlinePassed) => {
                    return Outcome::failed(TaskError::DeadlineExceeded { ms: 0 })
                }
                Err(other) => return Outcome::failed(TaskError::Unavailable(other.to_string())),
            };
            match handle.wait().await {
                // The sub-task's memory is its own attempt's, counted there.
                Ok(done) => Outcome {
                    fuel_used: done.output.fuel_used,
                    result: Ok(done.output),
                    memory: 0,
                },
                Err(failure) => Outcome {
                    fuel_used: failure.fuel_used,
                    result: Err(failure.error),
                    memory: 0,
                },
            }
        })
    }
}
