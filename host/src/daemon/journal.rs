//! The host's durable task journal: one redb file (`tasks.redb` under the
//! data directory) holding every accepted task, its payload until it ends,
//! its result, and the idempotency keys. A task is in the journal, fsynced,
//! before `submit` answers, so a host killed at any moment finds it again on
//! restart.
//!
//! Writes go through one writer thread that commits whatever has queued up
//! in one transaction (group commit): under load, hundreds of submissions
//! share one fsync instead of paying one each. Results come one or two at
//! a time when tasks take a millisecond or more, so while tasks wait in the
//! scheduler's queues the writer holds a commit of results (and of nothing
//! else) back for up to `[host] commit_delay` after it took the first, to
//! write more of them with the same fsync.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// id → task record (JSON).
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// id → the task's payload while it is unfinished, then its result (if it
/// has one), behind a tag byte ([`PAYLOAD`], [`RESULT`]). One table, so
/// that a task's end replaces one entry instead of removing one and
/// inserting another in two tables: each table a commit touches costs it
/// copies of that table's B-tree pages.
const BODIES: TableDefinition<&str, &[u8]> = TableDefinition::new("bodies");
const PAYLOAD: u8 = b'p';
const RESULT: u8 = b'r';
/// Where payloads and results were kept before [`BODIES`]; moved into it
/// when a journal from then is opened.
const OLD_PAYLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("payloads");
const OLD_RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// idempotency key → id.
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency");
/// (status, id): the tasks in each stored status, newest last. The journal
/// stores `queued` and the final statuses; `running` is in memory.
const BY_STATUS: TableDefinition<(&str, &str), ()> = TableDefinition::new("by_status");
/// (capability, id).
const BY_CAPABILITY: TableDefinition<(&str, &str), ()> = TableDefinition::new("by_capability");
/// (finished_at_ms, id) of the ended tasks, for the retention sweep.
const BY_FINISH: TableDefinition<(u64, &str), ()> = TableDefinition::new("by_finish");
/// "index" → the version of the index tables; they are rebuilt from
/// `tasks` when it is not [`INDEX_VERSION`] (a journal from before them).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const INDEX_VERSION: u64 = 1;
/// Sorts after every character of a task id.
const ID_END: &str = "\u{10ffff}";

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

/// Whether tasks wait for a free instance: asked by the writer before it
/// holds a commit of results back.
pub type Backlog = Box<dyn Fn() -> bool + Send + Sync>;

/// How long a commit of results may wait for more, and when.
struct CommitDelay {
    max: std::time::Duration,
    backlog: Backlog,
}

/// Set once, after the scheduler exists (it is made after the journal);
/// shared by the journal's handle and its writer thread.
type Linger = std::sync::OnceLock<CommitDelay>;

/// A journal failure: what failed ([`JournalErrorKind`]), on which file,
/// with the underlying error as its source.
#[derive(Debug, Clone, thiserror::Error)]
#[error("task journal {}: {kind}{}", path.display(), source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
pub struct JournalError {
    pub path: PathBuf,
    pub kind: JournalErrorKind,
    #[source]
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JournalErrorKind {
    #[error("cannot open")]
    Open,
    #[error("cannot read")]
    Read,
    #[error("cannot write")]
    Write,
    #[error("a stored record does not decode")]
    Decode,
    #[error("the writer thread has stopped")]
    Stopped,
}

impl JournalError {
    fn new(
        path: &Path,
        kind: JournalErrorKind,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> JournalError {
        JournalError {
            path: path.to_path_buf(),
            kind,
            source: Some(Arc::new(source)),
        }
    }

    pub fn kind(&self) -> JournalErrorKind {
        self.kind
    }
}

/// What `commit` fails with: the kind and the cause, for every op of the
/// batch (hence shared).
type CommitError = (JournalErrorKind, Arc<dyn std::error::Error + Send + Sync>);

fn write_err(e: impl std::error::Error + Send + Sync + 'static) -> CommitError {
    (JournalErrorKind::Write, Arc::new(e))
}

/// Where a task is. `Queued` and `Running` are the live states; the others
/// are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Running,
    Completed,
    Failed,
    Dead,
    Cancelled,
}

impl Status {
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Dead => "dead",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "queued" => Status::Queued,
            "running" => Status::Running,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "dead" => Status::Dead,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// A stable name: `fuel-exhausted`, `trap`, `deadline-exceeded`, ...
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptInfo {
    pub agent: String,
    /// The host it ran on (set in a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub kind: String,
    pub message: String,
}

/// One task as stored. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub capability: String,
    pub status: Status,
    pub priority: i32,
    pub deadline_ms: Option<u64>,
    pub idempotency_key: Option<String>,
    pub submitted_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    pub attempts: u32,
    pub agent: Option<String>,
    /// The host that ran the last attempt (set in a cluster).
    #[serde(default)]
    pub host: Option<String>,
    pub error: Option<ErrorInfo>,
    /// Each failed attempt, in order.
    pub attempt_errors: Vec<AttemptInfo>,
    pub fuel_used: Option<u64>,
    pub subtask_fuel: Option<u64>,
    pub subtasks: Option<u32>,
    /// The `tasks.call` sub-tasks of the successful attempt.
    #[serde(default)]
    pub calls: Vec<crate::sandbox::CallReport>,
    pub payload_bytes: u64,
    /// Who the task belongs to and who submitted it. One tenant and no
    /// authentication yet: `default` and `anonymous`; the fields are here
    /// so that records need not change when those come.
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default = "anonymous")]
    pub principal: String,
    /// The task's trace context, a W3C `traceparent` (`crate::trace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

pub const DEFAULT_TENANT: &str = "default";
pub const ANONYMOUS: &str = "anonymous";

fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

fn anonymous() -> String {
    ANONYMOUS.to_string()
}

impl TaskRecord {
    /// Makes a deadline error that came at `now_ms` name the deadline the
    /// submitter gave. The scheduler measures it from its own submission
    /// (in a cluster, from the delivery: later still when the task waited
    /// on the stream or was retried); a figure far from the given one that
    /// came before the task's deadline was the agent's own timeout and
    /// stays.
    pub fn name_given_deadline(&self, error: &mut crate::error::TaskError, now_ms: u64) {
        if let (crate::error::TaskError::DeadlineExceeded { ms }, Some(deadline)) =
            (error, self.deadline_ms)
        {
            let given = deadline.saturating_sub(self.submitted_at_ms);
            // The scheduler's deadline is an Instant made from the wall
            // clock's milliseconds: it may come a millisecond early.
            if now_ms.saturating_add(1) >= deadline || ms.abs_diff(given) <= 100 {
                *ms = given;
            }
        }
    }

    /// A task just accepted: queued, no attempt yet.
    pub fn queued(
        id: String,
        capability: String,
        submitted_at_ms: u64,
        payload_bytes: u64,
    ) -> TaskRecord {
        TaskRecord {
            id,
            capability,
            status: Status::Queued,
            priority: 0,
            deadline_ms: None,
            idempotency_key: None,
            submitted_at_ms,
            finished_at_ms: None,
            attempts: 0,
            agent: None,
            host: None,
            error: None,
            attempt_errors: Vec::new(),
            fuel_used: None,
            subtask_fuel: None,
            subtasks: None,
            calls: Vec::new(),
            payload_bytes,
            tenant: default_tenant(),
            principal: anonymous(),
            trace: None,
        }
    }

    /// Ends the task now with `status` and `error`.
    pub fn end(&mut self, status: Status, error: &crate::error::TaskError) {
        self.status = status;
        self.finished_at_ms = Some(super::now_ms());
        self.error = Some(ErrorInfo {
            kind: error.kind().to_string(),
            message: error.to_string(),
        });
    }

    /// Fills in a successful attempt's agent and figures.
    pub fn complete(&mut self, agent: String, output: crate::sandbox::TaskOutput) -> Vec<u8> {
        self.status = Status::Completed;
        self.agent = Some(agent);
        self.fuel_used = Some(output.fuel_used);
        self.subtask_fuel = Some(output.subtask_fuel);
        self.subtasks = Some(output.subtasks);
        self.calls = output.calls;
        output.result
    }
}

/// What `accept` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// The task is new and now durable.
    New,
    /// A task with the same idempotency key exists; this is its id.
    Existing(String),
}

enum Op {
    Accept {
        record: TaskRecord,
        payload: Vec<u8>,
        reply: oneshot::Sender<Result<Accepted, JournalError>>,
    },
    Finish {
        record: TaskRecord,
        result: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
    Forget {
        ids: Vec<String>,
        reply: oneshot::Sender<Result<(), JournalError>>,
    },
}

pub struct Journal {
    path: PathBuf,
    db: Arc<Database>,
    /// `None` only while dropping.
    writer: Option<mpsc::Sender<Op>>,
    thread: Option<std::thread::JoinHandle<()>>,
    linger: Arc<Linger>,
}

impl Drop for Journal {
    /// Closes the channel and waits for the writer, so that the file is
    /// closed when the journal is gone (redb refuses a second open).
    fn drop(&mut self) {
        self.writer = None;
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

impl Journal {
    /// Opens (or creates) the journal and starts its writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        Journal::open_timed(path, None)
    }

    /// [`Journal::open`], telling `timed` how long each commit took.
    pub fn open_timed(path: &Path, timed: Option<CommitTimer>) -> Result<Journal, JournalError> {
        let open = |e: redb::Error| JournalError::new(path, JournalErrorKind::Open, e);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| JournalError::new(path, JournalErrorKind::Open, e))?;
        }
        let db = Arc::new(
            crate::localdb::open(path, crate::localdb::JOURNAL_CACHE).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    JournalError::new(path, JournalErrorKind::Open, crate::localdb::InUse)
                }
                e => open(e.into()),
            })?,
        );
        // Create the tables up front so that readers never meet a missing
        // one, and index a journal written before the indexes.
        let txn = db.begin_write().map_err(|e| open(e.into()))?;
        let built = prepare(&txn).map_err(|(kind, source)| JournalError {
            path: path.to_path_buf(),
            kind,
            source: Some(source),
        })?;
        txn.commit().map_err(|e| open(e.into()))?;
        if built > 0 {
            tracing::info!(tasks = built, "indexed the task journal");
        }
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer_path = path.to_path_buf();
        let linger = Arc::new(Linger::new());
        let writer_linger = linger.clone();
        let thread = std::thread::Builder::new()
            .name("orch-journal".into())
            .spawn(move || write_loop(&writer_db, &writer_path, rx, timed, &writer_linger))
            .map_err(|e| JournalError::new(path, JournalErrorKind::Open, e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            db,
            writer: Some(tx),
            thread: Some(thread),
            linger,
        })
    }

    /// From now on, while `backlog` says tasks wait, a commit holding only
    /// results (and retention's removals) waits up to `max` after its
    /// first write for more, unless a submission comes. A result is then
    /// visible, and durable, up to `max` later; a crash in between runs
    /// its task again, as a crash before any commit does. Zero, or a
    /// second call, changes nothing.
    pub fn delay_commits(&self, max: std::time::Duration, backlog: Backlog) {
        if !max.is_zero() {
            let _ = self.linger.set(CommitDelay { max, backlog });
        }
    }

    fn error(&self, e: impl Into<redb::Error>) -> JournalError {
        JournalError::new(&self.path, JournalErrorKind::Read, e.into())
    }

    fn decode_error(&self, e: serde_json::Error) -> JournalError {
        JournalError::new(&self.path, JournalErrorKind::Decode, e)
    }

    fn stopped(&self) -> JournalError {
        JournalError {
            path: self.path.clone(),
            kind: JournalErrorKind::Stopped,
            source: None,
        }
    }

    async fn send<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Op,
    ) -> Result<T, JournalError> {
        let (tx, rx) = oneshot::channel();
        let op = op(tx);
        let submission = !is_result(&op);
        self.writer
            .as_ref()
            .and_then(|w| w.send(op).ok())
            .ok_or_else(|| self.stopped())?;
        // A writer parked holding results back commits them with this at
        // once; one not parked keeps the token and loops once more.
        if submission && self.linger.get().is_some() {
            if let Some(thread) = &self.thread {
                thread.thread().unpark();
            }
        }
        rx.await.map_err(|_| self.stopped())?
    }

    /// Stores a new task and its payload; returns once they are on disk.
    /// With an idempotency key already in the journal, stores nothing and
    /// returns the existing task's id.
    pub async fn accept(
        &self,
        record: TaskRecord,
        payload: Vec<u8>,
    ) -> Result<Accepted, JournalError> {
        self.send(|reply| Op::Accept {
            record,
            payload,
            reply,
        })
        .await
    }

    /// Stores a task's final record and result and drops its payload.
    pub async fn finish(
        &self,
        record: TaskRecord,
        result: Option<Vec<u8>>,
    ) -> Result<(), JournalError> {
        self.send(|reply| Op::Finish {
            record,
            result,
            reply,
        })
        .await
    }

    /// Deletes tasks (record, payload, result, idempotency key).
    pub async fn forget(&self, ids: Vec<String>) -> Result<(), JournalError> {
        self.send(|reply| Op::Forget { ids, reply }).await
    }

    /// The task accepted under idempotency key `key`, if any.
    pub fn task_for_key(&self, key: &str) -> Result<Option<String>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(KEYS).map_err(|e| self.error(e))?;
        Ok(table
            .get(key)
            .map_err(|e| self.error(e))?
            .map(|v| v.value().to_string()))
    }

    pub fn get(&self, id: &str) -> Result<Option<TaskRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(TASKS).map_err(|e| self.error(e))?;
        let Some(value) = table.get(id).map_err(|e| self.error(e))? else {
            return Ok(None);
        };
        serde_json::from_slice(value.value())
            .map(Some)
            .map_err(|e| self.decode_error(e))
    }

    pub fn result(&self, id: &str) -> Result<Option<Vec<u8>>, JournalError> {
        self.body(id, RESULT)
    }

    pub fn payload(&self, id: &str) -> Result<Option<Vec<u8>>, JournalError> {
        self.body(id, PAYLOAD)
    }

    /// The task's body if it is of kind `tag`.
    fn body(&self, id: &str, tag: u8) -> Result<Option<Vec<u8>>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(BODIES).map_err(|e| self.error(e))?;
        let Some(value) = table.get(id).map_err(|e| self.error(e))? else {
            return Ok(None);
        };
        Ok(match value.value().split_first() {
            Some((t, body)) if *t == tag => Some(body.to_vec()),
            _ => None,
        })
    }

    /// Records newest first (ids sort by submission time), at most
    /// `limit`: those in `status` when given, else those of `capability`
    /// when given, else all; then filtered by `keep`. Each list is read
    /// from its index, never by a scan of every task.
    pub fn list(
        &self,
        status: Option<Status>,
        capability: Option<&str>,
        limit: usize,
        mut keep: impl FnMut(&TaskRecord) -> bool,
    ) -> Result<Vec<TaskRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let tasks = txn.open_table(TASKS).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        let mut take = |id: &str| -> Result<bool, JournalError> {
            if out.len() >= limit {
                return Ok(false);
            }
            if let Some(value) = tasks.get(id).map_err(|e| self.error(e))? {
                let record: TaskRecord =
                    serde_json::from_slice(value.value()).map_err(|e| self.decode_error(e))?;
                if keep(&record) {
                    out.push(record);
                }
            }
            Ok(true)
        };
        let by = match (status, capability) {
            (Some(s), _) => Some((BY_STATUS, s.as_str())),
            (None, Some(c)) => Some((BY_CAPABILITY, c)),
            (None, None) => None,
        };
        match by {
            Some((table, first)) => {
                let index = txn.open_table(table).map_err(|e| self.error(e))?;
                let range = index
                    .range((first, "")..=(first, ID_END))
                    .map_err(|e| self.error(e))?;
                for entry in range.rev() {
                    let (key, _) = entry.map_err(|e| self.error(e))?;
                    if !take(key.value().1)? {
                        break;
                    }
                }
            }
            None => {
                for entry in tasks.iter().map_err(|e| self.error(e))?.rev() {
                    let (key, _) = entry.map_err(|e| self.error(e))?;
                    if !take(key.value())? {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }

    /// Ids of the tasks that ended at or before `cutoff_ms`, oldest first,
    /// at most `limit`.
    pub fn ended_before(&self, cutoff_ms: u64, limit: usize) -> Result<Vec<String>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let index = txn.open_table(BY_FINISH).map_err(|e| self.error(e))?;
        let mut ids = Vec::new();
        for entry in index
            .range((0, "")..=(cutoff_ms, ID_END))
            .map_err(|e| self.error(e))?
        {
            if ids.len() >= limit {
                break;
            }
            let (key, _) = entry.map_err(|e| self.error(e))?;
            ids.push(key.value().1.to_string());
        }
        Ok(ids)
    }
}

/// Creates every table, moves payloads and results into [`BODIES`] and
/// builds the indexes when the journal has them elsewhere or none of this
/// version. Returns how many tasks were indexed.
fn prepare(txn: &redb::WriteTransaction) -> Result<usize, CommitError> {
    txn.open_table(BODIES).map_err(write_err)?;
    txn.open_table(KEYS).map_err(write_err)?;
    // Whenever the old tables are there, also after an older version
    // wrote to them again.
    let old = txn
        .list_tables()
        .map_err(write_err)?
        .any(|t| [OLD_PAYLOADS.name(), OLD_RESULTS.name()].contains(&t.name()));
    if old {
        move_bodies(txn)?;
    }
    let mut meta = txn.open_table(META).map_err(write_err)?;
    let tasks = txn.open_table(TASKS).map_err(write_err)?;
    let mut index = Indexes::open(txn)?;
    let version = meta.get("index").map_err(write_err)?.map(|v| v.value());
    if version == Some(INDEX_VERSION) {
        return Ok(0);
    }
    let mut n = 0;
    for entry in tasks.iter().map_err(write_err)? {
        let (_, value) = entry.map_err(write_err)?;
        // A record that does not decode is left out of the indexes (and so
        // of lists) rather than keeping the host from starting.
        match serde_json::from_slice::<TaskRecord>(value.value()) {
            Ok(record) => {
                index.insert(&record)?;
                n += 1;
            }
            Err(e) => tracing::warn!(error = %e, "a task record does not decode; not indexed"),
        }
    }
    meta.insert("index", INDEX_VERSION).map_err(write_err)?;
    Ok(n)
}

/// Moves the payloads and results of a journal from before [`BODIES`]
/// into it and drops their tables.
fn move_bodies(txn: &redb::WriteTransaction) -> Result<(), CommitError> {
    let mut bodies = txn.open_table(BODIES).map_err(write_err)?;
    for (old, tag) in [(OLD_PAYLOADS, PAYLOAD), (OLD_RESULTS, RESULT)] {
        let table = txn.open_table(old).map_err(write_err)?;
        for entry in table.iter().map_err(write_err)? {
            let (id, body) = entry.map_err(write_err)?;
            bodies
                .insert(id.value(), tagged(tag, body.value()).as_slice())
                .map_err(write_err)?;
        }
        drop(table);
        txn.delete_table(old).map_err(write_err)?;
    }
    Ok(())
}

fn tagged(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(body.len() + 1);
    v.push(tag);
    v.extend_from_slice(body);
    v
}

/// The fields of a stored record that its index entries and its
/// idempotency key come from: what a commit reads of the record it
/// replaces, without decoding the rest.
#[derive(Deserialize)]
struct Indexed {
    capability: String,
    status: Status,
    finished_at_ms: Option<u64>,
    idempotency_key: Option<String>,
}

impl Indexed {
    /// The `by_finish` entry of a record in `status`, if it has one.
    fn finish_key(status: Status, at: Option<u64>) -> Option<u64> {
        at.filter(|_| status.is_final())
    }
}

/// The index tables of one write transaction.
struct Indexes<'t> {
    status: redb::Table<'t, (&'static str, &'static str), ()>,
    capability: redb::Table<'t, (&'static str, &'static str), ()>,
    finish: redb::Table<'t, (u64, &'static str), ()>,
}

impl<'t> Indexes<'t> {
    fn open(txn: &'t redb::WriteTransaction) -> Result<Indexes<'t>, CommitError> {
        Ok(Indexes {
            status: txn.open_table(BY_STATUS).map_err(write_err)?,
            capability: txn.open_table(BY_CAPABILITY).map_err(write_err)?,
            finish: txn.open_table(BY_FINISH).map_err(write_err)?,
        })
    }

    fn insert(&mut self, r: &TaskRecord) -> Result<(), CommitError> {
        let id = r.id.as_str();
        self.status
            .insert((r.status.as_str(), id), ())
            .map_err(write_err)?;
        self.capability
            .insert((r.capability.as_str(), id), ())
            .map_err(write_err)?;
        if let Some(at) = Indexed::finish_key(r.status, r.finished_at_ms) {
            self.finish.insert((at, id), ()).map_err(write_err)?;
        }
        Ok(())
    }

    fn remove(&mut self, id: &str, r: &Indexed) -> Result<(), CommitError> {
        self.status
            .remove((r.status.as_str(), id))
            .map_err(write_err)?;
        self.capability
            .remove((r.capability.as_str(), id))
            .map_err(write_err)?;
        if let Some(at) = r.finished_at_ms {
            self.finish.remove((at, id)).map_err(write_err)?;
        }
        Ok(())
    }

    /// Moves the entries of the record `old` was to those of `new`,
    /// touching only the tables whose entry changes (a task's end changes
    /// its status and finish entries, never its capability's).
    fn update(&mut self, old: &Indexed, new: &TaskRecord) -> Result<(), CommitError> {
        let id = new.id.as_str();
        move_entry(
            &mut self.status,
            id,
            old.status.as_str(),
            new.status.as_str(),
        )?;
        move_entry(&mut self.capability, id, &old.capability, &new.capability)?;
        let was = Indexed::finish_key(old.status, old.finished_at_ms);
        let is = Indexed::finish_key(new.status, new.finished_at_ms);
        if was != is {
            if let Some(at) = old.finished_at_ms {
                self.finish.remove((at, id)).map_err(write_err)?;
            }
            if let Some(at) = is {
                self.finish.insert((at, id), ()).map_err(write_err)?;
            }
        }
        Ok(())
    }
}

/// Moves `id`'s entry in a `(key, id)` index from `old` to `new`, if they
/// differ.
fn move_entry(
    table: &mut redb::Table<'_, (&'static str, &'static str), ()>,
    id: &str,
    old: &str,
    new: &str,
) -> Result<(), CommitError> {
    if old != new {
        table.remove((old, id)).map_err(write_err)?;
        table.insert((new, id), ()).map_err(write_err)?;
    }
    Ok(())
}

/// A result (or retention's removal): what a commit may hold back.
fn is_result(op: &Op) -> bool {
    matches!(op, Op::Finish { .. } | Op::Forget { .. })
}

/// Told how long each journal commit took (the host's metrics).
pub type CommitTimer = Box<dyn Fn(std::time::Duration) + Send>;

fn write_loop(
    db: &Database,
    path: &Path,
    rx: mpsc::Receiver<Op>,
    timed: Option<CommitTimer>,
    linger: &Linger,
) {
    while let Ok(first) = rx.recv() {
        let first_at = std::time::Instant::now();
        let mut batch = vec![first];
        // Whether the batch has only results, and until when it waits for
        // more: decided when the channel is first found empty.
        let mut results_only = is_result(&batch[0]);
        let mut until: Option<std::time::Instant> = None;
        let mut decided = false;
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => {
                    results_only &= is_result(&op);
                    batch.push(op);
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if !results_only {
                break;
            }
            if !decided {
                decided = true;
                until = linger
                    .get()
                    .filter(|d| (d.backlog)())
                    .and_then(|d| first_at.checked_add(d.max));
            }
            let Some(left) = until
                .map(|u| u.saturating_duration_since(std::time::Instant::now()))
                .filter(|l| !l.is_zero())
            else {
                break;
            };
            // Parked rather than blocked on the channel, so that results
            // sent meanwhile do not wake the writer one by one (a wake-up
            // each cost more CPU than the commits saved); a submission
            // unparks it (`Journal::send`), and an early or spurious
            // wake-up loops back to here.
            std::thread::park_timeout(left);
        }
        let started = std::time::Instant::now();
        let outcome = commit(db, &batch);
        if let Some(timed) = &timed {
            timed(started.elapsed());
        }
        let outcome = outcome.map_err(|(kind, source)| JournalError {
            path: path.to_path_buf(),
            kind,
            source: Some(source),
        });
        match outcome {
            Ok(accepted) => {
                let mut accepted = accepted.into_iter();
                for op in batch {
                    match op {
                        Op::Accept { reply, .. } => {
                            let a = accepted.next().unwrap_or(Accepted::New);
                            let _ = reply.send(Ok(a));
                        }
                        Op::Finish { reply, .. } | Op::Forget { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "task journal commit failed");
                for op in batch {
                    match op {
                        Op::Accept { reply, .. } => {
                            let _ = reply.send(Err(e.clone()));
                        }
                        Op::Finish { reply, .. } | Op::Forget { reply, .. } => {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        }
    }
}

/// Applies a batch in one transaction. Returns, per accept in order, what
/// it did.
fn commit(db: &Database, batch: &[Op]) -> Result<Vec<Accepted>, CommitError> {
    let decode = |e: serde_json::Error| (JournalErrorKind::Decode, Arc::new(e) as _);
    let txn = db.begin_write().map_err(write_err)?;
    let mut accepted = Vec::new();
    {
        let mut tasks = txn.open_table(TASKS).map_err(write_err)?;
        let mut bodies = txn.open_table(BODIES).map_err(write_err)?;
        let mut keys = txn.open_table(KEYS).map_err(write_err)?;
        let mut index = Indexes::open(&txn)?;
        for op in batch {
            match op {
                Op::Accept {
                    record, payload, ..
                } => {
                    if let Some(key) = &record.idempotency_key {
                        let existing = keys
                            .get(key.as_str())
                            .map_err(write_err)?
                            .map(|v| v.value().to_string());
                        if let Some(id) = existing {
                            accepted.push(Accepted::Existing(id));
                            continue;
                        }
                        keys.insert(key.as_str(), record.id.as_str())
                            .map_err(write_err)?;
                    }
                    let json = serde_json::to_vec(record).map_err(decode)?;
                    tasks
                        .insert(record.id.as_str(), json.as_slice())
                        .map_err(write_err)?;
                    bodies
                        .insert(record.id.as_str(), tagged(PAYLOAD, payload).as_slice())
                        .map_err(write_err)?;
                    index.insert(record)?;
                    accepted.push(Accepted::New);
                }
                Op::Finish { record, result, .. } => {
                    let json = serde_json::to_vec(record).map_err(decode)?;
                    let old = tasks
                        .insert(record.id.as_str(), json.as_slice())
                        .map_err(write_err)?
                        .and_then(|v| serde_json::from_slice::<Indexed>(v.value()).ok());
                    match old {
                        Some(old) => index.update(&old, record)?,
                        None => index.insert(record)?,
                    }
                    match result {
                        Some(result) => bodies
                            .insert(record.id.as_str(), tagged(RESULT, result).as_slice())
                            .map(drop),
                        None => bodies.remove(record.id.as_str()).map(drop),
                    }
                    .map_err(write_err)?;
                }
                Op::Forget { ids, .. } => {
                    for id in ids {
                        let old = tasks
                            .remove(id.as_str())
                            .map_err(write_err)?
                            .and_then(|v| serde_json::from_slice::<Indexed>(v.value()).ok());
                        if let Some(old) = &old {
                            index.remove(id, old)?;
                            if let Some(key) = &old.idempotency_key {
                                keys.remove(key.as_str()).map_err(write_err)?;
                            }
                        }
                        bodies.remove(id.as_str()).map_err(write_err)?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(write_err)?;
    Ok(accepted)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(id: &str, key: Option<&str>) -> TaskRecord {
        TaskRecord {
            idempotency_key: key.map(String::from),
            ..TaskRecord::queued(id.into(), "echo".into(), 1, 2)
        }
    }

    #[tokio::test]
    async fn accept_finish_forget_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.redb");
        {
            let j = Journal::open(&path).unwrap();
            assert_eq!(
                j.accept(record("a", Some("k")), b"hi".to_vec())
                    .await
                    .unwrap(),
                Accepted::New
            );
            assert_eq!(
                j.accept(record("b", Some("k")), b"hi".to_vec())
                    .await
                    .unwrap(),
                Accepted::Existing("a".into())
            );
            assert!(j.get("b").unwrap().is_none());
            assert_eq!(j.payload("a").unwrap().unwrap(), b"hi");
            let mut done = record("a", Some("k"));
            done.status = Status::Completed;
            j.finish(done, Some(b"out".to_vec())).await.unwrap();
            assert!(j.payload("a").unwrap().is_none());
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.get("a").unwrap().unwrap().status, Status::Completed);
        assert_eq!(j.result("a").unwrap().unwrap(), b"out");
        j.forget(vec!["a".into()]).await.unwrap();
        assert!(j.get("a").unwrap().is_none());
        // The key is free again once its task is forgotten.
        assert_eq!(
            j.accept(record("c", Some("k")), Vec::new()).await.unwrap(),
            Accepted::New
        );
    }

    /// A journal that counts its commits, with a backlog the test sets.
    fn counted(
        dir: &Path,
        delay: std::time::Duration,
    ) -> (
        Journal,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let commits = Arc::new(AtomicUsize::new(0));
        let counter = commits.clone();
        let j = Journal::open_timed(
            &dir.join("tasks.redb"),
            Some(Box::new(move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
            })),
        )
        .unwrap();
        let backlog = Arc::new(AtomicBool::new(false));
        let probe = backlog.clone();
        j.delay_commits(delay, Box::new(move || probe.load(Ordering::SeqCst)));
        (j, commits, backlog)
    }

    /// Fails the test, instead of holding it, if `f` does not end soon.
    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(20), f)
            .await
            .unwrap()
    }

    fn done(id: &str) -> TaskRecord {
        TaskRecord {
            status: Status::Completed,
            finished_at_ms: Some(2),
            ..TaskRecord::queued(id.into(), "echo".into(), 1, 0)
        }
    }

    /// With no task waiting, a result is committed at once (a delay of a
    /// minute would hold the test); with tasks waiting, a submission ends
    /// the wait at once.
    #[tokio::test]
    async fn results_wait_for_more_only_while_tasks_wait_and_not_past_a_submission() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let minute = std::time::Duration::from_secs(60);
        let (j, commits, backlog) = counted(dir.path(), minute);
        within(j.finish(done("a"), None)).await.unwrap();
        assert_eq!(commits.swap(0, Ordering::SeqCst), 1);

        backlog.store(true, Ordering::SeqCst);
        // `join!` polls in order: the result is sent (and held) first.
        let (finished, accepted) = within(async {
            tokio::join!(
                j.finish(done("b"), None),
                j.accept(record("c", None), Vec::new())
            )
        })
        .await;
        finished.unwrap();
        assert_eq!(accepted.unwrap(), Accepted::New);
        assert_eq!(commits.swap(0, Ordering::SeqCst), 1);
        assert_eq!(j.get("b").unwrap().unwrap().status, Status::Completed);
    }

    /// Results under a backlog wait out the delay and go in one commit.
    #[tokio::test]
    async fn results_are_held_for_the_delay_and_committed_together() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let delay = std::time::Duration::from_millis(300);
        let (j, commits, backlog) = counted(dir.path(), delay);
        backlog.store(true, Ordering::SeqCst);
        let started = std::time::Instant::now();
        let (a, b) = tokio::join!(j.finish(done("a"), None), j.finish(done("b"), None));
        a.unwrap();
        b.unwrap();
        assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
        assert_eq!(commits.load(Ordering::SeqCst), 1);
        assert_eq!(j.get("a").unwrap().unwrap().status, Status::Completed);
    }

    fn ids(records: Vec<TaskRecord>) -> Vec<String> {
        records.into_iter().map(|r| r.id).collect()
    }

    async fn finish(j: &Journal, id: &str, capability: &str, status: Status, at: u64) {
        let record = TaskRecord {
            status,
            finished_at_ms: Some(at),
            ..TaskRecord::queued(id.into(), capability.into(), 1, 0)
        };
        j.finish(record, None).await.unwrap();
    }

    /// Lists come from the indexes: by status, by capability, both, and
    /// newest first; the retention sweep finds ended tasks by end time.
    #[tokio::test]
    async fn lists_and_expiry_read_the_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("tasks.redb")).unwrap();
        for (id, capability) in [("t1", "echo"), ("t2", "wc"), ("t3", "echo"), ("t4", "echo")] {
            let r = TaskRecord::queued(id.into(), capability.into(), 1, 0);
            j.accept(r, Vec::new()).await.unwrap();
        }
        finish(&j, "t1", "echo", Status::Completed, 100).await;
        finish(&j, "t2", "wc", Status::Completed, 200).await;
        finish(&j, "t3", "echo", Status::Failed, 300).await;
        let all = |_: &TaskRecord| true;
        assert_eq!(
            ids(j.list(Some(Status::Completed), None, 10, all).unwrap()),
            ["t2", "t1"]
        );
        assert_eq!(
            ids(j.list(None, Some("echo"), 10, all).unwrap()),
            ["t4", "t3", "t1"]
        );
        assert_eq!(
            ids(j.list(Some(Status::Queued), None, 10, all).unwrap()),
            ["t4"]
        );
        assert_eq!(
            ids(j
                .list(Some(Status::Completed), Some("echo"), 10, |r| r.capability
                    == "echo")
                .unwrap()),
            ["t1"]
        );
        assert_eq!(ids(j.list(None, None, 2, all).unwrap()), ["t4", "t3"]);
        // At the cutoff included, past it not.
        assert_eq!(j.ended_before(200, 10).unwrap(), ["t1", "t2"]);
        assert_eq!(j.ended_before(199, 10).unwrap(), ["t1"]);
        j.forget(vec!["t1".into(), "t2".into()]).await.unwrap();
        assert_eq!(j.ended_before(1000, 10).unwrap(), ["t3"]);
        assert!(j
            .list(Some(Status::Completed), None, 10, all)
            .unwrap()
            .is_empty());
    }

    /// A journal from before the bodies table keeps its payloads and
    /// results: they are moved into it when it is opened, and the old
    /// tables go.
    #[tokio::test]
    async fn payloads_and_results_of_an_older_journal_are_moved_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.redb");
        {
            let j = Journal::open(&path).unwrap();
            j.accept(record("queued", None), Vec::new()).await.unwrap();
            j.accept(record("done", None), Vec::new()).await.unwrap();
            finish(&j, "done", "echo", Status::Completed, 100).await;
        }
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(BODIES).unwrap();
            txn.open_table(OLD_PAYLOADS)
                .unwrap()
                .insert("queued", b"in".as_slice())
                .unwrap();
            txn.open_table(OLD_RESULTS)
                .unwrap()
                .insert("done", b"out".as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.payload("queued").unwrap().unwrap(), b"in");
        assert_eq!(j.result("queued").unwrap(), None);
        assert_eq!(j.result("done").unwrap().unwrap(), b"out");
        assert_eq!(j.payload("done").unwrap(), None);
        drop(j);
        let db = Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        assert!(txn.open_table(OLD_PAYLOADS).is_err());
        assert!(txn.open_table(OLD_RESULTS).is_err());
    }

    /// A task that ends without a result keeps neither payload nor result.
    #[tokio::test]
    async fn an_end_without_a_result_drops_the_payload() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("tasks.redb")).unwrap();
        j.accept(record("a", None), b"in".to_vec()).await.unwrap();
        let mut failed = record("a", None);
        failed.status = Status::Failed;
        j.finish(failed, None).await.unwrap();
        assert_eq!(j.payload("a").unwrap(), None);
        assert_eq!(j.result("a").unwrap(), None);
        assert_eq!(j.get("a").unwrap().unwrap().status, Status::Failed);
    }

    /// A journal written before the indexes (no `meta` entry) is indexed
    /// when it is opened.
    #[tokio::test]
    async fn a_journal_without_indexes_is_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tasks.redb");
        {
            let j = Journal::open(&path).unwrap();
            j.accept(
                TaskRecord::queued("t1".into(), "echo".into(), 1, 0),
                Vec::new(),
            )
            .await
            .unwrap();
            finish(&j, "t1", "echo", Status::Completed, 100).await;
        }
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.delete_table(BY_STATUS).unwrap();
            txn.delete_table(BY_CAPABILITY).unwrap();
            txn.delete_table(BY_FINISH).unwrap();
            txn.delete_table(META).unwrap();
            txn.commit().unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let all = |_: &TaskRecord| true;
        assert_eq!(
            ids(j.list(Some(Status::Completed), None, 10, all).unwrap()),
            ["t1"]
        );
        assert_eq!(j.ended_before(100, 10).unwrap(), ["t1"]);
    }
}
