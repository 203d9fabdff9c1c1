//! The embedded key-value store behind the `kv` import: one redb file under
//! the data directory, with keys namespaced per agent. redb commits are
//! durable (fsync) and crash-safe, so a value set by a finished task survives
//! a host crash.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use redb::{Database, TableDefinition};

/// Keys are `(namespace, key)` so that one agent cannot name another's keys.
const TABLE: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");

#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    #[error("kv store at {path} cannot be opened: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("kv store at {path}: {reason}")]
    Storage { path: PathBuf, reason: String },
}

/// Handle to the store. The database file is opened on first use, so
/// commands and agents that never touch kv do not create or lock it.
pub struct KvStore {
    path: PathBuf,
    db: OnceLock<Result<Database, KvError>>,
}

impl KvStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        KvStore {
            path: path.into(),
            db: OnceLock::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<&Database, KvError> {
        self.db
            .get_or_init(|| {
                if let Some(parent) = self.path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| self.open_error(e))?;
                }
                Database::create(&self.path).map_err(|e| self.open_error(e))
            })
            .as_ref()
            .map_err(Clone::clone)
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

    pub fn set(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        self.write(|table| table.insert((namespace, key), value).map(|_| ()))
    }

    pub fn delete(&self, namespace: &str, key: &str) -> Result<(), KvError> {
        self.write(|table| table.remove((namespace, key)).map(|_| ()))
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<(&str, &str), &[u8]>) -> Result<(), redb::StorageError>,
    ) -> Result<(), KvError> {
        let txn = self
            .db()?
            .begin_write()
            .map_err(|e| self.storage_error(e))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| self.storage_error(e))?;
            f(&mut table).map_err(|e| self.storage_error(e))?;
        }
        txn.commit().map_err(|e| self.storage_error(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unused_store_creates_no_file() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/kv.redb");
        let _kv = KvStore::new(&path);
        assert!(!path.exists());
        Ok(())
    }
}
