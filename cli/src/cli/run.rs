//! `orch run`: one task against one component.

use std::io::{Read, Write};
use std::path::Path;

use orch::units::{format_size, parse_duration, parse_size};
use orch::{Agent, Limits, TaskRequest};

use super::{exit, task_error_code, Context, Output};

fn defaults_help() -> String {
    let l = Limits::default();
    format!(
        "Limit defaults: --fuel {}, --memory {}, --timeout {}ms, payload and result at most {} each, \
         at most {} of data per host call, kv values at most {}. A manifest beside the component \
         (NAME.toml) or an installed plugin's manifest may set others, within the host's maxima \
         ($ORCH_HOME/config.toml); flags override both, within the maxima.",
        l.fuel,
        format_size(l.memory),
        l.timeout.as_millis(),
        format_size(l.max_payload),
        format_size(l.hostcall_budget()),
        format_size(l.max_kv_value),
    )
}

#[derive(clap::Args)]
#[command(after_help = defaults_help())]
pub struct Args {
    /// The name of an installed plugin, or a component file: a path with a
    /// `/` or ending in `.wasm` (`./NAME` for a file named like a plugin).
    component: String,
    /// File whose bytes are the task payload; `-` reads standard input. Empty payload if absent.
    #[arg(long, short)]
    input: Option<String>,
    /// Capability to ask for; defaults to the first one the agent declares.
    #[arg(long)]
    capability: Option<String>,
    /// Fuel budget for the task (about one unit per wasm instruction).
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory cap for the instance, e.g. 64MiB.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Wall-clock deadline, e.g. 500ms or 2s.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// `text` prints the result bytes as they are; `json` prints an object with the result and figures.
    #[arg(long, value_enum, default_value_t)]
    output: Output,
    /// Run a file whose manifest grants kv, environment variables,
    /// directories or messaging without asking (as `plugin install --yes`).
    #[arg(long, short)]
    yes: bool,
}

pub async fn run(home: &Path, args: Args) -> u8 {
    if args.timeout.is_some_and(|t| t.is_zero()) {
        eprintln!("error: --timeout must be greater than zero");
        return exit::BAD_INPUT;
    }
    if args.fuel == Some(0) {
        eprintln!("error: --fuel must be greater than zero");
        return exit::BAD_INPUT;
    }
    let ctx = match Context::open(home) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let max = &ctx.config.limits;
    let over = [
        (
            args.fuel.is_some_and(|f| f > max.max_fuel),
            format!(
                "--fuel is above this host's maximum of {} ([limits] max_fuel)",
                max.max_fuel
            ),
        ),
        (
            args.memory.is_some_and(|m| m > max.max_memory),
            format!(
                "--memory is above this host's maximum of {} ([limits] max_memory)",
                format_size(max.max_memory)
            ),
        ),
        (
            args.timeout.is_some_and(|t| t > max.max_timeout),
            format!(
                "--timeout is above this host's maximum of {} ms ([limits] max_timeout)",
                max.max_timeout.as_millis()
            ),
        ),
    ];
    if let Some((_, message)) = over.iter().find(|(is_over, _)| *is_over) {
        eprintln!("error: {message}");
        return exit::BAD_INPUT;
    }
    let payload = match read_payload(
        args.input.as_deref(),
        ctx.config.limits.defaults.max_payload,
    ) {
        Ok(p) => p,
        Err((code, message)) => {
            eprintln!("error: {message}");
            return code;
        }
    };
    let (agent, mut limits) = match super::load_agent(&ctx, &args.component, args.yes).await {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Some(f) = args.fuel {
        limits.fuel = f;
    }
    if let Some(m) = args.memory {
        limits.memory = m;
    }
    if let Some(t) = args.timeout {
        limits.timeout = t;
    }
    let capability = match args.capability {
        Some(c) if agent.descriptor().capabilities.iter().any(|x| x.name == c) => c,
        Some(c) => {
            eprintln!(
                "error: agent {} does not provide capability {c}; it provides: {}",
                agent.descriptor().name,
                capability_names(&agent)
            );
            return exit::BAD_INPUT;
        }
        // Loading refuses descriptors without capabilities, so there is a first one.
        None => match agent.descriptor().capabilities.first() {
            Some(c) => c.name.clone(),
            None => {
                eprintln!(
                    "error: agent {} declares no capabilities",
                    agent.descriptor().name
                );
                return exit::BAD_INPUT;
            }
        },
    };
    let task = TaskRequest {
        id: task_id(),
        capability,
        payload,
        content_type: "application/octet-stream".into(),
        attempt: 1,
        calls: None,
    };
    let id = task.id.clone();
    match agent.handle(task, &limits).await {
        Ok(out) => {
            match args.output {
                Output::Text => {
                    let mut stdout = std::io::stdout().lock();
                    if stdout
                        .write_all(&out.result)
                        .and_then(|_| stdout.flush())
                        .is_err()
                    {
                        return exit::ERROR;
                    }
                }
                Output::Json => {
                    let (result, result_hex) = match String::from_utf8(out.result) {
                        Ok(s) => (Some(s), None),
                        Err(e) => (None, Some(hex::encode(e.as_bytes()))),
                    };
                    let json = serde_json::json!({
                        "id": id,
                        "status": "completed",
                        "agent": agent.descriptor().name,
                        "version": agent.descriptor().version,
                        "result": result,
                        "result_hex": result_hex,
                        "fuel_used": out.fuel_used,
                        "elapsed_us": out.elapsed.as_micros() as u64,
                    });
                    println!("{json}");
                }
            }
            0
        }
        Err(e) => {
            if let Output::Json = args.output {
                let json = serde_json::json!({
                    "id": id,
                    "status": "failed",
                    "agent": agent.descriptor().name,
                    "error": { "kind": e.kind(), "message": e.to_string() },
                });
                println!("{json}");
            }
            eprintln!("error: task {id} on {}: {e}", agent.descriptor().name);
            task_error_code(&e)
        }
    }
}

fn capability_names(agent: &Agent) -> String {
    let names: Vec<&str> = agent
        .descriptor()
        .capabilities
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    names.join(", ")
}

/// Reads at most `limit + 1` bytes so an oversized input is refused without
/// reading all of it into memory.
fn read_payload(input: Option<&str>, limit: u64) -> Result<Vec<u8>, (u8, String)> {
    let mut buf = Vec::new();
    let read = match input {
        None => return Ok(buf),
        Some("-") => std::io::stdin()
            .lock()
            .take(limit + 1)
            .read_to_end(&mut buf),
        Some(path) => std::fs::File::open(path)
            .and_then(|f| f.take(limit + 1).read_to_end(&mut buf))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{path}: {e}"))),
    };
    read.map_err(|e| (exit::BAD_INPUT, format!("cannot read input {e}")))?;
    if buf.len() as u64 > limit {
        return Err((
            exit::BAD_INPUT,
            format!(
                "payload too large: more than {limit} bytes, past the limit of {} ",
                format_size(limit)
            ),
        ));
    }
    Ok(buf)
}

/// A task id as the host makes them: `t` and a ULID.
fn task_id() -> String {
    format!("t{}", ulid::Ulid::new().to_string().to_ascii_lowercase())
}
