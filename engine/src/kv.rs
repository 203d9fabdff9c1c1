//! The embedded key-value store behind the `kv` import: one redb file under
//! the data directory, with keys namespaced per agent. redb commits are
//! durable (fsync) and crash-safe, so a value set by a finished task survives
//! a host crash.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use redb::{Database, ReadableTable, TableDefinition};

/// Keys are `(namespace, key)` so that one agent cannot name another's keys.
const TABLE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");
/// Per namespace: (bytes of keys and values, number of keys), kept in the
/// same transaction as every write so that quotas are checked in O(1).
const USAGE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("kv_usage");

/// redb's page cache. Its default (1 GiB) let a task writing large values
/// push the host's memory far past any task's own limit.
const CACHE_SIZE: usize = 16 << 20;

/// How much one namespace may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// Bytes of keys and values together.
    pub max_bytes: u64,
    pub max_keys: u64,
}

impl Default for KvLimits {
    fn default() -> Self {
        KvLimits {
            max_bytes: 64 << 20,
            max_keys: 100_000,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    #[error("kv store at {path} cannot be opened: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("kv store at {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
    #[error(
        "kv quota: namespace {namespace} would hold {bytes} bytes, past its limit of {limit} bytes"
    )]
    BytesQuota {
        namespace: String,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "kv quota: namespace {namespace} would hold {keys} keys, past its limit of {limit} keys"
    )]
    KeysQuota {
        namespace: String,
        keys: u64,
        limit: u64,
    },
}

/// Handle to the store. The database file is opened on first use, so
/// commands and agents that never touch kv do not create or lock it. An
/// open that failed is tried again at the next use: the file may have been
/// held by another process for a while (`orch run` of a kv agent).
pub struct KvStore {
    path: PathBuf,
    limits: KvLimits,
    db: OnceLock<Database>,
    /// One open at a time.
    opening: std::sync::Mutex<()>,
}

impl KvStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        KvStore::with_limits(path, KvLimits::default())
    }

    pub fn with_limits(path: impl Into<PathBuf>, limits: KvLimits) -> Self {
        KvStore {
            path: path.into(),
            limits,
            db: OnceLock::new(),
            opening: std::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn limits(&self) -> KvLimits {
        self.limits
    }

    fn db(&self) -> Result<&Database, KvError> {
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let _one = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| self.open_error(e))?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE)
            .create(&self.path)
            .map_err(|e| match e {
                // What a user meets: `orch run` of a kv agent and a host
                // on the same home.
                redb::DatabaseError::DatabaseAlreadyOpen => self.open_error(
                    "another process has it open (a host running on this home: submit \
                     the task to it with `orch task submit`; or an `orch run` of a kv agent)",
                ),
                e => self.open_error(e),
            })?;
        Ok(self.db.get_or_init(|| db))
    }

    fn open_error(&self, e: impl std::fmt::Display) -> KvError {
        KvError::Open {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn storage_error(&self, e: impl std::fmt::Display) -> KvError {
        KvError::Storage {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    pub fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let txn = self.db()?.begin_read().map_err(|e| self.storage_error(e))?;
        let table = match txn.open_table(TABLE) {
            Ok(t) => t,
            // Nothing was ever written: every key is missing.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.storage_error(e)),
        };
        let value = table
            .get((namespace, key))
            .map_err(|e| self.storage_error(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Sets `key`; refused when the namespace would pass its quota.
    pub fn set(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.write(namespace, |table, (bytes, keys)| {
            let old = table
                .get((namespace, key))
                .map_err(|e| self.storage_error(e))?
                .map(|v| v.value().len() as u64);
            let entry = key.len() as u64 + value.len() as u64;
            let (bytes, keys) = match old {
                Some(old) => (bytes - (key.len() as u64 + old).min(bytes) + entry, keys),
                None => (bytes + entry, keys + 1),
            };
            if bytes > self.limits.max_bytes {
                return Err(KvError::BytesQuota {
                    namespace: namespace.to_string(),
                    bytes,
                    limit: self.limits.max_bytes,
                });
            }
            if keys > self.limits.max_keys {
                return Err(KvError::KeysQuota {
                    namespace: namespace.to_string(),
                    keys,
                    limit: self.limits.max_keys,
                });
            }
            table
                .insert((namespace, key), value)
                .map_err(|e| self.storage_error(e))?;
            Ok((bytes, keys))
        })
    }

    pub fn delete(&self, namespace: &str, key: &str) -> Result<(), KvError> {
        self.write(namespace, |table, (bytes, keys)| {
            let old = table
                .remove((namespace, key))
                .map_err(|e| self.storage_error(e))?
                .map(|v| v.value().len() as u64);
            Ok(match old {
                Some(old) => (
                    bytes.saturating_sub(key.len() as u64 + old),
                    keys.saturating_sub(1),
                ),
                None => (bytes, keys),
            })
        })
    }

    /// Bytes and keys a namespace holds.
    pub fn usage(&self, namespace: &str) -> Result<(u64, u64), KvError> {
        let mut usage = (0, 0);
        self.write(namespace, |_, u| {
            usage = u;
            Ok(u)
        })?;
        Ok(usage)
    }

    /// Deletes every key of a namespace (`orch plugin remove --purge`).
    /// Returns how many there were.
    pub fn delete_namespace(&self, namespace: &str) -> Result<u64, KvError> {
        let mut removed = 0;
        let end = after(namespace);
        self.write(namespace, |table, (_, keys)| {
            table
                .retain_in((namespace, "")..(end.as_str(), ""), |_, _| false)
                .map_err(|e| self.storage_error(e))?;
            removed = keys;
            Ok((0, 0))
        })?;
        Ok(removed)
    }

    /// One write transaction on `namespace`: `f` gets the table and the
    /// namespace's usage and returns the new usage, stored with the change.
    fn write(
        &self,
        namespace: &str,
        f: impl FnOnce(&mut redb::Table<(&str, &str), &[u8]>, (u64, u64)) -> Result<(u64, u64), KvError>,
    ) -> Result<(), KvError> {
        let txn = self
            .db()?
            .begin_write()
            .map_err(|e| self.storage_error(e))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| self.storage_error(e))?;
            let mut usage = txn.open_table(USAGE).map_err(|e| self.storage_error(e))?;
            let current = match usage.get(namespace).map_err(|e| self.storage_error(e))? {
                Some(u) => u.value(),
                // A store written before usage was kept: count once.
                None => {
                    let mut u = (0u64, 0u64);
                    let end = after(namespace);
                    for entry in table
                        .range((namespace, "")..(end.as_str(), ""))
                        .map_err(|e| self.storage_error(e))?
                    {
                        let (k, v) = entry.map_err(|e| self.storage_error(e))?;
                        u.0 += k.value().1.len() as u64 + v.value().len() as u64;
                        u.1 += 1;
                    }
                    u
                }
            };
            let next = f(&mut table, current)?;
            usage
                .insert(namespace, next)
                .map_err(|e| self.storage_error(e))?;
        }
        txn.commit().map_err(|e| self.storage_error(e))
    }
}

/// The smallest namespace that sorts after `namespace`: keys are ordered by
/// namespace first, so `(namespace, "")..(after(namespace), "")` holds
/// exactly the namespace's keys.
fn after(namespace: &str) -> String {
    format!("{namespace}\0")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// While another handle holds the file, use fails naming why; once it
    /// is let go, the next use opens it (the failure is not kept).
    #[test]
    fn a_store_held_elsewhere_fails_with_why_then_opens_once_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        let holder = KvStore::new(&path);
        holder.set("a", "k", b"1").unwrap();
        let kv = KvStore::new(&path);
        let err = kv.get("a", "k").unwrap_err().to_string();
        assert!(err.contains("another process has it open"), "{err}");
        drop(holder);
        assert_eq!(kv.get("a", "k").unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn namespaces_are_isolated_and_values_persist() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("kv.redb");
        {
            let kv = KvStore::new(&path);
            assert_eq!(kv.get("a", "k")?, None);
            kv.set("a", "k", b"1")?;
            kv.set("b", "k", b"2")?;
            assert_eq!(kv.get("a", "k")?, Some(b"1".to_vec()));
            assert_eq!(kv.get("b", "k")?, Some(b"2".to_vec()));
            kv.delete("a", "k")?;
            assert_eq!(kv.get("a", "k")?, None);
        }
        let reopened = KvStore::new(&path);
        assert_eq!(reopened.get("b", "k")?, Some(b"2".to_vec()));
        Ok(())
    }

    #[test]
    fn a_namespace_holds_up_to_its_byte_quota_and_no_more() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let limits = KvLimits {
            max_bytes: 100,
            max_keys: 1000,
        };
        let kv = KvStore::with_limits(dir.path().join("kv.redb"), limits);
        // "k1" + 48 bytes = 50, twice = 100: exactly the quota.
        kv.set("a", "k1", &[0; 48])?;
        kv.set("a", "k2", &[0; 48])?;
        assert_eq!(kv.usage("a")?, (100, 2));
        let err = kv.set("a", "k3", &[0; 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kv quota: namespace a would hold 103 bytes, past its limit of 100 bytes"
        );
        // Overwriting counts the new size, not both; another namespace has its own.
        kv.set("a", "k1", &[1; 48])?;
        kv.set("b", "k1", &[0; 98])?;
        kv.delete("a", "k2")?;
        assert_eq!(kv.usage("a")?, (50, 1));
        kv.set("a", "k3", &[0; 47])?;
        assert_eq!(kv.get("a", "k2")?, None);
        Ok(())
    }

    #[test]
    fn a_namespace_holds_up_to_its_key_quota_and_no_more() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let limits = KvLimits {
            max_bytes: 1 << 20,
            max_keys: 3,
        };
        let kv = KvStore::with_limits(dir.path().join("kv.redb"), limits);
        for k in ["x", "y", "z"] {
            kv.set("a", k, b"v")?;
        }
        let err = kv.set("a", "w", b"v").unwrap_err();
        assert!(
            matches!(
                err,
                KvError::KeysQuota {
                    keys: 4,
                    limit: 3,
                    ..
                }
            ),
            "{err}"
        );
        // Replacing a key adds none.
        kv.set("a", "x", b"other")?;
        Ok(())
    }

    #[test]
    fn deleting_a_namespace_leaves_its_neighbours() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let kv = KvStore::new(dir.path().join("kv.redb"));
        for ns in ["a", "a.b", "a-", "ab", "b"] {
            kv.set(ns, "k", b"1")?;
            kv.set(ns, "\u{10FFFF}", b"2")?;
        }
        assert_eq!(kv.delete_namespace("a")?, 2);
        assert_eq!(kv.get("a", "k")?, None);
        assert_eq!(kv.get("a", "\u{10FFFF}")?, None);
        assert_eq!(kv.usage("a")?, (0, 0));
        for ns in ["a.b", "a-", "ab", "b"] {
            assert_eq!(kv.get(ns, "k")?, Some(b"1".to_vec()), "{ns}");
            assert_eq!(kv.usage(ns)?.1, 2, "{ns}");
        }
        Ok(())
    }

    #[test]
    fn unused_store_creates_no_file() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/kv.redb");
        let _kv = KvStore::new(&path);
        assert!(!path.exists());
        Ok(())
    }
}
