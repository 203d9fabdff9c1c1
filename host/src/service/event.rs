//! Task events: one typed event per transition of a task's life, built
//! here and emitted in four places only: the task service (accepted), the
//! stores where they write an end no attempt gave (a cancel; in a cluster
//! also a task failed for its deadline while it waited on the stream), the
//! scheduler's attempt hook (started, retried) and the code that writes a
//! run's outcome to its store (completed, failed, dead, fenced). The host's metrics count every one; watchers (the API's
//! `/v1/events`, and later traces, the audit trail, the dashboard and
//! workflows) subscribe to them instead of reading the stores' records.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::daemon::now_ms;

/// How many events a slow watcher may fall behind before it misses some
/// (it is told how many it missed). The channel never grows past this.
pub const CAPACITY: usize = 4096;

/// What happened to the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Stored and answered: the task will run at least once.
    Accepted,
    /// An attempt was handed to an agent.
    Started,
    /// An attempt failed and the task waits for another.
    Retried,
    /// The task's result is stored.
    Completed,
    /// The task failed for good (its error is final, not retryable).
    Failed,
    /// Every attempt failed with a retryable error: a dead letter.
    Dead,
    /// Cancelled before it ended.
    Cancelled,
    /// An attempt finished after the task already had its result (another
    /// host ran it too, or it was cancelled); its outcome was dropped.
    Fenced,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Started => "started",
            EventKind::Retried => "retried",
            EventKind::Completed => "completed",
            EventKind::Failed => "failed",
            EventKind::Dead => "dead",
            EventKind::Cancelled => "cancelled",
            EventKind::Fenced => "fenced",
        }
    }
}

/// One transition. Times are Unix milliseconds. Field names are stable:
/// `docs/api.md` documents them (the `/v1/events` stream sends this as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEvent {
    pub kind: EventKind,
    pub task: String,
    /// The capability, or the subject of a message between agents.
    pub capability: String,
    /// The host that emitted the event.
    pub host: String,
    /// `name@version` of the agent, once an attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// 1 for the first attempt; 0 before any.
    pub attempt: u32,
    pub at_ms: u64,
    pub submitted_at_ms: Option<u64>,
    /// Submission to end, for the events that end a task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    /// For the first `started` of a task on this host: microseconds it
    /// waited in the host's scheduler (its queue, then for a slot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_used: Option<u64>,
    /// `TaskError::kind()` of the failure, for `retried`, `failed`, `dead`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub tenant: String,
    pub principal: String,
}

impl TaskEvent {
    /// Whether this event ends the task (no event of it follows but
    /// `fenced`).
    pub fn is_final(&self) -> bool {
        matches!(
            self.kind,
            EventKind::Completed | EventKind::Failed | EventKind::Dead | EventKind::Cancelled
        )
    }
}

/// The host's event channel, and its metrics, which count every event.
#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Arc<TaskEvent>>,
    host: Arc<str>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Live [`Watch`]es: read on every emit, so kept apart from the
    /// channel's own count (which takes a lock).
    watchers: Arc<AtomicUsize>,
}

/// A subscription to the events; dropping it stops it.
pub struct Watch {
    rx: broadcast::Receiver<Arc<TaskEvent>>,
    watchers: Arc<AtomicUsize>,
}

impl Watch {
    /// The next event; `Lagged(n)` when this watcher fell more than
    /// [`CAPACITY`] events behind and missed `n`.
    pub async fn recv(&mut self) -> Result<Arc<TaskEvent>, broadcast::error::RecvError> {
        self.rx.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Events {
    pub fn new(host: &str) -> Events {
        let (tx, _) = broadcast::channel(CAPACITY);
        Events {
            tx,
            host: Arc::from(host),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            watchers: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    pub fn shared_metrics(&self) -> Arc<crate::metrics::Metrics> {
        self.metrics.clone()
    }

    /// Whether anyone watches.
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::Acquire) > 0
    }

    /// Every event from now on. A watcher that falls more than
    /// [`CAPACITY`] events behind gets `Lagged(n)` and goes on from there.
    pub fn subscribe(&self) -> Watch {
        self.watchers.fetch_add(1, Ordering::AcqRel);
        Watch {
            rx: self.tx.subscribe(),
            watchers: self.watchers.clone(),
        }
    }

    /// Emits the event that `make` builds from a blank one of this host:
    /// counted in the metrics, and sent to the watchers if any.
    pub fn emit(
        &self,
        kind: EventKind,
        task: &str,
        capability: &str,
        make: impl FnOnce(&mut TaskEvent),
    ) {
        let mut event = TaskEvent {
            kind,
            task: task.to_string(),
            capability: capability.to_string(),
            host: self.host.to_string(),
            agent: None,
            attempt: 0,
            at_ms: now_ms(),
            submitted_at_ms: None,
            took_ms: None,
            waited_us: None,
            fuel_used: None,
            error: None,
            tenant: crate::daemon::journal::DEFAULT_TENANT.to_string(),
            principal: crate::daemon::journal::ANONYMOUS.to_string(),
        };
        make(&mut event);
        self.metrics.observe(&event);
        if !self.watched() {
            return;
        }
        // An error only means nobody watches any more.
        let _ = self.tx.send(Arc::new(event));
    }

    /// Emits the event for a record: `accepted`, or the one its final
    /// status stands for (`fenced` when `fenced`).
    pub fn record(&self, kind: EventKind, record: &crate::daemon::TaskRecord) {
        self.emit(kind, &record.id, &record.capability, |e| {
            e.agent = record.agent.clone();
            e.attempt = record.attempts;
            e.submitted_at_ms = Some(record.submitted_at_ms);
            e.took_ms = record
                .finished_at_ms
                .map(|f| f.saturating_sub(record.submitted_at_ms));
            e.fuel_used = record.fuel_used;
            e.error = record.error.as_ref().map(|x| x.kind.clone());
            e.tenant = record.tenant.clone();
            e.principal = record.principal.clone();
        });
    }

    /// The event that a record's final status stands for.
    pub fn ended(&self, record: &crate::daemon::TaskRecord) {
        use crate::daemon::Status;
        let kind = match record.status {
            Status::Completed => EventKind::Completed,
            Status::Failed => EventKind::Failed,
            Status::Dead => EventKind::Dead,
            Status::Cancelled => EventKind::Cancelled,
            Status::Queued | Status::Running => return,
        };
        self.record(kind, record);
    }
}
