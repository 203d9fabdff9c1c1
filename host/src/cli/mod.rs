//! clap commands of `orch`. This layer parses arguments, opens the data
//! directory and prints; all behaviour lives in the library.

mod inspect;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
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
}

const AFTER_HELP: &str = "\
Exit codes: 0 success, 1 error, 2 usage, 3 bad input (file, component, payload, invalid-input),
4 limit exceeded (fuel, memory, deadline, result size), 5 agent failed (trap, panic, failed).

Environment: ORCH_HOME is the data directory (default ~/.orch): kv store and compiled-component cache.
ORCH_LOG sets the log filter (default: warn), e.g. ORCH_LOG=info or ORCH_LOG=orch::guest=debug.";

#[derive(Parser)]
#[command(name = "orch", version, about = "Run sandboxed agents compiled to WebAssembly components", after_help = AFTER_HELP)]
struct Cli {
    /// Data directory: kv store and component cache.
    #[arg(long, env = "ORCH_HOME", global = true)]
    home: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one task against a component and print the result bytes to stdout.
    Run(run::Args),
    /// Show a component's descriptor, imports, exports and size.
    Inspect(inspect::Args),
}

#[derive(Clone, Copy, Default, ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
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
    let home = cli.home.unwrap_or_else(default_home);
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(&home, args).await,
            Command::Inspect(args) => inspect::run(&home, args).await,
        }
    });
    ExitCode::from(code)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    Engine::new(EngineConfig {
        cache_dir: Some(home.join("cache").join("components")),
        ..EngineConfig::default()
    })
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
        TaskError::Host(_) | TaskError::NoCapacity { .. } => exit::ERROR,
        _ => exit::AGENT_FAILED,
    }
}
