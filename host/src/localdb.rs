//! Opening the lone host's redb files with a bounded page cache.
//!
//! redb's default cache is 1 GiB per database, and it keeps every page read
//! or written until it is full: a lone host's RSS grew from 27 to 429 MiB
//! over 200,000 echo tasks (the journal's and the audit log's pages), and
//! would have grown to about 1 GiB per file. The pages in use are the
//! recent records and the upper levels of the B-trees; older ones are read
//! back from the file, which the kernel caches.

use std::path::Path;

use redb::{Database, DatabaseError};

/// The task journal's cache: its writer and its readers of recent tasks.
pub(crate) const JOURNAL_CACHE: usize = 64 << 20;

/// The cache of the audit log, the call log and the workflow store.
pub(crate) const SMALL_CACHE: usize = 16 << 20;

/// Opens (or creates) the database at `path` with `cache` bytes of cache.
pub(crate) fn open(path: &Path, cache: usize) -> Result<Database, DatabaseError> {
    Database::builder().set_cache_size(cache).create(path)
}

/// What a second process opening one of a home's files meets.
#[derive(Debug, thiserror::Error)]
#[error(
    "another process has it open: is a host already running on this home? (`orch status` finds it)"
)]
pub(crate) struct InUse;
