//! clap commands of `orch`. This layer parses arguments, opens the data
//! directory and prints; all behaviour lives in the library.

mod audit;
mod client;
mod fetch;
mod host;
mod inspect;
mod key;
mod plugin;
mod run;
mod task;
mod telemetry;
mod workflow;

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use orch::config::HostConfig;
use orch::kv::KvStore;
use orch::plugin::{PluginError, PluginStore, StoreError};
use orch::{Engine, EngineConfig, LoadError, TaskError};

/// Exit codes. Scripts can tell a refused input from a limit from a failing agent.
pub mod exit {
    /// The command itself failed (I/O, engine setup).
    pub const ERROR: u8 = 1;
    /// Bad input: unreadable, not a component, wrong world, payload too large,
    /// or the agent answered `invalid-input`.
    pub const BAD_INPUT: u8 = 3;
    /// The task hit a limit: fuel, memory, deadline, result size, host-call data.
    pub const LIMIT: u8 = 4;
    /// The agent failed: a trap (panic) or a `failed`/`retryable` answer.
    pub const AGENT_FAILED: u8 = 5;
    /// The host or what it depends on (the NATS server) is unavailable, or
    /// has no room now: the same command may succeed when retried.
    pub const UNAVAILABLE: u8 = 6;
}

const AFTER_HELP: &str = "\
Exit codes: 0 success, 1 error, 2 usage, 3 bad input (file, component, payload, invalid-input),
4 limit exceeded (fuel, memory, deadline, result size), 5 agent failed (trap, panic, failed),
6 (orch task, orch status) the host or its NATS server is unavailable, or has no room now: retry,
7 (orch audit verify) the audit trail is broken: an entry was altered or removed.

Environment: ORCH_HOME is the data directory (default ~/.orch): installed plugins, kv store,
compiled-component cache, task journal, and config.toml (limit maxima, signature policy, host).
ORCH_API is the URL of a running host's API for `orch task` and `orch status`.
ORCH_LOG sets the log filter (default: warn), e.g. ORCH_LOG=info or ORCH_LOG=orch::guest=debug.";

#[derive(Parser)]
#[command(name = "orch", version, about = "Run sandboxed agents compiled to WebAssembly components", after_help = AFTER_HELP)]
struct Cli {
    /// Data directory: installed plugins, kv store, component cache, config.toml.
    #[arg(long, env = "ORCH_HOME", global = true)]
    home: Option<PathBuf>,

    /// Log lines as text, or as one JSON object per line (timestamp,
    /// level, target, message and the event's fields: agent, task, ...).
    /// Default: `[host] log_format` in config.toml, else text.
    #[arg(long, value_enum, env = "ORCH_LOG_FORMAT", global = true)]
    log_format: Option<LogFormatArg>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one task against a component file or an installed plugin and print the result bytes to stdout.
    Run(run::Args),
    /// Show a component's descriptor, imports, exports and size.
    Inspect(inspect::Args),
    /// Install, list, inspect, upgrade, roll back, remove and sign plugins.
    #[command(subcommand, after_help = plugin::WORKFLOW)]
    Plugin(plugin::Command),
    /// Manage signing keys.
    #[command(subcommand)]
    Key(key::Command),
    /// Run the long-lived host that serves installed plugins over an HTTP API.
    #[command(subcommand)]
    Host(host::Command),
    /// Submit, show and list tasks on a running host.
    #[command(subcommand)]
    Task(task::Command),
    /// Register, run, show and cancel durable workflows on a running host.
    #[command(subcommand)]
    Workflow(workflow::Command),
    /// Show a running host: tasks, agents, capabilities, breakers.
    Status(task::StatusArgs),
    /// List and verify the audit trail: who changed what.
    #[command(subcommand)]
    Audit(audit::Command),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Host(_)) {
        // Output to a closed pipe (`| head`) ends the command quietly, as it
        // does other Unix tools; Rust ignores SIGPIPE, so `println!` would
        // panic. The host keeps ignoring it. (Sockets are not affected:
        // std writes them with MSG_NOSIGNAL.)
        // SAFETY: no thread has started yet; this restores the default.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let home = cli.home.clone().unwrap_or_else(default_home);
    let json = match cli.log_format {
        Some(f) => matches!(f, LogFormatArg::Json),
        // A config that does not load is reported by the command itself.
        None => HostConfig::load(&home.join("config.toml"))
            .is_ok_and(|c| c.host.log_format == orch::config::LogFormat::Json),
    };
    telemetry::init(json, host::export(&home, &cli.command));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(&home, args).await,
            Command::Inspect(args) => inspect::run(&home, args).await,
            Command::Plugin(cmd) => plugin::run(&home, cmd).await,
            Command::Key(cmd) => key::run(cmd),
            Command::Host(cmd) => host::run(&home, cmd).await,
            // The API client is blocking (ureq); keep it off the runtime's
            // worker threads.
            Command::Task(cmd) => blocking(move || task::run(&home, cmd)).await,
            Command::Workflow(cmd) => blocking(move || workflow::run(&home, cmd)).await,
            Command::Status(api) => blocking(move || task::status(&home, api)).await,
            Command::Audit(cmd) => blocking(move || audit::run(&home, cmd)).await,
        }
    });
    ExitCode::from(code)
}

async fn blocking(f: impl FnOnce() -> u8 + Send + 'static) -> u8 {
    tokio::task::spawn_blocking(f).await.unwrap_or(exit::ERROR)
}

fn default_home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".orch")
}

/// The engine every command uses: compiled components are cached under the
/// data directory so that the second run of a component does not compile it.
pub fn engine(home: &std::path::Path) -> Result<Engine, LoadError> {
    engine_with(home, EngineConfig::default().instance_slots)
}

/// [`engine`] with a pool of `instance_slots` instances (`orch host start`
/// takes it from `[host] instance_slots`).
pub fn engine_with(home: &std::path::Path, instance_slots: u32) -> Result<Engine, LoadError> {
    Engine::new(EngineConfig {
        cache_dir: Some(home.join("cache").join("components")),
        instance_slots,
        ..EngineConfig::default()
    })
}

/// What most commands need: configuration, engine, kv store, plugin store.
pub struct Context {
    pub home: std::path::PathBuf,
    pub config: HostConfig,
    pub engine: Engine,
    pub kv: Arc<KvStore>,
    pub store: PluginStore,
}

impl Context {
    /// Opens the data directory; on failure prints the error and returns the exit code.
    pub fn open(home: &std::path::Path) -> Result<Context, u8> {
        let config = HostConfig::load(&home.join("config.toml")).map_err(|e| {
            eprintln!("error: {e}");
            exit::ERROR
        })?;
        let engine = engine(home).map_err(|e| {
            eprintln!("error: {e}");
            load_error_code(&e)
        })?;
        let kv = Arc::new(KvStore::with_limits(home.join("kv.redb"), config.kv));
        Ok(Context {
            home: home.to_path_buf(),
            config,
            engine,
            kv,
            store: PluginStore::new(home),
        })
    }
}

/// Loads what a user named on the command line: a bare name (no `/`, not
/// ending in `.wasm`) is an installed plugin; anything else is a component
/// file (`./NAME` for a file without a path or extension), checked with its
/// manifest when it has one, with no grants and the host's default limits
/// when it has none. A file whose manifest grants anything runs only after
/// the user confirms, or with `yes`, as at install. Returns the agent and
/// the limits its manifest gives it.
pub async fn load_agent(
    ctx: &Context,
    target: &str,
    yes: bool,
) -> Result<(orch::Agent, orch::Limits), u8> {
    let path = std::path::Path::new(target);
    let is_name = !target.contains('/') && !target.ends_with(".wasm");
    if !is_name {
        let loaded = load_file(ctx, path).await?;
        if let orch::plugin::Loaded::Plugin(checked) = &loaded {
            // stdout is the task's result: the grants go to stderr, and
            // only when there is a question to answer.
            if loaded.grants_anything() && !yes {
                plugin::print_summary(
                    checked,
                    path,
                    ctx.config.host.instances,
                    &mut std::io::stderr().lock(),
                );
                if !plugin::confirm("run this file with these grants?") {
                    eprintln!("not run");
                    return Err(exit::BAD_INPUT);
                }
            }
        }
        return loaded.into_parts(&ctx.store).map_err(|e| plugin_error(&e));
    }
    match ctx
        .store
        .load(target, &ctx.engine, ctx.kv.clone(), &ctx.config)
        .await
    {
        Ok((agent, limits, _)) => Ok((agent, limits)),
        Err(PluginError::Store(StoreError::NotInstalled { .. })) => {
            let hint = if path.exists() {
                format!("; for the file of that name, write ./{target}")
            } else {
                String::new()
            };
            eprintln!(
                "error: no plugin named {target} is installed (see `orch plugin list`){hint}"
            );
            Err(exit::BAD_INPUT)
        }
        Err(e) => Err(plugin_error(&e)),
    }
}

/// Loads a component file and only describes it (`orch inspect`): nothing
/// is granted, claimed or run.
pub async fn load_file(ctx: &Context, path: &std::path::Path) -> Result<orch::plugin::Loaded, u8> {
    orch::plugin::load_file(&ctx.engine, ctx.kv.clone(), &ctx.config, path)
        .await
        .map_err(|e| plugin_error(&e))
}

/// Prints a plugin error and returns its exit code.
pub fn plugin_error(e: &PluginError) -> u8 {
    eprintln!("error: {}", orch::text::escape_terminal(&e.to_string()));
    match e {
        PluginError::Load(l) => load_error_code(l),
        PluginError::Store(StoreError::Io { .. } | StoreError::Corrupt { .. }) => exit::ERROR,
        _ => exit::BAD_INPUT,
    }
}

pub fn load_error_code(e: &LoadError) -> u8 {
    match e {
        LoadError::Describe { source, .. } => task_error_code(source),
        LoadError::Engine(_) | LoadError::Cache { .. } => exit::ERROR,
        _ => exit::BAD_INPUT,
    }
}

pub fn task_error_code(e: &TaskError) -> u8 {
    match e {
        TaskError::PayloadTooLarge { .. } | TaskError::InvalidInput(_) => exit::BAD_INPUT,
        e if e.is_limit() => exit::LIMIT,
        TaskError::Host(_) | TaskError::NoCapacity { .. } | TaskError::Unavailable(_) => {
            exit::ERROR
        }
        _ => exit::AGENT_FAILED,
    }
}
