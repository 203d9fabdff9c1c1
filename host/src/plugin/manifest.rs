//! The plugin manifest: a TOML file beside the component (`NAME.toml` for
//! `NAME.wasm`) or the same text embedded in the component as a custom
//! section named `orch-manifest`. The serde types here are the file format;
//! [`Manifest::grants`] and [`Manifest::limits`] turn them into the runtime
//! types the sandbox enforces. Nothing is granted unless the manifest says so.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::HostLimits;
use crate::sandbox::{DirGrant, Grants, Limits};
use crate::units::{parse_duration, parse_size};

/// The largest manifest file read; real ones are a few hundred bytes.
pub const MAX_MANIFEST_SIZE: u64 = 1 << 20;

/// Name of the custom section that may carry the manifest.
pub const SECTION: &str = "orch-manifest";

/// Most tasks one instance may serve (`[limits] reuse`). What a guest
/// leaves in host-side tables (open WASI resources) is bounded by this many
/// tasks' worth; its memory is bounded by its memory limit.
pub const MAX_REUSE: u32 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub plugin: PluginSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub grants: GrantsSection,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// Capability names; must be exactly those the component's `describe` declares.
    pub capabilities: Vec<String>,
    /// Message subjects delivered to the plugin's `handle` (each within
    /// `grants.messaging`).
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Record each `tasks.call` outcome, so that a task run again (a
    /// retry, a restart, another host) replays them instead of calling
    /// again. Default false: replay needs the agent to make the same calls
    /// in the same order for the same input.
    #[serde(default)]
    pub durable: bool,
}

/// Requested per-task limits; each must be within the host's maximum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub fuel: Option<u64>,
    /// A size such as `256MiB`.
    pub memory: Option<String>,
    /// A duration such as `30s`.
    pub timeout: Option<String>,
    /// Most instances of this plugin alive at once.
    pub max_instances: Option<u32>,
    /// How many tasks in a row one instance may serve. The plugin declares
    /// by it that it keeps no state a later task must not see: memory,
    /// globals and open WASI resources carry over. Absent or 1, every task
    /// gets a fresh instance.
    pub reuse: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsSection {
    /// The kv namespace the plugin may use; no kv access without it.
    pub kv: Option<String>,
    /// Names of host environment variables passed to the plugin with their
    /// values on this host. Nothing else of the environment is visible.
    #[serde(default)]
    pub env: Vec<String>,
    /// Host directories mapped into the plugin's filesystem.
    #[serde(default)]
    pub dirs: Vec<DirSection>,
    /// Subject patterns (`*` one token, `>` the rest) the plugin may
    /// publish to, send requests to and subscribe to.
    #[serde(default)]
    pub messaging: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirSection {
    /// Absolute path on the host.
    pub host: PathBuf,
    /// Absolute path the plugin sees, e.g. `/data`.
    pub guest: String,
    #[serde(default)]
    pub mode: DirMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirMode {
    #[default]
    #[serde(rename = "ro")]
    ReadOnly,
    #[serde(rename = "rw")]
    ReadWrite,
}

/// What is wrong with a manifest, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest {source_name} is not valid TOML for an orch manifest: {reason}")]
    Parse { source_name: String, reason: String },
    #[error("manifest {source_name}: field `{field}`: {reason}")]
    Field {
        source_name: String,
        field: String,
        reason: String,
    },
    #[error("no manifest for {component}: expected {expected} beside it or an `orch-manifest` custom section in it")]
    Missing {
        component: PathBuf,
        expected: PathBuf,
    },
    #[error("cannot read manifest {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

/// A parsed manifest together with the exact bytes it came from (signatures
/// cover those bytes) and where it was found.
#[derive(Debug, Clone)]
pub struct LoadedManifest {
    pub manifest: Manifest,
    pub text: String,
    pub source_name: String,
}

impl Manifest {
    pub fn parse(text: &str, source_name: &str) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            source_name: source_name.to_string(),
            reason: e.message().to_string(),
        })?;
        manifest.validate(source_name)?;
        Ok(manifest)
    }

    fn validate(&self, source_name: &str) -> Result<(), ManifestError> {
        let field = |field: &str, reason: String| ManifestError::Field {
            source_name: source_name.to_string(),
            field: field.to_string(),
            reason,
        };
        let p = &self.plugin;
        // Fields are shown to a person at install: a control character
        // (a terminal escape, a carriage return) could rewrite what the
        // prompt shows, so none is accepted anywhere.
        let mut texts: Vec<(String, &str)> = vec![
            ("plugin.name".into(), p.name.as_str()),
            ("plugin.version".into(), p.version.as_str()),
            ("plugin.description".into(), p.description.as_str()),
        ];
        texts.extend(
            p.capabilities
                .iter()
                .map(|c| ("plugin.capabilities".into(), c.as_str())),
        );
        texts.extend(
            p.subscriptions
                .iter()
                .map(|c| ("plugin.subscriptions".into(), c.as_str())),
        );
        let g = &self.grants;
        texts.extend(g.kv.iter().map(|k| ("grants.kv".into(), k.as_str())));
        texts.extend(g.env.iter().map(|k| ("grants.env".into(), k.as_str())));
        texts.extend(
            g.messaging
                .iter()
                .map(|k| ("grants.messaging".into(), k.as_str())),
        );
        for (i, d) in g.dirs.iter().enumerate() {
            let host = d
                .host
                .to_str()
                .ok_or_else(|| field(&format!("grants.dirs[{i}].host"), "is not UTF-8".into()))?;
            texts.push((format!("grants.dirs[{i}].host"), host));
            texts.push((format!("grants.dirs[{i}].guest"), d.guest.as_str()));
        }
        for (name, text) in texts {
            if let Some(c) = text.chars().find(|c| c.is_control()) {
                return Err(field(
                    &name,
                    format!(
                        "{} contains the control character {}; control characters are not allowed",
                        crate::text::escape_control(&format!("{text:?}")),
                        c.escape_default()
                    ),
                ));
            }
        }
        if !is_name(&p.name) {
            return Err(field(
                "plugin.name",
                format!("{:?} must be 1-64 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit", p.name),
            ));
        }
        if !is_version(&p.version) {
            return Err(field(
                "plugin.version",
                format!("{:?} is not a version like 1.2.3", p.version),
            ));
        }
        if p.capabilities.is_empty() {
            return Err(field(
                "plugin.capabilities",
                "must list at least one capability".into(),
            ));
        }
        for c in &p.capabilities {
            if !crate::sandbox::is_capability_name(c) {
                return Err(field(
                    "plugin.capabilities",
                    format!("{:?}: {}", c, crate::sandbox::CAPABILITY_NAME_RULE),
                ));
            }
        }
        if let Some(m) = &self.limits.memory {
            parse_size(m).map_err(|e| field("limits.memory", e.to_string()))?;
        }
        if let Some(t) = &self.limits.timeout {
            let d = parse_duration(t).map_err(|e| field("limits.timeout", e.to_string()))?;
            if d.is_zero() {
                return Err(field("limits.timeout", "must be greater than zero".into()));
            }
        }
        if self.limits.fuel == Some(0) {
            return Err(field("limits.fuel", "must be greater than zero".into()));
        }
        if self.limits.max_instances == Some(0) {
            return Err(field(
                "limits.max_instances",
                "must be greater than zero".into(),
            ));
        }
        match self.limits.reuse {
            Some(0) => {
                return Err(field(
                    "limits.reuse",
                    "must be at least 1 (1 gives every task a fresh instance)".into(),
                ))
            }
            Some(n) if n > MAX_REUSE => {
                return Err(field(
                    "limits.reuse",
                    format!("{n} is past the limit of {MAX_REUSE} tasks for one instance"),
                ))
            }
            Some(n) if n > 1 && self.plugin.durable => {
                return Err(field(
                    "limits.reuse",
                    "a durable plugin cannot reuse instances: its calls are replayed against a record that state kept from another task could make them diverge from".into(),
                ))
            }
            _ => {}
        }
        if let Some(ns) = &g.kv {
            if !is_name(ns) {
                return Err(field(
                    "grants.kv",
                    format!("{ns:?} is not a valid namespace name"),
                ));
            }
        }
        for name in &g.env {
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !ok {
                return Err(field(
                    "grants.env",
                    format!("{name:?} is not an environment variable name"),
                ));
            }
        }
        for pattern in &g.messaging {
            if !crate::sandbox::subject::is_pattern(pattern) {
                return Err(field(
                    "grants.messaging",
                    format!("{pattern:?} is not a subject pattern like orders.* or orders.>"),
                ));
            }
        }
        for s in &p.subscriptions {
            if !crate::sandbox::subject::is_subject(s) {
                return Err(field(
                    "plugin.subscriptions",
                    format!("{s:?} is not a subject like orders.created"),
                ));
            }
            if !g
                .messaging
                .iter()
                .any(|pattern| crate::sandbox::subject::matches(pattern, s))
            {
                return Err(field(
                    "plugin.subscriptions",
                    format!("{s} is not within the subjects granted in grants.messaging"),
                ));
            }
        }
        for (i, d) in g.dirs.iter().enumerate() {
            if let Some(j) = g.dirs[..i].iter().position(|o| o.guest == d.guest) {
                return Err(field(
                    &format!("grants.dirs[{i}].guest"),
                    format!(
                        "{} is already the guest path of grants.dirs[{j}]; each guest path may be granted once",
                        d.guest
                    ),
                ));
            }
            if !d.host.is_absolute() {
                return Err(field(
                    &format!("grants.dirs[{i}].host"),
                    format!("{} is not an absolute path", d.host.display()),
                ));
            }
            let guest_ok = d.guest.starts_with('/')
                && !d.guest.split('/').any(|part| part == ".." || part == ".");
            if !guest_ok {
                return Err(field(
                    &format!("grants.dirs[{i}].guest"),
                    format!(
                        "{:?} must be an absolute path without . or .. parts",
                        d.guest
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The grants this manifest asks for, resolved on this host: environment
    /// variables get their values from `env` (the host's environment).
    pub fn grants(&self, env: impl Fn(&str) -> Option<String>) -> Grants {
        Grants {
            kv: self.grants.kv.clone(),
            env: self
                .grants
                .env
                .iter()
                .filter_map(|name| env(name).map(|v| (name.clone(), v)))
                .collect(),
            dirs: self
                .grants
                .dirs
                .iter()
                .map(|d| DirGrant {
                    host: resolve_host_dir(&d.host),
                    guest: d.guest.clone(),
                    writable: d.mode == DirMode::ReadWrite,
                })
                .collect(),
            messaging: self.grants.messaging.clone(),
        }
    }

    /// Per-task limits: the host defaults, overridden by what the manifest
    /// asks for, refused when it asks for more than the host allows.
    pub fn limits(&self, host: &HostLimits, source_name: &str) -> Result<Limits, ManifestError> {
        let over = |field: &str, asked: String, max: String| ManifestError::Field {
            source_name: source_name.to_string(),
            field: field.to_string(),
            reason: format!("{asked} is above this host's maximum of {max}"),
        };
        let mut limits = host.defaults.clone();
        if let Some(fuel) = self.limits.fuel {
            if fuel > host.max_fuel {
                return Err(over(
                    "limits.fuel",
                    fuel.to_string(),
                    host.max_fuel.to_string(),
                ));
            }
            limits.fuel = fuel;
        }
        if let Some(m) = &self.limits.memory {
            let bytes = parse_size(m).unwrap_or(u64::MAX);
            if bytes > host.max_memory {
                return Err(over(
                    "limits.memory",
                    m.clone(),
                    crate::units::format_size(host.max_memory),
                ));
            }
            limits.memory = bytes;
        }
        if let Some(t) = &self.limits.timeout {
            let d = parse_duration(t).unwrap_or(Duration::MAX);
            if d > host.max_timeout {
                return Err(over(
                    "limits.timeout",
                    t.clone(),
                    format!("{}ms", host.max_timeout.as_millis()),
                ));
            }
            limits.timeout = d;
        }
        limits.durable = self.plugin.durable;
        if let Some(n) = self.limits.reuse {
            if n > host.max_reuse {
                return Err(over(
                    "limits.reuse",
                    n.to_string(),
                    host.max_reuse.to_string(),
                ));
            }
            limits.reuse = n;
        }
        Ok(limits)
    }
}

/// The directory a grant's host path names, with `..`, `.` and symlinks
/// resolved: what the agent really gets, and what the install prompt shows.
/// A path that does not exist is normalized without the file system (loading
/// refuses it later).
pub fn resolve_host_dir(path: &Path) -> PathBuf {
    if let Ok(real) = std::fs::canonicalize(path) {
        return real;
    }
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

fn is_version(s: &str) -> bool {
    // Semver: the pre-release and build parts are dot-separated
    // alphanumerics and hyphens.
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+'))
    {
        return false;
    }
    let core = s.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// Where the manifest of `component` lives when it is a file beside it.
pub fn beside(component: &Path) -> PathBuf {
    component.with_extension("toml")
}

/// Finds the manifest of a component: the file beside it first, then an
/// embedded `orch-manifest` section. `Ok(None)` when there is neither.
pub fn find(component: &Path, bytes: &[u8]) -> Result<Option<LoadedManifest>, ManifestError> {
    let loaded = |text: String, source_name: String| {
        let manifest = Manifest::parse(&text, &source_name)?;
        Ok(Some(LoadedManifest {
            manifest,
            text,
            source_name,
        }))
    };
    let file = beside(component);
    if file.exists() {
        use crate::engine::{read_regular, ReadError};
        let io = |reason: String| ManifestError::Io {
            path: file.clone(),
            reason,
        };
        let bytes = read_regular(&file, MAX_MANIFEST_SIZE).map_err(|e| match e {
            ReadError::Io(e) => io(e.to_string()),
            ReadError::NotAFile(kind) => io(format!("it is {kind}, not a file")),
            ReadError::TooLarge(size) => io(format!(
                "{size} bytes, past the limit of {MAX_MANIFEST_SIZE} bytes for a manifest"
            )),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| io("it is not UTF-8".into()))?;
        return loaded(text, file.display().to_string());
    }
    if let Some(data) = super::section::find(bytes, SECTION) {
        let source_name = format!("{} (embedded)", component.display());
        let text = String::from_utf8(data.to_vec()).map_err(|_| ManifestError::Parse {
            source_name: source_name.clone(),
            reason: "the orch-manifest section is not UTF-8".into(),
        })?;
        return loaded(text, source_name);
    }
    Ok(None)
}

/// Like [`find`], but a missing manifest is an error.
pub fn require(component: &Path, bytes: &[u8]) -> Result<LoadedManifest, ManifestError> {
    find(component, bytes)?.ok_or_else(|| ManifestError::Missing {
        component: component.to_path_buf(),
        expected: beside(component),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[plugin]
name = "counter"
version = "0.1.0"
capabilities = ["counter"]

[limits]
fuel = 5000
memory = "32MiB"
timeout = "2s"

[grants]
kv = "counter"
env = ["LANG"]
dirs = [{ host = "/srv/in", guest = "/in" }, { host = "/srv/out", guest = "/out", mode = "rw" }]
"#;

    fn host() -> HostLimits {
        HostLimits::default()
    }

    #[test]
    fn parses_and_resolves() {
        let m = Manifest::parse(GOOD, "m.toml").unwrap();
        let limits = m.limits(&host(), "m.toml").unwrap();
        assert_eq!(
            (limits.fuel, limits.memory, limits.timeout),
            (5000, 32 << 20, Duration::from_secs(2))
        );
        let grants = m.grants(|k| (k == "LANG").then(|| "C".to_string()));
        assert_eq!(grants.kv.as_deref(), Some("counter"));
        assert_eq!(grants.env, vec![("LANG".to_string(), "C".to_string())]);
        assert_eq!(grants.dirs.len(), 2);
        assert!(!grants.dirs[0].writable && grants.dirs[1].writable);
    }

    #[test]
    fn nothing_is_granted_by_default() {
        let m = Manifest::parse(
            "[plugin]\nname='a'\nversion='1.0.0'\ncapabilities=['x']\n",
            "m",
        )
        .unwrap();
        let g = m.grants(|_| Some("value".into()));
        assert!(g.kv.is_none() && g.env.is_empty() && g.dirs.is_empty());
        assert_eq!(m.limits(&host(), "m").unwrap(), host().defaults);
    }

    #[test]
    fn limits_above_the_host_maximum_are_refused() {
        let text = GOOD.replace("fuel = 5000", &format!("fuel = {}", host().max_fuel + 1));
        let err = Manifest::parse(&text, "m.toml")
            .unwrap()
            .limits(&host(), "m.toml")
            .unwrap_err();
        assert!(err.to_string().contains("field `limits.fuel`"), "{err}");
        assert!(
            err.to_string().contains("above this host's maximum"),
            "{err}"
        );
        let at_max = GOOD.replace("fuel = 5000", &format!("fuel = {}", host().max_fuel));
        assert!(Manifest::parse(&at_max, "m.toml")
            .unwrap()
            .limits(&host(), "m.toml")
            .is_ok());
    }

    #[test]
    fn reuse_must_be_1_to_max_and_not_on_a_durable_plugin() {
        let with = |n: u32| GOOD.replace("fuel = 5000", &format!("fuel = 5000\nreuse = {n}"));
        let err = Manifest::parse(&with(0), "m.toml").unwrap_err().to_string();
        assert!(err.contains("field `limits.reuse`"), "{err}");
        assert!(err.contains("must be at least 1"), "{err}");
        for n in [1, 3, MAX_REUSE] {
            let m = Manifest::parse(&with(n), "m.toml").unwrap();
            assert_eq!(m.limits(&host(), "m.toml").unwrap().reuse, n);
        }
        // Within the host's maximum, and refused past it.
        let strict = HostLimits {
            max_reuse: 3,
            ..host()
        };
        let m = Manifest::parse(&with(3), "m.toml").unwrap();
        assert_eq!(m.limits(&strict, "m.toml").unwrap().reuse, 3);
        let err = Manifest::parse(&with(4), "m.toml")
            .unwrap()
            .limits(&strict, "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `limits.reuse`"), "{err}");
        assert!(err.contains("4 is above this host's maximum of 3"), "{err}");
        let err = Manifest::parse(&with(MAX_REUSE + 1), "m.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the limit of 10000 tasks"), "{err}");
        let durable = with(3).replace(
            "capabilities = [\"counter\"]",
            "capabilities = [\"counter\"]\ndurable = true",
        );
        let err = Manifest::parse(&durable, "m.toml").unwrap_err().to_string();
        assert!(
            err.contains("a durable plugin cannot reuse instances"),
            "{err}"
        );
        assert!(Manifest::parse(
            &with(1).replace(
                "capabilities = [\"counter\"]",
                "capabilities = [\"counter\"]\ndurable = true"
            ),
            "m.toml"
        )
        .is_ok());
    }

    #[test]
    fn reserved_capability_names_and_control_characters_are_refused() {
        let with = |line: &str| GOOD.replace("capabilities = [\"counter\"]", line);
        let err = Manifest::parse(&with("capabilities = [\"msg:orders.created\"]"), "m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("field `plugin.capabilities`"), "{err}");
        assert!(err.contains("letters, digits, '.', '-' and '_'"), "{err}");
        assert!(Manifest::parse(&with("capabilities = [\"orders.created-v2_x\"]"), "m").is_ok());
        let text = with("capabilities = [\"counter\"]\ndescription = \"a\\rb\"");
        let err = Manifest::parse(&text, "m").unwrap_err().to_string();
        assert!(err.contains("field `plugin.description`"), "{err}");
        assert!(!err.contains('\r'), "{err:?}");
        let text = with("capabilities = [\"counter\"]\ndescription = \"tabs\\tare control too\"");
        assert!(Manifest::parse(&text, "m").is_err());
        let text = with("capabilities = [\"counter\"]\ndescription = \"plain ünïcode\"");
        assert!(Manifest::parse(&text, "m").is_ok());
    }
}
