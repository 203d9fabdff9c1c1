//! Host configuration: `$ORCH_HOME/config.toml`. Every key is optional.
//!
//! ```toml
//! [limits]                     # the most any plugin's manifest may ask for
//! max_fuel = 10000000000
//! max_memory = "1GiB"
//! max_timeout = "5m"
//! max_reuse = 10000            # tasks one instance may serve ([limits] reuse); 1: none
//!
//! [plugins]
//! require_signed = true        # refuse plugins without a trusted signature
//! trusted_keys = ["UC3Z..."]   # Ed25519 public keys in NATS nkey form
//!
//! [host]                       # `orch host start`
//! listen = "127.0.0.1:7878"    # the HTTP control API (loopback only)
//! retention = "24h"            # how long finished tasks and results are kept
//! shutdown_grace = "30s"       # how long SIGTERM waits for running tasks
//! instances = 16               # tasks at once per plugin without max_instances
//! instance_slots = 256         # instances alive at once, all plugins together
//! max_attempts = 3             # attempts per task for retryable failures
//! max_unfinished = 100000      # accepted tasks not yet ended; more are refused (429)
//! max_waits = 16384            # requests waiting for results at once; more are refused (429)
//! commit_delay = "2ms"         # while tasks wait in the queues, how long the journal
//!                              # holds a commit of results for more (0ms: never; at most 100ms)
//! log_format = "text"          # or "json": one JSON object per log line
//!
//! [audit]
//! retention = "90d"            # how long audit entries are kept
//! max_entries = 10000000       # and how many at most (the oldest go)
//!
//! [telemetry]
//! otlp_endpoint = "http://127.0.0.1:4318"  # export task traces by OTLP/HTTP
//! max_traces_per_second = 100  # new traces at most (0: no cap)
//!
//! [kv]                         # per kv namespace (per plugin)
//! max_bytes = "64MiB"          # keys and values together
//! max_keys = 100000
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::kv::KvLimits;
use crate::sandbox::Limits;
use crate::units::{parse_duration, parse_size};

/// Per-task limits a plugin gets by default, and the most it may ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimits {
    pub defaults: Limits,
    pub max_fuel: u64,
    pub max_memory: u64,
    pub max_timeout: Duration,
    /// The most tasks one instance may serve (a manifest's `reuse`); 1
    /// gives every task of this host a fresh instance.
    pub max_reuse: u32,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            defaults: Limits::default(),
            max_fuel: 10_000_000_000,
            max_memory: 1 << 30,
            max_timeout: Duration::from_secs(300),
            max_reuse: crate::plugin::manifest::MAX_REUSE,
        }
    }
}

/// Which plugins this host accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginPolicy {
    pub require_signed: bool,
    pub trusted_keys: Vec<String>,
}

/// Settings of the long-running host (`orch host start`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    pub listen: std::net::SocketAddr,
    pub retention: Duration,
    pub shutdown_grace: Duration,
    pub instances: u32,
    /// Instances alive at once on the host, all plugins together (the
    /// engine's pool); a task waits for a free one.
    pub instance_slots: u32,
    pub max_attempts: u32,
    pub max_unfinished: usize,
    /// Requests that may wait for task results at once (`?wait=`).
    pub max_waits: usize,
    /// While tasks wait in the scheduler's queues, how long the journal may hold a
    /// commit of results back to write more with one fsync.
    pub commit_delay: Duration,
    pub log_format: LogFormat,
}

/// How log lines are written: for people, or one JSON object per line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?} is not a log format: text or json")),
        }
    }
}

/// The most `[host] instance_slots` may be. Each slot reserves address
/// space for its memories (about 8 GiB: two of 4 GiB, so that wasm code
/// needs no bounds checks): 10,000 slots reserve about 80 TiB of the
/// 128 TiB an x86-64 process has, and 12,000 failed to start here
/// (benches/README.md, `density`).
pub const MAX_INSTANCE_SLOTS: u32 = 10_000;

/// The most `[host] commit_delay` may be: a result may become visible that
/// much later, and a task whose result was held back runs again after a
/// crash.
pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(100);

/// An address for the control API: an IP address and port, or
/// `localhost:PORT` (127.0.0.1). Other host names are refused: what they
/// resolve to is not known to be loopback.
pub fn parse_listen(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    Err(format!(
        "{text:?} is not an address: give an IP address and port such as 127.0.0.1:7878, or localhost:PORT"
    ))
}

/// The API address when neither the config nor `--listen` names one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7878)),
            retention: Duration::from_secs(24 * 3600),
            shutdown_grace: Duration::from_secs(30),
            instances: 16,
            instance_slots: 256,
            max_attempts: 3,
            max_unfinished: 100_000,
            max_waits: 16_384,
            commit_delay: Duration::from_millis(2),
            log_format: LogFormat::Text,
        }
    }
}

/// The audit trail (`crate::audit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    pub retention: Duration,
    /// Entries kept at most, all hosts' together in a cluster; past it the
    /// oldest go.
    pub max_entries: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention: Duration::from_secs(90 * 24 * 3600),
            max_entries: 10_000_000,
        }
    }
}

/// Where task traces go (`crate::trace`); nowhere by default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP base URL (`/v1/traces` goes after it).
    pub otlp_endpoint: Option<String>,
    /// New traces a second at most: tasks without a sampled parent that
    /// the sampler takes past this are not traced; 0 is no cap.
    pub max_traces_per_second: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            max_traces_per_second: 100,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    pub limits: HostLimits,
    pub plugins: PluginPolicy,
    pub host: DaemonConfig,
    pub kv: KvLimits,
    pub audit: AuditConfig,
    pub telemetry: TelemetryConfig,
}

#[derive(Debug, thiserror::Error)]
#[error("config {path}: {reason}")]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    plugins: PluginsFile,
    #[serde(default)]
    host: HostFile,
    #[serde(default)]
    kv: KvFile,
    #[serde(default)]
    audit: AuditFile,
    #[serde(default)]
    telemetry: TelemetryFile,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TelemetryFile {
    otlp_endpoint: Option<String>,
    max_traces_per_second: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuditFile {
    retention: Option<String>,
    max_entries: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KvFile {
    max_bytes: Option<String>,
    max_keys: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HostFile {
    listen: Option<String>,
    retention: Option<String>,
    shutdown_grace: Option<String>,
    instances: Option<u32>,
    instance_slots: Option<u32>,
    max_attempts: Option<u32>,
    max_unfinished: Option<usize>,
    max_waits: Option<usize>,
    commit_delay: Option<String>,
    log_format: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_fuel: Option<u64>,
    max_memory: Option<String>,
    max_timeout: Option<String>,
    max_reuse: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PluginsFile {
    #[serde(default)]
    require_signed: bool,
    #[serde(default)]
    trusted_keys: Vec<String>,
}

impl HostConfig {
    /// Reads `path`; a missing file means the defaults.
    pub fn load(path: &Path) -> Result<HostConfig, ConfigError> {
        let err = |reason: String| ConfigError {
            path: path.display().to_string(),
            reason,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HostConfig::default()),
            Err(e) => return Err(err(e.to_string())),
        };
        let file: File = toml::from_str(&text).map_err(|e| err(e.message().to_string()))?;
        let mut config = HostConfig::default();
        if let Some(f) = file.limits.max_fuel {
            config.limits.max_fuel = f;
        }
        if let Some(m) = file.limits.max_memory {
            config.limits.max_memory =
                parse_size(&m).map_err(|e| err(format!("limits.max_memory: {e}")))?;
        }
        if let Some(t) = file.limits.max_timeout {
            config.limits.max_timeout =
                parse_duration(&t).map_err(|e| err(format!("limits.max_timeout: {e}")))?;
        }
        if let Some(n) = file.limits.max_reuse {
            let max = crate::plugin::manifest::MAX_REUSE;
            if !(1..=max).contains(&n) {
                return Err(err(format!(
                    "limits.max_reuse: {n} is not between 1 and {max}"
                )));
            }
            config.limits.max_reuse = n;
        }
        for key in &file.plugins.trusted_keys {
            crate::plugin::signature::check_public_key(key)
                .map_err(|reason| err(format!("plugins.trusted_keys: {key}: {reason}")))?;
        }
        if let Some(l) = file.host.listen {
            config.host.listen = parse_listen(&l).map_err(|e| err(format!("host.listen: {e}")))?;
        }
        if let Some(r) = file.host.retention {
            let r = parse_duration(&r).map_err(|e| err(format!("host.retention: {e}")))?;
            // 0 would mean "drop at once" alone and "no limit" to NATS.
            if r < Duration::from_secs(1) {
                return Err(err("host.retention: must be at least 1s".into()));
            }
            config.host.retention = r;
        }
        if let Some(g) = file.host.shutdown_grace {
            config.host.shutdown_grace =
                parse_duration(&g).map_err(|e| err(format!("host.shutdown_grace: {e}")))?;
        }
        if let Some(n) = file.host.instances {
            if n == 0 {
                return Err(err("host.instances: must be at least 1".into()));
            }
            config.host.instances = n;
        }
        if let Some(n) = file.host.instance_slots {
            if !(1..=MAX_INSTANCE_SLOTS).contains(&n) {
                return Err(err(format!(
                    "host.instance_slots: {n} is not between 1 and {MAX_INSTANCE_SLOTS}"
                )));
            }
            config.host.instance_slots = n;
        }
        if let Some(n) = file.host.max_unfinished {
            if n == 0 {
                return Err(err("host.max_unfinished: must be at least 1".into()));
            }
            config.host.max_unfinished = n;
        }
        if let Some(f) = file.host.log_format {
            config.host.log_format = f
                .parse()
                .map_err(|e| err(format!("host.log_format: {e}")))?;
        }
        if let Some(n) = file.host.max_waits {
            if n == 0 {
                return Err(err("host.max_waits: must be at least 1".into()));
            }
            config.host.max_waits = n;
        }
        if let Some(d) = file.host.commit_delay {
            let d = parse_duration(&d).map_err(|e| err(format!("host.commit_delay: {e}")))?;
            if d > MAX_COMMIT_DELAY {
                return Err(err(format!(
                    "host.commit_delay: {} ms is past the limit of {} ms",
                    d.as_millis(),
                    MAX_COMMIT_DELAY.as_millis()
                )));
            }
            config.host.commit_delay = d;
        }
        if let Some(n) = file.host.max_attempts {
            if n == 0 {
                return Err(err("host.max_attempts: must be at least 1".into()));
            }
            config.host.max_attempts = n;
        }
        if let Some(r) = file.audit.retention {
            let r = parse_duration(&r).map_err(|e| err(format!("audit.retention: {e}")))?;
            if r < Duration::from_secs(1) {
                return Err(err("audit.retention: must be at least 1s".into()));
            }
            config.audit.retention = r;
        }
        if let Some(n) = file.audit.max_entries {
            if n == 0 {
                return Err(err("audit.max_entries: must be at least 1".into()));
            }
            config.audit.max_entries = n;
        }
        if let Some(e) = file.telemetry.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(err(format!(
                    "telemetry.otlp_endpoint: {e:?} is not an http:// or https:// URL"
                )));
            }
            config.telemetry.otlp_endpoint = Some(e);
        }
        if let Some(n) = file.telemetry.max_traces_per_second {
            config.telemetry.max_traces_per_second = n;
        }
        if let Some(b) = file.kv.max_bytes {
            config.kv.max_bytes = parse_size(&b).map_err(|e| err(format!("kv.max_bytes: {e}")))?;
        }
        if let Some(n) = file.kv.max_keys {
            if n == 0 {
                return Err(err("kv.max_keys: must be at least 1".into()));
            }
            config.kv.max_keys = n;
        }
        config.plugins = PluginPolicy {
            require_signed: file.plugins.require_signed,
            trusted_keys: file.plugins.trusted_keys,
        };
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<HostConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        HostConfig::load(&path)
    }

    #[test]
    fn listen_takes_an_ip_address_or_localhost_and_no_other_name() {
        let config = load("[host]\nlisten = \"localhost:9000\"\n").unwrap();
        assert_eq!(config.host.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            parse_listen("[::1]:0").unwrap(),
            "[::1]:0".parse::<std::net::SocketAddr>().unwrap()
        );
        for bad in [
            "example.com:9000",
            "localhost",
            "localhost:99999",
            "127.0.0.1",
        ] {
            let e = parse_listen(bad).unwrap_err();
            assert!(e.contains("give an IP address and port"), "{bad}: {e}");
        }
        let e = load("[host]\nlisten = \"db.internal:80\"\n").unwrap_err();
        assert!(
            e.to_string().contains("host.listen: \"db.internal:80\""),
            "{e}"
        );
    }

    #[test]
    fn max_reuse_is_taken_from_1_to_its_limit_and_refused_past_it() {
        let max = crate::plugin::manifest::MAX_REUSE;
        assert_eq!(load("").unwrap().limits.max_reuse, max);
        for n in [1, max] {
            let config = load(&format!("[limits]\nmax_reuse = {n}\n")).unwrap();
            assert_eq!(config.limits.max_reuse, n);
        }
        for n in [0, max + 1] {
            let e = load(&format!("[limits]\nmax_reuse = {n}\n")).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("limits.max_reuse: {n} is not between 1 and {max}")),
                "{e}"
            );
        }
    }

    #[test]
    fn instance_slots_are_taken_up_to_their_limit_and_refused_past_it() {
        assert_eq!(load("").unwrap().host.instance_slots, 256);
        for n in [1, MAX_INSTANCE_SLOTS] {
            let config = load(&format!("[host]\ninstance_slots = {n}\n")).unwrap();
            assert_eq!(config.host.instance_slots, n);
        }
        for n in [0, MAX_INSTANCE_SLOTS + 1] {
            let e = load(&format!("[host]\ninstance_slots = {n}\n")).unwrap_err();
            assert!(
                e.to_string().contains(&format!(
                    "host.instance_slots: {n} is not between 1 and 10000"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn host_retention_is_taken_from_1s_and_refused_below() {
        let config = load("[host]\nretention = \"1s\"\n").unwrap();
        assert_eq!(config.host.retention, Duration::from_secs(1));
        let e = load("[host]\nretention = \"999ms\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("host.retention: must be at least 1s"),
            "{e}"
        );
    }

    #[test]
    fn commit_delay_is_taken_from_zero_to_its_limit_and_refused_past_it() {
        assert_eq!(
            load("").unwrap().host.commit_delay,
            Duration::from_millis(2)
        );
        for (text, ms) in [("0ms", 0), ("100ms", 100)] {
            let config = load(&format!("[host]\ncommit_delay = \"{text}\"\n")).unwrap();
            assert_eq!(config.host.commit_delay, Duration::from_millis(ms));
        }
        let e = load("[host]\ncommit_delay = \"101ms\"\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("host.commit_delay: 101 ms is past the limit of 100 ms"),
            "{e}"
        );
    }
}
