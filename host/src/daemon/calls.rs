//! A lone host's record of durable agents' calls (`scheduler::calls`):
//! `$ORCH_HOME/calls.redb`, one row per call, each written (and fsynced)
//! before the caller gets the outcome. Rows older than `[host] retention`
//! are dropped when the host starts and every hour.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};

use crate::scheduler::calls::{CallLog, CallRecord, LogFuture};

const CALLS: TableDefinition<&str, &[u8]> = TableDefinition::new("calls");

pub struct LocalCallLog {
    db: Arc<Database>,
}

fn text(e: impl std::fmt::Display) -> String {
    format!("calls.redb: {e}")
}

impl LocalCallLog {
    pub fn open(path: &Path, retention: Duration) -> Result<LocalCallLog, String> {
        let db = crate::localdb::open(path, crate::localdb::SMALL_CACHE).map_err(text)?;
        let txn = db.begin_write().map_err(text)?;
        txn.open_table(CALLS).map_err(text)?;
        txn.commit().map_err(text)?;
        let log = LocalCallLog { db: Arc::new(db) };
        let db = Arc::downgrade(&log.db);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            loop {
                every.tick().await;
                let Some(db) = db.upgrade() else { return };
                let keep = retention.as_millis() as u64;
                let swept = tokio::task::spawn_blocking(move || sweep(&db, keep)).await;
                if let Ok(Err(e)) = swept {
                    tracing::warn!(error = %e, "dropping old call records failed");
                }
            }
        });
        Ok(log)
    }
}

/// Drops the records older than `keep` ms.
fn sweep(db: &Database, keep: u64) -> Result<(), String> {
    let cutoff = crate::daemon::now_ms().saturating_sub(keep);
    let txn = db.begin_write().map_err(text)?;
    {
        let mut t = txn.open_table(CALLS).map_err(text)?;
        let old: Vec<String> = t
            .iter()
            .map_err(text)?
            .filter_map(|e| e.ok())
            .filter(|(_, v)| {
                serde_json::from_slice::<CallRecord>(v.value()).map_or(true, |r| r.at_ms < cutoff)
            })
            .map(|(k, _)| k.value().to_string())
            .collect();
        for k in old {
            t.remove(k.as_str()).map_err(text)?;
        }
    }
    txn.commit().map_err(text)
}

impl CallLog for LocalCallLog {
    fn get<'a>(&'a self, key: &'a str) -> LogFuture<'a, Option<CallRecord>> {
        let (db, key) = (self.db.clone(), key.to_string());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_read().map_err(text)?;
                let t = txn.open_table(CALLS).map_err(text)?;
                let found = t.get(key.as_str()).map_err(text)?;
                found
                    .map(|v| serde_json::from_slice(v.value()).map_err(text))
                    .transpose()
            })
            .await
            .map_err(text)?
        })
    }

    fn put<'a>(&'a self, key: &'a str, record: &'a CallRecord) -> LogFuture<'a, ()> {
        let (db, key) = (self.db.clone(), key.to_string());
        let value = serde_json::to_vec(record).map_err(text);
        Box::pin(async move {
            let value = value?;
            tokio::task::spawn_blocking(move || {
                let txn = db.begin_write().map_err(text)?;
                {
                    let mut t = txn.open_table(CALLS).map_err(text)?;
                    // The first outcome of a call stays.
                    if t.get(key.as_str()).map_err(text)?.is_none() {
                        t.insert(key.as_str(), value.as_slice()).map_err(text)?;
                    }
                }
                txn.commit().map_err(text)
            })
            .await
            .map_err(text)?
        })
    }
}
