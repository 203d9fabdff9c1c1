//! The audit trail: an append-only record of what changed the system and
//! who asked (`docs/operations.md#audit-trail`). Each host writes its own
//! chain: entry `seq` n carries the sha256 of entry n-1 (`prev`) and its
//! own (`hash`, over every other field), so an edited entry no longer
//! matches its hash and a removed one leaves a gap in `seq` and a `prev`
//! that matches nothing. A lone host keeps its chain in
//! `$ORCH_HOME/audit.redb` (`local`); in a cluster every host appends to the
//! JetStream stream `ORCH_AUDIT` (`cluster::audit`), one subject per host.
//!
//! Recording never waits: [`Audit::record`] puts the entry on a bounded
//! channel and one writer task chains and stores entries in batches (one
//! redb commit, or one wait for the stream's acks, per batch). If the store
//! falls [`BACKLOG`] entries behind, further entries are dropped and
//! counted (`orch_audit_dropped_total`) rather than slowing tasks down.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::daemon::now_ms;
use crate::service::BoxFuture;

pub mod local;

/// Entries waiting for the writer, at most.
pub const BACKLOG: usize = 65_536;

/// Entries chained and stored in one batch, at most.
const BATCH: usize = 1024;

/// `prev` of a chain's first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an entry records. The strings are stable (`docs/operations.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    PluginInstall,
    PluginUpgrade,
    PluginRollback,
    PluginRemove,
    /// A host started, with its configuration.
    HostStart,
    TaskSubmit,
    TaskCancel,
    WorkflowRegister,
    WorkflowStart,
    WorkflowCancel,
    /// A request the API refused (an error answer to a POST).
    RequestRefused,
    /// A message an agent published.
    MessagePublish,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::PluginInstall,
        Kind::PluginUpgrade,
        Kind::PluginRollback,
        Kind::PluginRemove,
        Kind::HostStart,
        Kind::TaskSubmit,
        Kind::TaskCancel,
        Kind::WorkflowRegister,
        Kind::WorkflowStart,
        Kind::WorkflowCancel,
        Kind::RequestRefused,
        Kind::MessagePublish,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::PluginInstall => "plugin.install",
            Kind::PluginUpgrade => "plugin.upgrade",
            Kind::PluginRollback => "plugin.rollback",
            Kind::PluginRemove => "plugin.remove",
            Kind::HostStart => "host.start",
            Kind::TaskSubmit => "task.submit",
            Kind::TaskCancel => "task.cancel",
            Kind::WorkflowRegister => "workflow.register",
            Kind::WorkflowStart => "workflow.start",
            Kind::WorkflowCancel => "workflow.cancel",
            Kind::RequestRefused => "request.refused",
            Kind::MessagePublish => "message.publish",
        }
    }
}

/// One entry as stored. Field names are stable (`docs/operations.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// The host whose chain this entry is in.
    pub host: String,
    /// Position in the host's chain, from 1.
    pub seq: u64,
    pub at_ms: u64,
    pub kind: String,
    /// Who asked: the API client's address, `uid:N user:NAME` for the CLI
    /// on the host's machine, `agent:NAME` for an agent, or what
    /// started a workflow run (`schedule:NAME`, `subject:S`).
    pub by: String,
    /// What the entry is about (ids, names, sizes); the keys depend on
    /// the kind.
    pub detail: Value,
    /// `hash` of the previous entry in the chain; [`GENESIS`] for the first.
    pub prev: String,
    /// sha256 (hex) of this entry's other fields, as JSON in this order.
    pub hash: String,
}

impl Entry {
    /// The hash this entry should have.
    pub fn digest(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            host: &'a str,
            seq: u64,
            at_ms: u64,
            kind: &'a str,
            by: &'a str,
            detail: &'a Value,
            prev: &'a str,
        }
        let body = Body {
            host: &self.host,
            seq: self.seq,
            at_ms: self.at_ms,
            kind: &self.kind,
            by: &self.by,
            detail: &self.detail,
            prev: &self.prev,
        };
        // Serializing plain fields and a JSON value cannot fail.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }
}

/// An error of the audit store, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("audit trail: {what}: {source}")]
pub struct AuditError {
    pub what: String,
    /// A stored entry that does not decode, not a store that failed.
    pub damaged: bool,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl AuditError {
    pub fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> AuditError {
        AuditError {
            what: what.into(),
            damaged: false,
            source: source.into(),
        }
    }

    /// An entry that does not decode.
    pub fn damaged(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> AuditError {
        AuditError {
            damaged: true,
            ..AuditError::new(what, source)
        }
    }
}

/// One stored item as read back: where it is (the redb key, or the stream
/// sequence) and its bytes, which verification parses itself so that a
/// damaged item is reported, not skipped.
pub struct Raw {
    pub position: u64,
    pub bytes: Vec<u8>,
}

/// Where a host's entries go: a redb file, or the cluster's stream.
pub trait AuditStore: Send + Sync {
    /// The last stored entry of `host`'s chain.
    fn head<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Option<Entry>, AuditError>>;
    /// Stores entries, in order, all or (on error) possibly some.
    fn append(&self, entries: Vec<Entry>) -> BoxFuture<'_, Result<(), AuditError>>;
    /// Every stored item from `since_ms` on, oldest first, through a
    /// bounded channel (the reader sets the pace).
    fn scan(&self, since_ms: u64) -> mpsc::Receiver<Result<Raw, AuditError>>;
    /// Drops entries older than `cutoff_ms` (a lone host's retention; the
    /// stream ages out entries itself).
    fn prune(&self, cutoff_ms: u64) -> BoxFuture<'_, Result<u64, AuditError>>;
}

struct Draft {
    at_ms: u64,
    kind: Kind,
    by: String,
    detail: Value,
}

enum Msg {
    Entry(Draft),
    /// Answered once everything sent before it is stored.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Entries the writer holds apart for the kinds no client or guest can
/// cause at will (plugin changes, host starts): a flood of the others
/// never crowds them out.
const RESERVED: usize = 1024;

impl Kind {
    /// Recorded through the reserved channel.
    fn reserved(self) -> bool {
        matches!(
            self,
            Kind::PluginInstall
                | Kind::PluginUpgrade
                | Kind::PluginRollback
                | Kind::PluginRemove
                | Kind::HostStart
        )
    }
}

/// The last entry the writer stored.
#[derive(Clone)]
struct Written {
    seq: u64,
    hash: String,
    at_ms: u64,
}

struct Channels {
    entries: mpsc::Receiver<Msg>,
    reserved: mpsc::Receiver<Msg>,
}

/// A host's handle on its audit trail; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    host: Arc<str>,
    tx: mpsc::Sender<Msg>,
    reserved: mpsc::Sender<Msg>,
    rx: Arc<Mutex<Option<Channels>>>,
    written: Arc<Mutex<Option<Written>>>,
    store: Arc<Mutex<Option<Arc<dyn AuditStore>>>>,
    retention: Arc<Mutex<Duration>>,
    metrics: Arc<crate::metrics::Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Audit {
    /// A trail that holds entries until [`Audit::start`] gives it a store.
    pub fn new(host: &str, metrics: Arc<crate::metrics::Metrics>) -> Audit {
        let (tx, entries) = mpsc::channel(BACKLOG);
        let (reserved, reserved_rx) = mpsc::channel(RESERVED);
        Audit {
            host: Arc::from(host),
            tx,
            reserved,
            rx: Arc::new(Mutex::new(Some(Channels {
                entries,
                reserved: reserved_rx,
            }))),
            written: Arc::new(Mutex::new(None)),
            store: Arc::new(Mutex::new(None)),
            retention: Arc::new(Mutex::new(Duration::MAX)),
            metrics,
        }
    }

    /// Starts the writer on `store`: it continues this host's chain from
    /// the store's last entry, and drops entries older than `retention`.
    /// A last entry that cannot be read (damaged) is logged, and the chain
    /// starts again after it (`verify` reports the damage). A second call
    /// does nothing.
    pub async fn start(
        &self,
        store: Arc<dyn AuditStore>,
        retention: Duration,
    ) -> Result<(), AuditError> {
        let Some(channels) = lock(&self.rx).take() else {
            return Ok(());
        };
        let head = match store.head(&self.host).await {
            Ok(head) => head.map(|e| Written {
                seq: e.seq,
                hash: e.hash,
                at_ms: e.at_ms,
            }),
            Err(e) if e.damaged => {
                tracing::error!(error = %e, "the last audit entry of this host cannot be read; its chain starts again");
                None
            }
            Err(e) => return Err(e),
        };
        *lock(&self.written) = head.clone();
        *lock(&self.store) = Some(store.clone());
        *lock(&self.retention) = retention;
        tokio::spawn(write(
            self.host.clone(),
            channels,
            store,
            head,
            self.written.clone(),
            retention,
            self.metrics.clone(),
        ));
        Ok(())
    }

    /// Records an entry; never waits (see the module's note on drops).
    pub fn record(&self, kind: Kind, by: &str, detail: Value) {
        let draft = Msg::Entry(Draft {
            at_ms: now_ms(),
            kind,
            by: by.to_string(),
            detail,
        });
        let tx = if kind.reserved() {
            &self.reserved
        } else {
            &self.tx
        };
        if tx.try_send(draft).is_err() {
            self.metrics.audit_dropped();
            // One line per 1,000 drops, not one per drop.
            if self.metrics.audit_dropped_count() % 1000 == 1 {
                tracing::warn!(
                    kind = kind.as_str(),
                    "audit entries dropped: the audit store is {BACKLOG} entries behind"
                );
            }
        }
    }

    /// Waits (at most `timeout`) until every entry recorded before this
    /// call is stored: at the end of a graceful stop.
    pub async fn flush(&self, timeout: Duration) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        let both = async {
            if self.reserved.send(Msg::Flush(rtx)).await.is_ok() {
                let _ = rrx.await;
            }
            if self.tx.send(Msg::Flush(tx)).await.is_ok() {
                let _ = rx.await;
            }
        };
        if tokio::time::timeout(timeout, both).await.is_err() {
            tracing::warn!("audit entries not yet stored at the stop are lost");
        }
    }

    fn store(&self) -> Result<Arc<dyn AuditStore>, AuditError> {
        lock(&self.store)
            .clone()
            .ok_or_else(|| AuditError::new("reading", "the audit trail has not started"))
    }

    /// The last `limit` entries at or after `since_ms` whose kind starts
    /// with `kind`, oldest first. Items that do not parse are skipped here
    /// (`verify` reports them).
    pub async fn list(
        &self,
        since_ms: u64,
        kind: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Entry>, AuditError> {
        // Nothing is stored in the future; a time past any clock is now.
        let since_ms = since_ms.min(now_ms() + 1);
        let mut rx = self.store()?.scan(since_ms);
        let mut kept = VecDeque::with_capacity(limit.min(1024));
        while let Some(raw) = rx.recv().await {
            let Ok(entry) = serde_json::from_slice::<Entry>(&raw?.bytes) else {
                continue;
            };
            if entry.at_ms < since_ms || kind.is_some_and(|k| !entry.kind.starts_with(k)) {
                continue;
            }
            if kept.len() == limit {
                kept.pop_front();
            }
            if limit > 0 {
                kept.push_back(entry);
            }
        }
        Ok(kept.into())
    }

    /// Checks every stored chain (see [`Check`]); for this host's chain
    /// also that nothing it wrote before the check began is missing at the
    /// end (unless retention has dropped it since).
    pub async fn verify(&self) -> Result<Verdict, AuditError> {
        let written = lock(&self.written).clone();
        let retention = *lock(&self.retention);
        let mut rx = self.store()?.scan(0);
        let mut check = Check::default();
        while let Some(raw) = rx.recv().await {
            if check.push(raw?) {
                break;
            }
        }
        let mut verdict = check.finish();
        let kept_from =
            now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        if let (None, Some(w)) = (&verdict.bad, written) {
            let last = verdict.chains.get(self.host.as_ref());
            // A margin of a second: retention drops entries a little late,
            // never early.
            if last.is_none_or(|c| c.last_seq < w.seq) && w.at_ms >= kept_from + 1000 {
                let have = last.map_or(0, |c| c.last_seq);
                verdict.ok = false;
                verdict.bad = Some(Bad {
                    position: None,
                    host: Some(self.host.to_string()),
                    seq: Some(have + 1),
                    reason: format!(
                        "entries {} to {} of this host's chain are missing: it wrote them (the last with hash {})",
                        have + 1,
                        w.seq,
                        w.hash
                    ),
                    entry: None,
                });
            }
        }
        Ok(verdict)
    }
}

/// The writer: chains drafts and stores them in batches, in order, the
/// reserved kinds first.
async fn write(
    host: Arc<str>,
    mut channels: Channels,
    store: Arc<dyn AuditStore>,
    mut head: Option<Written>,
    written: Arc<Mutex<Option<Written>>>,
    retention: Duration,
    metrics: Arc<crate::metrics::Metrics>,
) {
    // Often enough that a short retention is kept to within a quarter of it.
    let mut prune = tokio::time::interval(
        (retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(60)),
    );
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut urgent, mut rest) = (Vec::new(), Vec::with_capacity(BATCH));
    loop {
        tokio::select! {
            biased;
            n = channels.reserved.recv_many(&mut urgent, BATCH) => if n == 0 { return },
            n = channels.entries.recv_many(&mut rest, BATCH) => if n == 0 { return },
            _ = prune.tick() => {
                let cutoff = now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
                if let Err(e) = store.prune(cutoff).await {
                    tracing::warn!(error = %e, "dropping old audit entries failed");
                }
                continue;
            }
        }
        let (mut seq, mut prev) = head
            .as_ref()
            .map_or((0, GENESIS.to_string()), |w| (w.seq, w.hash.clone()));
        let mut flushes = Vec::new();
        let mut last_at = head.as_ref().map_or(0, |w| w.at_ms);
        let entries: Vec<Entry> = urgent
            .drain(..)
            .chain(rest.drain(..))
            .filter_map(|m| match m {
                Msg::Flush(done) => {
                    flushes.push(done);
                    None
                }
                Msg::Entry(d) => Some(d),
            })
            .map(|d| {
                seq += 1;
                last_at = d.at_ms;
                let mut entry = Entry {
                    host: host.to_string(),
                    seq,
                    at_ms: d.at_ms,
                    kind: d.kind.as_str().to_string(),
                    by: d.by,
                    detail: d.detail,
                    prev: std::mem::take(&mut prev),
                    hash: String::new(),
                };
                entry.hash = entry.digest();
                prev = entry.hash.clone();
                entry
            })
            .collect();
        let n = entries.len() as u64;
        // A failed batch is tried again whole (the chain must not skip
        // it), with growing pauses; meanwhile new entries wait in the
        // channel. A store that kept part of it drops the repeats (the
        // stream by message id, redb by key).
        let mut pause = Duration::from_millis(100);
        if n > 0 {
            while let Err(e) = store.append(entries.clone()).await {
                tracing::warn!(error = %e, entries = n, "storing audit entries failed; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
            }
            metrics.audit_written(n);
            head = Some(Written {
                seq,
                hash: prev,
                at_ms: last_at,
            });
            *lock(&written) = head.clone();
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

/// What verification found.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub ok: bool,
    /// Entries checked.
    pub entries: u64,
    /// Each host's chain as far as it was checked.
    pub chains: BTreeMap<String, Chain>,
    /// The first entry that breaks a chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad: Option<Bad>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Chain {
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bad {
    /// Where it is stored (the redb key, or the stream sequence).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub reason: String,
    /// The entry as stored, when it parses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<Entry>,
}

/// Chain checking over stored items in store order. A chain may begin at
/// any `seq` (older entries aged out), but from its first entry on every
/// entry must be the next `seq`, name the previous entry's hash as `prev`,
/// and hash to its `hash`.
#[derive(Default)]
pub struct Check {
    entries: u64,
    chains: BTreeMap<String, Chain>,
    bad: Option<Bad>,
}

impl Check {
    /// Checks one item; `true` once the first bad one is found.
    pub fn push(&mut self, raw: Raw) -> bool {
        if self.bad.is_some() {
            return true;
        }
        let entry = match serde_json::from_slice::<Entry>(&raw.bytes) {
            Ok(e) => e,
            Err(e) => {
                self.bad = Some(Bad {
                    position: Some(raw.position),
                    host: None,
                    seq: None,
                    reason: format!("not an audit entry: {e}"),
                    entry: None,
                });
                return true;
            }
        };
        let bad = |reason: String, entry: &Entry| {
            Some(Bad {
                position: Some(raw.position),
                host: Some(entry.host.clone()),
                seq: Some(entry.seq),
                reason,
                entry: Some(entry.clone()),
            })
        };
        let digest = entry.digest();
        if digest != entry.hash {
            self.bad = bad(
                format!(
                    "altered: its fields hash to {digest}, not to its hash {}",
                    entry.hash
                ),
                &entry,
            );
            return true;
        }
        match self.chains.get_mut(&entry.host) {
            None => {
                if entry.seq == 1 && entry.prev != GENESIS {
                    self.bad = bad("the first entry of a chain has a prev".into(), &entry);
                    return true;
                }
                self.chains.insert(
                    entry.host.clone(),
                    Chain {
                        first_seq: entry.seq,
                        last_seq: entry.seq,
                        last_hash: entry.hash.clone(),
                    },
                );
            }
            Some(chain) => {
                if entry.seq != chain.last_seq + 1 {
                    let reason = if entry.seq > chain.last_seq + 1 {
                        format!(
                            "entries {} to {} of host {}'s chain are missing before it",
                            chain.last_seq + 1,
                            entry.seq - 1,
                            entry.host
                        )
                    } else {
                        format!(
                            "out of order: entry {} of host {} follows entry {}",
                            entry.seq, entry.host, chain.last_seq
                        )
                    };
                    self.bad = bad(reason, &entry);
                    return true;
                }
                if entry.prev != chain.last_hash {
                    self.bad = bad(
                        format!(
                            "its prev {} is not the hash {} of entry {}",
                            entry.prev, chain.last_hash, chain.last_seq
                        ),
                        &entry,
                    );
                    return true;
                }
                chain.last_seq = entry.seq;
                chain.last_hash = entry.hash.clone();
            }
        }
        self.entries += 1;
        false
    }

    pub fn finish(self) -> Verdict {
        Verdict {
            ok: self.bad.is_none(),
            entries: self.entries,
            chains: self.chains,
            bad: self.bad,
        }
    }
}

/// Who runs this process, for entries the CLI leaves (plugin changes):
/// the uid, which the kernel vouches for, and the name `$USER` claims.
pub fn local_user() -> String {
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    // An empty value counts as unset.
    let named = |var| std::env::var(var).ok().filter(|n: &String| !n.is_empty());
    match named("USER").or_else(|| named("LOGNAME")) {
        Some(name) => format!("uid:{uid} user:{}", crate::text::escape_capped(&name, 64)),
        None => format!("uid:{uid}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Entry> {
        let mut prev = GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let mut e = Entry {
                    host: "h1".into(),
                    seq,
                    at_ms: seq,
                    kind: "task.submit".into(),
                    by: "127.0.0.1:1".into(),
                    detail: serde_json::json!({ "task": seq }),
                    prev: prev.clone(),
                    hash: String::new(),
                };
                e.hash = e.digest();
                prev = e.hash.clone();
                e
            })
            .collect()
    }

    fn check(entries: &[Entry]) -> Verdict {
        let mut c = Check::default();
        for (i, e) in entries.iter().enumerate() {
            c.push(Raw {
                position: i as u64,
                bytes: serde_json::to_vec(e).unwrap(),
            });
        }
        c.finish()
    }

    #[test]
    fn an_intact_chain_verifies_even_when_its_head_aged_out() {
        let entries = chain(5);
        assert!(check(&entries).ok);
        assert!(check(&entries[2..]).ok);
    }

    #[test]
    fn an_edited_a_deleted_and_a_reordered_entry_are_each_found() {
        let mut edited = chain(5);
        edited[2].detail = serde_json::json!({ "task": 99 });
        let v = check(&edited);
        assert_eq!(v.bad.as_ref().and_then(|b| b.seq), Some(3));
        assert!(v.bad.unwrap().reason.starts_with("altered"));

        let mut deleted = chain(5);
        deleted.remove(2);
        let v = check(&deleted);
        assert_eq!(v.bad.as_ref().and_then(|b| b.seq), Some(4));
        assert!(v.bad.unwrap().reason.contains("3 to 3"));

        let mut swapped = chain(5);
        swapped.swap(1, 2);
        assert!(!check(&swapped).ok);
    }

    #[test]
    fn a_rehashed_edit_is_found_by_the_next_entry() {
        let mut entries = chain(5);
        entries[2].detail = serde_json::json!({ "task": 99 });
        entries[2].hash = entries[2].digest();
        let v = check(&entries);
        assert_eq!(v.bad.as_ref().and_then(|b| b.seq), Some(4));
    }
}
