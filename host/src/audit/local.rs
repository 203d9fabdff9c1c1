//! A lone host's audit trail: `$ORCH_HOME/audit.redb`, one row per entry
//! keyed by its `seq` (one host writes this file, so one chain).

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::mpsc;

use super::{AuditError, AuditStore, Entry, Raw};
use crate::service::BoxFuture;

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");

pub struct LocalAudit {
    db: Arc<Database>,
    max_entries: u64,
}

fn err(what: &str) -> impl Fn(redb::Error) -> AuditError + '_ {
    move |e| AuditError::new(format!("audit.redb: {what}"), e)
}

impl LocalAudit {
    /// Keeps at most `max_entries` (the oldest go first).
    pub fn open(path: &Path, max_entries: u64) -> Result<LocalAudit, AuditError> {
        let db = crate::localdb::open(path, crate::localdb::SMALL_CACHE)
            .map_err(|e| err("opening")(e.into()))?;
        let txn = db.begin_write().map_err(|e| err("opening")(e.into()))?;
        txn.open_table(ENTRIES)
            .map_err(|e| err("opening")(e.into()))?;
        txn.commit().map_err(|e| err("opening")(e.into()))?;
        Ok(LocalAudit {
            db: Arc::new(db),
            max_entries,
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AuditError> + Send + 'static,
) -> Result<T, AuditError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AuditError::new("audit.redb", e))?
}

impl AuditStore for LocalAudit {
    fn head<'a>(&'a self, _host: &'a str) -> BoxFuture<'a, Result<Option<Entry>, AuditError>> {
        let db = self.db.clone();
        Box::pin(blocking(move || {
            let e = err("reading");
            let txn = db.begin_read().map_err(|x| e(x.into()))?;
            let t = txn.open_table(ENTRIES).map_err(|x| e(x.into()))?;
            let Some((_, v)) = t.last().map_err(|x| e(x.into()))? else {
                return Ok(None);
            };
            serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|x| AuditError::damaged("audit.redb: the last entry", x))
        }))
    }

    fn append(&self, entries: Vec<Entry>) -> BoxFuture<'_, Result<(), AuditError>> {
        let db = self.db.clone();
        Box::pin(blocking(move || {
            let e = err("writing");
            let txn = db.begin_write().map_err(|x| e(x.into()))?;
            {
                let mut t = txn.open_table(ENTRIES).map_err(|x| e(x.into()))?;
                for entry in &entries {
                    let bytes = serde_json::to_vec(entry)
                        .map_err(|x| AuditError::new("encoding an entry", x))?;
                    t.insert(entry.seq, bytes.as_slice())
                        .map_err(|x| e(x.into()))?;
                }
            }
            txn.commit().map_err(|x| e(x.into()))
        }))
    }

    fn scan(&self, since_ms: u64) -> mpsc::Receiver<Result<Raw, AuditError>> {
        let (tx, rx) = mpsc::channel(256);
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let e = err("reading");
            let read = || -> Result<(), AuditError> {
                let txn = db.begin_read().map_err(|x| e(x.into()))?;
                let t = txn.open_table(ENTRIES).map_err(|x| e(x.into()))?;
                for row in t.iter().map_err(|x| e(x.into()))? {
                    let (k, v) = row.map_err(|x| e(x.into()))?;
                    // Entries are in time order: skip the older ones cheaply.
                    if since_ms > 0 {
                        if let Ok(entry) = serde_json::from_slice::<Entry>(v.value()) {
                            if entry.at_ms < since_ms {
                                continue;
                            }
                        }
                    }
                    let raw = Raw {
                        position: k.value(),
                        bytes: v.value().to_vec(),
                    };
                    if tx.blocking_send(Ok(raw)).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            };
            if let Err(x) = read() {
                let _ = tx.blocking_send(Err(x));
            }
        });
        rx
    }

    fn prune(&self, cutoff_ms: u64) -> BoxFuture<'_, Result<u64, AuditError>> {
        let (db, max) = (self.db.clone(), self.max_entries);
        Box::pin(blocking(move || {
            let e = err("pruning");
            // Read first: most prunes find nothing old and need no commit.
            let old: Vec<u64> = {
                let txn = db.begin_read().map_err(|x| e(x.into()))?;
                let t = txn.open_table(ENTRIES).map_err(|x| e(x.into()))?;
                // Past the count, the oldest go whatever their age.
                let over = t.len().map_err(|x| e(x.into()))?.saturating_sub(max);
                let mut old = Vec::new();
                for row in t.iter().map_err(|x| e(x.into()))? {
                    let (k, v) = row.map_err(|x| e(x.into()))?;
                    if (old.len() as u64) < over {
                        old.push(k.value());
                        continue;
                    }
                    match serde_json::from_slice::<Entry>(v.value()) {
                        Ok(entry) if entry.at_ms < cutoff_ms => old.push(k.value()),
                        // Kept: newer, or damaged (verify must see it).
                        _ => break,
                    }
                    if old.len() >= 100_000 && (old.len() as u64) >= over {
                        break;
                    }
                }
                old
            };
            if old.is_empty() {
                return Ok(0);
            }
            let txn = db.begin_write().map_err(|x| e(x.into()))?;
            {
                let mut t = txn.open_table(ENTRIES).map_err(|x| e(x.into()))?;
                for k in &old {
                    t.remove(k).map_err(|x| e(x.into()))?;
                }
            }
            txn.commit().map_err(|x| e(x.into()))?;
            Ok(old.len() as u64)
        }))
    }
}
