//! The host's durable task journal: one redb file (`tasks.redb` under the
//! data directory) holding every accepted task, its payload until it ends,
//! its result, and the idempotency keys. A task is in the journal, fsynced,
//! before `submit` answers, so a host killed at any moment finds it again on
//! restart.
//!
//! Writes go through one writer thread that commits whatever has queued up
//! in one transaction (group commit): under load, hundreds of submissions
//! share one fsync instead of paying one each.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// id → task record (JSON).
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
/// id → payload; removed when the task ends.
const PAYLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("payloads");
/// id → result bytes.
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
/// idempotency key → id.
const KEYS: TableDefinition<&str, &str> = TableDefinition::new("idempotency");

/// Most writes committed in one transaction.
const MAX_BATCH: usize = 512;

#[derive(Debug, Clone, thiserror::Error)]
#[error("task journal {path}: {reason}")]
pub struct JournalError {
    pub path: PathBuf,
    pub reason: String,
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
    /// Makes a deadline error name the deadline the submitter gave. The
    /// scheduler measures it from its own submission, a few ms later; a
    /// figure far from the given one was the agent's own timeout and stays.
    pub fn name_given_deadline(&self, error: &mut crate::error::TaskError) {
        if let (crate::error::TaskError::DeadlineExceeded { ms }, Some(deadline)) =
            (error, self.deadline_ms)
        {
            let given = deadline.saturating_sub(self.submitted_at_ms);
            if ms.abs_diff(given) <= 100 {
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
        }
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
}

impl Drop for Journal {
    /// Closes the channel and waits for the writer, so that the file is
    /// closed when the journal is gone (redb refuses a second open).
    fn drop(&mut self) {
        self.writer = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Journal {
    /// Opens (or creates) the journal and starts its writer thread.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let err = |e: &dyn std::fmt::Display| JournalError {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(&e))?;
        }
        let db = Arc::new(Database::create(path).map_err(|e| err(&e))?);
        // Create the tables up front so that readers never meet a missing one.
        let txn = db.begin_write().map_err(|e| err(&e))?;
        txn.open_table(TASKS).map_err(|e| err(&e))?;
        txn.open_table(PAYLOADS).map_err(|e| err(&e))?;
        txn.open_table(RESULTS).map_err(|e| err(&e))?;
        txn.open_table(KEYS).map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))?;
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("orch-journal".into())
            .spawn(move || write_loop(&writer_db, &writer_path, rx))
            .map_err(|e| err(&e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            db,
            writer: Some(tx),
            thread: Some(thread),
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> JournalError {
        JournalError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    async fn send<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, JournalError>>) -> Op,
    ) -> Result<T, JournalError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .as_ref()
            .and_then(|w| w.send(op(tx)).ok())
            .ok_or_else(|| self.error("the writer thread has stopped"))?;
        rx.await
            .map_err(|_| self.error("the writer thread has stopped"))?
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
            .map_err(|e| self.error(format!("record {id}: {e}")))
    }

    pub fn result(&self, id: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(RESULTS).map_err(|e| self.error(e))?;
        Ok(table
            .get(id)
            .map_err(|e| self.error(e))?
            .map(|v| v.value().to_vec()))
    }

    pub fn payload(&self, id: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(PAYLOADS).map_err(|e| self.error(e))?;
        Ok(table
            .get(id)
            .map_err(|e| self.error(e))?
            .map(|v| v.value().to_vec()))
    }

    /// Records in id order (ids sort by submission time), newest first,
    /// those matching `keep`, at most `limit`.
    pub fn list(
        &self,
        limit: usize,
        mut keep: impl FnMut(&TaskRecord) -> bool,
    ) -> Result<Vec<TaskRecord>, JournalError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(TASKS).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))?.rev() {
            if out.len() >= limit {
                break;
            }
            let (_, value) = entry.map_err(|e| self.error(e))?;
            let record: TaskRecord =
                serde_json::from_slice(value.value()).map_err(|e| self.error(e))?;
            if keep(&record) {
                out.push(record);
            }
        }
        Ok(out)
    }
}

fn write_loop(db: &Database, path: &Path, rx: mpsc::Receiver<Op>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let outcome = commit(db, &batch).map_err(|reason| JournalError {
            path: path.to_path_buf(),
            reason,
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
fn commit(db: &Database, batch: &[Op]) -> Result<Vec<Accepted>, String> {
    let s = |e: &dyn std::fmt::Display| e.to_string();
    let txn = db.begin_write().map_err(|e| s(&e))?;
    let mut accepted = Vec::new();
    {
        let mut tasks = txn.open_table(TASKS).map_err(|e| s(&e))?;
        let mut payloads = txn.open_table(PAYLOADS).map_err(|e| s(&e))?;
        let mut results = txn.open_table(RESULTS).map_err(|e| s(&e))?;
        let mut keys = txn.open_table(KEYS).map_err(|e| s(&e))?;
        for op in batch {
            match op {
                Op::Accept {
                    record, payload, ..
                } => {
                    if let Some(key) = &record.idempotency_key {
                        let existing = keys
                            .get(key.as_str())
                            .map_err(|e| s(&e))?
                            .map(|v| v.value().to_string());
                        if let Some(id) = existing {
                            accepted.push(Accepted::Existing(id));
                            continue;
                        }
                        keys.insert(key.as_str(), record.id.as_str())
                            .map_err(|e| s(&e))?;
                    }
                    let json = serde_json::to_vec(record).map_err(|e| s(&e))?;
                    tasks
                        .insert(record.id.as_str(), json.as_slice())
                        .map_err(|e| s(&e))?;
                    payloads
                        .insert(record.id.as_str(), payload.as_slice())
                        .map_err(|e| s(&e))?;
                    accepted.push(Accepted::New);
                }
                Op::Finish { record, result, .. } => {
                    let json = serde_json::to_vec(record).map_err(|e| s(&e))?;
                    tasks
                        .insert(record.id.as_str(), json.as_slice())
                        .map_err(|e| s(&e))?;
                    payloads.remove(record.id.as_str()).map_err(|e| s(&e))?;
                    if let Some(result) = result {
                        results
                            .insert(record.id.as_str(), result.as_slice())
                            .map_err(|e| s(&e))?;
                    }
                }
                Op::Forget { ids, .. } => {
                    for id in ids {
                        let key = tasks
                            .remove(id.as_str())
                            .map_err(|e| s(&e))?
                            .and_then(|v| serde_json::from_slice::<TaskRecord>(v.value()).ok())
                            .and_then(|r| r.idempotency_key);
                        if let Some(key) = key {
                            keys.remove(key.as_str()).map_err(|e| s(&e))?;
                        }
                        payloads.remove(id.as_str()).map_err(|e| s(&e))?;
                        results.remove(id.as_str()).map_err(|e| s(&e))?;
                    }
                }
            }
        }
    }
    txn.commit().map_err(|e| s(&e))?;
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
}
