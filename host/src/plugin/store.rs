//! Installed plugins under `$ORCH_HOME/plugins/`:
//!
//! - `blobs/<sha256>.wasm`: component bytes, named by their hash;
//! - `registry.json`: per plugin, its versions (hash, manifest text, signer,
//!   install time), the active one, and the activation history for rollback.
//!
//! Every change writes a new file and renames it over the old one (after
//! fsync), under an exclusive lock, so an interrupted or failed install
//! leaves the store as it was: at most an unreferenced blob, never a
//! registry entry without its blob.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::{LoadedManifest, Manifest};
use super::{Checked, PluginError};
use crate::config::HostConfig;
use crate::kv::KvStore;
use crate::sandbox::Engine;
use crate::sandbox::{Agent, Limits};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("plugin store {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("plugin store {path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("no plugin named {name} is installed")]
    NotInstalled { name: String },
    #[error("plugin {name} is already installed (version {active}); use `orch plugin upgrade {name} <path>` for a new version")]
    AlreadyInstalled { name: String, active: String },
    #[error(
        "plugin {name} {version} is already installed; a new version needs a new version number"
    )]
    DuplicateVersion { name: String, version: String },
    #[error("plugin {name} has no earlier version to roll back to")]
    NoPrevious { name: String },
    #[error("kv namespace {namespace} is already granted to plugin {owner}; namespaces are private to one plugin")]
    KvNamespaceTaken { namespace: String, owner: String },
    #[error("kv namespace {namespace} is reserved for plugin {owner} (not installed now), whose data it may hold; `orch plugin remove {owner} --purge` deletes the data and frees the name")]
    KvNamespaceReserved { namespace: String, owner: String },
    #[error("kv namespace {namespace} belongs to the installed plugin {owner}, and this file is not an installed version of it; run the installed plugin (`orch run {owner}`) or install the file (`orch plugin upgrade {owner} FILE`)")]
    KvNamespaceOfInstalled { namespace: String, owner: String },
}

/// Why `purge` stopped.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the data of kv namespace {namespace} could not be deleted, so it stays reserved: {source}"
    )]
    Kv {
        namespace: String,
        #[source]
        source: crate::kv::KvError,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: String,
    pub sha256: String,
    pub size: u64,
    /// The manifest text exactly as installed (signatures cover it).
    pub manifest: String,
    pub signed_by: Option<String>,
    /// Seconds since the Unix epoch.
    pub installed_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginRecord {
    pub active: String,
    pub versions: Vec<VersionRecord>,
    /// Versions in the order they were made active; the last is `active`.
    pub history: Vec<String>,
}

impl PluginRecord {
    pub fn active_version(&self) -> Option<&VersionRecord> {
        self.versions.iter().find(|v| v.version == self.active)
    }

    /// Makes `version` active. It appears in the history once, where it
    /// was made active last, so the history is never longer than the
    /// versions kept, however often an operator switches between them.
    fn activate(&mut self, version: &str) {
        self.history.retain(|v| v != version);
        self.history.push(version.to_string());
        self.active = version.to_string();
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    plugins: BTreeMap<String, PluginRecord>,
    /// kv namespaces of removed plugins: namespace -> plugin name. The data
    /// stays, so the namespace stays that plugin's until it is installed
    /// again or purged.
    #[serde(default)]
    reserved: BTreeMap<String, String>,
    /// The last [`MAX_CHANGES`] changes, for the audit trail (a host
    /// records those it has not recorded yet when it starts and syncs).
    #[serde(default)]
    changes: VecDeque<Change>,
}

/// Changes the registry keeps for the audit trail.
pub const MAX_CHANGES: usize = 1000;

/// One change to the installed plugins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Counts from 1 in this store.
    pub seq: u64,
    pub at_ms: u64,
    /// install, upgrade, rollback or remove.
    pub op: String,
    pub name: String,
    /// The version active after the change (before it, for remove).
    pub version: String,
    pub sha256: String,
    pub signed_by: Option<String>,
    /// Who made it (`user:NAME`).
    pub by: String,
}

impl Registry {
    fn note(&mut self, op: &str, name: &str, version: Option<&VersionRecord>) {
        let seq = self.changes.back().map_or(1, |c| c.seq + 1);
        if self.changes.len() >= MAX_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back(Change {
            seq,
            at_ms: crate::daemon::now_ms(),
            op: op.to_string(),
            name: name.to_string(),
            version: version.map(|v| v.version.clone()).unwrap_or_default(),
            sha256: version.map(|v| v.sha256.clone()).unwrap_or_default(),
            signed_by: version.and_then(|v| v.signed_by.clone()),
            by: crate::audit::local_user(),
        });
    }
}

impl Registry {
    /// Who owns kv namespace `ns`: an installed plugin that grants it in any
    /// of its versions, or a removed one that reserved it.
    fn kv_owner(&self, ns: &str) -> Option<KvOwner> {
        for (name, record) in &self.plugins {
            let grants = record.versions.iter().any(|v| {
                Manifest::parse(&v.manifest, name)
                    .map(|m| m.grants.kv.as_deref() == Some(ns))
                    .unwrap_or(false)
            });
            if grants {
                return Some(KvOwner {
                    plugin: name.clone(),
                    removed: false,
                });
            }
        }
        self.reserved.get(ns).map(|name| KvOwner {
            plugin: name.clone(),
            removed: true,
        })
    }
}

/// The plugin a kv namespace belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvOwner {
    pub plugin: String,
    /// Removed, with its namespace reserved.
    pub removed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Install,
    Upgrade,
}

pub struct PluginStore {
    dir: PathBuf,
}

impl PluginStore {
    pub fn new(home: &Path) -> PluginStore {
        PluginStore {
            dir: home.join("plugins"),
        }
    }

    fn io(&self, path: &Path, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }

    pub fn registry_path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{sha256}.wasm"))
    }

    /// Holds the store's lock until dropped, so concurrent `orch` commands
    /// change the registry one at a time.
    fn lock(&self) -> Result<std::fs::File, StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| self.io(&path, e))?;
        file.lock().map_err(|e| self.io(&path, e))?;
        Ok(file)
    }

    fn read(&self) -> Result<Registry, StoreError> {
        let path = self.registry_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(e) => Err(self.io(&path, e)),
        }
    }

    fn write(&self, registry: &Registry) -> Result<(), StoreError> {
        let path = self.registry_path();
        let bytes = serde_json::to_vec_pretty(registry).map_err(|e| self.io(&path, e))?;
        write_atomic(&path, &bytes).map_err(|e| self.io(&path, e))
    }

    /// The changes after `seq`, oldest first.
    pub fn changes_since(&self, seq: u64) -> Result<Vec<Change>, StoreError> {
        Ok(self
            .read()?
            .changes
            .into_iter()
            .filter(|c| c.seq > seq)
            .collect())
    }

    pub fn list(&self) -> Result<BTreeMap<String, PluginRecord>, StoreError> {
        Ok(self.read()?.plugins)
    }

    pub fn get(&self, name: &str) -> Result<PluginRecord, StoreError> {
        self.read()?
            .plugins
            .remove(name)
            .ok_or_else(|| StoreError::NotInstalled {
                name: name.to_string(),
            })
    }

    /// Stores a checked plugin: the blob first, then the registry entry that
    /// makes it the active version.
    pub fn commit(&self, checked: &Checked, mode: Mode) -> Result<VersionRecord, StoreError> {
        let _lock = self.lock()?;
        let mut registry = self.read()?;
        let m = &checked.manifest.manifest;
        let name = m.plugin.name.clone();
        let version = m.plugin.version.clone();
        match (mode, registry.plugins.get(&name)) {
            (Mode::Install, Some(existing)) => {
                return Err(StoreError::AlreadyInstalled {
                    name,
                    active: existing.active.clone(),
                })
            }
            (Mode::Upgrade, None) => return Err(StoreError::NotInstalled { name }),
            (Mode::Upgrade, Some(existing)) => {
                if let Some(kept) = existing.versions.iter().find(|v| v.version == version) {
                    // A version kept from before, the same component and
                    // manifest, becomes active again (after a rollback, say);
                    // other contents under its number are refused.
                    let same = kept.sha256 == checked.sha256
                        && kept.manifest == checked.manifest.text
                        && existing.active != version;
                    if !same {
                        return Err(StoreError::DuplicateVersion { name, version });
                    }
                    let mut kept = kept.clone();
                    // The same contents: a signature checked now holds for
                    // the kept version too.
                    if checked.signed_by.is_some() {
                        kept.signed_by = checked.signed_by.clone();
                    }
                    if let Some(entry) = registry.plugins.get_mut(&name) {
                        for v in entry.versions.iter_mut().filter(|v| v.version == version) {
                            *v = kept.clone();
                        }
                        entry.activate(&version);
                    }
                    registry.note("upgrade", &name, Some(&kept));
                    self.write(&registry)?;
                    return Ok(kept);
                }
            }
            _ => {}
        }
        if let Some(namespace) = &m.grants.kv {
            check_kv_owner(registry.kv_owner(namespace), namespace, &name)?;
            // Installed again under its own name: the plugin has its data back.
            registry.reserved.remove(namespace);
        }

        let blob = self.blob_path(&checked.sha256);
        if !blob.exists() {
            if let Some(parent) = blob.parent() {
                std::fs::create_dir_all(parent).map_err(|e| self.io(parent, e))?;
            }
            write_atomic(&blob, &checked.bytes).map_err(|e| self.io(&blob, e))?;
        }
        let record = VersionRecord {
            version: version.clone(),
            sha256: checked.sha256.clone(),
            size: checked.bytes.len() as u64,
            manifest: checked.manifest.text.clone(),
            signed_by: checked.signed_by.clone(),
            installed_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let entry = registry
            .plugins
            .entry(name)
            .or_insert_with(|| PluginRecord {
                active: version.clone(),
                versions: Vec::new(),
                history: Vec::new(),
            });
        entry.versions.push(record.clone());
        entry.activate(&version);
        let op = match mode {
            Mode::Install => "install",
            Mode::Upgrade => "upgrade",
        };
        registry.note(op, &m.plugin.name, Some(&record));
        self.write(&registry)?;
        Ok(record)
    }

    /// Who owns kv namespace `ns`, if anyone.
    pub fn kv_owner(&self, ns: &str) -> Result<Option<KvOwner>, StoreError> {
        Ok(self.read()?.kv_owner(ns))
    }

    /// Lets a component file that is not installed (`orch run FILE`) use kv
    /// namespace `ns` as plugin `name` (with content hash `sha256`): only
    /// when the namespace is nobody's, or is `name`'s and either the file is
    /// an installed version of it or `name` is not installed. A namespace
    /// that was nobody's is reserved for `name` from now on, so no other
    /// plugin is ever given the data the run leaves.
    pub fn claim_kv(&self, ns: &str, name: &str, sha256: &str) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        let mut registry = self.read()?;
        match registry.kv_owner(ns) {
            None => {
                registry.reserved.insert(ns.to_string(), name.to_string());
                self.write(&registry)
            }
            Some(o) if o.plugin == name && o.removed => Ok(()),
            Some(o) if o.plugin == name => {
                let installed = registry
                    .plugins
                    .get(name)
                    .is_some_and(|r| r.versions.iter().any(|v| v.sha256 == sha256));
                if installed {
                    Ok(())
                } else {
                    Err(StoreError::KvNamespaceOfInstalled {
                        namespace: ns.to_string(),
                        owner: o.plugin,
                    })
                }
            }
            Some(o) => check_kv_owner(Some(o), ns, name),
        }
    }

    /// Whether `sha256` is a version of the installed plugin `name`.
    pub fn has_blob(&self, name: &str, sha256: &str) -> Result<bool, StoreError> {
        Ok(self
            .read()?
            .plugins
            .get(name)
            .is_some_and(|r| r.versions.iter().any(|v| v.sha256 == sha256)))
    }

    /// Removes a plugin and every version of it; blobs no other plugin uses
    /// are deleted. Its kv namespaces stay reserved for its name (their
    /// data is kept) until it is installed again or purged.
    pub fn remove(&self, name: &str) -> Result<PluginRecord, StoreError> {
        let _lock = self.lock()?;
        let mut registry = self.read()?;
        let record = registry
            .plugins
            .remove(name)
            .ok_or_else(|| StoreError::NotInstalled {
                name: name.to_string(),
            })?;
        for ns in namespaces(name, &record) {
            registry.reserved.insert(ns, name.to_string());
        }
        registry.note("remove", name, record.active_version());
        self.write(&registry)?;
        for v in &record.versions {
            let used = registry
                .plugins
                .values()
                .any(|r| r.versions.iter().any(|o| o.sha256 == v.sha256));
            if !used {
                // A blob left behind costs disk, not correctness.
                let _ = std::fs::remove_file(self.blob_path(&v.sha256));
            }
        }
        Ok(record)
    }

    /// Forgets a plugin: removes it if it is still installed, then for each
    /// kv namespace reserved for its name calls `delete` (which deletes the
    /// data) and frees the namespace only once that succeeded, so no other
    /// plugin is ever granted a namespace with data left in it. Returns the
    /// freed namespaces. Fails when the name is neither installed nor holds
    /// a reservation.
    pub fn purge(
        &self,
        name: &str,
        mut delete: impl FnMut(&str) -> Result<(), crate::kv::KvError>,
    ) -> Result<Vec<String>, PurgeError> {
        if self.get(name).is_ok() {
            self.remove(name)?;
        }
        let _lock = self.lock()?;
        let mut registry = self.read()?;
        let reserved: Vec<String> = registry
            .reserved
            .iter()
            .filter(|(_, owner)| owner.as_str() == name)
            .map(|(ns, _)| ns.clone())
            .collect();
        if reserved.is_empty() {
            return Err(StoreError::NotInstalled {
                name: name.to_string(),
            }
            .into());
        }
        let mut freed = Vec::new();
        let mut failed = None;
        for ns in reserved {
            match delete(&ns) {
                Ok(()) => {
                    registry.reserved.remove(&ns);
                    freed.push(ns);
                }
                Err(e) => {
                    failed = Some((ns, e));
                    break;
                }
            }
        }
        self.write(&registry)?;
        match failed {
            None => Ok(freed),
            Some((namespace, source)) => Err(PurgeError::Kv { namespace, source }),
        }
    }

    /// Makes the version that was active before the current one active
    /// again. Returns (from, to).
    pub fn rollback(&self, name: &str) -> Result<(String, String), StoreError> {
        let _lock = self.lock()?;
        let mut registry = self.read()?;
        let record = registry
            .plugins
            .get_mut(name)
            .ok_or_else(|| StoreError::NotInstalled {
                name: name.to_string(),
            })?;
        if record.history.len() < 2 {
            return Err(StoreError::NoPrevious {
                name: name.to_string(),
            });
        }
        let from = record.history.pop().unwrap_or_default();
        let to = record.history.last().cloned().unwrap_or_default();
        record.active = to.clone();
        let active = record.active_version().cloned();
        registry.note("rollback", name, active.as_ref());
        self.write(&registry)?;
        Ok((from, to))
    }

    /// Loads the active version of an installed plugin: checks the stored
    /// bytes against their hash and the signature policy, then compiles (or
    /// loads from the cache) and describes it.
    pub async fn load(
        &self,
        name: &str,
        engine: &Engine,
        kv: Arc<KvStore>,
        config: &HostConfig,
    ) -> Result<(Agent, Limits, VersionRecord), PluginError> {
        let record = self.get(name)?;
        let version = record
            .active_version()
            .cloned()
            .ok_or_else(|| StoreError::Corrupt {
                path: self.registry_path(),
                reason: format!("{name}: active version {} has no record", record.active),
            })?;
        let blob = self.blob_path(&version.sha256);
        let bytes = std::fs::read(&blob).map_err(|e| self.io(&blob, e))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != version.sha256 {
            return Err(StoreError::Corrupt {
                path: blob,
                reason: format!("content hash is {actual}, expected {}", version.sha256),
            }
            .into());
        }
        if config.plugins.require_signed {
            let trusted = version
                .signed_by
                .as_ref()
                .is_some_and(|k| config.plugins.trusted_keys.contains(k));
            if !trusted {
                return Err(super::signature::SignatureError::Unsigned {
                    path: PathBuf::from(name),
                    sig: PathBuf::from(format!(
                        "a signature by a trusted key for {name} {}",
                        version.version
                    )),
                }
                .into());
            }
        }
        let source_name = format!("{name} {} (installed)", version.version);
        let manifest = LoadedManifest {
            manifest: Manifest::parse(&version.manifest, &source_name)?,
            text: version.manifest.clone(),
            source_name,
        };
        let limits = manifest
            .manifest
            .limits(&config.limits, &manifest.source_name)?;
        let grants = manifest.manifest.grants(|n| std::env::var(n).ok());
        let compiled = {
            let engine = engine.clone();
            let display = PathBuf::from(format!("{name}@{}", version.version));
            tokio::task::spawn_blocking(move || engine.compile(&display, &bytes))
                .await
                .map_err(|e| {
                    crate::error::LoadError::Engine(format!("compile task failed: {e}"))
                })??
        };
        let mut agent = Agent::from_compiled(engine, compiled, kv, grants, &limits).await?;
        agent.set_max_instances(manifest.manifest.limits.max_instances);
        agent.set_subscriptions(manifest.manifest.plugin.subscriptions.clone());
        Ok((agent, limits, version))
    }
}

/// Refuses kv namespace `ns` to plugin `name` when another plugin owns it.
pub fn check_kv_owner(owner: Option<KvOwner>, ns: &str, name: &str) -> Result<(), StoreError> {
    match owner {
        Some(o) if o.plugin != name && o.removed => Err(StoreError::KvNamespaceReserved {
            namespace: ns.to_string(),
            owner: o.plugin,
        }),
        Some(o) if o.plugin != name => Err(StoreError::KvNamespaceTaken {
            namespace: ns.to_string(),
            owner: o.plugin,
        }),
        _ => Ok(()),
    }
}

/// Every kv namespace any version of a plugin grants.
fn namespaces(name: &str, record: &PluginRecord) -> Vec<String> {
    let mut out: Vec<String> = record
        .versions
        .iter()
        .filter_map(|v| Manifest::parse(&v.manifest, name).ok()?.grants.kv)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Writes `bytes` to `path` so that readers see the old file or the whole
/// new one: a temporary file in the same directory, fsync, rename, fsync of
/// the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
