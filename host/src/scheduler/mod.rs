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

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::error::TaskError;
use crate::sandbox::{
    Agent, Bus, CallContext, Limits, SubCall, SubCallFuture, SubTasks, TaskOutput, TaskRequest,
    MESSAGE_CONTENT_TYPE,
};

/// Messages for a subscribed subject are queued under this capability.
pub fn message_capability(subject: &str) -> String {
    format!("msg:{subject}")
}
use breaker::Breaker;

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
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_attempts: 3,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            breaker_threshold: 5,
            breaker_cool_down: Duration::from_secs(2),
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
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("no agent provides capability {0}")]
    UnknownCapability(String),
    #[error("the task's deadline has already passed")]
    DeadlinePassed,
    #[error("the host is shutting down and takes no new tasks")]
    ShuttingDown,
}

/// Runs the sub-tasks no local agent can take: the cluster implements it,
/// so that `tasks.call` reaches agents on other hosts. `call.parent` holds
/// the sub-task's own id here.
pub trait Remote: Send + Sync {
    fn call(&self, call: SubCall, priority: i32) -> SubCallFuture;
}

/// What happens to a task between submission and its end, for whoever shows
/// task states (the daemon).
#[derive(Debug, Clone, Copy)]
pub enum AttemptEvent<'a> {
    /// An attempt starts on `agent`; `attempt` is 1 for the first.
    Started {
        id: &'a str,
        agent: &'a str,
        attempt: u32,
    },
    /// An attempt failed and the task waits for its next one.
    Retrying { id: &'a str },
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
            })
        })
    }
}

struct Pending {
    id: String,
    capability: String,
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
    label: String,
    agent: Arc<Agent>,
    limits: Limits,
    max_in_flight: u32,
    in_flight: u32,
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
    /// The reliability score: failures weigh heavily, latency gently.
    fn score(&self) -> f64 {
        self.success.powi(4) / (1.0 + self.latency_ms / 100.0)
    }
}

struct State {
    agents: Vec<Entry>,
    index: HashMap<String, Vec<usize>>,
    queues: HashMap<String, BinaryHeap<Queued>>,
    dead: Vec<Failure>,
    seq: u64,
    rng: u64,
}

impl State {
    fn random(&mut self) -> f64 {
        // xorshift64: placement and jitter need spread, not cryptography.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An agent for `capability` with a free slot and a closed (or probing)
    /// breaker, chosen at random weighted by score.
    fn pick(&mut self, capability: &str, now: Instant) -> Option<usize> {
        let candidates: Vec<(usize, f64)> = self
            .index
            .get(capability)?
            .iter()
            .filter(|&&i| {
                let e = &self.agents[i];
                e.in_flight < e.max_in_flight && e.breaker.allows(now)
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

/// A task placed on an agent, waiting for a runner.
struct Job {
    agent_index: usize,
    agent: Arc<Agent>,
    label: String,
    limits: Limits,
    task: Pending,
}

struct Inner {
    config: SchedulerConfig,
    on_attempt: Option<AttemptHook>,
    remote: Mutex<Option<Arc<dyn Remote>>>,
    bus: Mutex<Option<Arc<dyn Bus>>>,
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
            running: AtomicU64::new(0),
            finished: Notify::new(),
            draining: AtomicBool::new(false),
            state: Mutex::new(State {
                agents: Vec::new(),
                index: HashMap::new(),
                queues: HashMap::new(),
                dead: Vec::new(),
                seq: 0,
                rng: seed,
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
                    found = true;
                    for list in state.index.values_mut() {
                        list.retain(|&j| j != i);
                    }
                }
            }
            state.index.retain(|_, list| !list.is_empty());
        }
        if let Some((label, agent, limits, max_in_flight)) = new {
            let i = state.agents.len();
            for c in &agent.descriptor().capabilities {
                state.index.entry(c.name.clone()).or_default().push(i);
            }
            for subject in agent.subscriptions() {
                state
                    .index
                    .entry(message_capability(subject))
                    .or_default()
                    .push(i);
            }
            self.push_entry(&mut state, label, agent, limits, max_in_flight);
        }
        drop(state);
        self.inner.wake.notify_one();
        found
    }

    fn push_entry(
        &self,
        state: &mut State,
        label: &str,
        agent: Arc<Agent>,
        limits: Limits,
        max_in_flight: u32,
    ) {
        state.agents.push(Entry {
            label: label.to_string(),
            agent,
            limits,
            max_in_flight: max_in_flight.max(1),
            in_flight: 0,
            success: 1.0,
            latency_ms: 0.0,
            breaker: Breaker::new(
                self.inner.config.breaker_threshold,
                self.inner.config.breaker_cool_down,
            ),
            completed: 0,
            failed: 0,
            retired: false,
        });
    }

    /// Whether some agent provides `capability` now.
    pub fn provides(&self, capability: &str) -> bool {
        self.inner.state().index.contains_key(capability)
    }

    /// The capabilities some agent provides now.
    pub fn capabilities(&self) -> Vec<String> {
        let mut caps: Vec<String> = self
            .inner
            .state()
            .index
            .keys()
            .filter(|k| !k.starts_with("msg:"))
            .cloned()
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
            .filter_map(|k| k.strip_prefix("msg:"))
            .map(String::from)
            .collect();
        subjects.sort();
        subjects
    }

    /// Tasks waiting in the queues, per capability.
    pub fn queued(&self) -> Vec<(String, usize)> {
        let mut q: Vec<(String, usize)> = self
            .inner
            .state()
            .queues
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(c, q)| (c.clone(), q.len()))
            .collect();
        q.sort();
        q
    }

    /// Attempts running now.
    pub fn running(&self) -> u64 {
        self.inner.running.load(AtomicOrdering::Relaxed)
    }

    /// Stops placing and accepting tasks, then waits up to `grace` for the
    /// running attempts to end. Returns how many were still running.
    pub async fn drain(&self, grace: Duration) -> u64 {
        self.inner.draining.store(true, AtomicOrdering::Relaxed);
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
        submit(&self.inner, task, 0, None)
    }

    /// Queues a sub-task that another host's agent started (`tasks.call`
    /// across hosts): `depth` and `fuel_cap` come from its caller.
    pub fn submit_sub_task(
        &self,
        task: Submit,
        depth: u32,
        fuel_cap: u64,
    ) -> Result<TaskHandle, SubmitError> {
        submit(&self.inner, task, depth, Some(fuel_cap))
    }

    /// Where agents' `messaging` calls go.
    pub fn set_bus(&self, bus: Arc<dyn Bus>) {
        *self.inner.bus.lock().unwrap_or_else(|p| p.into_inner()) = Some(bus);
    }

    /// Where sub-tasks for capabilities no local agent provides go.
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        *self.inner.remote.lock().unwrap_or_else(|p| p.into_inner()) = Some(remote);
    }

    /// Tasks that failed every attempt, oldest first.
    pub fn dead_letters(&self) -> Vec<Failure> {
        self.inner.state().dead.clone()
    }

    pub fn stats(&self) -> Vec<AgentStats> {
        let now = Instant::now();
        self.inner
            .state()
            .agents
            .iter()
            .filter(|e| !e.retired || e.in_flight > 0)
            .map(|e| AgentStats {
                label: e.label.clone(),
                capabilities: e
                    .agent
                    .descriptor()
                    .capabilities
                    .iter()
                    .map(|c| c.name.clone())
                    .collect(),
                max_in_flight: e.max_in_flight,
                completed: e.completed,
                failed: e.failed,
                in_flight: e.in_flight,
                score: e.score(),
                breaker: e.breaker.state(now),
            })
            .collect()
    }
}

fn submit(
    inner: &Inner,
    task: Submit,
    depth: u32,
    fuel_cap: Option<u64>,
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
        if !state.index.contains_key(&task.capability) {
            return Err(SubmitError::UnknownCapability(task.capability));
        }
        let pending = Pending {
            id: task.id,
            capability: task.capability,
            payload: task.payload,
            priority: task.priority,
            deadline: task.deadline,
            attempts: Vec::new(),
            reply: tx,
            depth,
            fuel_cap,
            max_attempts: task.max_attempts,
        };
        enqueue(&mut state, pending);
    }
    inner.wake.notify_one();
    Ok(TaskHandle { id, rx })
}

fn enqueue(state: &mut State, task: Pending) {
    state.seq += 1;
    let seq = state.seq;
    state
        .queues
        .entry(task.capability.clone())
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
        let next_breaker = {
            let mut state = inner.state();
            let caps: Vec<String> = state.queues.keys().cloned().collect();
            for cap in caps {
                if !state.index.contains_key(&cap) {
                    // The last agent for it was removed.
                    if let Some(q) = state.queues.remove(&cap) {
                        orphaned.extend(q.into_iter().map(|q| q.task));
                    }
                    continue;
                }
                if draining {
                    continue;
                }
                while let Some(head) = state.queues.get(&cap).and_then(|q| q.peek()) {
                    if head.task.deadline.is_some_and(|d| d <= now) {
                        if let Some(q) = state.queues.get_mut(&cap).and_then(|q| q.pop()) {
                            expired.push(q.task);
                        }
                        continue;
                    }
                    let Some(i) = state.pick(&cap, now) else {
                        break;
                    };
                    let Some(q) = state.queues.get_mut(&cap).and_then(|q| q.pop()) else {
                        break;
                    };
                    let e = &mut state.agents[i];
                    e.in_flight += 1;
                    e.breaker.on_send(now);
                    starts.push(Job {
                        agent_index: i,
                        agent: e.agent.clone(),
                        label: e.label.clone(),
                        limits: e.limits.clone(),
                        task: q.task,
                    });
                }
            }
            let waiting = state.queues.values().any(|q| !q.is_empty());
            if waiting {
                state
                    .agents
                    .iter()
                    .filter_map(|e| e.breaker.open_until())
                    .min()
            } else {
                None
            }
        };
        for task in expired {
            fail(&inner, task, TaskError::DeadlineExceeded { ms: 0 }, false);
        }
        for task in orphaned {
            let error = TaskError::Unavailable(format!(
                "no agent provides capability {} any more",
                task.capability
            ));
            fail(&inner, task, error, false);
        }
        let runners = starts.len();
        inner
            .ready
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(starts);
        for _ in 0..runners {
            tokio::spawn(run_oldest(inner.clone()));
        }
        let notified = inner.wake.notified();
        match next_breaker {
            Some(until) => {
                let _ = tokio::time::timeout_at(until.into(), notified).await;
            }
            None => notified.await,
        }
    }
}

fn fail(inner: &Inner, task: Pending, error: TaskError, dead_letter: bool) {
    let failure = Failure {
        id: task.id,
        capability: task.capability,
        error,
        attempts: task.attempts,
        dead_letter,
    };
    if dead_letter {
        inner.state().dead.push(failure.clone());
    }
    let _ = task.reply.send(Err(failure));
}

async fn run_oldest(inner: Arc<Inner>) {
    let job = inner
        .ready
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .pop_front();
    if let Some(job) = job {
        inner.running.fetch_add(1, AtomicOrdering::Relaxed);
        run(inner.clone(), job).await;
        inner.running.fetch_sub(1, AtomicOrdering::Relaxed);
        inner.finished.notify_waiters();
    }
}

async fn run(inner: Arc<Inner>, job: Job) {
    let Job {
        agent_index: i,
        agent,
        label,
        mut limits,
        mut task,
    } = job;
    let started = Instant::now();
    if let Some(deadline) = task.deadline {
        limits.timeout = limits
            .timeout
            .min(deadline.saturating_duration_since(started));
    }
    if let Some(cap) = task.fuel_cap {
        limits.fuel = limits.fuel.min(cap);
    }
    let attempt = task.attempts.len() as u32 + 1;
    if let Some(hook) = &inner.on_attempt {
        hook(AttemptEvent::Started {
            id: &task.id,
            agent: &label,
            attempt,
        });
    }
    // A message for a subscription reaches the agent with its subject as
    // the capability.
    let (capability, content_type) = match task.capability.strip_prefix("msg:") {
        Some(subject) => (subject.to_string(), MESSAGE_CONTENT_TYPE),
        None => (task.capability.clone(), "application/octet-stream"),
    };
    let request = TaskRequest {
        id: task.id.clone(),
        capability,
        payload: task.payload.clone(),
        content_type: content_type.into(),
        attempt,
        calls: Some(CallContext {
            depth: task.depth,
            tasks: Arc::new(Router {
                loan: Arc::new(Loan {
                    inner: inner.clone(),
                    agent: i,
                    waiting: Mutex::new(0),
                }),
                priority: task.priority,
                seq: AtomicU64::new(0),
            }),
            bus: inner.bus.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }),
    };
    let result = agent.handle(request, &limits).await;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let now = Instant::now();
    let backoff = {
        let mut state = inner.state();
        let e = &mut state.agents[i];
        e.in_flight = e.in_flight.saturating_sub(1);
        e.latency_ms = 0.9 * e.latency_ms + 0.1 * elapsed_ms;
        match &result {
            Ok(_) => {
                e.completed += 1;
                e.success = 0.9 * e.success + 0.1;
                e.breaker.on_success();
            }
            // Bad input says nothing about the agent's health.
            Err(TaskError::InvalidInput(_)) => e.completed += 1,
            Err(_) => {
                e.failed += 1;
                e.success *= 0.9;
                e.breaker.on_failure(now);
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
            if !error.is_retryable() {
                fail(&inner, task, error, false);
            } else if task.attempts.len() as u32 >= task.max_attempts(&inner.config)
                || task.deadline.is_some_and(|d| d <= now + backoff)
            {
                // A sub-task's failure goes back to its caller, not to the
                // dead letters.
                let dead = task.depth == 0;
                fail(&inner, task, error, dead);
            } else {
                if let Some(hook) = &inner.on_attempt {
                    hook(AttemptEvent::Retrying { id: &task.id });
                }
                tokio::time::sleep(backoff).await;
                enqueue(&mut inner.state(), task);
                inner.wake.notify_one();
            }
        }
    }
}

/// Runs the `tasks.call` sub-tasks of one task through the same queues as
/// every other task.
struct Router {
    loan: Arc<Loan>,
    priority: i32,
    seq: AtomicU64,
}

impl SubTasks for Router {
    fn call(&self, mut call: SubCall) -> SubCallFuture {
        let loan = self.loan.clone();
        let n = self.seq.fetch_add(1, AtomicOrdering::Relaxed) + 1;
        let id = format!("{}.{n}", call.parent);
        let remote = self.loan.inner.remote();
        if !self.loan.inner.state().index.contains_key(&call.capability) {
            if let Some(remote) = remote {
                // No local agent: another host's, through the cluster.
                let priority = self.priority;
                return Box::pin(async move {
                    let _waiting = Loan::enter(&loan);
                    call.parent = id;
                    remote.call(call, priority).await
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
        };
        Box::pin(async move {
            let _waiting = Loan::enter(&loan);
            let handle =
                submit(&loan.inner, task, call.depth, Some(call.fuel)).map_err(|e| match e {
                    SubmitError::DeadlinePassed => TaskError::DeadlineExceeded { ms: 0 },
                    other => TaskError::Unavailable(other.to_string()),
                })?;
            handle.wait().await.map(|c| c.output).map_err(|f| f.error)
        })
    }
}

/// The caller gives its slot back while it waits for sub-tasks, so that
/// callers cannot fill every slot of the agents they wait for (a task
/// calling its own capability would otherwise deadlock until its deadline).
/// Its instance stays alive; the depth and fan-out bounds and the engine's
/// instance slots bound how many. One loan covers every sub-task the caller
/// waits for at once (`call-all`).
struct Loan {
    inner: Arc<Inner>,
    agent: usize,
    /// Sub-tasks the caller waits for now.
    waiting: Mutex<u32>,
}

impl Loan {
    fn enter(loan: &Arc<Loan>) -> LoanGuard {
        let mut waiting = loan.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if *waiting == 0 {
            if let Some(e) = loan.inner.state().agents.get_mut(loan.agent) {
                e.in_flight = e.in_flight.saturating_sub(1);
            }
            loan.inner.wake.notify_one();
        }
        *waiting += 1;
        LoanGuard(loan.clone())
    }
}

/// Ends one sub-task's wait; the last one takes the slot back, also when
/// the caller is cut off.
struct LoanGuard(Arc<Loan>);

impl Drop for LoanGuard {
    fn drop(&mut self) {
        let loan = &self.0;
        let mut waiting = loan.waiting.lock().unwrap_or_else(|p| p.into_inner());
        *waiting = waiting.saturating_sub(1);
        if *waiting == 0 {
            if let Some(e) = loan.inner.state().agents.get_mut(loan.agent) {
                e.in_flight += 1;
            }
        }
    }
}
