//! `orch audit ...`: a client of a running host's audit trail.

use std::path::Path;

use serde_json::Value;

use super::client::Failed;
use super::task::{client, print_json, ApiArgs};
use super::{exit, Output};

/// The exit code of `orch audit verify` when a chain is broken.
pub const BROKEN: u8 = 7;

#[derive(clap::Subcommand)]
pub enum Command {
    /// List audit entries, oldest first: the last --limit of those that
    /// match.
    List {
        /// Only entries from this time on: a duration ago (`1h`, `30m`) or
        /// an RFC 3339 time (`2026-11-29T12:00:00Z`).
        #[arg(long)]
        since: Option<String>,
        /// Only this kind, or kinds that start with it (`plugin`,
        /// `task.submit`).
        #[arg(long)]
        kind: Option<String>,
        /// How many at most, from 1 to 10000.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=10_000))]
        limit: u16,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Check every host's chain of entries: exits 0 when intact, 7 and
    /// names the first bad entry when one was altered or removed.
    Verify {
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `--since` as Unix milliseconds.
fn since_ms(since: &str) -> Result<u64, String> {
    if let Ok(ago) = orch::units::parse_duration(since) {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        return Ok(now.saturating_sub(ago.as_millis() as u64));
    }
    chrono::DateTime::parse_from_rfc3339(since)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|e| {
            format!("--since {since:?}: neither a duration (1h) nor an RFC 3339 time ({e})")
        })
}

fn time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

pub fn run(home: &Path, cmd: Command) -> u8 {
    let result: Result<u8, u8> = match cmd {
        Command::List {
            since,
            kind,
            limit,
            api,
        } => (|| {
            let mut path = format!("/v1/audit?limit={limit}");
            if let Some(s) = since {
                let ms = since_ms(&s).map_err(|e| {
                    eprintln!("error: {e}");
                    exit::BAD_INPUT
                })?;
                path.push_str(&format!("&since_ms={ms}"));
            }
            if let Some(k) = kind {
                path.push_str(&format!("&kind={}", super::client::segment(&k)));
            }
            let (_, answer) = client(home, &api, None)
                .request("GET", &path, None)
                .map_err(|Failed(c)| c)?;
            if let Output::Json = api.output {
                return Ok(print_json(&answer));
            }
            println!(
                "{:<24} {:<10} {:>6}  {:<18} {:<22} DETAIL",
                "TIME", "HOST", "SEQ", "KIND", "BY"
            );
            for e in answer["entries"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:<10} {:>6}  {:<18} {:<22} {}",
                    time(e["at_ms"].as_u64().unwrap_or_default()),
                    e["host"].as_str().unwrap_or_default(),
                    e["seq"].as_u64().unwrap_or_default(),
                    e["kind"].as_str().unwrap_or_default(),
                    e["by"].as_str().unwrap_or_default(),
                    e["detail"]
                );
            }
            Ok(0)
        })(),
        Command::Verify { api } => (|| {
            let (_, verdict) = client(home, &api, None)
                .request("GET", "/v1/audit/verify", None)
                .map_err(|Failed(c)| c)?;
            let ok = verdict["ok"].as_bool().unwrap_or(false);
            if let Output::Json = api.output {
                print_json(&verdict);
                return Ok(if ok { 0 } else { BROKEN });
            }
            if ok {
                let chains = verdict["chains"].as_object().map_or(0, |c| c.len());
                println!(
                    "ok: {} entries in {chains} chain(s), every one intact",
                    verdict["entries"]
                );
                return Ok(0);
            }
            let bad = &verdict["bad"];
            eprintln!(
                "broken: {} (host {}, seq {}, stored at {})",
                bad["reason"].as_str().unwrap_or_default(),
                bad["host"].as_str().unwrap_or("?"),
                bad["seq"],
                bad["position"]
            );
            if bad["entry"] != Value::Null {
                eprintln!("entry: {}", bad["entry"]);
            }
            Ok(BROKEN)
        })(),
    };
    result.unwrap_or_else(|c| c)
}
