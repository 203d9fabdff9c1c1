//! The one executor of a stored task, for both stores: hands it to the
//! scheduler, waits for its outcome and turns that into the task's record.
//! The lone host's driver (`daemon`) and the cluster's pull loop
//! (`cluster::tasks`) both run tasks through here, so a task's fields mean
//! the same in both modes; they differ only in how they store the outcome.

use std::time::{Duration, Instant};

use crate::daemon::{now_ms, AttemptInfo, ErrorInfo, Status, TaskRecord};
use crate::error::TaskError;
use crate::scheduler::{CancellationToken, Failure, Scheduler, Submit, SubmitError};

/// A stored task to run once more.
pub struct Run {
    /// The task as stored: `attempts` and `attempt_errors` hold the
    /// attempts made before this run (on any host).
    pub record: TaskRecord,
    pub payload: Vec<u8>,
    /// Attempts in this run (the scheduler retries within it); `None` for
    /// the scheduler's setting. The cluster makes one per delivery.
    pub max_attempts: Option<u32>,
    /// For a sub-task of another host's task: its depth and fuel cap.
    pub sub_task: Option<(u32, u64)>,
    pub cancel: Option<CancellationToken>,
    /// The host running it, noted in the record and its attempt errors.
    pub host: Option<String>,
}

/// A run that ended. `record` is final (`completed`, `failed`, `dead`,
/// `cancelled`), with `result` for a completed task and the typed `error`
/// for the others.
pub struct Ended {
    pub record: TaskRecord,
    pub result: Option<Vec<u8>>,
    pub error: Option<TaskError>,
}

/// Why a task was not run; it stays stored as it was.
#[derive(Debug)]
pub enum NotRun {
    /// The host is draining: for another host or the restart (never a
    /// final failure for that).
    Draining,
    /// No agent of this host serves its capability any more (removed
    /// since): another host may; on a lone host it is a failure. The task
    /// comes back as it was given.
    NoAgent(Box<TaskRecord>),
}

/// Runs the task, or says why it did not.
pub async fn execute(scheduler: &Scheduler, run: Run) -> Result<Ended, NotRun> {
    let Run {
        mut record,
        payload,
        max_attempts,
        sub_task,
        cancel,
        host,
    } = run;
    // A deadline too far away for the clock to hold is no deadline.
    let deadline = record.deadline_ms.and_then(|ms| {
        let left = ms.saturating_sub(now_ms());
        Instant::now().checked_add(Duration::from_millis(left))
    });
    let submit = Submit {
        id: record.id.clone(),
        capability: record.capability.clone(),
        payload,
        priority: record.priority,
        deadline,
        max_attempts,
        cancel,
        attempts_before: record.attempts,
        trace: record.trace.clone(),
        submitted_at_ms: Some(record.submitted_at_ms),
    };
    let submitted = match sub_task {
        Some((depth, fuel)) => scheduler.submit_sub_task(submit, depth, fuel),
        None => scheduler.submit(submit),
    };
    let outcome = match submitted {
        Ok(handle) => handle.wait().await,
        Err(SubmitError::ShuttingDown) => return Err(NotRun::Draining),
        Err(SubmitError::UnknownCapability(_)) => return Err(NotRun::NoAgent(Box::new(record))),
        Err(e) => Err(Failure {
            id: record.id.clone(),
            capability: record.capability.clone(),
            error: match e {
                SubmitError::DeadlinePassed => TaskError::DeadlineExceeded { ms: 0 },
                other => TaskError::Unavailable(other.to_string()),
            },
            attempts: Vec::new(),
            dead_letter: false,
            fuel_used: 0,
        }),
    };
    // The host that ran an attempt; a task that ended before one (taken
    // past its deadline) names none, as when it fails on the stream.
    let ran = match &outcome {
        Ok(_) => true,
        Err(failure) => !failure.attempts.is_empty(),
    };
    if ran {
        record.host = host.clone();
    }
    record.finished_at_ms = Some(now_ms());
    let infos = |attempts: &[crate::scheduler::AttemptError]| -> Vec<AttemptInfo> {
        attempts
            .iter()
            .map(|a| AttemptInfo {
                agent: a.agent.clone(),
                host: host.clone(),
                kind: a.error.kind().to_string(),
                message: a.error.to_string(),
            })
            .collect()
    };
    match outcome {
        Ok(done) => {
            record.attempts += done.failed_attempts.len() as u32 + 1;
            record.attempt_errors.extend(infos(&done.failed_attempts));
            let result = record.complete(done.agent, done.output);
            Ok(Ended {
                record,
                result: Some(result),
                error: None,
            })
        }
        Err(mut failure) => {
            // Name the deadline the submitter gave, not what was left of it
            // when the scheduler got the task.
            if let TaskError::DeadlineExceeded { ms } = &mut failure.error {
                if failure.attempts.is_empty() && *ms == 0 {
                    *ms = record
                        .deadline_ms
                        .map_or(0, |d| d.saturating_sub(record.submitted_at_ms));
                }
            }
            let now = now_ms();
            record.name_given_deadline(&mut failure.error, now);
            // The attempt the deadline stopped (the last) says the same
            // deadline.
            if let Some(last) = failure.attempts.last_mut() {
                record.name_given_deadline(&mut last.error, now);
            }
            record.attempts += failure.attempts.len() as u32;
            if let Some(last) = failure.attempts.last() {
                record.agent = Some(last.agent.clone());
            }
            record.attempt_errors.extend(infos(&failure.attempts));
            // A caller on another host is charged what the failed attempt used.
            record.fuel_used = Some(failure.fuel_used);
            record.status = match failure.error {
                TaskError::Cancelled => Status::Cancelled,
                _ if failure.dead_letter => Status::Dead,
                _ => Status::Failed,
            };
            record.error = Some(ErrorInfo {
                kind: failure.error.kind().to_string(),
                message: failure.error.to_string(),
            });
            Ok(Ended {
                record,
                result: None,
                error: Some(failure.error),
            })
        }
    }
}

/// Whether an outcome that comes after its task already ended is an
/// attempt's, told as `fenced`: one that ended on its own, or one a
/// cancel stopped. A task cancelled while it waited (for a slot, or
/// between attempts) or failed before an attempt (taken past its
/// deadline) had none, in either mode.
pub fn attempt_outcome(record: &TaskRecord) -> bool {
    match record.status {
        Status::Cancelled => record
            .attempt_errors
            .last()
            .is_some_and(|a| a.kind == TaskError::Cancelled.kind()),
        _ => record.agent.is_some(),
    }
}

/// The end of a task that could not run: failed with `error`.
pub fn failed(mut record: TaskRecord, error: TaskError) -> Ended {
    record.end(Status::Failed, &error);
    Ended {
        record,
        result: None,
        error: Some(error),
    }
}
