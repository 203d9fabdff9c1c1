//! Plugins: a component plus its manifest. This module checks a candidate
//! (file, manifest, signature, world, descriptor against manifest) before
//! anything is stored or run, and keeps installed plugins in a
//! content-addressed store under the data directory.

pub mod manifest;
pub mod section;
pub mod signature;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::config::HostConfig;
use crate::error::LoadError;
use crate::kv::KvStore;
use crate::sandbox::{Agent, Limits};
use crate::sandbox::{Compiled, Engine};
use manifest::{LoadedManifest, ManifestError};
use signature::SignatureError;
pub use store::{KvOwner, PluginRecord, PluginStore, StoreError, VersionRecord};

/// Why a plugin was refused. Each variant names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("{path}: sha256 is {actual}, but {expected} was expected")]
    Sha256Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: the manifest and the component's describe disagree on {field}: the manifest says {manifest}, describe says {component}")]
    DescriptorMismatch {
        path: PathBuf,
        field: &'static str,
        manifest: String,
        component: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Interfaces a component may import that give it nothing unless the
/// manifest grants it: listed at install so operators see what is unused.
pub fn gated_imports(imports: &[String]) -> Vec<(&'static str, Vec<String>)> {
    let gates: [(&str, &str); 5] = [
        ("kv", "orch:agent/kv"),
        ("messaging", "orch:agent/messaging"),
        ("dirs", "wasi:filesystem/"),
        ("env", "wasi:cli/environment"),
        ("network (never granted)", "wasi:sockets/"),
    ];
    gates
        .iter()
        .filter_map(|(grant, prefix)| {
            let hits: Vec<String> = imports
                .iter()
                .filter(|i| i.starts_with(prefix))
                .cloned()
                .collect();
            (!hits.is_empty()).then_some((*grant, hits))
        })
        .collect()
}

/// A plugin that passed every check and is loaded, ready to run or store.
pub struct Checked {
    pub agent: Agent,
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
    pub manifest: LoadedManifest,
    pub limits: Limits,
    pub signed_by: Option<String>,
}

/// Checks the plugin at `path` in order: readable wasm, expected sha256,
/// manifest, signature (before any compilation), component world, grants,
/// then `describe` against the manifest.
pub async fn check(
    engine: &Engine,
    kv: Arc<KvStore>,
    config: &HostConfig,
    path: &Path,
    expected_sha256: Option<&str>,
) -> Result<Checked, PluginError> {
    let bytes = crate::engine::read_component(path)?;
    crate::engine::check_header(path, &bytes)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    if let Some(expected) = expected_sha256 {
        if !expected.eq_ignore_ascii_case(&sha256) {
            return Err(PluginError::Sha256Mismatch {
                path: path.to_path_buf(),
                expected: expected.to_ascii_lowercase(),
                actual: sha256,
            });
        }
    }
    let manifest = manifest::require(path, &bytes)?;
    let signature = signature::read_beside(path)?;
    let signed_by = if config.plugins.require_signed {
        Some(signature::verify(
            path,
            signature.as_ref(),
            &bytes,
            &manifest.text,
            &config.plugins.trusted_keys,
        )?)
    } else {
        // Not required here, but a signature that is present must still be
        // valid for some key: a broken one is a sign of tampering.
        match &signature {
            Some(sig) => Some(signature::verify(
                path,
                Some(sig),
                &bytes,
                &manifest.text,
                std::slice::from_ref(&sig.key),
            )?),
            None => None,
        }
    };
    let limits = manifest
        .manifest
        .limits(&config.limits, &manifest.source_name)?;
    let grants = manifest.manifest.grants(|name| std::env::var(name).ok());

    let bytes = Arc::new(bytes);
    let compiled: Compiled = {
        let engine = engine.clone();
        let path = path.to_path_buf();
        let bytes = bytes.clone();
        tokio::task::spawn_blocking(move || engine.compile(&path, &bytes))
            .await
            .map_err(|e| LoadError::Engine(format!("compile task failed: {e}")))??
    };
    let mut agent = Agent::from_compiled(engine, compiled, kv, grants, &limits).await?;
    agent.set_max_instances(manifest.manifest.limits.max_instances);
    check_descriptor(path, &manifest, &agent)?;
    Ok(Checked {
        agent,
        bytes,
        sha256,
        manifest,
        limits,
        signed_by,
    })
}

/// A component file loaded for a one-off run (`orch run FILE`). One value
/// per command, so the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Loaded {
    /// It has a manifest and passed every install check.
    Plugin(Checked),
    /// No manifest: no grants, the host's default limits.
    Bare { agent: Agent, limits: Limits },
}

impl Loaded {
    /// Whether the manifest grants anything (kv, environment, directories,
    /// messaging) that a person should confirm before the file runs.
    pub fn grants_anything(&self) -> bool {
        match self {
            Loaded::Plugin(c) => {
                let g = &c.manifest.manifest.grants;
                g.kv.is_some() || !g.env.is_empty() || !g.dirs.is_empty() || !g.messaging.is_empty()
            }
            Loaded::Bare { .. } => false,
        }
    }

    /// The agent, to look at (its descriptor, imports). Only `describe`
    /// has run, without grants.
    pub fn agent(&self) -> &Agent {
        match self {
            Loaded::Plugin(c) => &c.agent,
            Loaded::Bare { agent, .. } => agent,
        }
    }

    /// The agent to run, once its grants are confirmed: its kv namespace
    /// must be free or its own ([`PluginStore::claim_kv`]), the same rule
    /// as at install; a free one is reserved for it from now on.
    pub fn into_parts(self, store: &PluginStore) -> Result<(Agent, Limits), PluginError> {
        match self {
            Loaded::Plugin(c) => {
                if let Some(ns) = &c.manifest.manifest.grants.kv {
                    store.claim_kv(ns, &c.manifest.manifest.plugin.name, &c.sha256)?;
                }
                Ok((c.agent, c.limits))
            }
            Loaded::Bare { agent, limits } => Ok((agent, limits)),
        }
    }
}

/// Loads a component file for a one-off run: checked in full with its
/// manifest when it has one (beside it or embedded), like an install; the
/// kv rule is applied by [`Loaded::into_parts`], after the grants are
/// confirmed. Without a manifest it gets no grants and the host's default
/// limits, unless the host requires signed plugins, in which case it is
/// refused.
pub async fn load_file(
    engine: &Engine,
    kv: Arc<KvStore>,
    config: &HostConfig,
    path: &Path,
) -> Result<Loaded, PluginError> {
    let bytes = crate::engine::read_component(path)?;
    if manifest::find(path, &bytes)?.is_some() || config.plugins.require_signed {
        let checked = check(engine, kv, config, path, None).await?;
        return Ok(Loaded::Plugin(checked));
    }
    let limits = config.limits.defaults.clone();
    let agent = Agent::load(engine, path, kv, crate::sandbox::Grants::default(), &limits).await?;
    Ok(Loaded::Bare { agent, limits })
}

fn check_descriptor(path: &Path, m: &LoadedManifest, agent: &Agent) -> Result<(), PluginError> {
    let d = agent.descriptor();
    let p = &m.manifest.plugin;
    let mismatch = |field, manifest: String, component: String| PluginError::DescriptorMismatch {
        path: path.to_path_buf(),
        field,
        manifest,
        component,
    };
    if d.name != p.name {
        return Err(mismatch("its name", p.name.clone(), d.name.clone()));
    }
    if d.version != p.version {
        return Err(mismatch(
            "the version",
            p.version.clone(),
            d.version.clone(),
        ));
    }
    let mut declared: Vec<&str> = d.capabilities.iter().map(|c| c.name.as_str()).collect();
    let mut listed: Vec<&str> = p.capabilities.iter().map(String::as_str).collect();
    declared.sort_unstable();
    listed.sort_unstable();
    if declared != listed {
        return Err(mismatch(
            "the capabilities",
            listed.join(", "),
            declared.join(", "),
        ));
    }
    Ok(())
}
