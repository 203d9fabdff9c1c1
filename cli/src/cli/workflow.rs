//! `orch workflow ...`: a client of a running host's workflow API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::client::{exit_for_kind, segment, Failed};
use super::task::{client, print_json, read_input, ApiArgs};
use super::{exit, Output};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Check and store a workflow definition (TOML; JSON for a .json
    /// file). A second registration of the same name and version is refused.
    Register {
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the registered definitions.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a definition's versions and steps.
    Inspect {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start a run of a workflow's latest version (or --version). Prints
    /// the run id, or with --wait the run as `get` shows it, and exits
    /// non-zero unless it completed.
    Run {
        name: String,
        /// File with the run's input as JSON; `-` reads standard input.
        /// Default: null.
        #[arg(long)]
        input: Option<PathBuf>,
        #[arg(long)]
        version: Option<u32>,
        /// Fail the run (and undo it) if it has not ended this long after
        /// its start, e.g. 30s. Default: the definition's.
        #[arg(long)]
        deadline: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a run: its status and each step's. With --wait, once it ended
    /// (and exits as `run --wait` does).
    Get {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List runs, newest first.
    Runs {
        /// running, completed, failed, compensating, compensated,
        /// compensation-failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        workflow: Option<String>,
        /// How many at most, from 1 to 10000.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=10_000))]
        limit: u16,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the triggers of each workflow's latest version: its schedules,
    /// with when each fires next, and its subjects.
    Triggers {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a run: no step starts after this, running steps end, then the
    /// completed steps' compensations run.
    Cancel {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args)]
pub struct WaitArgs {
    /// Wait for the run to end.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m")]
    timeout: String,
}

impl WaitArgs {
    fn wait(&self) -> Result<Option<Duration>, u8> {
        super::task::parse_wait(self.wait, &self.timeout)
    }
}

pub fn run(home: &Path, cmd: Command) -> u8 {
    let result: Result<u8, u8> = match cmd {
        Command::Register { file, api } => (|| {
            let text = read_input(Some(&file))?;
            let json = file.extension().is_some_and(|e| e == "json");
            let content_type = if json {
                "application/json"
            } else {
                "application/toml"
            };
            let (_, answer) = client(home, &api, None)
                .post_text("/v1/workflows", content_type, text)
                .map_err(|Failed(c)| c)?;
            if let Output::Json = api.output {
                return Ok(print_json(&answer));
            }
            for w in answer["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", w.as_str().unwrap_or_default());
            }
            println!(
                "registered {} version {}",
                answer["name"].as_str().unwrap_or_default(),
                answer["version"]
            );
            Ok(0)
        })(),
        Command::List { api } => (|| {
            let (_, answer) = client(home, &api, None)
                .request("GET", "/v1/workflows", None)
                .map_err(|Failed(c)| c)?;
            if let Output::Json = api.output {
                return Ok(print_json(&answer));
            }
            println!(
                "{:<24} {:>7} {:>5}  DESCRIPTION",
                "NAME", "VERSION", "STEPS"
            );
            for w in answer["workflows"].as_array().into_iter().flatten() {
                println!(
                    "{:<24} {:>7} {:>5}  {}",
                    w["name"].as_str().unwrap_or_default(),
                    w["version"].as_u64().unwrap_or_default(),
                    w["steps"].as_u64().unwrap_or_default(),
                    w["description"].as_str().unwrap_or_default()
                );
            }
            Ok(0)
        })(),
        Command::Inspect { name, api } => (|| {
            let (_, answer) = client(home, &api, None)
                .request("GET", &format!("/v1/workflows/{}", segment(&name)), None)
                .map_err(|Failed(c)| c)?;
            if let Output::Json = api.output {
                return Ok(print_json(&answer));
            }
            for v in answer["versions"].as_array().into_iter().flatten() {
                let def = &v["definition"];
                println!(
                    "{} version {}",
                    def["name"].as_str().unwrap_or_default(),
                    def["version"]
                );
                for s in def["steps"].as_array().into_iter().flatten() {
                    let after: Vec<&str> = s["after"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let mut line = format!(
                        "  {:<20} {}",
                        s["id"].as_str().unwrap_or_default(),
                        s["capability"].as_str().unwrap_or_default()
                    );
                    if !after.is_empty() {
                        line.push_str(&format!("  after {}", after.join(", ")));
                    }
                    if s["for_each"].is_string() || s["for_each"].is_array() {
                        line.push_str("  (fan-out)");
                    }
                    if let Some(c) = s["compensate"]["capability"].as_str() {
                        line.push_str(&format!("  undo: {c}"));
                    }
                    println!("{line}");
                }
            }
            Ok(0)
        })(),
        Command::Run {
            name,
            input,
            version,
            deadline,
            wait,
            api,
        } => (|| {
            let wait = wait.wait()?;
            let input = match &input {
                None => Value::Null,
                Some(path) => {
                    let bytes = read_input(Some(path))?;
                    serde_json::from_slice(&bytes).map_err(|e| {
                        eprintln!("error: {}: the input is not JSON: {e}", path.display());
                        exit::BAD_INPUT
                    })?
                }
            };
            let mut body = json!({ "input": input });
            if let Some(v) = version {
                body["version"] = json!(v);
            }
            if let Some(d) = deadline {
                body["deadline"] = json!(d);
            }
            let path = match wait {
                Some(w) => format!(
                    "/v1/workflows/{}/runs?wait={}ms",
                    segment(&name),
                    w.as_millis()
                ),
                None => format!("/v1/workflows/{}/runs", segment(&name)),
            };
            let (_, run) = client(home, &api, wait)
                .request("POST", &path, Some(&body))
                .map_err(|Failed(c)| c)?;
            match (api.output, wait.is_some()) {
                (Output::Json, _) => {
                    print_json(&run);
                }
                (Output::Text, true) => print_run(&run),
                (Output::Text, false) => println!("{}", run["id"].as_str().unwrap_or_default()),
            }
            Ok(if wait.is_some() { run_code(&run) } else { 0 })
        })(),
        Command::Get { id, wait, api } => (|| {
            let wait = wait.wait()?;
            let path = match wait {
                Some(w) => format!("/v1/runs/{}?wait={}ms", segment(&id), w.as_millis()),
                None => format!("/v1/runs/{}", segment(&id)),
            };
            let (_, run) = client(home, &api, wait)
                .request("GET", &path, None)
                .map_err(|Failed(c)| c)?;
            match api.output {
                Output::Json => print_json(&run),
                Output::Text => {
                    print_run(&run);
                    0
                }
            };
            Ok(if wait.is_some() { run_code(&run) } else { 0 })
        })(),
        Command::Runs {
            status,
            workflow,
            limit,
            api,
        } => (|| {
            let mut path = format!("/v1/runs?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", segment(&s)));
            }
            if let Some(w) = workflow {
                path.push_str(&format!("&workflow={}", segment(&w)));
            }
            let (_, answer) = client(home, &api, None)
                .request("GET", &path, None)
                .map_err(|Failed(c)| c)?;
            if let Output::Json = api.output {
                return Ok(print_json(&answer));
            }
            println!("{:<26} {:<20} {:<20} STEPS", "ID", "WORKFLOW", "STATUS");
            for r in answer["runs"].as_array().into_iter().flatten() {
                let steps = r["steps"].as_array().cloned().unwrap_or_default();
                let done = steps.iter().filter(|s| s["status"] == "completed").count();
                println!(
                    "{:<26} {:<20} {:<20} {done}/{} completed",
                    r["id"].as_str().unwrap_or_default(),
                    format!(
                        "{} v{}",
                        r["workflow"].as_str().unwrap_or_default(),
                        r["version"]
                    ),
                    r["status"].as_str().unwrap_or_default(),
                    steps.len()
                );
            }
            Ok(0)
        })(),
        Command::Triggers { api } => (|| {
            let (_, answer) = client(home, &api, None)
                .request("GET", "/v1/triggers", None)
                .map_err(|Failed(c)| c)?;
            if let Output::Json = api.output {
                return Ok(print_json(&answer));
            }
            println!(
                "{:<28} {:<24} {:<16} NEXT (UTC)",
                "WORKFLOW", "TRIGGER", "TIME ZONE"
            );
            for t in answer["triggers"].as_array().into_iter().flatten() {
                let workflow = format!(
                    "{} v{}",
                    t["workflow"].as_str().unwrap_or_default(),
                    t["version"].as_u64().unwrap_or_default()
                );
                match t["subject"].as_str() {
                    Some(subject) => println!(
                        "{workflow:<28} {:<24} {:<16} on each message",
                        format!("subject {subject}"),
                        "-"
                    ),
                    None => println!(
                        "{workflow:<28} {:<24} {:<16} {}",
                        t["schedule"].as_str().unwrap_or_default(),
                        t["timezone"].as_str().unwrap_or_default(),
                        t["next_at_ms"].as_u64().map_or("never".into(), utc)
                    ),
                }
            }
            Ok(0)
        })(),
        Command::Cancel { id, api } => (|| {
            let (_, run) = client(home, &api, None)
                .request("POST", &format!("/v1/runs/{}/cancel", segment(&id)), None)
                .map_err(|Failed(c)| c)?;
            match api.output {
                Output::Json => print_json(&run),
                Output::Text => {
                    println!("{}", run["status"].as_str().unwrap_or_default());
                    0
                }
            };
            Ok(0)
        })(),
    };
    result.unwrap_or_else(|code| code)
}

/// The exit code of a run waited for: 0 when it completed, else the code
/// of its error's kind (as for a task).
fn run_code(run: &Value) -> u8 {
    match run["status"].as_str().unwrap_or_default() {
        "completed" => 0,
        "running" | "compensating" => exit::ERROR,
        _ => match exit_for_kind(run["error"]["kind"].as_str().unwrap_or_default()) {
            0 => exit::AGENT_FAILED,
            code => code,
        },
    }
}

/// Unix ms as `YYYY-MM-DD HH:MM:SS` UTC.
fn utc(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn ms_to_time(ms: &Value) -> String {
    ms.as_u64().map_or("-".into(), |ms| {
        let secs = ms / 1000;
        format!(
            "{:02}:{:02}:{:02}.{:03}",
            (secs / 3600) % 24,
            (secs / 60) % 60,
            secs % 60,
            ms % 1000
        )
    })
}

/// At most `max` characters of `text`, with `...` when cut.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

fn print_run(r: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    println!("id:       {}", s(&r["id"]));
    println!("workflow: {} version {}", s(&r["workflow"]), r["version"]);
    println!("status:   {}", s(&r["status"]));
    if let Some(e) = r["error"].as_object() {
        let step = e.get("step").and_then(Value::as_str);
        println!(
            "error:    {}{} ({})",
            step.map(|s| format!("step {s}: ")).unwrap_or_default(),
            e.get("message").and_then(Value::as_str).unwrap_or_default(),
            e.get("kind").and_then(Value::as_str).unwrap_or_default()
        );
    }
    println!(
        "  {:<16} {:<11} {:>8} {:<12} {:<12} {:>10}  AGENT / HOST / ERROR",
        "STEP", "STATUS", "ATTEMPTS", "STARTED", "ENDED", "FUEL"
    );
    for step in r["steps"].as_array().into_iter().flatten() {
        let mut tail = vec![s(&step["agent"])];
        if let Some(h) = step["host"].as_str() {
            tail.push(h.to_string());
        }
        if let Some(m) = step["error"]["message"].as_str() {
            tail.push(m.to_string());
        }
        println!(
            "  {:<16} {:<11} {:>8} {:<12} {:<12} {:>10}  {}",
            s(&step["id"]),
            s(&step["status"]),
            step["attempts"].as_u64().unwrap_or_default(),
            ms_to_time(&step["started_at_ms"]),
            ms_to_time(&step["ended_at_ms"]),
            step["fuel_used"]
                .as_u64()
                .map_or("-".into(), |f| f.to_string()),
            tail.join(" / ")
        );
        if let Some(c) = step["compensation"].as_object() {
            println!(
                "    undo: {} {}{}",
                c.get("capability")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                c.get("status").and_then(Value::as_str).unwrap_or_default(),
                c.get("error")
                    .and_then(|e| e["message"].as_str())
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            );
        }
    }
    // The last step comes after all it depends on: its result is usually
    // the run's.
    let last = r["steps"].as_array().and_then(|s| s.last());
    if let Some(last) = last.filter(|s| s["status"] == "completed") {
        println!(
            "result ({}): {}",
            s(&last["id"]),
            orch::text::escape_terminal(&clip(&last["result"].to_string(), 400))
        );
    }
}
