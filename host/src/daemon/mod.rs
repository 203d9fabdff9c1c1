//! The long-running host (`orch host start`) without its HTTP layer: it
//! serves the installed plugins through the scheduler, keeps every accepted
//! task in the journal until it has a result, restarts the tasks it finds
//! unfinished when it starts, follows the plugin store (install, upgrade,
//! rollback, remove while running), and drops finished tasks after the
//! retention time.
//!
//! Execution is at least once, results are exactly once: a task that was
//! running when the host died runs again after the restart, under the same
//! id, and only the attempt that finishes first writes the task's result.

pub mod calls;
pub mod journal;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::config::HostConfig;
use crate::error::TaskError;
use crate::kv::KvStore;
use crate::plugin::{PluginError, PluginStore, StoreError};
use crate::sandbox::BusError;
use crate::sandbox::Engine;
use crate::scheduler::SubmitError;
use crate::scheduler::{
    AgentStats, AttemptEvent, CancellationToken, Scheduler, SchedulerConfig, Submit,
};
use crate::service::run;
use crate::service::{BoxFuture, EventKind, Events, ListQuery, Stored, TaskStore};
pub use journal::{Accepted, AttemptInfo, ErrorInfo, Journal, JournalError, Status, TaskRecord};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("no agent provides capability {0}")]
    UnknownCapability(String),
    #[error("payload too large: {size} bytes, past the limit of {limit} bytes")]
    PayloadTooLarge { size: u64, limit: u64 },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("no task with id {0}")]
    NotFound(String),
    #[error("the host is shutting down and takes no new tasks")]
    ShuttingDown,
    #[error("no capacity: {limit} accepted tasks have not ended on this host, its limit ([host] max_unfinished); retry later")]
    NoCapacity { limit: usize },
    #[error("no capacity: {limit} requests wait for task results on this host, its limit ([host] max_waits); retry later or wait less")]
    TooManyWaits { limit: usize },
    /// Something the host depends on (the NATS server) failed; the request
    /// was fine and may succeed when retried.
    #[error("unavailable: {what}: {source}")]
    Unavailable {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("data directory: {}: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A stored record that cannot be read back: `what` it is, and why.
    #[error("damaged record: {what}: {source}")]
    Corrupt {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A submission under a fence that a newer one replaced (see
    /// `service::Fence`): the submitter no longer drives what it submits
    /// for. Only the host's own workflow driver submits under a fence.
    #[error("fenced: {0}")]
    Fenced(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
}

impl HostError {
    /// A stable name for API clients.
    pub fn kind(&self) -> &'static str {
        match self {
            HostError::UnknownCapability(_) => "unknown-capability",
            HostError::PayloadTooLarge { .. } => "payload-too-large",
            HostError::InvalidRequest(_) => "invalid-request",
            HostError::NotFound(_) => "not-found",
            HostError::ShuttingDown => "shutting-down",
            HostError::NoCapacity { .. } | HostError::TooManyWaits { .. } => "no-capacity",
            HostError::Unavailable { .. } => "unavailable",
            HostError::Corrupt { .. } => "corrupt",
            HostError::DataDir { .. } => "data-dir",
            HostError::Journal(_) => "journal",
            HostError::Plugin(_) => "plugin",
            HostError::Fenced(_) => "fenced",
        }
    }
}

/// A task as a client submits it.
#[derive(Debug, Clone, Default)]
pub struct SubmitRequest {
    pub capability: String,
    pub payload: Vec<u8>,
    /// Higher runs first.
    pub priority: i32,
    /// Counted from submission.
    pub deadline: Option<Duration>,
    /// A second submission with the same key returns the first task.
    pub idempotency_key: Option<String>,
    /// The trace context to continue (a W3C `traceparent`), if any.
    pub trace: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Submitted {
    pub task: TaskRecord,
    /// True when the idempotency key matched an earlier task, which is the
    /// one returned.
    pub existing: bool,
}

/// One installed plugin as the host serves it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServedPlugin {
    pub name: String,
    pub version: String,
    pub sha256: String,
    /// The scheduler's label: `name@version`.
    pub label: String,
    pub capabilities: Vec<String>,
    pub instances: u32,
}

/// What a plugin sync changed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncReport {
    /// `name@version` now served that was not before.
    pub loaded: Vec<String>,
    /// `name@version` no longer served.
    pub removed: Vec<String>,
    /// Plugins that failed to load, with the error; an older version of
    /// the plugin keeps serving if there was one.
    pub errors: Vec<(String, String)>,
}

struct Live {
    record: TaskRecord,
    waiters: Vec<oneshot::Sender<()>>,
    cancel: CancellationToken,
    /// Its end is being written (by its driver or a cancel): only one
    /// of them writes it.
    ending: bool,
    /// The outcome of an attempt that ended while a cancel wrote the
    /// task's end: told as `fenced` after the cancel's `cancelled`, or
    /// written as the task's end if the cancel's write fails.
    fenced: Option<(TaskRecord, Option<Vec<u8>>)>,
}

type LiveMap = Arc<Mutex<HashMap<String, Live>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section is a few map operations; a panic inside one
    // leaves the map usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inner {
    id: String,
    started: Instant,
    config: HostConfig,
    engine: Engine,
    kv: Arc<KvStore>,
    plugins: PluginStore,
    scheduler: Scheduler,
    journal: Journal,
    live: LiveMap,
    /// Woken each time a task enters `live`, for a wait that came between
    /// its journal commit and that (see [`Host::wait`]).
    tracked: tokio::sync::Notify,
    served: Mutex<BTreeMap<String, ServedPlugin>>,
    load_errors: Mutex<BTreeMap<String, String>>,
    sync_lock: tokio::sync::Mutex<()>,
    ids: Mutex<ulid::Generator>,
    stopping: AtomicBool,
    /// Cancelled when the host starts to stop: long-lived streams (the
    /// API's event stream) end then, so that a graceful stop never waits
    /// for a client that keeps watching.
    stopped: tokio_util::sync::CancellationToken,
    /// Signalled after each task's outcome is in the journal.
    written: tokio::sync::Notify,
    /// Unfinished tasks found in the journal at start.
    recovered: AtomicU64,
    events: Events,
    audit: crate::audit::Audit,
    /// Where agents' published messages also go, for the workflow
    /// triggers by subject (`Host::tap_messages`).
    message_tap: Mutex<Option<tokio::sync::mpsc::Sender<Message>>>,
    home: PathBuf,
}

/// A cheaply cloned handle to the running host.
#[derive(Clone)]
pub struct Host {
    inner: Arc<Inner>,
}

/// An agent's message as the workflow triggers get it: subject, payload.
pub type Message = (String, Vec<u8>);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Host {
    /// Opens the data directory's journal, loads the installed plugins and
    /// requeues the tasks the journal holds unfinished. Must run inside a
    /// tokio runtime.
    pub async fn start(home: &Path, config: HostConfig, engine: Engine) -> Result<Host, HostError> {
        let id = host_id_of(home)?;
        let events = Events::new(&id);
        let metrics = events.shared_metrics();
        let journal = Journal::open_timed(
            &home.join("tasks.redb"),
            Some(Box::new(move |took| metrics.journal_committed(took))),
        )?;
        let audit = crate::audit::Audit::new(&id, events.shared_metrics());
        let hook_events = events.clone();
        let live: LiveMap = Arc::new(Mutex::new(HashMap::new()));
        let hook_live = live.clone();
        let scheduler = Scheduler::with_attempt_hook(
            SchedulerConfig {
                max_attempts: config.host.max_attempts,
                ..SchedulerConfig::default()
            },
            Arc::new(move |event: AttemptEvent<'_>| match event {
                AttemptEvent::Started {
                    id,
                    capability,
                    agent,
                    attempt,
                    waited,
                    submitted_at_ms,
                } => {
                    if let Some(l) = lock(&hook_live).get_mut(id) {
                        l.record.status = Status::Running;
                        l.record.attempts = attempt;
                        l.record.agent = Some(agent.to_string());
                    }
                    hook_events.emit(EventKind::Started, id, capability, |e| {
                        e.agent = Some(agent.to_string());
                        e.attempt = attempt;
                        e.waited_us = waited.map(|w| w.as_micros() as u64);
                        e.submitted_at_ms = submitted_at_ms;
                    });
                }
                AttemptEvent::Ended {
                    capability,
                    agent,
                    ran,
                    memory,
                    error,
                } => hook_events
                    .metrics()
                    .attempt_ended(capability, agent, ran, memory, error),
                AttemptEvent::Retrying {
                    id,
                    capability,
                    agent,
                    attempt,
                    error,
                    submitted_at_ms,
                } => {
                    if let Some(l) = lock(&hook_live).get_mut(id) {
                        l.record.status = Status::Queued;
                        // Shown while it waits for the next attempt, as a
                        // cluster's record of a retry shows it.
                        l.record.attempt_errors.push(AttemptInfo {
                            agent: agent.to_string(),
                            host: None,
                            kind: error.kind().to_string(),
                            message: error.to_string(),
                        });
                    }
                    hook_events.emit(EventKind::Retried, id, capability, |e| {
                        e.agent = Some(agent.to_string());
                        e.attempt = attempt;
                        e.error = Some(error.kind().to_string());
                        e.submitted_at_ms = submitted_at_ms;
                    });
                }
            }),
        );
        journal.delay_commits(config.host.commit_delay, Box::new(scheduler.backlog()));
        let kv = Arc::new(KvStore::with_limits(home.join("kv.redb"), config.kv));
        let host = Host {
            inner: Arc::new(Inner {
                id,
                started: Instant::now(),
                config,
                engine,
                kv,
                plugins: PluginStore::new(home),
                scheduler,
                journal,
                live,
                tracked: tokio::sync::Notify::new(),
                served: Mutex::new(BTreeMap::new()),
                load_errors: Mutex::new(BTreeMap::new()),
                sync_lock: tokio::sync::Mutex::new(()),
                ids: Mutex::new(ulid::Generator::new()),
                stopping: AtomicBool::new(false),
                stopped: tokio_util::sync::CancellationToken::new(),
                written: tokio::sync::Notify::new(),
                recovered: AtomicU64::new(0),
                audit,
                events,
                message_tap: Mutex::new(None),
                home: home.to_path_buf(),
            }),
        };
        let report = host.sync_plugins().await?;
        for (name, error) in &report.errors {
            tracing::error!(plugin = %name, %error, "plugin not served");
        }
        host.inner
            .scheduler
            .set_bus(Arc::new(LocalBus(Arc::downgrade(&host.inner))));
        let calls =
            calls::LocalCallLog::open(&home.join("calls.redb"), host.config().host.retention)
                .map_err(|e| HostError::DataDir {
                    path: home.join("calls.redb"),
                    source: std::io::Error::other(e),
                })?;
        host.inner.scheduler.set_call_log(Arc::new(calls));
        let recovered = host.recover()?;
        host.inner
            .recovered
            .store(recovered as u64, Ordering::Relaxed);
        host.spawn_background();
        Ok(host)
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// A copy of every message this host's agents publish from now on
    /// (lone host: they do not leave it), for the workflow triggers. The
    /// channel is bounded: a message that finds it full is not copied.
    pub fn tap_messages(&self) -> tokio::sync::mpsc::Receiver<Message> {
        let (tx, rx) = tokio::sync::mpsc::channel(crate::cluster::messages::TAP_CAPACITY);
        *lock(&self.inner.message_tap) = Some(tx);
        rx
    }

    pub fn config(&self) -> &HostConfig {
        &self.inner.config
    }

    /// How many unfinished tasks the journal held at start (requeued).
    pub fn recovered(&self) -> u64 {
        self.inner.recovered.load(Ordering::Relaxed)
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// The engine every plugin of this host runs on (its instance slots).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.inner.scheduler
    }

    /// Requeues every task the journal holds without a result, oldest first.
    fn recover(&self) -> Result<usize, HostError> {
        let mut pending = self.inner.journal.list(
            Some(Status::Queued),
            None,
            usize::MAX,
            // The index says queued; the record decides.
            |r| !r.status.is_final(),
        )?;
        pending.reverse();
        let n = pending.len();
        for mut record in pending {
            record.status = Status::Queued;
            self.track(record.clone());
            match self.inner.journal.payload(&record.id)? {
                Some(payload) => self.spawn_drive(record, payload),
                // Accepted with its payload in one transaction, so only a
                // damaged journal gets here: the task cannot run as given.
                None => {
                    let error =
                        TaskError::Host("the task's payload is missing from the journal".into());
                    let ended = run::failed(record, error);
                    tokio::spawn(write_end(self.inner.clone(), ended.record, None));
                }
            }
        }
        if n > 0 {
            tracing::info!(tasks = n, "requeued unfinished tasks from the journal");
        }
        Ok(n)
    }

    fn track(&self, record: TaskRecord) {
        lock(&self.inner.live).insert(
            record.id.clone(),
            Live {
                record,
                waiters: Vec::new(),
                cancel: CancellationToken::new(),
                ending: false,
                fenced: None,
            },
        );
        self.inner.tracked.notify_waiters();
    }

    /// The id of a task that delivers a message: like a task id, with `m`.
    pub fn new_message_id(&self) -> String {
        format!("m{}", &self.new_task_id()[1..])
    }

    /// A new task id: `t` and a ULID (millisecond time, then 80 random
    /// bits, increasing within this host), so ids sort by submission and
    /// two hosts never make the same one.
    pub fn new_task_id(&self) -> String {
        let mut ids = lock(&self.inner.ids);
        // The generator fails only when 2^80 ids were made in one
        // millisecond; a fresh random ULID is as good then.
        let ulid = ids.generate().unwrap_or_else(|_| ulid::Ulid::new());
        format!("t{}", ulid.to_string().to_ascii_lowercase())
    }

    /// Stores an admitted task in the journal (on disk when this returns)
    /// and hands it to the scheduler; admission is the task service's.
    async fn accept(
        &self,
        record: TaskRecord,
        payload: Vec<u8>,
        stored: &(dyn Fn(&TaskRecord) + Send + Sync),
    ) -> Result<Accepted, HostError> {
        let accepted = self
            .inner
            .journal
            .accept(record.clone(), payload.clone())
            .await?;
        if accepted == Accepted::New {
            stored(&record);
            self.track(record.clone());
            self.spawn_drive(record, payload);
        }
        Ok(accepted)
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Relaxed)
    }

    /// Cancelled once the host starts to stop.
    pub fn stopped(&self) -> tokio_util::sync::CancellationToken {
        self.inner.stopped.clone()
    }

    /// The host's audit trail.
    pub fn audit(&self) -> &crate::audit::Audit {
        &self.inner.audit
    }

    /// Records the plugin store's changes this host has not recorded yet
    /// (the CLI changes the store; the host keeps the trail). The last
    /// change recorded is kept in `audited-plugin-changes`.
    fn audit_plugin_changes(&self) {
        let cursor = self.inner.home.join("audited-plugin-changes");
        let seen: u64 = std::fs::read_to_string(&cursor)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let changes = match self.inner.plugins.changes_since(0) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading the plugin changes for the audit trail failed");
                return;
            }
        };
        let Some(last) = changes.last().map(|c| c.seq) else {
            return;
        };
        // A store that counts from 1 again (its registry was replaced).
        let seen = if last < seen { 0 } else { seen };
        for c in changes.iter().filter(|c| c.seq > seen) {
            let kind = match c.op.as_str() {
                "install" => crate::audit::Kind::PluginInstall,
                "upgrade" => crate::audit::Kind::PluginUpgrade,
                "rollback" => crate::audit::Kind::PluginRollback,
                _ => crate::audit::Kind::PluginRemove,
            };
            self.inner.audit.record(
                kind,
                &c.by,
                serde_json::json!({
                    "plugin": c.name,
                    "version": c.version,
                    "sha256": c.sha256,
                    "signed_by": c.signed_by,
                    "changed_at_ms": c.at_ms,
                }),
            );
        }
        if last != seen {
            if let Err(e) = std::fs::write(&cursor, last.to_string()) {
                tracing::warn!(path = %cursor.display(), error = %e, "keeping the audited plugin changes failed");
            }
        }
    }

    /// The host's task events.
    pub fn events(&self) -> &Events {
        &self.inner.events
    }

    /// Ends a live task as cancelled: stops it in the scheduler, writes its
    /// final record and emits `cancelled` (then `fenced`, when its attempt
    /// ended meanwhile). `false` when it had ended (or is ending) already.
    async fn cancel_live(&self, id: &str) -> Result<bool, HostError> {
        let record = {
            let mut live = lock(&self.inner.live);
            let Some(entry) = live.get_mut(id) else {
                return Ok(false);
            };
            if entry.ending {
                return Ok(false);
            }
            entry.ending = true;
            entry.cancel.cancel();
            let mut record = entry.record.clone();
            record.end(Status::Cancelled, &TaskError::Cancelled);
            record
        };
        // Its payload leaves the scheduler's queue now, not when it would
        // have reached the head.
        self.inner.scheduler.forget_cancelled();
        if let Err(e) = self.inner.journal.finish(record.clone(), None).await {
            // Not ended: its driver, whose attempt the token stopped,
            // writes the cancelled end instead (or has handed it over).
            let handed = lock(&self.inner.live).get_mut(id).and_then(|l| {
                l.ending = false;
                l.fenced.take()
            });
            if let Some((ended, result)) = handed {
                tokio::spawn(write_end(self.inner.clone(), ended, result));
            }
            return Err(e.into());
        }
        self.inner.events.ended(&record);
        // Taken with the entry's removal: an outcome handed over later
        // finds no entry and is told as fenced by its driver.
        let fenced = end_live(&self.inner, id).and_then(|l| l.fenced);
        if let Some((attempt, _)) = fenced.filter(|(r, _)| run::attempt_outcome(r)) {
            self.inner.events.record(EventKind::Fenced, &attempt);
        }
        Ok(true)
    }

    fn spawn_drive(&self, record: TaskRecord, payload: Vec<u8>) {
        tokio::spawn(drive(self.inner.clone(), record, payload));
    }

    /// The task's current state: the journal's record when it is final,
    /// else what the scheduler is doing with it.
    pub fn get(&self, id: &str) -> Result<TaskRecord, HostError> {
        let stored = self.inner.journal.get(id)?;
        if let Some(record) = &stored {
            if record.status.is_final() {
                return Ok(record.clone());
            }
        }
        if let Some(live) = lock(&self.inner.live).get(id) {
            return Ok(live.record.clone());
        }
        stored.ok_or_else(|| HostError::NotFound(id.to_string()))
    }

    pub fn result(&self, id: &str) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.inner.journal.result(id)?)
    }

    /// Waits up to `timeout` for the task to end, then returns its state.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<TaskRecord, HostError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(rx) = self.add_waiter(id) {
                let _ = tokio::time::timeout_at(until, rx).await;
                return self.get(id);
            }
            // Not live: ended, or committed but not tracked yet (a second
            // submission with the same idempotency key, in the same journal
            // commit as the first, asks before the first's accept has
            // tracked the task; it answered `queued` at once before).
            let tracked = self.inner.tracked.notified();
            tokio::pin!(tracked);
            // Before the second look, so that a task tracked right after it
            // is not missed.
            tracked.as_mut().enable();
            if lock(&self.inner.live).contains_key(id) {
                continue;
            }
            let record = self.get(id)?;
            if record.status.is_final() {
                return Ok(record);
            }
            if tokio::time::timeout_at(until, tracked).await.is_err() {
                return self.get(id);
            }
        }
    }

    /// A receiver woken when the live task `id` ends; `None` when it is not
    /// live.
    fn add_waiter(&self, id: &str) -> Option<oneshot::Receiver<()>> {
        let mut live = lock(&self.inner.live);
        let l = live.get_mut(id)?;
        // Requests that stopped waiting leave closed senders.
        l.waiters.retain(|w| !w.is_closed());
        let (tx, rx) = oneshot::channel();
        l.waiters.push(tx);
        Some(rx)
    }

    /// Newest first, filtered by status and capability: queued and
    /// running tasks from memory, the others from the journal's indexes.
    pub fn list(
        &self,
        status: Option<Status>,
        capability: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, HostError> {
        if let Some(s) = status.filter(|s| !s.is_final()) {
            let mut live: Vec<TaskRecord> = lock(&self.inner.live)
                .values()
                .filter(|l| l.record.status == s)
                .filter(|l| capability.is_none_or(|c| l.record.capability == c))
                .map(|l| l.record.clone())
                .collect();
            live.sort_by(|a, b| b.id.cmp(&a.id));
            live.truncate(limit);
            return Ok(live);
        }
        let mut records = self.inner.journal.list(status, capability, limit, |r| {
            capability.is_none_or(|c| r.capability == c)
        })?;
        // A task the journal holds as queued may be running now.
        let live = lock(&self.inner.live);
        for record in &mut records {
            if !record.status.is_final() {
                if let Some(l) = live.get(&record.id) {
                    *record = l.record.clone();
                }
            }
        }
        Ok(records)
    }

    /// What a heartbeat announces: capabilities, free slots over all
    /// agents, attempts running and tasks queued in the scheduler.
    pub fn load(&self) -> (Vec<String>, u64, u64, u64) {
        let free = self
            .agents()
            .iter()
            .map(|a| u64::from(a.max_in_flight.saturating_sub(a.in_flight)))
            .sum();
        // The scheduler's figures, not the journal's: in a cluster the
        // tasks come from JetStream and never enter the journal.
        let queued = self
            .inner
            .scheduler
            .queued()
            .iter()
            .map(|(_, n)| *n as u64)
            .sum();
        (
            self.inner.scheduler.capabilities(),
            free,
            self.inner.scheduler.running(),
            queued,
        )
    }

    /// Tasks accepted and not yet ended, by status.
    pub fn live_counts(&self) -> (usize, usize) {
        let live = lock(&self.inner.live);
        let running = live
            .values()
            .filter(|l| l.record.status == Status::Running)
            .count();
        (live.len() - running, running)
    }

    pub fn agents(&self) -> Vec<AgentStats> {
        self.inner.scheduler.stats()
    }

    pub fn plugins(&self) -> Vec<ServedPlugin> {
        lock(&self.inner.served).values().cloned().collect()
    }

    pub fn plugin_errors(&self) -> Vec<(String, String)> {
        lock(&self.inner.load_errors)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Brings the served plugins in line with the plugin store: loads new
    /// and changed active versions, and drops removed plugins. A changed
    /// plugin is swapped in one step: tasks placed from then on run on the
    /// new version, tasks already running finish on the old one.
    pub async fn sync_plugins(&self) -> Result<SyncReport, HostError> {
        let _one_at_a_time = self.inner.sync_lock.lock().await;
        self.audit_plugin_changes();
        let registry = match self.inner.plugins.list() {
            Ok(r) => r,
            Err(e) => return Err(HostError::Plugin(e.into())),
        };
        let mut report = SyncReport::default();
        for (name, record) in &registry {
            let Some(active) = record.active_version() else {
                continue;
            };
            let current = lock(&self.inner.served).get(name).cloned();
            if current
                .as_ref()
                .is_some_and(|c| c.sha256 == active.sha256 && c.version == active.version)
            {
                continue;
            }
            let loaded = self
                .inner
                .plugins
                .load(
                    name,
                    &self.inner.engine,
                    self.inner.kv.clone(),
                    &self.inner.config,
                )
                .await;
            let (mut agent, limits, version) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    let message = e.to_string();
                    lock(&self.inner.load_errors).insert(name.clone(), message.clone());
                    report.errors.push((name.clone(), message));
                    continue;
                }
            };
            lock(&self.inner.load_errors).remove(name);
            // The scheduler bounds the plugin's tasks (its slots, waiting
            // callers included) instead of the agent's own semaphore, so that
            // one owner counts them.
            let instances = agent
                .max_instances()
                .unwrap_or(self.inner.config.host.instances);
            agent.set_max_instances(None);
            let label = format!("{name}@{}", version.version);
            let served = ServedPlugin {
                name: name.clone(),
                version: version.version.clone(),
                sha256: version.sha256.clone(),
                label: label.clone(),
                capabilities: agent
                    .descriptor()
                    .capabilities
                    .iter()
                    .map(|c| c.name.clone())
                    .collect(),
                instances,
            };
            self.inner.scheduler.replace_agent(
                current.as_ref().map(|c| c.label.as_str()),
                Some((&label, Arc::new(agent), limits, instances)),
            );
            if let Some(old) = current {
                report.removed.push(old.label);
            }
            report.loaded.push(label);
            lock(&self.inner.served).insert(name.clone(), served);
        }
        let gone: Vec<ServedPlugin> = lock(&self.inner.served)
            .values()
            .filter(|s| !registry.contains_key(&s.name))
            .cloned()
            .collect();
        for plugin in gone {
            self.inner.scheduler.remove_agent(&plugin.label);
            lock(&self.inner.served).remove(&plugin.name);
            report.removed.push(plugin.label);
        }
        lock(&self.inner.load_errors).retain(|name, _| registry.contains_key(name));
        Ok(report)
    }

    /// Background work: follow the plugin store and drop expired tasks.
    fn spawn_background(&self) {
        let weak = Arc::downgrade(&self.inner);
        let registry = self.inner.plugins.registry_path();
        tokio::spawn(async move {
            let mut seen = stamp(&registry);
            let mut last_sweep = Instant::now() - Duration::from_secs(3600);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(inner) = weak.upgrade() else { return };
                let host = Host { inner };
                // An install made with the CLI while the host runs changes
                // the registry file; pick it up.
                let now = stamp(&registry);
                if now != seen {
                    seen = now;
                    match host.sync_plugins().await {
                        Ok(r) if !r.loaded.is_empty() || !r.removed.is_empty() => {
                            tracing::info!(loaded = ?r.loaded, removed = ?r.removed, "plugins changed");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "plugin sync failed"),
                    }
                }
                let every = (host.inner.config.host.retention / 10)
                    .clamp(Duration::from_secs(1), Duration::from_secs(60));
                if last_sweep.elapsed() >= every {
                    last_sweep = Instant::now();
                    if let Err(e) = host.sweep().await {
                        tracing::error!(error = %e, "dropping expired tasks failed");
                    }
                }
            }
        });
    }

    /// Deletes finished tasks older than the retention time. Returns how many.
    pub async fn sweep(&self) -> Result<usize, HostError> {
        let retention = self.inner.config.host.retention.as_millis() as u64;
        let cutoff = now_ms().saturating_sub(retention);
        // At most this many per sweep, so that one transaction stays small.
        let old = self.inner.journal.ended_before(cutoff, 100_000)?;
        let n = old.len();
        if n > 0 {
            self.inner.journal.forget(old).await?;
        }
        Ok(n)
    }

    /// Graceful stop: no new tasks, running attempts get `grace` to end and
    /// store their results. Queued tasks, and attempts still running after
    /// the grace time, stay in the journal and run after the next start.
    /// Returns how many attempts were cut off.
    pub async fn shutdown(&self, grace: Duration) -> u64 {
        self.inner.stopping.store(true, Ordering::Relaxed);
        self.inner.stopped.cancel();
        let cut = self.inner.scheduler.drain(grace).await;
        // The attempts that ended hand their outcome to their drivers, which
        // write it to the journal; wait for those writes (a task stays
        // "running" until its outcome is written).
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let written = self.inner.written.notified();
            if self.live_counts().1 as u64 <= cut {
                break;
            }
            if tokio::time::timeout_at(until, written).await.is_err() {
                break;
            }
        }
        cut
    }
}

/// The id of the host on `home`, made now if it has none yet.
pub fn host_id_of(home: &Path) -> Result<String, HostError> {
    let salt = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::from(d.subsec_nanos()))
        .unwrap_or(0);
    std::fs::create_dir_all(home).map_err(|e| HostError::DataDir {
        path: home.to_path_buf(),
        source: e,
    })?;
    host_id(home, salt)
}

/// The host's id: made once per data directory and kept in `host-id`, so a
/// restarted host is the same host to its peers.
fn host_id(home: &Path, salt: u64) -> Result<String, HostError> {
    let path = home.join("host-id");
    let io = |e: std::io::Error| HostError::DataDir {
        path: path.clone(),
        source: e,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let id = format!(
        "h{:08x}",
        (salt ^ (u64::from(std::process::id()) << 16) ^ now_ms()) & 0xffff_ffff
    );
    std::fs::write(&path, &id).map_err(io)?;
    Ok(id)
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Runs one accepted task through the scheduler and journals the outcome.
async fn drive(inner: Arc<Inner>, record: TaskRecord, payload: Vec<u8>) {
    let id = record.id.clone();
    let cancel = lock(&inner.live).get(&id).map(|l| l.cancel.clone());
    let ran = run::execute(
        &inner.scheduler,
        run::Run {
            record,
            payload,
            max_attempts: None,
            sub_task: None,
            cancel,
            host: None,
        },
    )
    .await;
    let run::Ended { record, result, .. } = match ran {
        Ok(ended) => ended,
        // Not run (the host drains): left in the journal as queued, it
        // runs after the next start.
        Err(run::NotRun::Draining) => return,
        Err(run::NotRun::NoAgent(record)) => {
            let error = TaskError::Unavailable(format!(
                "no agent provides capability {} any more",
                record.capability
            ));
            run::failed(*record, error)
        }
    };
    if inner.stopping.load(Ordering::Relaxed)
        && matches!(&record.error, Some(e) if e.kind == "host")
    {
        // The scheduler went away under a shutdown: not the task's fault.
        return;
    }
    let span = crate::cluster::tasks::result_span(&record);
    // Boxed: inline, the end's write made this future 1.5 KiB larger for
    // the whole of the task's run, 15 MiB of a host with 10,000 tasks in
    // flight (`density` bench).
    Box::pin(tracing::Instrument::instrument(
        write_end(inner, record, result),
        span,
    ))
    .await;
}

/// Writes a task's end to the journal, unless a cancel wrote it first (then
/// this outcome is fenced), and tells its waiters and watchers.
async fn write_end(inner: Arc<Inner>, record: TaskRecord, result: Option<Vec<u8>>) {
    let id = record.id.clone();
    {
        let mut live = lock(&inner.live);
        match live.get_mut(&id) {
            Some(l) if !l.ending => l.ending = true,
            // A cancel is writing the task's end: it tells of this outcome
            // after its own event.
            Some(l) => {
                l.fenced = Some((record, result));
                return;
            }
            // Cancelled meanwhile: the cancel wrote the task's end, and an
            // attempt that ran is fenced.
            None => {
                drop(live);
                if run::attempt_outcome(&record) {
                    inner.events.record(EventKind::Fenced, &record);
                }
                return;
            }
        }
    }
    if let Err(e) = inner.journal.finish(record.clone(), result).await {
        // The task stays queued in the journal and runs again after a
        // restart; its waiters see it as still pending.
        tracing::error!(task = %id, error = %e, "cannot store the task's result");
        if let Some(l) = lock(&inner.live).get_mut(&id) {
            l.ending = false;
        }
        return;
    }
    end_live(&inner, &id);
    inner.events.ended(&record);
}

/// Drops a task that ended from the live map and wakes its waiters;
/// returns what is left of its entry.
fn end_live(inner: &Inner, id: &str) -> Option<Live> {
    let mut live = lock(&inner.live).remove(id);
    for waiter in live.iter_mut().flat_map(|l| l.waiters.drain(..)) {
        let _ = waiter.send(());
    }
    inner.written.notify_waiters();
    live
}

/// Where a running host publishes its API address, so that CLI commands
/// on the same data directory find it without `--api`.
pub fn address_file(home: &Path) -> PathBuf {
    home.join("host.json")
}

/// The API URL a running host wrote for `home`, if any.
pub fn read_address(home: &Path) -> Option<String> {
    let text = std::fs::read_to_string(address_file(home)).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value.get("api")?.as_str().map(String::from)
}

impl From<StoreError> for HostError {
    fn from(e: StoreError) -> Self {
        HostError::Plugin(e.into())
    }
}

/// Messages within one host: a message for a subscribed subject is a task
/// for the subscribing agent. The cluster replaces it with one over NATS.
struct LocalBus(std::sync::Weak<Inner>);

/// The audit entry of a message an agent published.
pub fn audit_message(
    audit: &crate::audit::Audit,
    agent: &str,
    task: &str,
    subject: &str,
    bytes: usize,
) {
    audit.record(
        crate::audit::Kind::MessagePublish,
        &format!("agent:{agent}"),
        serde_json::json!({ "subject": subject, "bytes": bytes, "agent": agent, "task": task }),
    );
}

impl LocalBus {
    fn send(
        &self,
        subject: &str,
        payload: Vec<u8>,
    ) -> Result<crate::scheduler::TaskHandle, BusError> {
        let inner = self.0.upgrade().ok_or(BusError::ShuttingDown)?;
        let host = Host { inner };
        let submit = Submit {
            id: host.new_message_id(),
            payload,
            // The message's task is a child of the span that sent it.
            trace: crate::trace::current(None),
            ..Submit::default()
        };
        host.inner
            .scheduler
            .submit_message(subject, submit)
            .map_err(|e| match e {
                SubmitError::NoSubscriber(subject) => BusError::NoSubscriber { subject },
                other => BusError::Refused {
                    subject: subject.to_string(),
                    source: Box::new(other),
                },
            })
    }
}

impl crate::sandbox::Bus for LocalBus {
    fn publish(&self, subject: String, payload: Vec<u8>) -> crate::sandbox::BusFuture<()> {
        if let Some(inner) = self.0.upgrade() {
            if let Some(tap) = lock(&inner.message_tap).as_ref() {
                if let Err(tokio::sync::mpsc::error::TrySendError::Full(_)) =
                    tap.try_send((subject.clone(), payload.clone()))
                {
                    tracing::warn!(
                        subject,
                        "workflow triggers are behind: a message was dropped"
                    );
                }
            }
        }
        // Like NATS: a message nobody subscribes to is dropped.
        let _ = self.send(&subject, payload);
        Box::pin(async { Ok(()) })
    }

    fn published(&self, agent: &str, task: &str, subject: &str, bytes: usize) {
        if let Some(inner) = self.0.upgrade() {
            audit_message(&inner.audit, agent, task, subject, bytes);
        }
    }

    fn request(
        &self,
        subject: String,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> crate::sandbox::BusFuture<Vec<u8>> {
        let handle = self.send(&subject, payload);
        Box::pin(async move {
            let handle = handle?;
            match tokio::time::timeout(timeout, handle.wait()).await {
                Err(_) => Err(BusError::Timeout {
                    subject,
                    ms: timeout.as_millis() as u64,
                }),
                Ok(Ok(done)) => Ok(done.output.result),
                Ok(Err(failure)) => Err(BusError::Failed {
                    message: failure.error.to_string(),
                }),
            }
        })
    }
}

/// The lone host's store: the journal, with the live state of queued and
/// running tasks in memory; accepted tasks go to the local scheduler.
impl TaskStore for Host {
    fn name(&self) -> &'static str {
        "journal"
    }

    fn serves(&self, capability: &str) -> bool {
        self.inner.scheduler.provides(capability)
    }

    fn max_payload(&self) -> u64 {
        self.inner.config.limits.defaults.max_payload
    }

    fn unfinished(&self) -> usize {
        lock(&self.inner.live).len()
    }

    fn counts(&self) -> (usize, usize) {
        self.live_counts()
    }

    fn new_id(&self, _key: Option<&str>) -> String {
        // The journal maps idempotency keys to ids itself.
        self.new_task_id()
    }

    fn retention(&self) -> BoxFuture<'_, Result<Option<Duration>, HostError>> {
        let retention = self.config().host.retention;
        Box::pin(async move { Ok(Some(retention)) })
    }

    fn find_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, HostError>> {
        Box::pin(async move { Ok(self.inner.journal.task_for_key(key)?) })
    }

    fn accept<'a>(
        &'a self,
        record: TaskRecord,
        payload: Vec<u8>,
        stored: &'a (dyn Fn(&TaskRecord) + Send + Sync),
        // The journal looks the key up inside the write that stores the
        // task, at no extra cost.
        _unused_key: bool,
        // One host drives every run: nothing to fence.
        _fence: Option<&'a crate::service::Fence>,
    ) -> BoxFuture<'a, Result<Accepted, HostError>> {
        Box::pin(Host::accept(self, record, payload, stored))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stored, HostError>> {
        Box::pin(async move { self.stored(Host::get(self, id)?) })
    }

    fn wait<'a>(
        &'a self,
        id: &'a str,
        timeout: Duration,
        _fresh: bool,
    ) -> BoxFuture<'a, Result<Stored, HostError>> {
        Box::pin(async move {
            let record = Host::wait(self, id, timeout).await?;
            self.stored(record)
        })
    }

    fn list<'a>(
        &'a self,
        query: &'a ListQuery,
    ) -> BoxFuture<'a, Result<Vec<TaskRecord>, HostError>> {
        Box::pin(
            async move { Host::list(self, query.status, query.capability.as_deref(), query.limit) },
        )
    }

    fn cancel<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stored, HostError>> {
        Box::pin(async move {
            let cancelled = self.cancel_live(id).await?;
            if !cancelled {
                // Ended, or ending now: its end is what the caller gets.
                let record = Host::wait(self, id, Duration::from_secs(5)).await?;
                // Or accepted and not tracked yet when asked: tracked now.
                if !record.status.is_final() && self.cancel_live(id).await? {
                    return self.stored(Host::get(self, id)?);
                }
                return self.stored(record);
            }
            self.stored(Host::get(self, id)?)
        })
    }
}

impl Host {
    /// A record with its result, when it has one.
    fn stored(&self, record: TaskRecord) -> Result<Stored, HostError> {
        let result = if record.status == Status::Completed {
            self.result(&record.id)?
        } else {
            None
        };
        Ok(Stored {
            record,
            result,
            error: None,
        })
    }
}
