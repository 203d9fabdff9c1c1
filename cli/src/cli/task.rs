//! `orch task ...` and `orch status`: clients of a running host's API.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use super::client::{api_url, exit_for_kind, segment, Client, Failed};
use super::{exit, Output};

#[derive(clap::Args)]
pub struct ApiArgs {
    /// URL of the host's API (default: the host running on $ORCH_HOME, else
    /// http://127.0.0.1:7878).
    #[arg(long, env = "ORCH_API")]
    pub api: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub output: Output,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Submit a task by capability. Prints the task id, or with --wait the result.
    /// With --batch, submits one task per line of a file and prints one JSON
    /// line per task (with --wait, as each task ends).
    Submit {
        /// The capability to run, e.g. text.wordcount.
        #[arg(long, required_unless_present = "batch")]
        capability: Option<String>,
        /// File of JSON lines, one submission per line as the body of
        /// `POST /v1/tasks` (`{"capability", "input", ...}`); `-` reads
        /// standard input. At most 10,000 lines. Prints the answer lines
        /// (JSON, whatever --output says).
        #[arg(long, conflicts_with_all = ["capability", "input", "priority", "deadline", "idempotency_key"])]
        batch: Option<PathBuf>,
        /// File with the payload; `-` reads standard input. Default: empty.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Higher runs first (default 0).
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Fail the task if it has not ended this long after submission, e.g. 2s.
        #[arg(long)]
        deadline: Option<String>,
        /// Submitting again with the same key returns the first task.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one task.
    Get {
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a task that has not ended: it ends as `cancelled` and its
    /// running attempt is stopped. Prints the task's status.
    Cancel {
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print the host's task events as they happen, one JSON object per
    /// line (accepted, started, retried, completed, failed, dead, cancelled,
    /// fenced), until interrupted or, with a task id, until that task ends
    /// (in a cluster, the events of a run are on the host that ran it).
    Watch {
        /// Only this task's events (and its sub-tasks').
        #[arg(long)]
        task: Option<String>,
        #[arg(long)]
        capability: Option<String>,
        /// URL of the host's API (default: the host running on $ORCH_HOME).
        #[arg(long, env = "ORCH_API")]
        api: Option<String>,
    },
    /// List tasks, newest first.
    List {
        /// queued, running, completed, failed, dead or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        capability: Option<String>,
        /// How many at most, from 1 to 10000.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u16).range(1..=10_000))]
        limit: u16,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(clap::Args)]
pub struct WaitArgs {
    /// Wait for the task to end, then print it (`submit` prints the result)
    /// and exit with the exit code of `orch run` for its outcome.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "5m")]
    timeout: String,
}

impl WaitArgs {
    /// The `wait` query parameter to send, if any.
    fn wait(&self) -> Result<Option<Duration>, u8> {
        parse_wait(self.wait, &self.timeout)
    }
}

/// `--wait` and `--timeout` as the wait to ask the API for, if any.
pub fn parse_wait(wait: bool, timeout: &str) -> Result<Option<Duration>, u8> {
    if !wait {
        return Ok(None);
    }
    match orch::units::parse_duration(timeout) {
        // Checked before anything is submitted: a wait of nothing would
        // submit the task and then report it unfinished.
        Ok(t) if t.is_zero() => {
            eprintln!("error: --timeout must be greater than zero");
            Err(exit::BAD_INPUT)
        }
        Ok(t) => Ok(Some(t)),
        Err(e) => {
            eprintln!("error: --timeout: {e}");
            Err(exit::BAD_INPUT)
        }
    }
}

/// A client of the API that waits `wait` for an answer, and 30 s more.
pub fn client(home: &Path, api: &ApiArgs, wait: Option<Duration>) -> Client {
    let timeout = wait.unwrap_or_default() + Duration::from_secs(30);
    Client::new(api_url(home, api.api.clone()), timeout)
}

pub fn run(home: &Path, cmd: Command) -> u8 {
    let result = match cmd {
        Command::Submit {
            batch: Some(batch),
            wait,
            api,
            ..
        } => (|| {
            let wait = wait.wait()?;
            let body = read_input(Some(&batch))?;
            let client = client(home, &api, wait);
            let path = match wait {
                Some(w) => format!("/v1/tasks:batch?wait={}ms", w.as_millis()),
                None => "/v1/tasks:batch".to_string(),
            };
            // The code of the first line in the batch's order that did not
            // complete: answers with `wait` come in the order tasks end.
            let mut first: Option<(u64, u8)> = None;
            let mut out = std::io::stdout().lock();
            client
                .post_lines(&path, body, |line| {
                    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
                    let (index, code) = batch_line_code(line, wait.is_some());
                    if code != 0 && first.is_none_or(|(i, _)| index < i) {
                        first = Some((index, code));
                    }
                })
                .map_err(|Failed(c)| c)?;
            Ok(first.map_or(0, |(_, code)| code))
        })(),
        Command::Submit {
            capability: Some(capability),
            input,
            priority,
            deadline,
            idempotency_key,
            wait,
            api,
            batch: None,
        } => (|| {
            let wait = wait.wait()?;
            let payload = read_input(input.as_deref())?;
            let mut body = json!({ "capability": capability, "priority": priority });
            let b64 = |bytes: &[u8]| {
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            };
            match String::from_utf8(payload) {
                // Text whose JSON escapes (newlines, control characters)
                // would outgrow base64 goes as base64: the host's body
                // limit is sized for that.
                Ok(text) if escaped_len(&text) > text.len().div_ceil(3) * 4 => {
                    body["input_base64"] = b64(text.as_bytes())
                }
                Ok(text) => body["input"] = Value::String(text),
                Err(e) => body["input_base64"] = b64(e.as_bytes()),
            }
            if let Some(d) = deadline {
                body["deadline"] = Value::String(d);
            }
            if let Some(k) = idempotency_key {
                body["idempotency_key"] = Value::String(k);
            }
            let client = client(home, &api, wait);
            let path = match wait {
                Some(w) => format!("/v1/tasks?wait={}ms", w.as_millis()),
                None => "/v1/tasks".to_string(),
            };
            let (_, task) = client
                .request("POST", &path, Some(&body))
                .map_err(|Failed(c)| c)?;
            Ok(match (api.output, wait.is_some()) {
                (Output::Json, false) => print_json(&task),
                (Output::Json, true) => {
                    print_json(&task);
                    waited_code(&task)
                }
                (Output::Text, true) => print_result(&task),
                (Output::Text, false) => {
                    println!("{}", task["id"].as_str().unwrap_or_default());
                    0
                }
            })
        })(),
        // clap requires a capability without --batch.
        Command::Submit { .. } => Err(exit::BAD_INPUT),
        Command::Get { id, wait, api } => (|| {
            let wait = wait.wait()?;
            let client = client(home, &api, wait);
            let path = match wait {
                Some(w) => format!("/v1/tasks/{}?wait={}ms", segment(&id), w.as_millis()),
                None => format!("/v1/tasks/{}", segment(&id)),
            };
            let (_, task) = client.request("GET", &path, None).map_err(|Failed(c)| c)?;
            match api.output {
                Output::Json => println!("{task}"),
                Output::Text => print_task(&task),
            }
            // A wait is for the task's outcome, so it exits as `submit
            // --wait` (and `workflow get --wait`) do; a plain read that
            // found the task succeeded.
            Ok(if wait.is_some() {
                waited_code(&task)
            } else {
                0
            })
        })(),
        Command::Cancel { id, api } => (|| {
            let client = client(home, &api, None);
            let (_, task) = client
                .request("POST", &format!("/v1/tasks/{}/cancel", segment(&id)), None)
                .map_err(|Failed(c)| c)?;
            Ok(match api.output {
                Output::Json => print_json(&task),
                Output::Text => {
                    println!("{}", task["status"].as_str().unwrap_or_default());
                    0
                }
            })
        })(),
        Command::Watch {
            task,
            capability,
            api,
        } => {
            let base = api_url(home, api);
            Ok(super::client::watch(
                &base,
                task.as_deref(),
                capability.as_deref(),
            ))
        }
        Command::List {
            status,
            capability,
            limit,
            api,
        } => (|| {
            let client = client(home, &api, None);
            let mut path = format!("/v1/tasks?limit={limit}");
            if let Some(s) = status {
                path.push_str(&format!("&status={}", segment(&s)));
            }
            if let Some(c) = capability {
                path.push_str(&format!("&capability={}", segment(&c)));
            }
            let (_, value) = client.request("GET", &path, None).map_err(|Failed(c)| c)?;
            Ok(match api.output {
                Output::Json => print_json(&value),
                Output::Text => {
                    let tasks = value["tasks"].as_array().cloned().unwrap_or_default();
                    if tasks.is_empty() {
                        println!("no tasks");
                    }
                    for t in tasks {
                        println!(
                            "{:<22} {:<10} {:<24} attempts {} {}",
                            t["id"].as_str().unwrap_or_default(),
                            t["status"].as_str().unwrap_or_default(),
                            t["capability"].as_str().unwrap_or_default(),
                            t["attempts"],
                            t["agent"].as_str().unwrap_or_default(),
                        );
                    }
                    0
                }
            })
        })(),
    };
    result.unwrap_or_else(|code| code)
}

/// `orch status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// Show the status again every --interval until interrupted; on a
    /// terminal, in place.
    #[arg(long)]
    watch: bool,
    /// How often --watch refreshes.
    #[arg(long, default_value = "1s")]
    interval: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// `orch status [--watch]`.
pub fn status(home: &Path, args: StatusArgs) -> u8 {
    if !args.watch {
        return status_once(home, &args.api);
    }
    let interval = match orch::units::parse_duration(&args.interval) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            eprintln!("error: --interval: must be more than 0");
            return exit::BAD_INPUT;
        }
        Err(e) => {
            eprintln!("error: --interval: {e}");
            return exit::BAD_INPUT;
        }
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    loop {
        if terminal {
            // Cursor home and clear: the new status replaces the old.
            print!("\x1b[H\x1b[2J");
        }
        // A host that is restarting comes back: the error is shown and
        // the watch goes on.
        let _ = status_once(home, &args.api);
        if !terminal {
            println!();
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(interval);
    }
}

fn status_once(home: &Path, api: &ApiArgs) -> u8 {
    let client = client(home, api, None);
    let value = match client.request("GET", "/v1/status", None) {
        Ok((_, v)) => v,
        Err(Failed(code)) => return code,
    };
    if let Output::Json = api.output {
        return print_json(&value);
    }
    println!(
        "host {} (orch {}) at {}, up {} s",
        value["host"].as_str().unwrap_or_default(),
        value["version"].as_str().unwrap_or_default(),
        client.base(),
        value["uptime_ms"].as_u64().unwrap_or(0) / 1000
    );
    let on_this = if value["cluster"].is_object() {
        " (this host)"
    } else {
        ""
    };
    println!(
        "tasks{on_this}: {} queued, {} running",
        value["tasks"]["queued"], value["tasks"]["running"]
    );
    println!("agents:");
    for a in value["agents"].as_array().cloned().unwrap_or_default() {
        let caps: Vec<&str> = a["capabilities"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "  {:<24} {}/{} busy, {} done, {} failed, score {:.2}, breaker {}  [{}]",
            a["label"].as_str().unwrap_or_default(),
            a["in_flight"],
            a["instances"],
            a["completed"],
            a["failed"],
            a["score"].as_f64().unwrap_or(0.0),
            a["breaker"].as_str().unwrap_or_default(),
            caps.join(", ")
        );
    }
    if let Some(cluster) = value["cluster"].as_object() {
        // Counts the host could not read (its NATS server is unreachable)
        // come as null.
        let count = |v: &Value| match v {
            Value::Null => "unknown".to_string(),
            v => v.to_string(),
        };
        let link = if cluster.get("connected") == Some(&Value::Bool(false)) {
            ", not connected: other hosts as last heard"
        } else {
            ""
        };
        println!(
            "cluster ({}{link}): {} tasks on the stream, {} running",
            cluster
                .get("nats")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            count(&value["cluster"]["tasks"]["on_stream"]),
            count(&value["cluster"]["tasks"]["running"])
        );
        for h in cluster
            .get("hosts")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            let caps: Vec<&str> = h["capabilities"]
                .as_array()
                .map(|c| c.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!(
                "  {:<10} {:<6} heartbeat {} ms ago, {} free, {} running, {} queued  [{}]",
                h["host"].as_str().unwrap_or_default(),
                h["state"].as_str().unwrap_or_default(),
                h["last_heartbeat_ms"],
                h["free"],
                h["running"],
                h["queued"],
                caps.join(", ")
            );
        }
    }
    for e in value["plugin_errors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        println!(
            "  not served: {}: {}",
            e["plugin"].as_str().unwrap_or_default(),
            e["error"].as_str().unwrap_or_default()
        );
    }
    0
}

/// The length of `text` as a JSON string, quotes included.
fn escaped_len(text: &str) -> usize {
    2 + text
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

pub fn read_input(input: Option<&Path>) -> Result<Vec<u8>, u8> {
    match input {
        None => Ok(Vec::new()),
        Some(p) if p == Path::new("-") => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).map_err(|e| {
                eprintln!("error: cannot read standard input: {e}");
                exit::ERROR
            })?;
            Ok(buf)
        }
        Some(p) => std::fs::read(p).map_err(|e| {
            eprintln!("error: cannot read {}: {e}", p.display());
            exit::BAD_INPUT
        }),
    }
}

/// A batch answer line's `index` and the exit code it calls for: 0 for a
/// task accepted (or, when waited for, completed), else what `orch task
/// submit` exits with for that refusal or that task's error. A line that
/// does not parse counts as the last.
fn batch_line_code(line: &str, waited: bool) -> (u64, u8) {
    let Ok(value) = serde_json::from_str::<Value>(line) else {
        return (u64::MAX, exit::ERROR);
    };
    let index = value["index"].as_u64().unwrap_or(u64::MAX);
    if let Some(kind) = value["error"]["kind"].as_str() {
        return (index, super::client::exit_for_refusal(kind));
    }
    if !waited {
        return (index, 0);
    }
    (index, waited_code(&value["task"]))
}

/// The exit code for a task that was waited for: 0 completed, its error's
/// code when it ended otherwise, 1 when the wait ran out first.
fn waited_code(task: &Value) -> u8 {
    match task["status"].as_str().unwrap_or_default() {
        "completed" => 0,
        "failed" | "dead" | "cancelled" => {
            exit_for_kind(task["error"]["kind"].as_str().unwrap_or_default())
        }
        _ => exit::ERROR,
    }
}

pub fn print_json(value: &Value) -> u8 {
    println!("{value}");
    0
}

/// Prints a finished task's result bytes to stdout, or its error to stderr
/// with the exit code `orch run` would use.
fn print_result(task: &Value) -> u8 {
    match task["status"].as_str().unwrap_or_default() {
        "completed" => {
            let bytes = match (task["result"].as_str(), task["result_base64"].as_str()) {
                (Some(text), _) => text.as_bytes().to_vec(),
                (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap_or_default(),
                (None, None) => Vec::new(),
            };
            let mut out = std::io::stdout();
            let _ = out.write_all(&bytes);
            let _ = out.flush();
            0
        }
        "failed" | "dead" | "cancelled" => {
            let kind = task["error"]["kind"].as_str().unwrap_or_default();
            eprintln!(
                "error: task {} {}: {}",
                task["id"].as_str().unwrap_or_default(),
                task["status"].as_str().unwrap_or_default(),
                task["error"]["message"].as_str().unwrap_or_default()
            );
            exit_for_kind(kind)
        }
        other => {
            eprintln!(
                "error: task {} is still {other}; see it later with `orch task get {}`",
                task["id"].as_str().unwrap_or_default(),
                task["id"].as_str().unwrap_or_default()
            );
            exit::ERROR
        }
    }
}

fn print_task(t: &Value) {
    let field = |k: &str| t[k].as_str().unwrap_or("-").to_string();
    println!("id:         {}", field("id"));
    println!("capability: {}", field("capability"));
    println!("status:     {}", field("status"));
    println!("attempts:   {}", t["attempts"]);
    println!("agent:      {}", field("agent"));
    if let Some(trace) = t["trace_id"].as_str() {
        println!("trace:      {trace}");
    }
    if let Some(fuel) = t["fuel_used"].as_u64() {
        match t["subtasks"].as_u64().unwrap_or(0) {
            0 => println!("fuel:       {fuel}"),
            n => println!(
                "fuel:       {fuel} ({} of it for {n} sub-task(s))",
                t["subtask_fuel"].as_u64().unwrap_or(0)
            ),
        }
    }
    if let Some(e) = t["error"].as_object() {
        println!(
            "error:      {} ({})",
            e.get("message").and_then(Value::as_str).unwrap_or_default(),
            e.get("kind").and_then(Value::as_str).unwrap_or_default()
        );
    }
    for a in t["attempt_errors"].as_array().cloned().unwrap_or_default() {
        println!(
            "  attempt on {}: {}",
            a["agent"].as_str().unwrap_or_default(),
            a["message"].as_str().unwrap_or_default()
        );
    }
    if let Some(r) = t["result"].as_str() {
        println!("result:     {r}");
    } else if t["result_base64"].is_string() {
        println!("result:     (binary; use --output json for result_base64)");
    }
}
