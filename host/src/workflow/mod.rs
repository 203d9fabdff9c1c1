//! Durable workflows: definitions of steps (a task graph with fan-out,
//! conditions, retries and compensations), and runs of them that survive a
//! crash.
//!
//! [`Workflows`] is the service (register, start, get, wait, list, cancel).
//! A run is driven by one host at a time ([`run::Driver`]) through the
//! task service, the same way in both modes; what differs is the
//! [`store::WorkflowStore`] under it: a redb file on a lone host, JetStream
//! KV in a cluster. Each checkpoint replaces the run's record with a
//! compare-and-set on its revision, so a driver that lost its lease (a host
//! paused past it) is fenced at its next write.

pub mod def;
pub mod record;
mod run;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};

use crate::daemon::now_ms;
use crate::service::{Fence, TaskService};
pub use def::{Checked, Definition, Invalid};
pub use record::{RunRecord, RunStatus, StepRecord, StepStatus};
pub use store::{LocalStore, Registered, WorkflowStore};

/// How long a driver holds a run without writing it, in a cluster: past
/// it, another host takes the run over. Renewed every third of it.
pub const LEASE: Duration = Duration::from_secs(2);
/// The largest a run's record may grow (its steps' inputs and results):
/// one NATS message with the server's default `max_payload`, less room.
pub const MAX_RUN_BYTES: usize = 900 * 1024;
/// Runs one host drives at once; past it, a start is refused.
pub const MAX_RUNS: usize = 10_000;
/// Definitions kept (all versions of all workflows): every host reads
/// them all for the triggers, so a client cannot grow them without end.
pub const MAX_DEFINITIONS: usize = 10_000;
/// The most bytes a definition may take as JSON.
pub const MAX_DEFINITION_BYTES: usize = 256 * 1024;
/// How often a host looks for runs that no one drives (a lone host's
/// after a restart, or a dead host's in a cluster).
const SCAN: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("workflow {name} version {version} is registered already; register a new version")]
    Exists { name: String, version: u32 },
    #[error("no {0}")]
    NotFound(String),
    #[error("no capacity: {limit} workflow runs are running on this host, its limit; retry later")]
    NoCapacity { limit: usize },
    #[error("too many workflow definitions: {limit} are registered, the limit")]
    TooManyDefinitions { limit: usize },
    #[error("payload too large: the run's record would be {size} bytes with this input, past the limit of {limit} bytes")]
    InputTooLarge { size: usize, limit: usize },
    #[error("the host is shutting down and starts no new runs")]
    ShuttingDown,
    #[error("workflow store: {what}: {source}")]
    Store {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl WorkflowError {
    pub fn store(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> WorkflowError {
        WorkflowError::Store {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A stable name for API clients.
    pub fn kind(&self) -> &'static str {
        match self {
            WorkflowError::Invalid(_) => "invalid-workflow",
            WorkflowError::Exists { .. } => "already-exists",
            WorkflowError::NotFound(_) => "not-found",
            WorkflowError::NoCapacity { .. } | WorkflowError::TooManyDefinitions { .. } => {
                "no-capacity"
            }
            WorkflowError::InputTooLarge { .. } => "payload-too-large",
            WorkflowError::ShuttingDown => "shutting-down",
            WorkflowError::Store { .. } => "unavailable",
        }
    }
}

/// What a registration stored, and what it warns of.
#[derive(Debug, Clone)]
pub struct Registration {
    pub registered: Registered,
    /// Capabilities no agent serves now: their steps fail (`unavailable`)
    /// if that is still so when they run.
    pub warnings: Vec<String>,
}

pub(crate) struct Shared {
    tasks: TaskService,
    store: Arc<dyn WorkflowStore>,
    /// Runs this host drives, with the sender that tells a driver to read
    /// its run again (a cancel), and the run's cancel gate.
    driving: Mutex<HashMap<String, Driving>>,
    definitions: Mutex<HashMap<(String, u32), Arc<Checked>>>,
    /// A run this host drove stopped: its id, and its record when it ended
    /// (a waiter needs no read then).
    ended: broadcast::Sender<(String, Option<Arc<RunRecord>>)>,
}

impl Shared {
    /// The audit entry of a run a trigger started (`by` names it).
    fn audit_start(&self, run: &RunRecord, by: &str) {
        self.tasks.host().audit().record(
            crate::audit::Kind::WorkflowStart,
            by,
            serde_json::json!({ "run": run.id, "workflow": run.workflow, "version": run.version }),
        );
    }
}

/// A run driven on this host.
struct Driving {
    poke: watch::Sender<()>,
    gate: run::Gate,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The workflow service of one host.
#[derive(Clone)]
pub struct Workflows {
    shared: Arc<Shared>,
}

impl Workflows {
    /// The service over `store`; starts the scan that takes up runs no one
    /// drives (all running ones, on a lone host just started).
    /// `messages`: agents' messages (subject, payload) for the triggers by
    /// subject; in a cluster each message reaches one host.
    pub fn start(
        tasks: TaskService,
        store: Arc<dyn WorkflowStore>,
        messages: Option<mpsc::Receiver<(String, Vec<u8>)>>,
    ) -> Workflows {
        // A waiter that falls behind reads the run again: the channel
        // need not hold many records (each up to MAX_RUN_BYTES).
        let (ended, _) = broadcast::channel(64);
        let shared = Arc::new(Shared {
            tasks,
            store,
            driving: Mutex::new(HashMap::new()),
            definitions: Mutex::new(HashMap::new()),
            ended,
        });
        let weak = Arc::downgrade(&shared);
        // A lone host has runs to take up after its start, or after one of
        // its drivers gave up on a store failure: a slow scan will do.
        let every = if shared.store.exclusive() {
            Duration::from_secs(30)
        } else {
            SCAN
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut sweep = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let Some(shared) = weak.upgrade() else { return };
                        if shared.tasks.host().is_stopping() {
                            return;
                        }
                        if let Err(e) = scan(&shared).await {
                            tracing::warn!(error = %e, "looking for workflow runs to resume failed");
                        }
                    }
                    _ = sweep.tick() => {
                        let Some(shared) = weak.upgrade() else { return };
                        if let Err(e) = retention(&shared).await {
                            tracing::warn!(error = %e, "removing old workflow runs failed");
                        }
                    }
                }
            }
        });
        tokio::spawn(schedules(Arc::downgrade(&shared)));
        if let Some(messages) = messages {
            tokio::spawn(on_messages(Arc::downgrade(&shared), messages));
        }
        Workflows { shared }
    }

    /// Checks and stores a definition; a second registration of a name and
    /// version is refused.
    pub async fn register(&self, definition: Definition) -> Result<Registration, WorkflowError> {
        // Every host keeps every definition (for the triggers) and a
        // listing prints them whole.
        let size = serde_json::to_vec(&definition).map_or(0, |v| v.len());
        if size > MAX_DEFINITION_BYTES {
            return Err(WorkflowError::Invalid(Invalid {
                problems: vec![format!(
                    "the definition is {size} bytes as JSON, past the limit of {MAX_DEFINITION_BYTES} bytes"
                )],
            }));
        }
        let checked = definition.clone().check_new()?;
        let warnings = checked
            .capabilities
            .iter()
            .filter(|c| !self.shared.tasks.store().serves(c))
            .map(|c| format!("no agent provides capability {c} now"))
            .collect();
        if self.shared.store.definitions().await?.len() >= MAX_DEFINITIONS {
            return Err(WorkflowError::TooManyDefinitions {
                limit: MAX_DEFINITIONS,
            });
        }
        let registered = Registered {
            definition,
            registered_at_ms: now_ms(),
        };
        if !self.shared.store.register(&registered).await? {
            return Err(WorkflowError::Exists {
                name: registered.definition.name,
                version: registered.definition.version,
            });
        }
        Ok(Registration {
            registered,
            warnings,
        })
    }

    /// Every registered definition, by name then version.
    pub async fn definitions(&self) -> Result<Vec<Registered>, WorkflowError> {
        let mut all = self.shared.store.definitions().await?;
        all.sort_by(|a, b| {
            (&a.definition.name, a.definition.version)
                .cmp(&(&b.definition.name, b.definition.version))
        });
        Ok(all)
    }

    /// A definition's versions, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<Registered>, WorkflowError> {
        let found: Vec<Registered> = self
            .definitions()
            .await?
            .into_iter()
            .filter(|r| r.definition.name == name)
            .collect();
        if found.is_empty() {
            return Err(WorkflowError::NotFound(format!("workflow named {name}")));
        }
        Ok(found)
    }

    async fn checked(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Arc<Checked>, WorkflowError> {
        self.shared.checked(name, version).await
    }

    /// Starts a run of the definition's latest version (or `version`).
    pub async fn start_run(
        &self,
        name: &str,
        version: Option<u32>,
        input: Value,
        deadline: Option<Duration>,
    ) -> Result<RunRecord, WorkflowError> {
        let def = self.checked(name, version).await?;
        let id = ulid::Ulid::new().to_string();
        let run = self.shared.start(def, id, input, deadline).await?;
        // A fresh ulid is never taken.
        run.ok_or_else(|| WorkflowError::store("runs", "a new run id was taken"))
    }

    /// The triggers of each workflow's latest version, with their next tick.
    pub async fn triggers(&self) -> Result<Vec<TriggerInfo>, WorkflowError> {
        let now = now_ms();
        let mut out = Vec::new();
        for def in self.shared.latest_definitions().await? {
            for s in &def.schedules {
                out.push(TriggerInfo {
                    workflow: def.def.name.clone(),
                    version: def.def.version,
                    schedule: Some(s.schedule.clone()),
                    timezone: Some(s.timezone.name().to_string()),
                    subject: None,
                    next_at_ms: s.next_after(now),
                });
            }
            for subject in &def.subjects {
                out.push(TriggerInfo {
                    workflow: def.def.name.clone(),
                    version: def.def.version,
                    schedule: None,
                    timezone: None,
                    subject: Some(subject.clone()),
                    next_at_ms: None,
                });
            }
        }
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> Result<RunRecord, WorkflowError> {
        match self.shared.store.run(id).await? {
            Some((run, _)) => Ok(run),
            None => Err(WorkflowError::NotFound(format!(
                "workflow run with id {id}"
            ))),
        }
    }

    /// Waits up to `timeout` for the run to end, then returns it as it is.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<RunRecord, WorkflowError> {
        let mut ended = self.shared.ended.subscribe();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            let run = self.get(id).await?;
            if run.status.is_final() || tokio::time::Instant::now() >= until {
                return Ok(run);
            }
            // A run driven by another host ends there: read again each
            // second as well.
            let next = (tokio::time::Instant::now() + SCAN).min(until);
            loop {
                match tokio::time::timeout_at(next, ended.recv()).await {
                    Ok(Ok((ended_id, _))) if ended_id != id => continue,
                    Ok(Ok((_, Some(run)))) if run.status.is_final() => {
                        return Ok(Arc::unwrap_or_clone(run))
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => {
                        tokio::time::sleep_until(next).await;
                        break;
                    }
                    _ => break,
                }
            }
        }
    }

    /// Runs, newest first, at most `limit`.
    pub async fn list(
        &self,
        status: Option<RunStatus>,
        workflow: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunRecord>, WorkflowError> {
        let mut runs: Vec<RunRecord> = self
            .shared
            .store
            .runs()
            .await?
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| status.is_none_or(|s| r.status == s))
            .filter(|r| workflow.is_none_or(|w| r.workflow == w))
            .collect();
        // Ulids sort by creation time.
        runs.sort_by(|a, b| b.id.cmp(&a.id));
        runs.truncate(limit);
        Ok(runs)
    }

    /// Asks the run to stop: no step starts after this, running ones end,
    /// then the completed steps' compensations run. A run that ended is
    /// returned as it is.
    pub async fn cancel(&self, id: &str) -> Result<RunRecord, WorkflowError> {
        loop {
            let Some((mut run, rev)) = self.shared.store.run(id).await? else {
                return Err(WorkflowError::NotFound(format!(
                    "workflow run with id {id}"
                )));
            };
            // A run that failed already is being undone: a cancel adds
            // nothing (and does not turn `compensated` into `cancelled`).
            if run.status != RunStatus::Running || run.error.is_some() || run.cancel_requested {
                return Ok(run);
            }
            // Every step ended: the run is completing, and a cancel is too
            // late (it would undo a run that did all it had to).
            if run
                .steps
                .iter()
                .all(|s| matches!(s.status, StepStatus::Completed | StepStatus::Skipped))
            {
                return Ok(run);
            }
            run.cancel_requested = true;
            let poke = || {
                if let Some(driving) = lock(&self.shared.driving).get(id) {
                    let _ = driving.poke.send(());
                }
            };
            // A driver on this host submits a step's task only while it
            // holds the gate to read, and not once it is closed: the write
            // waits for submissions under way, and none starts after the
            // cancel is stored (in a cluster the fence, below, does that
            // for a driver on another host).
            let gate = lock(&self.shared.driving).get(id).map(|d| d.gate.clone());
            let mut closed = match &gate {
                Some(gate) => Some(gate.write().await),
                None => None,
            };
            // Before the write too: a driver with a poke waiting writes the
            // run before it starts a step (see `run.rs`), so the steps it was
            // about to start wait for this cancel.
            poke();
            if self.shared.store.update_run(&run, rev).await?.is_some() {
                if let Some(closed) = closed.as_deref_mut() {
                    *closed = true;
                }
                drop(closed);
                poke();
                // In a cluster the driver may be on another host, which
                // reads the cancel at its next write of the run; meanwhile
                // it could start a step. The run's fence, raised here,
                // refuses every task it submits from now on; it then reads
                // the run, finds the cancel, and takes the new fence
                // (`run::Fencing`). A lone host needs none (the poke).
                for pause in [100, 400, 0] {
                    match self.shared.tasks.store().raise_fence(&fence_name(id)).await {
                        Ok(_) => break,
                        Err(e) if pause == 0 => {
                            tracing::warn!(run = %id, error = %e, "cannot raise a cancelled run's fence: its driver reads the cancel at its next write");
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(pause)).await,
                    }
                }
                return Ok(run);
            }
        }
    }

    /// Runs this host drives now.
    pub fn driving(&self) -> usize {
        lock(&self.shared.driving).len()
    }
}

/// A trigger as `GET /v1/triggers` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TriggerInfo {
    pub workflow: String,
    pub version: u32,
    pub schedule: Option<String>,
    pub timezone: Option<String>,
    pub subject: Option<String>,
    /// A schedule's next tick.
    pub next_at_ms: Option<u64>,
}

impl Shared {
    /// Stores a run with this id and starts driving it; `None` when a run
    /// with the id exists (a tick another host started first).
    async fn start(
        self: &Arc<Self>,
        def: Arc<Checked>,
        id: String,
        input: Value,
        deadline: Option<Duration>,
    ) -> Result<Option<RunRecord>, WorkflowError> {
        if self.tasks.host().is_stopping() {
            return Err(WorkflowError::ShuttingDown);
        }
        let now = now_ms();
        let deadline_ms = deadline
            .or(def.deadline)
            .map(|d| now.saturating_add(d.as_millis() as u64));
        let run = RunRecord {
            id,
            workflow: def.def.name.clone(),
            version: def.def.version,
            status: RunStatus::Running,
            input,
            created_at_ms: now,
            ended_at_ms: None,
            deadline_ms,
            error: None,
            cancel_requested: false,
            owner: Some(self.owner_token()),
            lease_until_ms: now + LEASE.as_millis() as u64,
            steps: def
                .steps
                .iter()
                .map(|s| StepRecord::pending(&s.step.id, &s.step.capability))
                .collect(),
            completed: 0,
            trace: match crate::trace::decide(None) {
                crate::trace::Decision::Record => {
                    let span = tracing::info_span!(
                        target: crate::trace::TARGET,
                        "workflow.start",
                        workflow = %def.def.name,
                        version = def.def.version,
                    );
                    crate::trace::of(&span, None)
                }
                crate::trace::Decision::Skip(trace) => trace,
            },
        };
        let size = serde_json::to_vec(&run).map_or(0, |v| v.len());
        if size > MAX_RUN_BYTES {
            return Err(WorkflowError::InputTooLarge {
                size,
                limit: MAX_RUN_BYTES,
            });
        }
        // Counted as driven before it is stored, so that the scan never
        // takes it up as well.
        let Some(poke) = self.claim(&run.id)? else {
            return Ok(None);
        };
        let mut driver = run::Driver::new(self.clone(), def, run, 0);
        // A new run has no fence yet: its tasks are stored while none is
        // raised, that is until another host takes the run over.
        if !self.store.exclusive() {
            driver.set_fence(Fence {
                name: fence_name(&driver.run.id),
                sequence: 0,
            });
        }
        driver.start_new();
        driver.run.fit(MAX_RUN_BYTES);
        driver.rev = match self.store.create_run(&driver.run).await {
            Ok(Some(rev)) => rev,
            Ok(None) => {
                lock(&self.driving).remove(&driver.run.id);
                return Ok(None);
            }
            Err(e) => {
                lock(&self.driving).remove(&driver.run.id);
                return Err(e);
            }
        };
        let run = driver.run.clone();
        spawn_driver(self.clone(), driver, poke);
        Ok(Some(run))
    }

    /// The latest version of every workflow, checked.
    async fn latest_definitions(&self) -> Result<Vec<Arc<Checked>>, WorkflowError> {
        let mut latest: HashMap<String, u32> = HashMap::new();
        for r in self.store.definitions().await? {
            let v = latest.entry(r.definition.name.clone()).or_default();
            *v = (*v).max(r.definition.version);
        }
        let mut out = Vec::with_capacity(latest.len());
        for (name, version) in latest {
            out.push(self.checked(&name, Some(version)).await?);
        }
        out.sort_by(|a, b| a.def.name.cmp(&b.def.name));
        Ok(out)
    }

    /// A token naming this host and this take-over: the run's `owner`
    /// while this driver holds it.
    fn owner_token(&self) -> String {
        format!("{}/{}", self.tasks.host().id(), ulid::Ulid::new())
    }

    /// Counts a run as driven here; `None` when it is already.
    fn claim(&self, id: &str) -> Result<Option<watch::Receiver<()>>, WorkflowError> {
        let mut driving = lock(&self.driving);
        if driving.contains_key(id) {
            return Ok(None);
        }
        if driving.len() >= MAX_RUNS {
            return Err(WorkflowError::NoCapacity { limit: MAX_RUNS });
        }
        let (tx, rx) = watch::channel(());
        driving.insert(
            id.to_string(),
            Driving {
                poke: tx,
                gate: run::Gate::default(),
            },
        );
        Ok(Some(rx))
    }

    /// A definition, checked; the latest version without `version`. Cached:
    /// a registered version never changes.
    async fn checked(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Arc<Checked>, WorkflowError> {
        let missing = || {
            WorkflowError::NotFound(match version {
                Some(v) => format!("workflow named {name} with version {v}"),
                None => format!("workflow named {name}"),
            })
        };
        // A name no definition can have is not looked up (in a cluster it
        // is not a key the store takes).
        if !def::valid_name(name) {
            return Err(missing());
        }
        let version = match version {
            Some(v) => v,
            None => self.store.latest_version(name).await?.ok_or_else(missing)?,
        };
        let key = (name.to_string(), version);
        if let Some(c) = lock(&self.definitions).get(&key) {
            return Ok(c.clone());
        }
        let found = self
            .store
            .definition(name, version)
            .await?
            .ok_or_else(missing)?;
        let checked = Arc::new(found.definition.check()?);
        let mut cache = lock(&self.definitions);
        // Bounded: past this many, start over (each is read again once).
        if cache.len() >= 1024 {
            cache.clear();
        }
        cache.insert(key, checked.clone());
        Ok(checked)
    }
}

/// The name of a run's fence: its id when that is one subject token.
fn fence_name(run: &str) -> String {
    let token = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if !run.is_empty() && run.chars().all(token) {
        return run.to_string();
    }
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(run.as_bytes())[..16])
}

fn spawn_driver(shared: Arc<Shared>, driver: run::Driver, poke: watch::Receiver<()>) {
    tokio::spawn(async move {
        let id = driver.run.id.clone();
        let mut ended = None;
        match driver.drive(poke).await {
            Ok(run) => {
                tracing::debug!(run = %id, status = run.status.as_str(), "workflow run ended");
                shared.tasks.events().metrics().workflow_ended(
                    &run.workflow,
                    run.status.as_str(),
                    run.steps.iter().map(|s| s.status.as_str()),
                );
                ended = Some(Arc::new(run));
            }
            Err(run::Stop::Fenced) => {
                tracing::warn!(run = %id, "another host drives this workflow run now; this host stopped driving it");
            }
            Err(run::Stop::Stopping) => {}
            Err(run::Stop::Store(e)) => {
                tracing::error!(run = %id, error = %e, "a workflow run's store failed; the run waits to be taken up again");
            }
        }
        lock(&shared.driving).remove(&id);
        let _ = shared.ended.send((id, ended));
    });
}

/// How often the schedules' definitions are read again (a new version's
/// triggers replace the old one's within this).
const TRIGGERS_REFRESH: Duration = Duration::from_secs(5);

/// Starts a run at each tick of every schedule of every workflow's latest
/// version. Every host does this; the run's id is made from the workflow,
/// version, trigger and tick, and a run is created only if its id is new,
/// so a tick starts one run in a cluster. Ticks before this host started
/// (or while it could not read its store) are not made up for.
async fn schedules(weak: std::sync::Weak<Shared>) {
    use sha2::Digest;
    // A schedule (workflow, cron, time zone, input) -> its next tick, one
    // per schedule of the definitions read last. Not by version: a new
    // version with the same schedule keeps its next tick.
    let mut next: HashMap<(String, String, String, String), u64> = HashMap::new();
    let mut defs: Vec<Arc<Checked>> = Vec::new();
    let mut refreshed: Option<tokio::time::Instant> = None;
    let key_of = |def: &Checked, s: &def::Schedule| {
        (
            def.def.name.clone(),
            s.schedule.clone(),
            s.timezone.name().to_string(),
            s.input.to_string(),
        )
    };
    loop {
        let Some(shared) = weak.upgrade() else { return };
        if shared.tasks.host().is_stopping() {
            return;
        }
        if refreshed.is_none_or(|r| r.elapsed() >= TRIGGERS_REFRESH) {
            match shared.latest_definitions().await {
                Ok(all) => {
                    defs = all
                        .into_iter()
                        .filter(|d| !d.schedules.is_empty())
                        .collect();
                    let live: std::collections::HashSet<_> = defs
                        .iter()
                        .flat_map(|d| d.schedules.iter().map(|s| key_of(d, s)))
                        .collect();
                    next.retain(|k, _| live.contains(k));
                }
                Err(e) => tracing::warn!(error = %e, "reading workflow triggers failed"),
            }
            refreshed = Some(tokio::time::Instant::now());
        }
        let now = now_ms();
        let mut wake = now + 1000;
        for def in &defs {
            for schedule in &def.schedules {
                let key = key_of(def, schedule);
                let at = *next
                    .entry(key.clone())
                    .or_insert_with(|| schedule.next_after(now).unwrap_or(u64::MAX));
                if at > now {
                    wake = wake.min(at);
                    continue;
                }
                // From the schedule and the tick, not the version: hosts that
                // read a new version at different times agree on a tick.
                let hash =
                    sha2::Sha256::digest(format!("{}/{}/{}/{}/{at}", key.0, key.1, key.2, key.3));
                let mut random = [0u8; 16];
                random.copy_from_slice(&hash[..16]);
                let id = ulid::Ulid::from_parts(at, u128::from_be_bytes(random)).to_string();
                match shared
                    .start(def.clone(), id, schedule.input.clone(), None)
                    .await
                {
                    Ok(Some(run)) => {
                        tracing::info!(workflow = %key.0, run = %run.id, tick_ms = at, "a schedule started a workflow run");
                        shared.audit_start(&run, &format!("schedule:{}", key.0));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(workflow = %key.0, error = %e, "a schedule could not start its run");
                    }
                }
                // Ticks missed while this host was busy or suspended are
                // not made up for: the next one after now.
                let following = schedule.next_after(at.max(now)).unwrap_or(u64::MAX);
                wake = wake.min(following);
                next.insert(key, following);
            }
        }
        drop(shared);
        tokio::time::sleep(Duration::from_millis(wake.saturating_sub(now_ms()))).await;
    }
}

/// Starts a run for each message on a subject a trigger of a workflow's
/// latest version names, with the message as its input (JSON when it
/// parses, else its text).
async fn on_messages(
    weak: std::sync::Weak<Shared>,
    mut messages: mpsc::Receiver<(String, Vec<u8>)>,
) {
    let mut defs: Vec<Arc<Checked>> = Vec::new();
    let mut refreshed: Option<tokio::time::Instant> = None;
    while let Some((subject, payload)) = messages.recv().await {
        let Some(shared) = weak.upgrade() else { return };
        if refreshed.is_none_or(|r| r.elapsed() >= TRIGGERS_REFRESH) {
            match shared.latest_definitions().await {
                Ok(all) => defs = all.into_iter().filter(|d| !d.subjects.is_empty()).collect(),
                Err(e) => tracing::warn!(error = %e, "reading workflow triggers failed"),
            }
            refreshed = Some(tokio::time::Instant::now());
        }
        for def in &defs {
            if !def
                .subjects
                .iter()
                .any(|p| crate::sandbox::subject::matches(p, &subject))
            {
                continue;
            }
            let input = run::result_value(&payload);
            let id = ulid::Ulid::new().to_string();
            match shared.start(def.clone(), id, input, None).await {
                Ok(Some(run)) => {
                    tracing::info!(workflow = %def.def.name, run = %run.id, subject, "a message started a workflow run");
                    shared.audit_start(&run, &format!("subject:{subject}"));
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(workflow = %def.def.name, subject, error = %e, "a message could not start its run");
                }
            }
        }
    }
}

/// Takes up the runs that no one drives: on a lone host every running run
/// it does not drive (after a restart, or a store failure), in a cluster
/// those whose lease ran out.
async fn scan(shared: &Arc<Shared>) -> Result<(), WorkflowError> {
    let now = now_ms();
    for (mut run, rev) in shared.store.runs().await? {
        if run.status.is_final() || lock(&shared.driving).contains_key(&run.id) {
            continue;
        }
        if !shared.store.exclusive() && run.lease_until_ms > now {
            continue;
        }
        let def = match shared.checked(&run.workflow, Some(run.version)).await {
            Ok(def) => def,
            Err(e) => {
                tracing::error!(run = %run.id, error = %e, "a workflow run's definition cannot be read");
                continue;
            }
        };
        let poke = match shared.claim(&run.id) {
            Ok(Some(poke)) => poke,
            Ok(None) => continue,
            Err(_) => return Ok(()),
        };
        let taken = take_over(shared, &mut run, rev).await;
        let (rev, fence) = match taken {
            Ok(Some(taken)) => taken,
            // Another host's write won.
            Ok(None) => {
                lock(&shared.driving).remove(&run.id);
                continue;
            }
            Err(e) => {
                lock(&shared.driving).remove(&run.id);
                return Err(e);
            }
        };
        tracing::info!(run = %run.id, workflow = %run.workflow, "resuming a workflow run from its checkpoint");
        let mut driver = run::Driver::new(shared.clone(), def, run, rev);
        if let Some(fence) = fence {
            driver.set_fence(fence);
        }
        spawn_driver(shared.clone(), driver, poke);
    }
    Ok(())
}

/// Takes `run` (read at `rev`) over for this host: its revision and fence
/// to drive it with, or `None` if another host's write won.
async fn take_over(
    shared: &Arc<Shared>,
    run: &mut RunRecord,
    rev: u64,
) -> Result<Option<(u64, Option<Fence>)>, WorkflowError> {
    run.owner = Some(shared.owner_token());
    run.lease_until_ms = now_ms() + LEASE.as_millis() as u64;
    let Some(rev) = shared.store.update_run(run, rev).await? else {
        return Ok(None);
    };
    // The fence goes up once the run is this host's, and before this host
    // submits anything for it: from then on, tasks the replaced driver
    // submits are refused, also one it was about to submit after a write
    // it made before the takeover (what it stored before the fence, this
    // driver looks up by key). Raised only by the host whose write won, so
    // two hosts taking the run at once do not fence each other. If it
    // cannot be raised, this host does not drive the run, and the run is
    // taken up again when the lease just written ends.
    let Some(sequence) = shared
        .tasks
        .store()
        .raise_fence(&fence_name(&run.id))
        .await
        .map_err(|e| WorkflowError::store("a run's fence", e))?
    else {
        // No fences in this store (a lone host): one write is enough.
        return Ok(Some((rev, None)));
    };
    // Then the run is written again, and driven only if that write wins
    // too: a host paused between its first write and its fence, past its
    // lease, may have raised its fence after the one of a host that took
    // the run over meanwhile; its second write is refused, so it does not
    // drive under a fence that a later taker's does not follow. (That
    // taker, refused once under its own fence, finds itself still the
    // run's owner and takes the newer one: `run::Fencing`.)
    run.lease_until_ms = now_ms() + LEASE.as_millis() as u64;
    let fence = Fence {
        name: fence_name(&run.id),
        sequence,
    };
    Ok(shared
        .store
        .update_run(run, rev)
        .await?
        .map(|rev| (rev, Some(fence))))
}

/// Removes ended runs older than the retention of finished tasks (in a
/// cluster the cluster's, so that one host's shorter setting does not
/// remove every host's runs).
async fn retention(shared: &Arc<Shared>) -> Result<(), WorkflowError> {
    let retention = shared.tasks.store().retention().await;
    let Some(keep) =
        retention.map_err(|e| WorkflowError::store("the retention of finished tasks", e))?
    else {
        return Ok(());
    };
    let keep = keep.as_millis() as u64;
    let now = now_ms();
    for (run, _) in shared.store.runs().await? {
        if run
            .ended_at_ms
            .is_some_and(|t| t.saturating_add(keep) < now)
        {
            // Its fence first (there is one if a host took it over or it
            // was cancelled): a run whose fence stays is tried again at
            // the next pass.
            if let Err(e) = shared.tasks.store().drop_fence(&fence_name(&run.id)).await {
                tracing::warn!(run = %run.id, error = %e, "cannot remove a run's fence");
                continue;
            }
            shared.store.delete_run(&run.id).await?;
        }
    }
    Ok(())
}
