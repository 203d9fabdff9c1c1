//! The driver of one run: starts steps as their dependencies end, writes a
//! checkpoint before any step that depends on another starts, and runs the
//! compensations when the run fails or is cancelled.
//!
//! Every task a run submits has an idempotency key made of the run id, the
//! step, the fan-out element and the attempt (`wf/RUN/STEP[/i]/N`), so a
//! driver that starts again after a crash, or on another host, submits the
//! same keys and gets the same tasks: a task that ended is not run again,
//! and one still running ends with one result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::def::{Checked, CheckedStep, IfSkipped, Ref};
use super::record::{
    CompensationRecord, CompensationStatus, RunError, RunRecord, RunStatus, StepStatus,
};
use super::{Shared, WorkflowError, LEASE, MAX_RUN_BYTES};
use crate::daemon::{now_ms, ErrorInfo, HostError, Status, SubmitRequest};
use crate::service::{Fence, TaskService};

/// Why a driver gave a run up without ending it: another host holds it
/// now, this host is stopping, or the store failed (the run is taken up
/// again by this host's scan, or another host's once the lease ends).
#[derive(Debug)]
pub(super) enum Stop {
    Fenced,
    Stopping,
    Store(WorkflowError),
}

/// How a step, an element or a compensation ended.
enum Outcome {
    Completed {
        result: Value,
        task: Option<TaskEnd>,
        fuel: u64,
        attempts: u32,
    },
    Failed {
        error: ErrorInfo,
        task: Option<TaskEnd>,
        attempts: u32,
    },
    /// The host is stopping, or (`fenced`) another driver took the run.
    Stopping { fenced: bool },
    /// A cancel raised the run's fence before the step's first task was
    /// stored: the step did not start.
    NotStarted,
}

/// The kind of a submission refused because a cancel came first (see
/// [`Fencing::renew`]); never shown, it becomes [`Outcome::NotStarted`].
const NOT_STARTED: &str = "not-started";

/// A run's cancel gate on the host that drives it: a step's task is
/// submitted while the gate is held to read and open (`false`); a cancel
/// made on this host closes it with its write of the run, after the
/// submissions under way. On a lone host this keeps every step from
/// starting after a cancel is answered, as the fence does in a cluster.
pub(super) type Gate = Arc<tokio::sync::RwLock<bool>>;

/// In a cluster, the fence a driver's tasks are submitted under, shared by
/// its steps. A cancel through any host raises it too (`Workflows::cancel`),
/// so that no task of the run is stored after the cancel; a driver that
/// finds its submission refused and is still the run's owner takes the new
/// fence.
#[derive(Clone)]
pub(super) struct Fencing {
    shared: Arc<Shared>,
    run: String,
    owner: Option<String>,
    fence: Arc<std::sync::Mutex<Fence>>,
    /// A renewal found the run cancelled: no step or element submits
    /// again, and the driver takes the cancel as its own.
    cancelled: Arc<std::sync::atomic::AtomicBool>,
}

impl Fencing {
    fn current(&self) -> Fence {
        self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// After a submission under `refused` was refused: whether this driver
    /// still owns the run, and then it has the current fence. The fence is
    /// read before the run: a host takes a run over with a write before it
    /// raises the fence, so a run read afterwards (from the leader) that
    /// still names this driver's owner token means no takeover raised the
    /// fence read, and a later raise refuses this driver again. A failed
    /// read is tried again a few times before the driver gives the run up.
    async fn renew(&self, refused: &Fence) -> bool {
        for pause in [100, 400, 1600] {
            let store = self.shared.tasks.store();
            let sequence = match store.fence_sequence(&refused.name).await {
                Ok(Some(s)) if s != refused.sequence => s,
                Ok(_) => return false,
                Err(e) => {
                    tracing::warn!(run = %self.run, error = %e, "cannot read a run's fence; retrying");
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    continue;
                }
            };
            match self.shared.store.run_latest(&self.run).await {
                Ok(Some((run, _))) if run.owner == self.owner => {
                    self.fence
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .sequence = sequence;
                    if run.cancel_requested {
                        self.cancelled
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    return true;
                }
                Ok(_) => return false,
                Err(e) => {
                    tracing::warn!(run = %self.run, error = %e, "cannot read a fenced run; retrying");
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        false
    }
}

impl Outcome {
    fn stop(fenced: bool) -> Stop {
        if fenced {
            Stop::Fenced
        } else {
            Stop::Stopping
        }
    }
}

/// The fields of a step's last task that its record shows.
struct TaskEnd {
    id: String,
    host: Option<String>,
    agent: Option<String>,
}

/// A step's first attempt has a task: shown before the step ends.
struct Progress {
    step: usize,
    attempt: u32,
    task: String,
}

/// What one attempt loop needs.
#[derive(Clone)]
struct Spec {
    capability: String,
    priority: i32,
    timeout: Option<Duration>,
    attempts: u32,
    backoff: Duration,
    deadline_ms: Option<u64>,
    trace: Option<String>,
    /// In a cluster, when this driver started the step and no driver
    /// before it submitted its first attempt: none will while this
    /// driver's lease lasts (a later one raises the fence first), until
    /// this time (see `TaskService::submit_keyed`).
    unused_until_ms: Option<u64>,
    /// In a cluster, the fence its tasks are submitted under.
    fence: Option<Fencing>,
    /// A step's (or element's) attempts, which a cancel keeps from
    /// starting; not a compensation's.
    forward: bool,
    /// The run's cancel gate (forward attempts only).
    gate: Gate,
}

pub(super) struct Driver {
    pub shared: Arc<Shared>,
    pub def: Arc<Checked>,
    pub run: RunRecord,
    pub rev: u64,
    dirty: bool,
    /// The run is new and its first steps were started in the record
    /// that created it (`start_new`).
    fresh: bool,
    /// Cancelled when the run is: no attempt starts after it.
    stop: CancellationToken,
    /// In a cluster, the fence this driver submits under: raised when it
    /// took the run over (sequence 0 for a run it created: none yet).
    fence: Option<Fencing>,
    gate: Gate,
    /// The run's end as `completed` met a cancel stored before it: it is
    /// decided again (see `write`).
    reopened: bool,
}

fn error(kind: &str, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo {
        kind: kind.to_string(),
        message: message.into(),
    }
}

/// A task's input bytes: a JSON string as its text, anything else as JSON.
pub(super) fn payload(value: &Value) -> Vec<u8> {
    match value {
        Value::String(s) => s.clone().into_bytes(),
        // A Value always serializes.
        other => serde_json::to_vec(other).unwrap_or_default(),
    }
}

/// A task's result as JSON: parsed when it is JSON, else kept as text.
pub(super) fn result_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// What references resolve against.
struct Scope<'a> {
    input: &'a Value,
    run: &'a RunRecord,
    index: &'a HashMap<String, usize>,
    item: Option<&'a Value>,
    result: Option<&'a Value>,
}

impl Scope<'_> {
    /// The template with each reference replaced by its value. A step that
    /// was skipped has the value `null`; a pointer to nothing is an error.
    fn resolve(&self, template: &Value) -> Result<Value, String> {
        Ok(match template {
            Value::String(s) => match Ref::parse(s) {
                None => template.clone(),
                Some(Err(e)) => return Err(e),
                Some(Ok(r)) => {
                    let (base, pointer) = match &r {
                        Ref::Input(p) => (Some(self.input), p),
                        Ref::Item(p) => (self.item, p),
                        Ref::Result(p) => (self.result, p),
                        Ref::Step(id, p) => (
                            self.index
                                .get(id)
                                .and_then(|&i| self.run.steps.get(i))
                                .map(|s| s.result.as_ref().unwrap_or(&Value::Null)),
                            p,
                        ),
                    };
                    let base = base.ok_or_else(|| format!("{s} has no value here"))?;
                    base.pointer(pointer)
                        .cloned()
                        .ok_or_else(|| format!("{s}: nothing at {pointer:?}"))?
                }
            },
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|v| self.resolve(v))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), self.resolve(v)?)))
                    .collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
}

impl Driver {
    pub fn new(shared: Arc<Shared>, def: Arc<Checked>, run: RunRecord, rev: u64) -> Driver {
        // The gate of the run's entry among the runs driven here (made when
        // the run was claimed); a lone one otherwise.
        let gate = super::lock(&shared.driving)
            .get(&run.id)
            .map(|d| d.gate.clone())
            .unwrap_or_default();
        Driver {
            shared,
            gate,
            def,
            run,
            rev,
            dirty: false,
            fresh: false,
            stop: CancellationToken::new(),
            fence: None,
            reopened: false,
        }
    }

    /// In a cluster: the fence this driver submits under (see `Fencing`).
    pub fn set_fence(&mut self, fence: Fence) {
        self.fence = Some(Fencing {
            shared: self.shared.clone(),
            run: self.run.id.clone(),
            owner: self.run.owner.clone(),
            fence: Arc::new(std::sync::Mutex::new(fence)),
            cancelled: Arc::default(),
        });
    }

    /// Starts a new run's first steps in its record before the record is
    /// first stored: its creation is then their checkpoint, which saves a
    /// write per run (in a cluster, a round trip before the first step).
    pub fn start_new(&mut self) {
        self.start_ready(None);
        self.dirty = false;
        self.fresh = true;
    }

    /// Drives the run to its end, or until it must give it up.
    pub async fn drive(mut self, poke: watch::Receiver<()>) -> Result<RunRecord, Stop> {
        if self.run.status == RunStatus::Running {
            self.forward(poke).await?;
        }
        if self.run.status == RunStatus::Compensating {
            self.compensate().await?;
        }
        Ok(self.run)
    }

    /// Writes the run if it changed since the last write. A write that
    /// meets a newer revision merges a cancel request, and stops when
    /// another driver holds the run.
    async fn save(&mut self) -> Result<(), Stop> {
        if !self.dirty {
            return Ok(());
        }
        self.write().await?;
        self.dirty = false;
        Ok(())
    }

    async fn write(&mut self) -> Result<(), Stop> {
        self.run.fit(MAX_RUN_BYTES);
        let store = &self.shared.store;
        let mut failures = 0u32;
        loop {
            if !store.exclusive() {
                self.run.lease_until_ms = now_ms() + LEASE.as_millis() as u64;
            }
            let result = match store.update_run(&self.run, self.rev).await {
                Ok(Some(rev)) => {
                    self.rev = rev;
                    return Ok(());
                }
                Ok(None) => store.run(&self.run.id).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(Some((theirs, rev))) if theirs.owner == self.run.owner => {
                    // A cancel request came in through another writer.
                    let new_cancel = theirs.cancel_requested && !self.run.cancel_requested;
                    self.run.cancel_requested |= theirs.cancel_requested;
                    self.rev = rev;
                    if new_cancel && self.run.status == RunStatus::Completed {
                        // Stored while a step still ran (`Workflows::cancel`)
                        // and read only now: the run is not written
                        // completed but ended again, cancelled.
                        self.reopened = true;
                        return Ok(());
                    }
                }
                Ok(_) => return Err(Stop::Fenced),
                Err(e) => {
                    failures += 1;
                    if failures >= 5 || self.shared.tasks.host().is_stopping() {
                        return Err(Stop::Store(e));
                    }
                    tracing::warn!(run = %self.run.id, error = %e, "writing a workflow run failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 << failures)).await;
                }
            }
        }
    }

    fn spec(&self, s: &CheckedStep) -> Spec {
        Spec {
            capability: s.step.capability.clone(),
            priority: s.step.priority,
            timeout: s.timeout,
            attempts: s.attempts,
            backoff: s.backoff,
            deadline_ms: self.run.deadline_ms,
            trace: self.run.trace.clone(),
            unused_until_ms: None,
            fence: self.fence.clone(),
            forward: true,
            gate: self.gate.clone(),
        }
    }

    fn scope<'a>(&'a self, item: Option<&'a Value>) -> Scope<'a> {
        Scope {
            input: &self.run.input,
            run: &self.run,
            index: &self.def.index,
            item,
            result: None,
        }
    }

    fn fail(&mut self, step: Option<&str>, e: &ErrorInfo) {
        if self.run.error.is_none() {
            // A failure after a cancel (the cancel stops the attempts and
            // backoffs, which end with the error they had) is the cancel's
            // doing: the run ends `cancelled`. The step keeps its error.
            self.run.error = Some(if self.run.cancel_requested {
                RunError {
                    step: None,
                    kind: "cancelled".to_string(),
                    message: "the run was cancelled".to_string(),
                }
            } else {
                RunError {
                    step: step.map(String::from),
                    kind: e.kind.clone(),
                    message: e.message.clone(),
                }
            });
        }
        self.dirty = true;
    }

    /// Starts (marks running, with its input) every pending step whose
    /// dependencies have all ended; skips those whose condition is false.
    /// Returns the steps to spawn.
    /// Starts the pending steps whose dependencies ended (only those in
    /// `only`, when given).
    fn start_ready(&mut self, only: Option<&[usize]>) -> Vec<usize> {
        let mut started = Vec::new();
        // One pass in dependency order: a step skipped here makes its
        // dependants ready in the same pass.
        for i in 0..self.run.steps.len() {
            if self.run.steps[i].status != StepStatus::Pending
                || only.is_some_and(|only| !only.contains(&i))
            {
                continue;
            }
            let step = self.def.steps[i].step.clone();
            let deps: Vec<StepStatus> = step
                .after
                .iter()
                .filter_map(|a| self.def.index.get(a))
                .map(|&d| self.run.steps[d].status)
                .collect();
            if !deps.iter().all(|s| s.has_ended()) {
                continue;
            }
            let now = now_ms();
            let skip = |d: &mut Driver| {
                let r = &mut d.run.steps[i];
                r.status = StepStatus::Skipped;
                r.ended_at_ms = Some(now);
                d.dirty = true;
            };
            if deps.contains(&StepStatus::Skipped) && step.if_skipped == IfSkipped::Skip {
                skip(self);
                continue;
            }
            if let Some(when) = &step.when {
                let value = self
                    .scope(None)
                    .resolve(&Value::String(when.value.clone()))
                    .unwrap_or(Value::Null);
                let run = match &when.equals {
                    Some(expected) => &value == expected,
                    None => value == Value::Bool(true),
                };
                if !run {
                    skip(self);
                    continue;
                }
            }
            let size = serde_json::to_vec(&self.run).map_or(0, |v| v.len());
            let input = self.input_of(i).and_then(|(input, elements)| {
                let grown = size + serde_json::to_vec(&input).map_or(0, |v| v.len());
                if grown > MAX_RUN_BYTES {
                    return Err(format!(
                        "input: the run's record would be {grown} bytes with this input, past the limit of {MAX_RUN_BYTES} bytes"
                    ));
                }
                Ok((input, elements))
            });
            match input {
                Ok((input, elements)) => {
                    let r = &mut self.run.steps[i];
                    r.status = StepStatus::Running;
                    r.started_at_ms = Some(now);
                    // Its first attempt starts now; later ones are shown
                    // with the checkpoint after them.
                    r.attempts = r.attempts.max(1);
                    r.input = Some(input);
                    r.elements = elements;
                    started.push(i);
                }
                Err(message) => {
                    let e = error("invalid-input", message);
                    let r = &mut self.run.steps[i];
                    r.status = StepStatus::Failed;
                    r.started_at_ms = Some(now);
                    r.ended_at_ms = Some(now);
                    r.error = Some(e.clone());
                    self.fail(Some(&step.id), &e);
                    // Nothing more starts once a step failed.
                    break;
                }
            }
            self.dirty = true;
        }
        started
    }

    /// A step's input; for a fan-out, the array of its elements' inputs.
    fn input_of(&self, i: usize) -> Result<(Value, Option<u32>), String> {
        let step = &self.def.steps[i].step;
        let Some(for_each) = &step.for_each else {
            let template = step
                .input
                .clone()
                .unwrap_or_else(|| Value::String("${input}".into()));
            return Ok((
                self.scope(None)
                    .resolve(&template)
                    .map_err(|e| format!("input: {e}"))?,
                None,
            ));
        };
        let items = self
            .scope(None)
            .resolve(for_each)
            .map_err(|e| format!("for_each: {e}"))?;
        let Value::Array(items) = items else {
            return Err(format!("for_each: {for_each} is not an array but {items}"));
        };
        if items.len() > super::def::MAX_FAN_OUT {
            return Err(format!(
                "for_each: {} elements, past the limit of {}",
                items.len(),
                super::def::MAX_FAN_OUT
            ));
        }
        let template = step
            .input
            .clone()
            .unwrap_or_else(|| Value::String("${item}".into()));
        let inputs = items
            .iter()
            .map(|item| self.scope(Some(item)).resolve(&template))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("input: {e}"))?;
        Ok((Value::Array(inputs), Some(items.len() as u32)))
    }

    /// The steps, until all have ended or the run stops (a failure, a
    /// cancel, its deadline) and the running ones have ended.
    async fn forward(&mut self, mut poke: watch::Receiver<()>) -> Result<(), Stop> {
        // A run taken up with a cancel already stored: no step's task is
        // submitted from now on, those recorded running included (a task
        // the driver before stored under their keys is still waited for).
        if self.run.cancel_requested {
            self.stop.cancel();
            *self.gate.write().await = true;
        }
        let (tx, mut progress) = mpsc::channel::<Progress>(64);
        let mut running: JoinSet<(usize, Outcome)> = JoinSet::new();
        // Which step each spawned future runs, for one that panics.
        let mut running_ids: HashMap<tokio::task::Id, usize> = HashMap::new();
        // Steps recorded as running were running when the last driver
        // stopped: they start again at once, with the same task keys. In a
        // new run they are the first steps, started by `start_new`.
        for i in 0..self.run.steps.len() {
            if self.run.steps[i].status == StepStatus::Running {
                let handle = running.spawn(self.step(i, tx.clone(), self.fresh));
                running_ids.insert(handle.id(), i);
            }
        }
        // A step's task may be stored while the run still says the step
        // is pending (the run's write and the step's submission overlap,
        // below): such a step was started by the driver before this one (a
        // crash, or in a cluster a host replaced). It is started again
        // whatever comes (a cancel, a failure, the deadline), so that its
        // task is waited for and, completed, undone like any other. In a
        // cluster this driver raised its fence before it took the run, so
        // no task of the replaced driver can be stored after this looks.
        let mut started_before = Vec::new();
        if !self.fresh {
            let checks: Vec<_> = (0..self.run.steps.len())
                .filter(|&i| self.run.steps[i].status == StepStatus::Pending)
                .filter(|&i| self.def.steps[i].step.for_each.is_none())
                .map(|i| {
                    let step = &self.def.steps[i].step;
                    let key = format!("wf/{}/{}/1", self.run.id, step.id);
                    let (store, capability) = (self.shared.tasks.store(), step.capability.clone());
                    async move { (i, store.key_used(&key, &capability).await) }
                })
                .collect();
            let mut used = futures_util::stream::iter(checks).buffer_unordered(16);
            while let Some((i, used)) = used.next().await {
                match used {
                    Ok(true) => started_before.push(i),
                    Ok(false) => {}
                    Err(e) => {
                        return Err(Stop::Store(WorkflowError::store("a step's task key", e)))
                    }
                }
            }
            started_before.sort_unstable();
        }
        // Their first attempts' keys are used: looked up when submitted.
        let submitted_before = started_before.clone();
        let mut spawn: Vec<usize> = Vec::new();
        // The first renewal a third of a lease from now: the write that
        // made or took the run set its lease (an interval's first tick
        // would write again at once).
        let mut renew =
            tokio::time::interval_at(tokio::time::Instant::now() + LEASE / 3, LEASE / 3);
        loop {
            self.take_fenced_cancel();
            if self.run.error.is_none() {
                if let Some(d) = self.run.deadline_ms.filter(|&d| now_ms() >= d) {
                    let left = d.saturating_sub(self.run.created_at_ms);
                    self.fail(
                        None,
                        &error(
                            "deadline-exceeded",
                            format!("the run's deadline of {left} ms passed"),
                        ),
                    );
                }
            }
            let stopping = self.run.error.is_some() || self.run.cancel_requested;
            if !stopping {
                spawn.extend(self.start_ready(None));
            } else if !started_before.is_empty() {
                spawn.extend(self.start_ready(Some(&started_before)));
            }
            started_before.retain(|&i| self.run.steps[i].status == StepStatus::Pending);
            if running.is_empty() && spawn.is_empty() {
                break;
            }
            // The checkpoint: every started step and ended one is written
            // before a step that depends on it can start. A step's task is
            // a checkpoint of its own: stored under its key (`wf/RUN/STEP/N`)
            // before anything depends on it, and found by that key by a
            // driver that takes the run up again (above). So the run's write
            // and the new steps' submissions overlap. In a cluster the
            // tasks are stored under the run's fence, which a host that
            // takes the run over raises first: a replaced driver's task is
            // stored before it, and found, or refused. A cancel waiting to
            // be read (a poke) keeps the order, and so does a fan-out (its
            // elements' keys are not looked up when a run is taken up
            // again).
            let plain = spawn
                .iter()
                .all(|&i| self.def.steps[i].step.for_each.is_none());
            let overlap = self.shared.store.exclusive() || self.fence.is_some();
            if overlap && plain && !poke.has_changed().unwrap_or(true) {
                for i in spawn.drain(..) {
                    let fresh = !submitted_before.contains(&i);
                    let handle = running.spawn(self.step(i, tx.clone(), fresh));
                    running_ids.insert(handle.id(), i);
                }
            }
            self.save().await?;
            if self.run.cancel_requested {
                // A cancel came in with that write: the steps it marked
                // running do not start (on a lone host they may have; the
                // stop token ends their attempts).
                self.stop.cancel();
                for i in spawn.drain(..) {
                    self.unstart(i);
                }
            }
            for i in spawn.drain(..) {
                let fresh = !submitted_before.contains(&i);
                let handle = running.spawn(self.step(i, tx.clone(), fresh));
                running_ids.insert(handle.id(), i);
            }
            let deadline = self.run.deadline_ms.filter(|_| self.run.error.is_none());
            let until_deadline = async {
                match deadline {
                    Some(d) => {
                        tokio::time::sleep(Duration::from_millis(d.saturating_sub(now_ms()))).await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = running.join_next_with_id() => {
                    match joined {
                        Some(Ok((id, (i, outcome)))) => {
                            running_ids.remove(&id);
                            self.ended(i, outcome)?;
                        }
                        // A bug, not the agent's: the step fails with it.
                        Some(Err(e)) => {
                            if let Some(i) = running_ids.remove(&e.id()) {
                                let outcome = Outcome::Failed {
                                    error: error("host", format!("the step's driver failed: {e}")),
                                    task: None,
                                    attempts: self.run.steps[i].attempts,
                                };
                                self.ended(i, outcome)?;
                            }
                        }
                        None => {}
                    }
                }
                Some(p) = progress.recv() => {
                    let r = &mut self.run.steps[p.step];
                    r.attempts = p.attempt;
                    r.task_id = Some(p.task);
                    // Shown with the next checkpoint; not worth a write.
                }
                Ok(()) = poke.changed() => {
                    if let Ok(Some((theirs, _))) = self.shared.store.run(&self.run.id).await {
                        if theirs.cancel_requested && !self.run.cancel_requested {
                            self.run.cancel_requested = true;
                            self.stop.cancel();
                            self.dirty = true;
                        }
                    }
                }
                () = until_deadline => {}
                _ = renew.tick(), if !self.shared.store.exclusive() => {
                    self.dirty = true;
                }
            }
        }
        let now = now_ms();
        for r in &mut self.run.steps {
            if r.status == StepStatus::Pending {
                r.status = StepStatus::NotRun;
                r.ended_at_ms = Some(now);
            }
        }
        self.end_forward();
        self.save().await?;
        if std::mem::take(&mut self.reopened) {
            self.run.status = RunStatus::Running;
            self.run.ended_at_ms = None;
            self.end_forward();
            self.save().await?;
        }
        Ok(())
    }

    /// Decides how the run goes on once no step runs: it ends (completed,
    /// failed or cancelled) or its completed steps are undone.
    fn end_forward(&mut self) {
        // A cancel is stored only while a step has not ended
        // (`Workflows::cancel`): the run is cancelled, even if the steps
        // that were running then have completed since.
        if self.run.cancel_requested && self.run.error.is_none() {
            self.fail(None, &error("cancelled", "the run was cancelled"));
        }
        let undo = self.undo_order();
        self.dirty = true;
        if self.run.error.is_none() {
            self.finish(RunStatus::Completed);
        } else if undo.is_empty() {
            let status = if self.was_cancelled() {
                RunStatus::Cancelled
            } else {
                RunStatus::Failed
            };
            self.finish(status);
        } else {
            self.run.status = RunStatus::Compensating;
            for i in undo {
                let capability = self.def.steps[i]
                    .compensation
                    .as_ref()
                    .map(|c| c.capability.clone())
                    .unwrap_or_default();
                self.run.steps[i].compensation = Some(CompensationRecord {
                    capability,
                    status: CompensationStatus::Pending,
                    attempts: 0,
                    task_id: None,
                    started_at_ms: None,
                    ended_at_ms: None,
                    error: None,
                });
            }
        }
    }

    /// Step `i`, marked started, did not start (a cancel came first): it is
    /// as if never started.
    fn unstart(&mut self, i: usize) {
        let r = &mut self.run.steps[i];
        r.status = StepStatus::Pending;
        r.started_at_ms = None;
        r.attempts = 0;
        r.input = None;
        r.elements = None;
        r.task_id = None;
        self.dirty = true;
    }

    /// A cancel that a renewal of the fence found (`Fencing`) is the
    /// run's: no step starts after it.
    fn take_fenced_cancel(&mut self) {
        if !self.run.cancel_requested && self.fence.as_ref().is_some_and(Fencing::cancelled) {
            self.run.cancel_requested = true;
            self.stop.cancel();
            self.dirty = true;
        }
    }

    /// Whether the run stopped for a cancel (and not a failure before it).
    fn was_cancelled(&self) -> bool {
        self.run
            .error
            .as_ref()
            .is_some_and(|e| e.kind == "cancelled")
    }

    fn finish(&mut self, status: RunStatus) {
        self.run.status = status;
        self.run.ended_at_ms = Some(now_ms());
        self.dirty = true;
    }

    /// Completed steps with a compensation, latest completed first.
    fn undo_order(&self) -> Vec<usize> {
        let mut undo: Vec<usize> = (0..self.run.steps.len())
            .filter(|&i| {
                let s = &self.run.steps[i];
                // A result too large to keep is a task that completed: its
                // effect is there to undo.
                let done = s.status == StepStatus::Completed
                    || s.error
                        .as_ref()
                        .is_some_and(|e| e.kind == "result-too-large");
                done && self.def.steps[i].compensation.is_some()
            })
            .collect();
        undo.sort_by_key(|&i| std::cmp::Reverse(self.run.steps[i].completed_order));
        undo
    }

    /// Records how a step ended.
    fn ended(&mut self, i: usize, outcome: Outcome) -> Result<(), Stop> {
        let now = now_ms();
        self.dirty = true;
        // Before a failure is written: one that a cancel caused makes the
        // run `cancelled` (`fail`).
        self.take_fenced_cancel();
        let id = self.run.steps[i].id.clone();
        match outcome {
            Outcome::Stopping { fenced } => return Err(Outcome::stop(fenced)),
            Outcome::NotStarted => {
                // A cancel came first.
                self.unstart(i);
                self.run.cancel_requested = true;
                self.stop.cancel();
            }
            Outcome::Completed {
                result,
                task,
                fuel,
                attempts,
            } => {
                let size = serde_json::to_vec(&self.run).map_or(0, |v| v.len())
                    + serde_json::to_vec(&result).map_or(0, |v| v.len());
                let r = &mut self.run.steps[i];
                r.ended_at_ms = Some(now);
                r.fuel_used = Some(fuel);
                r.attempts = attempts;
                if let Some(t) = task {
                    r.task_id = Some(t.id);
                    r.host = t.host;
                    r.agent = t.agent;
                }
                if size > MAX_RUN_BYTES {
                    // Its task completed: it is undone in its place.
                    self.run.completed += 1;
                    let r = &mut self.run.steps[i];
                    r.completed_order = Some(self.run.completed);
                    let e = error(
                        "result-too-large",
                        format!(
                            "the run's record would be {size} bytes with this result, past the limit of {MAX_RUN_BYTES} bytes"
                        ),
                    );
                    r.status = StepStatus::Failed;
                    r.error = Some(e.clone());
                    self.fail(Some(&id), &e);
                } else {
                    self.run.completed += 1;
                    let r = &mut self.run.steps[i];
                    r.status = StepStatus::Completed;
                    r.result = Some(result);
                    r.completed_order = Some(self.run.completed);
                }
            }
            Outcome::Failed {
                error,
                task,
                attempts,
            } => {
                let r = &mut self.run.steps[i];
                r.status = StepStatus::Failed;
                r.ended_at_ms = Some(now);
                r.attempts = attempts;
                r.error = Some(error.clone());
                if let Some(t) = task {
                    r.task_id = Some(t.id);
                    r.host = t.host;
                    r.agent = t.agent;
                }
                self.fail(Some(&id), &error);
            }
        }
        Ok(())
    }

    /// The future of one step: its attempts, or its fan-out's elements.
    fn step(
        &self,
        i: usize,
        progress: mpsc::Sender<Progress>,
        started_here: bool,
    ) -> impl std::future::Future<Output = (usize, Outcome)> + Send + 'static {
        let tasks = self.shared.tasks.clone();
        let checked = &self.def.steps[i];
        // In a cluster only (on a lone host the journal checks keys
        // anyway): a step this driver starts, and that no driver before it
        // was found to have submitted (`key_used`), has an unused key.
        let spec = Spec {
            unused_until_ms: (started_here && !self.shared.store.exclusive())
                .then_some(self.run.lease_until_ms),
            ..self.spec(checked)
        };
        let concurrency = checked.step.concurrency.unwrap_or(10).max(1) as usize;
        let fan_out = checked.step.for_each.is_some();
        let input = self.run.steps[i].input.clone().unwrap_or(Value::Null);
        let key = format!("wf/{}/{}", self.run.id, checked.step.id);
        let stop = self.stop.clone();
        async move {
            if !fan_out {
                let report = move |attempt: u32, task: &str| {
                    let _ = progress.try_send(Progress {
                        step: i,
                        attempt,
                        task: task.to_string(),
                    });
                };
                return (
                    i,
                    attempts(&tasks, &spec, payload(&input), &key, &stop, report).await,
                );
            }
            let elements = match input {
                Value::Array(a) => a,
                other => vec![other],
            };
            (
                i,
                fan_out_elements(&tasks, &spec, elements, &key, concurrency, &stop).await,
            )
        }
    }

    /// Runs the compensations still to run, latest completed step first,
    /// one at a time.
    async fn compensate(&mut self) -> Result<(), Stop> {
        for i in self.undo_order() {
            let Some(record) = self.run.steps[i].compensation.clone() else {
                continue;
            };
            if matches!(
                record.status,
                CompensationStatus::Completed | CompensationStatus::Failed
            ) {
                continue;
            }
            let Some(c) = self.def.steps[i].compensation.clone() else {
                continue;
            };
            let step = &self.run.steps[i];
            let default = serde_json::json!({
                "input": step.input.clone().unwrap_or(Value::Null),
                "result": step.result.clone().unwrap_or(Value::Null),
            });
            let input = match &c.input {
                None => Ok(default),
                Some(template) => Scope {
                    input: step.input.as_ref().unwrap_or(&Value::Null),
                    run: &self.run,
                    index: &self.def.index,
                    item: None,
                    result: step.result.as_ref(),
                }
                .resolve(template),
            };
            let key = format!("wf/{}/{}/undo", self.run.id, step.id);
            let spec = Spec {
                capability: c.capability.clone(),
                priority: self.def.steps[i].step.priority,
                timeout: c.timeout,
                attempts: c.attempts,
                backoff: c.backoff,
                // Undoing is not cut short by the run's deadline.
                deadline_ms: None,
                trace: self.run.trace.clone(),
                unused_until_ms: None,
                fence: self.fence.clone(),
                forward: false,
                gate: self.gate.clone(),
            };
            self.set_compensation(i, |r| {
                r.status = CompensationStatus::Running;
                r.started_at_ms = Some(now_ms());
                r.attempts = r.attempts.max(1);
            });
            self.save().await?;
            let outcome = match input {
                Ok(input) => {
                    // Undoing is not cancelled; the lease is renewed while
                    // it runs, as while the steps run.
                    let (tasks, never) = (self.shared.tasks.clone(), CancellationToken::new());
                    let undo = async move {
                        attempts(&tasks, &spec, payload(&input), &key, &never, |_, _| {}).await
                    };
                    self.renewing(undo).await?
                }
                Err(e) => Outcome::Failed {
                    error: error("invalid-input", format!("compensate.input: {e}")),
                    task: None,
                    attempts: 0,
                },
            };
            match outcome {
                Outcome::Stopping { fenced } => return Err(Outcome::stop(fenced)),
                // Not for a compensation (`Spec::forward`).
                Outcome::NotStarted => return Err(Stop::Fenced),
                Outcome::Completed { task, attempts, .. } => self.set_compensation(i, |r| {
                    r.status = CompensationStatus::Completed;
                    r.attempts = attempts;
                    r.task_id = task.map(|t| t.id);
                    r.ended_at_ms = Some(now_ms());
                }),
                Outcome::Failed {
                    error,
                    task,
                    attempts,
                } => self.set_compensation(i, |r| {
                    r.status = CompensationStatus::Failed;
                    r.attempts = attempts;
                    r.task_id = task.map(|t| t.id);
                    r.error = Some(error);
                    r.ended_at_ms = Some(now_ms());
                }),
            }
            self.save().await?;
        }
        let (mut undone, mut not_undone, mut reasons) = (Vec::new(), Vec::new(), Vec::new());
        for s in &self.run.steps {
            let Some(c) = &s.compensation else { continue };
            match c.status {
                CompensationStatus::Completed => undone.push(s.id.as_str()),
                _ => not_undone.push(s.id.as_str()),
            }
            if let Some(e) = &c.error {
                reasons.push(format!("compensation of {}: {}", s.id, e.message));
            }
        }
        if not_undone.is_empty() {
            let status = if self.was_cancelled() {
                RunStatus::Cancelled
            } else {
                RunStatus::Compensated
            };
            self.finish(status);
        } else {
            let first = self.run.error.clone();
            // The lists first, then why each compensation failed, then what
            // started the undoing: a long message is cut from its end when
            // the record is written (`RunRecord::fit`), and the lists must
            // stay.
            reasons.extend(first.as_ref().map(|e| e.message.clone()));
            self.run.error = Some(RunError {
                step: first.and_then(|e| e.step),
                kind: "compensation-failed".into(),
                message: format!(
                    "undone: [{}]; not undone: [{}]; {}",
                    undone.join(", "),
                    not_undone.join(", "),
                    reasons.join("; "),
                ),
            });
            self.finish(RunStatus::CompensationFailed);
        }
        self.save().await
    }

    /// Runs `work` and, in a cluster, renews the run's lease while it runs.
    async fn renewing<T>(&mut self, work: impl std::future::Future<Output = T>) -> Result<T, Stop> {
        tokio::pin!(work);
        let mut renew = tokio::time::interval(LEASE / 3);
        renew.tick().await;
        loop {
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = renew.tick(), if !self.shared.store.exclusive() => {
                    self.dirty = true;
                    self.save().await?;
                }
            }
        }
    }

    fn set_compensation(&mut self, i: usize, f: impl FnOnce(&mut CompensationRecord)) {
        if let Some(r) = self.run.steps[i].compensation.as_mut() {
            f(r);
            self.dirty = true;
        }
    }
}

/// A fan-out: each element through its own attempts, at most
/// `concurrency` at once, results in element order. The first element that
/// fails fails the step; no element starts after it.
async fn fan_out_elements(
    tasks: &TaskService,
    spec: &Spec,
    elements: Vec<Value>,
    key: &str,
    concurrency: usize,
    stop: &CancellationToken,
) -> Outcome {
    let mut results = Vec::with_capacity(elements.len());
    let (mut fuel, mut most) = (0u64, 0u32);
    let mut stream = futures_util::stream::iter(elements.into_iter().enumerate())
        .map(|(n, input)| {
            let key = format!("{key}/{n}");
            async move {
                // As for an attempt: an element a driver before this one
                // submitted is waited for.
                if stop.is_cancelled() && !submitted_before(tasks, spec, &format!("{key}/1")).await
                {
                    let e = error(
                        "cancelled",
                        "the run was cancelled before this element started",
                    );
                    return (
                        n,
                        Outcome::Failed {
                            error: e,
                            task: None,
                            attempts: 0,
                        },
                    );
                }
                let outcome = attempts(tasks, spec, payload(&input), &key, stop, |_, _| {}).await;
                (n, outcome)
            }
        })
        .buffered(concurrency);
    while let Some((n, outcome)) = stream.next().await {
        match outcome {
            Outcome::Completed {
                result,
                fuel: f,
                attempts,
                ..
            } => {
                results.push(result);
                fuel += f;
                most = most.max(attempts);
            }
            Outcome::Failed {
                error: e, attempts, ..
            } => {
                // A fan-out has no task of its own (docs/api.md), and it
                // started: an element that never started has 0 attempts.
                return Outcome::Failed {
                    error: error(&e.kind, format!("element {n}: {}", e.message)),
                    task: None,
                    attempts: most.max(attempts).max(1),
                };
            }
            s @ Outcome::Stopping { .. } => return s,
            Outcome::NotStarted => {
                return Outcome::Failed {
                    error: error(
                        "cancelled",
                        format!("element {n}: the run was cancelled before this element started"),
                    ),
                    task: None,
                    attempts: most.max(1),
                };
            }
        }
    }
    Outcome::Completed {
        result: Value::Array(results),
        task: None,
        fuel,
        attempts: most,
    }
}

/// One step (or element, or compensation): its attempts, each a task with
/// its own idempotency key, with the backoff doubling between them. No
/// attempt starts after `stop` (a cancel), and no backoff outlasts the
/// run's deadline.
async fn attempts(
    tasks: &TaskService,
    spec: &Spec,
    payload: Vec<u8>,
    key: &str,
    stop: &CancellationToken,
    report: impl Fn(u32, &str),
) -> Outcome {
    let mut last: Option<(ErrorInfo, Option<TaskEnd>)> = None;
    let mut ran = 0;
    for attempt in 1..=spec.attempts {
        if attempt > 1 {
            let mut wait = spec.backoff.saturating_mul(1 << (attempt - 2).min(16));
            if let Some(d) = spec.deadline_ms {
                wait = wait.min(Duration::from_millis(d.saturating_sub(now_ms())));
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => {}
            }
            // No attempt starts after a cancel, but one that a driver
            // before this one submitted (before a crash, or a takeover) is
            // waited for: completed, it is undone like any other.
            if stop.is_cancelled()
                && !submitted_before(tasks, spec, &format!("{key}/{attempt}")).await
            {
                break;
            }
            // The run's deadline passed while the step waited to retry: the
            // step fails with it, and with what the attempt before said.
            if spec.deadline_ms.is_some_and(|d| now_ms() >= d)
                && !submitted_before(tasks, spec, &format!("{key}/{attempt}")).await
            {
                if let Some((e, _)) = &mut last {
                    *e = error(
                        "deadline-exceeded",
                        format!(
                            "the run's deadline passed before attempt {attempt}; attempt {}: {}",
                            attempt - 1,
                            e.message
                        ),
                    );
                }
                break;
            }
        }
        ran = attempt;
        let attempt_key = format!("{key}/{attempt}");
        // A driver paused past its lease may have been replaced: then its
        // key is looked up, as a resumed driver's is.
        let unused = attempt == 1 && spec.unused_until_ms.is_some_and(|t| now_ms() < t);
        match task(tasks, spec, payload.clone(), attempt_key, unused, |id| {
            report(attempt, id)
        })
        .await
        {
            Err(None) => return Outcome::Stopping { fenced: false },
            Err(Some(error)) if error.kind == "fenced" => {
                return Outcome::Stopping { fenced: true }
            }
            // No attempt starts after a cancel.
            Err(Some(error)) if error.kind == NOT_STARTED => {
                stop.cancel();
                if attempt == 1 {
                    return Outcome::NotStarted;
                }
                // Ends with the error of the attempt before, as after any
                // cancel; the driver then takes the cancel (`ended`).
                ran = attempt - 1;
                break;
            }
            Err(Some(error)) => {
                last = Some((error, None));
            }
            Ok(stored) => {
                let r = &stored.record;
                let end = TaskEnd {
                    id: r.id.clone(),
                    host: r.host.clone(),
                    agent: r.agent.clone(),
                };
                if r.status == Status::Completed {
                    return Outcome::Completed {
                        result: result_value(stored.result.as_deref().unwrap_or_default()),
                        task: Some(end),
                        fuel: r.fuel_used.unwrap_or(0) + r.subtask_fuel.unwrap_or(0),
                        attempts: attempt,
                    };
                }
                let e = r.error.clone().unwrap_or_else(|| {
                    error(
                        r.status.as_str(),
                        format!("the task ended {}", r.status.as_str()),
                    )
                });
                last = Some((e, Some(end)));
            }
        }
        // Past the run's deadline no attempt starts either, with the same
        // exception.
        if spec.deadline_ms.is_some_and(|d| now_ms() >= d)
            && !submitted_before(tasks, spec, &format!("{key}/{}", attempt + 1)).await
        {
            break;
        }
    }
    let (error, task) = last.unwrap_or_else(|| {
        (
            error(
                "cancelled",
                "the run was cancelled before the step's first attempt",
            ),
            None,
        )
    });
    Outcome::Failed {
        error,
        task,
        attempts: ran,
    }
}

/// Whether a task was submitted under `key` already (by a driver before
/// this one): `TaskStore::key_used`, which in a cluster finds the task on
/// the stream by its id, and reads from the leader. A failed look counts
/// as no.
async fn submitted_before(tasks: &TaskService, spec: &Spec, key: &str) -> bool {
    matches!(
        tasks.store().key_used(key, &spec.capability).await,
        Ok(true)
    )
}

/// How many times a submission refused for a reason of the host's own
/// (its journal, its data directory) is tried before the step fails.
const HOST_ERROR_TRIES: u32 = 10;

/// Submits one task (or finds the one its key was given to) and waits for
/// its end. `Err(None)`: the host is stopping; `Err(Some)`: the task could
/// not be submitted.
async fn task(
    tasks: &TaskService,
    spec: &Spec,
    payload: Vec<u8>,
    key: String,
    mut unused_key: bool,
    submitted: impl FnOnce(&str),
) -> Result<crate::service::Stored, Option<ErrorInfo>> {
    let mut pause = Duration::from_millis(50);
    let mut host_errors = 0;
    let mut renewals = 0;
    // A refusal may come after the task was accepted before a crash (the
    // deadline has passed since, or the agent is gone): then the task the
    // key names is the step's.
    let earlier = |refusal: ErrorInfo| async {
        match tasks.store().find_key(&key).await {
            Ok(Some(id)) => Ok(id),
            _ => Err(Some(refusal)),
        }
    };
    let (id, mut fresh) = loop {
        let left = spec.deadline_ms.map(|d| d.saturating_sub(now_ms()));
        if left == Some(0) {
            let id = earlier(error(
                "deadline-exceeded",
                "the run's deadline passed before the step started",
            ))
            .await?;
            break (id, false);
        }
        let deadline = match (spec.timeout, left.map(Duration::from_millis)) {
            (Some(t), Some(l)) => Some(t.min(l)),
            (t, l) => t.or(l),
        };
        let request = SubmitRequest {
            capability: spec.capability.clone(),
            payload: payload.clone(),
            priority: spec.priority,
            deadline,
            idempotency_key: Some(key.clone()),
            trace: spec.trace.clone(),
        };
        // A renewal of the fence found the run cancelled (below, or in
        // another step): no step's task is stored after that. One stored
        // before under this key (by a driver before this one, or by a try
        // whose answer was lost) is waited for, as after any cancel. A
        // failed look gives the run up (it is taken up again).
        let gate = match spec.forward {
            true => Some(spec.gate.read().await),
            false => None,
        };
        let closed = gate.as_deref() == Some(&true);
        if closed || spec.forward && spec.fence.as_ref().is_some_and(Fencing::cancelled) {
            let store = tasks.store();
            match store.key_used(&key, &spec.capability).await {
                // A lone host's journal maps the key to the task's id; in
                // a cluster the id is made from the key.
                Ok(true) => match store.find_key(&key).await {
                    Ok(Some(id)) => break (id, false),
                    _ => break (store.new_id(Some(&key)), false),
                },
                Ok(false) => return Err(Some(error(NOT_STARTED, "the run was cancelled"))),
                Err(e) => return Err(Some(error("fenced", e.to_string()))),
            }
        }
        // Only the first try: one that failed may have stored the task.
        let unused = std::mem::take(&mut unused_key);
        let fence = spec.fence.as_ref().map(Fencing::current);
        let submitted = tasks.submit_keyed(request, unused, fence.clone()).await;
        drop(gate);
        match submitted {
            Ok(s) => break (s.task.id, !s.existing),
            Err(HostError::ShuttingDown) => return Err(None),
            // Another driver took the run over, or a cancel raised the
            // fence: nothing was stored.
            Err(e @ HostError::Fenced(_)) => {
                let (Some(fencing), Some(refused)) = (&spec.fence, fence) else {
                    return Err(Some(error(e.kind(), e.to_string())));
                };
                renewals += 1;
                // A fence is raised once per cancel and per takeover: a
                // few renewals in a row mean something else. After one,
                // the loop's top sees a cancel it found.
                if renewals > 3 || !fencing.renew(&refused).await {
                    return Err(Some(error(e.kind(), e.to_string())));
                }
            }
            Err(HostError::UnknownCapability(c)) => {
                let id = earlier(error(
                    "unavailable",
                    format!("no agent provides capability {c}"),
                ))
                .await?;
                break (id, false);
            }
            Err(e @ (HostError::PayloadTooLarge { .. } | HostError::InvalidRequest(_))) => {
                return Err(Some(error(e.kind(), e.to_string())))
            }
            // Full, or the store is briefly away: the step waits.
            Err(
                e @ (HostError::NoCapacity { .. }
                | HostError::TooManyWaits { .. }
                | HostError::Unavailable { .. }),
            ) => {
                tracing::debug!(error = %e, key, "a workflow step's task waits to be accepted");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            // The host's own store failed: a few more tries, then the step
            // fails with that error.
            Err(e) => {
                host_errors += 1;
                if host_errors >= HOST_ERROR_TRIES {
                    return Err(Some(error(e.kind(), e.to_string())));
                }
                tracing::warn!(error = %e, key, "submitting a workflow step's task failed; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    };
    submitted(&id);
    loop {
        if tasks.host().is_stopping() {
            return Err(None);
        }
        match tasks
            .store()
            .wait(&id, Duration::from_secs(30), fresh)
            .await
        {
            Ok(stored) if stored.record.status.is_final() => return Ok(stored),
            Ok(_) => {}
            Err(HostError::NotFound(_)) => {
                return Err(Some(error(
                    "not-found",
                    format!("task {id} is no longer kept"),
                )))
            }
            Err(e) => {
                tracing::debug!(error = %e, task = %id, "waiting for a workflow step's task failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        fresh = false;
    }
}
