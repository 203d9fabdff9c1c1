//! A run as stored and as the API shows it (`docs/api.md`, field names
//! stable): the run's status, and each step's status, attempts, task, host,
//! agent, times, fuel, error, input and result.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::daemon::ErrorInfo;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunStatus {
    Running,
    Completed,
    Failed,
    Compensating,
    Compensated,
    CompensationFailed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Compensating => "compensating",
            RunStatus::Compensated => "compensated",
            RunStatus::CompensationFailed => "compensation-failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<RunStatus> {
        [
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Compensating,
            RunStatus::Compensated,
            RunStatus::CompensationFailed,
            RunStatus::Cancelled,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Whether the run has ended (nothing more will change it).
    pub fn is_final(self) -> bool {
        !matches!(self, RunStatus::Running | RunStatus::Compensating)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepStatus {
    /// Not started yet.
    Pending,
    Running,
    Completed,
    Failed,
    /// Its condition was false, or a step it runs after was skipped.
    Skipped,
    /// Never started: the run stopped first (a failure, cancel, deadline).
    NotRun,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::NotRun => "not-run",
        }
    }

    pub fn has_ended(self) -> bool {
        !matches!(self, StepStatus::Pending | StepStatus::Running)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompensationStatus {
    Pending,
    Running,
    Completed,
    Failed,
}

/// What went wrong, and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunError {
    /// The step that failed; none for a cancel or the run's deadline.
    pub step: Option<String>,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub workflow: String,
    pub version: u32,
    pub status: RunStatus,
    pub input: Value,
    pub created_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub error: Option<RunError>,
    pub cancel_requested: bool,
    /// The host driving the run, and until when it holds it unless it
    /// renews (in a cluster).
    pub owner: Option<String>,
    pub lease_until_ms: u64,
    /// Steps in the order they may start (each after those it runs after).
    pub steps: Vec<StepRecord>,
    /// Completed steps so far; numbers `completed_order`.
    pub completed: u32,
    /// The run's trace context (a W3C `traceparent`): its steps' tasks are
    /// in this trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub id: String,
    pub capability: String,
    pub status: StepStatus,
    /// Attempts started (of the last element, for a fan-out).
    pub attempts: u32,
    /// The last attempt's task (none for a fan-out: its elements each
    /// have theirs, found by `elements`).
    pub task_id: Option<String>,
    pub host: Option<String>,
    pub agent: Option<String>,
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    /// Summed over a fan-out's elements.
    pub fuel_used: Option<u64>,
    pub error: Option<ErrorInfo>,
    /// For a fan-out, the element count.
    pub elements: Option<u32>,
    pub input: Option<Value>,
    pub result: Option<Value>,
    /// 1 for the first step of the run to complete, 2 for the next...:
    /// compensations run in the reverse of this order.
    pub completed_order: Option<u32>,
    pub compensation: Option<CompensationRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompensationRecord {
    pub capability: String,
    pub status: CompensationStatus,
    pub attempts: u32,
    pub task_id: Option<String>,
    pub started_at_ms: Option<u64>,
    pub ended_at_ms: Option<u64>,
    pub error: Option<ErrorInfo>,
}

/// The most bytes of an error message a run's record keeps. Error messages
/// are the one part of a record that no check bounds (an agent's error may
/// quote its whole input, and the run's error repeats its step's).
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// What is kept of each error message when a record is past its limit even
/// so: 2 per step and the run's, at about 130 bytes each in JSON, stay far
/// inside the room between the data checks' limit and a NATS message.
const SHORT_ERROR_MESSAGE: usize = 64;

impl RunRecord {
    /// Cuts the record's error messages to `MAX_ERROR_MESSAGE` bytes, and
    /// to `SHORT_ERROR_MESSAGE` when the record is still larger than `max`
    /// (inputs and results are checked against it as they come).
    pub fn fit(&mut self, max: usize) {
        self.cut_errors(MAX_ERROR_MESSAGE);
        if serde_json::to_vec(self).map_or(0, |v| v.len()) > max {
            self.cut_errors(SHORT_ERROR_MESSAGE);
        }
    }

    fn cut_errors(&mut self, keep: usize) {
        if let Some(e) = &mut self.error {
            cut(&mut e.message, keep);
        }
        for s in &mut self.steps {
            if let Some(e) = &mut s.error {
                cut(&mut e.message, keep);
            }
            if let Some(e) = s.compensation.as_mut().and_then(|c| c.error.as_mut()) {
                cut(&mut e.message, keep);
            }
        }
    }
}

const CUT_END: &str = " more bytes not kept)";

/// Keeps the first `keep` bytes of `message` (at a character boundary) and
/// says how much was cut, counting what an earlier cut took (a record is
/// fitted at each write).
fn cut(message: &mut String, keep: usize) {
    let (mut kept, mut gone) = (message.len(), 0);
    if let Some(head) = message.strip_suffix(CUT_END) {
        if let Some(at) = head.rfind("... (") {
            if let Ok(n) = head[at + 5..].parse::<usize>() {
                (kept, gone) = (at, n);
            }
        }
    }
    if kept <= keep {
        return;
    }
    let mut end = keep;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let gone = gone + (kept - end);
    message.truncate(end);
    message.push_str(&format!("... ({gone}{CUT_END}"));
}

impl StepRecord {
    pub fn pending(id: &str, capability: &str) -> StepRecord {
        StepRecord {
            id: id.to_string(),
            capability: capability.to_string(),
            status: StepStatus::Pending,
            attempts: 0,
            task_id: None,
            host: None,
            agent: None,
            started_at_ms: None,
            ended_at_ms: None,
            fuel_used: None,
            error: None,
            elements: None,
            input: None,
            result: None,
            completed_order: None,
            compensation: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_cut_at_a_character_boundary_and_says_how_much_went() {
        let mut m = "é".repeat(600); // 1,200 bytes
        cut(&mut m, MAX_ERROR_MESSAGE);
        assert!(m.starts_with(&"é".repeat(512)), "{m}");
        assert!(m.ends_with("... (176 more bytes not kept)"), "{m}");
        // Cut again, at each write: the count stays, and a shorter cut
        // adds what it takes.
        let once = m.clone();
        cut(&mut m, MAX_ERROR_MESSAGE);
        assert_eq!(m, once);
        cut(&mut m, SHORT_ERROR_MESSAGE);
        assert!(m.starts_with(&"é".repeat(32)), "{m}");
        assert!(m.ends_with("... (1136 more bytes not kept)"), "{m}");
        let mut short = "x".repeat(MAX_ERROR_MESSAGE);
        cut(&mut short, MAX_ERROR_MESSAGE);
        assert_eq!(short.len(), MAX_ERROR_MESSAGE);
    }
}
