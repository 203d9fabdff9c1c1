//! Typed errors. Every message names the thing that went wrong and, for
//! limits, the limit, so that an operator can act on it without reading code.

use std::path::PathBuf;

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a regular file ({kind}); a component must be a file")]
    NotAFile { path: PathBuf, kind: &'static str },

    #[error("{path} is {size} bytes, past the limit of {limit} bytes for a component")]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },

    #[error("{path} is not a WebAssembly file (it does not start with the \\0asm magic bytes)")]
    NotWasm { path: PathBuf },

    #[error(
        "{path} is a core WebAssembly module, not a component; turn it into a component \
         (for example with orch-componentize or `wasm-tools component new`)"
    )]
    CoreModule { path: PathBuf },

    #[error("{path} is not a valid component: {reason}")]
    InvalidComponent { path: PathBuf, reason: String },

    #[error("{path} does not implement the world {world}: {details}")]
    WrongWorld {
        path: PathBuf,
        world: &'static str,
        details: String,
    },

    #[error("{path}: describe failed: {source}")]
    Describe {
        path: PathBuf,
        #[source]
        source: Box<TaskError>,
    },

    #[error("{path}: invalid descriptor: {reason}")]
    InvalidDescriptor { path: PathBuf, reason: String },

    #[error("{path}: grant refused: {reason}")]
    Grant { path: PathBuf, reason: String },

    #[error("component cache at {path}: {reason}")]
    Cache { path: PathBuf, reason: String },

    #[error("engine setup failed: {0}")]
    Engine(String),
}

/// Why a task did not produce a result. The host reports these to whoever
/// submitted the task; the instance that produced one is always discarded.
/// It crosses hosts as itself (serde), so a caller on another host gets the
/// same typed error as a local one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskError {
    #[error("fuel exhausted: the task used all of its {limit} fuel")]
    FuelExhausted { limit: u64 },

    #[error("memory limit: the agent asked for {requested} bytes of linear memory, past the limit of {limit} bytes")]
    MemoryLimit { limit: u64, requested: u64 },

    #[error("table limit: the agent asked for a table of {requested} elements, past the limit of {limit} elements")]
    TableLimit { limit: u64, requested: u64 },

    #[error("deadline exceeded: the task did not end within its deadline of {ms} ms")]
    DeadlineExceeded { ms: u64 },

    #[error("payload too large: {size} bytes, past the limit of {limit} bytes")]
    PayloadTooLarge { size: u64, limit: u64 },

    #[error("result too large: the agent returned {size} bytes, past the limit of {limit} bytes")]
    ResultTooLarge { size: u64, limit: u64 },

    /// The result was too large for the host to read at all: the agent
    /// returned more than `read` bytes.
    #[error("result too large: the agent returned more than {read} bytes, past the limit of {limit} bytes")]
    ResultTooLargeToRead { read: u64, limit: u64 },

    #[error("host call data limit: the agent passed more than {limit} bytes to one host call")]
    HostCallDataLimit { limit: u64 },

    #[error("no free instance: all {limit} instance slots of this host are in use")]
    NoCapacity { limit: u64 },

    #[error("guest trap: {}", trap_text(.message, .guest))]
    Trap {
        message: String,
        /// The guest's own account of the failure, when it gave one before
        /// trapping: a Rust panic message ("panicked at ...") or the tail of
        /// its stderr ("wrote to stderr: ...", e.g. a Python traceback).
        guest: Option<String>,
    },

    #[error("invalid input: {0}")]
    InvalidInput(String),

    #[error("agent failed: {0}")]
    Failed(String),

    #[error("retryable failure: {0}")]
    Retryable(String),

    #[error("unavailable: {0}")]
    Unavailable(String),

    #[error("host error: {0}")]
    Host(String),

    #[error("cancelled: the task was cancelled before it ended")]
    Cancelled,

    /// A durable agent, run again, made a `tasks.call` that does not match
    /// the one recorded at that place in its earlier run.
    #[error("non-deterministic: {0}")]
    NonDeterministic(String),
}

fn trap_text(message: &str, guest: &Option<String>) -> String {
    match guest {
        Some(p) => format!("{message}; the agent {p}"),
        None => message.to_string(),
    }
}

impl TaskError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            TaskError::FuelExhausted { .. } => "fuel-exhausted",
            TaskError::MemoryLimit { .. } => "memory-limit",
            TaskError::TableLimit { .. } => "table-limit",
            TaskError::DeadlineExceeded { .. } => "deadline-exceeded",
            TaskError::PayloadTooLarge { .. } => "payload-too-large",
            TaskError::ResultTooLarge { .. } | TaskError::ResultTooLargeToRead { .. } => {
                "result-too-large"
            }
            TaskError::HostCallDataLimit { .. } => "host-call-data-limit",
            TaskError::NoCapacity { .. } => "no-capacity",
            TaskError::Trap { .. } => "trap",
            TaskError::InvalidInput(_) => "invalid-input",
            TaskError::Failed(_) => "failed",
            TaskError::Retryable(_) => "retryable",
            TaskError::Unavailable(_) => "unavailable",
            TaskError::Host(_) => "host",
            TaskError::Cancelled => "cancelled",
            TaskError::NonDeterministic(_) => "non-deterministic",
        }
    }

    /// The error a `kind()` and message stand for, for errors that crossed
    /// hosts as text. Figures the text does not carry are filled from
    /// `fuel_limit` or left at 0.
    pub fn from_kind(kind: &str, message: &str, fuel_limit: u64) -> TaskError {
        // The message is the error's Display text; drop the prefix the
        // rebuilt error adds again.
        let strip = |prefix: &str| message.strip_prefix(prefix).unwrap_or(message).to_string();
        let m = message.to_string();
        match kind {
            "fuel-exhausted" => TaskError::FuelExhausted { limit: fuel_limit },
            "deadline-exceeded" => TaskError::DeadlineExceeded { ms: 0 },
            "trap" => TaskError::Trap {
                message: strip("guest trap: "),
                guest: None,
            },
            "invalid-input" => TaskError::InvalidInput(strip("invalid input: ")),
            "failed" => TaskError::Failed(strip("agent failed: ")),
            "retryable" => TaskError::Retryable(strip("retryable failure: ")),
            "unavailable" => TaskError::Unavailable(strip("unavailable: ")),
            "no-capacity" => TaskError::Unavailable(m),
            "cancelled" => TaskError::Cancelled,
            "non-deterministic" => TaskError::NonDeterministic(strip("non-deterministic: ")),
            // Other limits keep their text; the caller sees it as a failure.
            _ => TaskError::Failed(m),
        }
    }

    /// Whether another attempt may succeed: the agent said so, or it trapped
    /// (which may be a bad instance rather than bad input). Limits are
    /// deterministic for the same input, and invalid input or a declared
    /// failure will not change, so those are final.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TaskError::Retryable(_)
                | TaskError::Trap { .. }
                | TaskError::NoCapacity { .. }
                | TaskError::Host(_)
        )
    }

    /// Whether the task stopped because it hit one of the host's limits.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            TaskError::FuelExhausted { .. }
                | TaskError::MemoryLimit { .. }
                | TaskError::TableLimit { .. }
                | TaskError::DeadlineExceeded { .. }
                | TaskError::ResultTooLarge { .. }
                | TaskError::ResultTooLargeToRead { .. }
                | TaskError::HostCallDataLimit { .. }
        )
    }
}
