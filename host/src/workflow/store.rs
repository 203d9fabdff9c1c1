//! Where definitions and runs are kept: a redb file on a lone host,
//! JetStream KV buckets in a cluster (`cluster::workflows`). A run is one
//! document, replaced whole at each checkpoint with a compare-and-set on its
//! revision, so a host that lost a run to another cannot write it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::def::Definition;
use super::record::RunRecord;
use super::WorkflowError;
use crate::service::BoxFuture;

/// A registered definition: what was written, and when it was stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Registered {
    pub definition: Definition,
    pub registered_at_ms: u64,
}

pub trait WorkflowStore: Send + Sync {
    /// Whether this host is the only one that drives runs (a lone host):
    /// then a restarted host takes every running run at once, and leases
    /// are not renewed.
    fn exclusive(&self) -> bool;
    /// Stores a definition; `false` when that name and version exist.
    fn register<'a>(&'a self, def: &'a Registered) -> BoxFuture<'a, Result<bool, WorkflowError>>;
    fn definitions(&self) -> BoxFuture<'_, Result<Vec<Registered>, WorkflowError>>;
    /// One version of a definition.
    fn definition<'a>(
        &'a self,
        name: &'a str,
        version: u32,
    ) -> BoxFuture<'a, Result<Option<Registered>, WorkflowError>>;
    /// A name's highest registered version.
    fn latest_version<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<u32>, WorkflowError>>;
    /// Stores a new run; its revision, or `None` when a run with its id
    /// exists (a scheduled run another host started first).
    fn create_run<'a>(
        &'a self,
        run: &'a RunRecord,
    ) -> BoxFuture<'a, Result<Option<u64>, WorkflowError>>;
    /// A run and its revision.
    fn run<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(RunRecord, u64)>, WorkflowError>>;
    /// [`WorkflowStore::run`], certain to see every write that was
    /// acknowledged before it (in a cluster, read from the stream's
    /// leader, not a replica that may lag).
    fn run_latest<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(RunRecord, u64)>, WorkflowError>> {
        self.run(id)
    }
    /// Replaces a run if its revision is still `rev`: the new revision, or
    /// `None` when someone else wrote it since.
    fn update_run<'a>(
        &'a self,
        run: &'a RunRecord,
        rev: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, WorkflowError>>;
    /// Every run kept.
    fn runs(&self) -> BoxFuture<'_, Result<Vec<(RunRecord, u64)>, WorkflowError>>;
    fn delete_run<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), WorkflowError>>;
}

const DEFINITIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("definitions");
/// Run id → 8-byte big-endian revision, then the run as JSON.
const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");

/// A redb error, boxed: redb's is large, and every call returns one.
#[derive(Debug)]
struct DbError(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for DbError {
    fn from(e: E) -> DbError {
        DbError(Box::new(e.into()))
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

fn corrupt(what: &str) -> DbError {
    DbError::from(redb::Error::Corrupted(format!("{what} is damaged")))
}

/// A lone host's store: `$ORCH_HOME/workflows.redb`. Every write commits
/// (and fsyncs) before it returns, on the blocking pool.
pub struct LocalStore {
    db: Arc<Database>,
    path: PathBuf,
}

fn def_key(name: &str, version: u32) -> String {
    // Zero-padded so that a name's versions sort in order.
    format!("{name}\0{version:010}")
}

impl LocalStore {
    pub fn open(path: &Path) -> Result<LocalStore, WorkflowError> {
        let err = |e: DbError| WorkflowError::store(format!("{}", path.display()), e);
        let db =
            crate::localdb::open(path, crate::localdb::SMALL_CACHE).map_err(|e| err(e.into()))?;
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(DEFINITIONS).map_err(|e| err(e.into()))?;
        txn.open_table(RUNS).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(LocalStore {
            db: Arc::new(db),
            path: path.to_path_buf(),
        })
    }

    /// Runs `f` with the database on the blocking pool: commits fsync.
    fn blocking<'a, T: Send + 'static>(
        &'a self,
        f: impl FnOnce(&Database) -> Result<T, DbError> + Send + 'static,
    ) -> BoxFuture<'a, Result<T, WorkflowError>> {
        let db = self.db.clone();
        let what = self.path.display().to_string();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .map_err(|e| WorkflowError::store(what.clone(), e))?
                .map_err(|e| WorkflowError::store(what, e))
        })
    }
}

fn encode(run: &RunRecord, rev: u64) -> Vec<u8> {
    let mut out = rev.to_be_bytes().to_vec();
    // A record of plain data always serializes.
    out.extend(serde_json::to_vec(run).unwrap_or_default());
    out
}

/// A record's revision, without decoding the rest (a write compares it).
fn revision(bytes: &[u8]) -> Result<u64, DbError> {
    let rev = bytes
        .first_chunk::<8>()
        .ok_or_else(|| corrupt("a workflow run record"))?;
    Ok(u64::from_be_bytes(*rev))
}

fn decode(bytes: &[u8]) -> Result<(RunRecord, u64), DbError> {
    let corrupt = || corrupt("a workflow run record");
    let rev = revision(bytes)?;
    let json = bytes.get(8..).ok_or_else(corrupt)?;
    let run = serde_json::from_slice(json).map_err(|e| {
        DbError::from(redb::Error::Corrupted(format!(
            "a workflow run record is damaged: {e}"
        )))
    })?;
    Ok((run, rev))
}

impl WorkflowStore for LocalStore {
    fn exclusive(&self) -> bool {
        true
    }

    fn register<'a>(&'a self, def: &'a Registered) -> BoxFuture<'a, Result<bool, WorkflowError>> {
        let key = def_key(&def.definition.name, def.definition.version);
        let value = serde_json::to_vec(def).unwrap_or_default();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let created = {
                let mut t = txn.open_table(DEFINITIONS)?;
                if t.get(key.as_str())?.is_some() {
                    false
                } else {
                    t.insert(key.as_str(), value.as_slice())?;
                    true
                }
            };
            txn.commit()?;
            Ok(created)
        })
    }

    fn definitions(&self) -> BoxFuture<'_, Result<Vec<Registered>, WorkflowError>> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(DEFINITIONS)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (_, v) = entry?;
                out.push(
                    serde_json::from_slice(v.value())
                        .map_err(|_| corrupt("a workflow definition"))?,
                );
            }
            Ok(out)
        })
    }

    fn definition<'a>(
        &'a self,
        name: &'a str,
        version: u32,
    ) -> BoxFuture<'a, Result<Option<Registered>, WorkflowError>> {
        let key = def_key(name, version);
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(DEFINITIONS)?;
            let found = t.get(key.as_str())?;
            found
                .map(|v| {
                    serde_json::from_slice(v.value()).map_err(|_| corrupt("a workflow definition"))
                })
                .transpose()
        })
    }

    fn latest_version<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<u32>, WorkflowError>> {
        // A name's keys are `name\0` and a zero-padded version: the last
        // key of that range is the highest version.
        let (from, to) = (format!("{name}\0"), format!("{name}\u{1}"));
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(DEFINITIONS)?;
            let last = t
                .range(from.as_str()..to.as_str())?
                .next_back()
                .transpose()?;
            Ok(last.and_then(|(k, _)| k.value().rsplit('\0').next()?.parse().ok()))
        })
    }

    fn create_run<'a>(
        &'a self,
        run: &'a RunRecord,
    ) -> BoxFuture<'a, Result<Option<u64>, WorkflowError>> {
        let (id, value) = (run.id.clone(), encode(run, 1));
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let created = {
                let mut t = txn.open_table(RUNS)?;
                if t.get(id.as_str())?.is_some() {
                    false
                } else {
                    t.insert(id.as_str(), value.as_slice())?;
                    true
                }
            };
            txn.commit()?;
            Ok(created.then_some(1))
        })
    }

    fn run<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(RunRecord, u64)>, WorkflowError>> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(RUNS)?;
            let found = t.get(id.as_str())?;
            found.map(|v| decode(v.value())).transpose()
        })
    }

    fn update_run<'a>(
        &'a self,
        run: &'a RunRecord,
        rev: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, WorkflowError>> {
        let (id, value) = (run.id.clone(), encode(run, rev + 1));
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            let written = {
                let mut t = txn.open_table(RUNS)?;
                let now = match t.get(id.as_str())? {
                    Some(v) => Some(revision(v.value())?),
                    None => None,
                };
                if now == Some(rev) {
                    t.insert(id.as_str(), value.as_slice())?;
                    Some(rev + 1)
                } else {
                    None
                }
            };
            txn.commit()?;
            Ok(written)
        })
    }

    fn runs(&self) -> BoxFuture<'_, Result<Vec<(RunRecord, u64)>, WorkflowError>> {
        self.blocking(|db| {
            let txn = db.begin_read()?;
            let t = txn.open_table(RUNS)?;
            let mut out = Vec::new();
            for entry in t.iter()? {
                let (k, v) = entry?;
                // One damaged record must not hide the others (or stop the
                // scan and retention for good).
                match decode(v.value()) {
                    Ok(run) => out.push(run),
                    Err(e) => tracing::error!(run = k.value(), error = %e, "skipping a workflow run record that does not decode"),
                }
            }
            Ok(out)
        })
    }

    fn delete_run<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), WorkflowError>> {
        let id = id.to_string();
        self.blocking(move |db| {
            let txn = db.begin_write()?;
            txn.open_table(RUNS)?.remove(id.as_str())?;
            txn.commit()?;
            Ok(())
        })
    }
}
