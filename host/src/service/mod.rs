//! The task service: one lifecycle for a task, whether the host runs alone
//! or in a cluster.
//!
//! [`TaskService`] is what clients talk to (submit, get, wait, list, watch,
//! cancel). It owns admission (capability served, payload size, deadline,
//! idempotency, unfinished tasks) and emits every task event
//! ([`event::TaskEvent`]). Below it, a [`TaskStore`] keeps the tasks and
//! gets them to an agent: the lone host's journal ([`crate::daemon::Host`]),
//! or JetStream ([`crate::cluster::tasks::TaskRouter`]). Both run each task
//! through the same executor ([`run::execute`]) and the same scheduler, so
//! statuses, errors and fields are the same in both modes; the API never
//! asks which store it has.

pub mod event;
pub mod run;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::{
    now_ms, Accepted, Host, HostError, Status, SubmitRequest, Submitted, TaskRecord,
};
use crate::error::TaskError;
pub use event::{EventKind, Events, TaskEvent};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A task as a store holds it: its record, its result once completed, and
/// its typed error once failed.
#[derive(Debug, Clone)]
pub struct Stored {
    pub record: TaskRecord,
    pub result: Option<Vec<u8>>,
    pub error: Option<TaskError>,
}

impl Stored {
    pub fn record(record: TaskRecord) -> Stored {
        Stored {
            record,
            result: None,
            error: None,
        }
    }
}

/// Which tasks to list: newest first, at most `limit`.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub capability: Option<String>,
    pub limit: usize,
}

/// Where tasks are kept, and how a stored task reaches an agent. The two
/// implementations are the lone host's journal and JetStream.
pub trait TaskStore: Send + Sync {
    /// What the store is, for messages: "journal", "JetStream".
    fn name(&self) -> &'static str;
    /// Whether an agent this store reaches serves `capability` now.
    fn serves(&self, capability: &str) -> bool;
    /// An error when the store cannot be reached now (a cluster's NATS
    /// connection is down), so that a capability nobody seems to serve is
    /// not called unknown because the hosts that serve it cannot be heard.
    fn reachable(&self) -> Result<(), HostError> {
        Ok(())
    }
    /// The largest payload the store takes (the host's limit, or less).
    fn max_payload(&self) -> u64;
    /// Tasks accepted through this host that have not ended.
    fn unfinished(&self) -> usize;
    /// This host's tasks now: (queued, running). A lone host's are all
    /// its tasks; a host in a cluster's are those it pulled to run.
    fn counts(&self) -> (usize, usize);
    /// The id of a new task; the same for every submission with the same
    /// idempotency key when the store finds tasks by id only.
    fn new_id(&self, key: Option<&str>) -> String;
    /// The task an idempotency key was first given to.
    fn find_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, HostError>>;
    /// Stores a new task durably, calls `stored` (which emits `accepted`),
    /// and starts the task towards an agent; or finds the task its
    /// idempotency key names. The journal calls `stored` before the task can
    /// start, so `accepted` comes first on a lone host; JetStream calls it
    /// after the stream's ack, when another host may be running it already.
    /// `unused_key`: no earlier submission used the key (see
    /// [`TaskService::submit_keyed`]); a store may skip looking it up.
    /// `fence`: store the task only under this fence ([`Fence`]); a store
    /// whose submitters need none ignores it.
    fn accept<'a>(
        &'a self,
        record: TaskRecord,
        payload: Vec<u8>,
        stored: &'a (dyn Fn(&TaskRecord) + Send + Sync),
        unused_key: bool,
        fence: Option<&'a Fence>,
    ) -> BoxFuture<'a, Result<Accepted, HostError>>;
    /// Raises the fence `name`: submissions under an earlier one are
    /// refused from now on. Returns the new fence's sequence, or `None`
    /// when this store needs no fences (one host drives everything).
    fn raise_fence<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<u64>, HostError>> {
        let _ = name;
        Box::pin(async { Ok(None) })
    }
    /// How long finished tasks are kept, `None` for no limit: what a run's
    /// record is kept for after its end too. A cluster's is the one its
    /// streams have (the longest any host asked for), not this host's.
    fn retention(&self) -> BoxFuture<'_, Result<Option<Duration>, HostError>>;
    /// The fence `name` as it is now (0: never raised), or `None` when
    /// this store needs no fences.
    fn fence_sequence<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, HostError>> {
        let _ = name;
        Box::pin(async { Ok(None) })
    }
    /// Removes the fence `name` (its runs are gone).
    fn drop_fence<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HostError>> {
        let _ = name;
        Box::pin(async { Ok(()) })
    }
    /// Whether a task was submitted under `key` for `capability`, asked
    /// after [`TaskStore::raise_fence`]: the answer is final, since no
    /// submission under an earlier fence can be stored after it.
    fn key_used<'a>(
        &'a self,
        key: &'a str,
        capability: &'a str,
    ) -> BoxFuture<'a, Result<bool, HostError>> {
        let _ = capability;
        Box::pin(async move { Ok(self.find_key(key).await?.is_some()) })
    }
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stored, HostError>>;
    /// Waits up to `timeout` for the task to end, then returns it as it is.
    /// `fresh`: this host has just accepted it (it cannot have ended yet).
    fn wait<'a>(
        &'a self,
        id: &'a str,
        timeout: Duration,
        fresh: bool,
    ) -> BoxFuture<'a, Result<Stored, HostError>>;
    fn list<'a>(
        &'a self,
        query: &'a ListQuery,
    ) -> BoxFuture<'a, Result<Vec<TaskRecord>, HostError>>;
    /// Ends the task as cancelled, unless it has ended already, and emits
    /// its `cancelled` event before any `fenced` of the attempt it stops.
    /// Returns the task as it is then.
    fn cancel<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stored, HostError>>;
}

/// A condition a submission is stored under, checked by the store in the
/// same write: the last fence raised under `name` is `sequence` (0: none
/// yet). A workflow driver submits its run's tasks under the fence it
/// raised when it took the run over; a driver that another replaced
/// (paused past its lease) has its submissions refused, however late they
/// come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub name: String,
    pub sequence: u64,
}

/// The task service of one host over its store.
#[derive(Clone)]
pub struct TaskService {
    host: Host,
    store: Arc<dyn TaskStore>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    /// Submissions between their capacity check and the store counting
    /// them: counted too, so that concurrent submissions cannot pass
    /// `max_unfinished` together.
    admitting: AtomicUsize,
    waits: AtomicUsize,
}

/// Holds one unit of a counter until dropped.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    /// Takes one unit unless `limit` are taken; returns how many were.
    fn take(counter: &'a AtomicUsize, limit: usize) -> Result<Held<'a>, usize> {
        let before = counter.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Err(before);
        }
        Ok(Held(counter))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TaskService {
    pub fn new(host: Host, store: Arc<dyn TaskStore>) -> TaskService {
        TaskService {
            host,
            store,
            counts: Arc::new(Counts::default()),
        }
    }

    /// Counts one waiting request while it waits; past `[host] max_waits`
    /// a wait is refused with `no-capacity`.
    fn wait_slot(&self) -> Result<Held<'_>, HostError> {
        let limit = self.host.config().host.max_waits;
        Held::take(&self.counts.waits, limit).map_err(|_| HostError::TooManyWaits { limit })
    }

    /// A lone host: tasks in its journal.
    pub fn local(host: Host) -> TaskService {
        let store: Arc<dyn TaskStore> = Arc::new(host.clone());
        TaskService::new(host, store)
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn store(&self) -> &dyn TaskStore {
        self.store.as_ref()
    }

    pub fn events(&self) -> &Events {
        self.host.events()
    }

    /// Every task event this host emits from now on: the tasks it accepts,
    /// cancels and runs (in a cluster, another host's events stay there).
    pub fn watch(&self) -> event::Watch {
        self.events().subscribe()
    }

    /// Accepts a task: it is stored durably when this returns, and will run
    /// at least once. A submission with the idempotency key of an earlier
    /// one gets that task (`existing`).
    pub async fn submit(&self, request: SubmitRequest) -> Result<Submitted, HostError> {
        self.submit_keyed(request, false, None).await
    }

    /// [`TaskService::submit`]; `unused_key`: the caller knows that no
    /// earlier submission used the request's idempotency key (a workflow
    /// driver that has just started the step), so a cluster
    /// does not look the key up first. A second submission with it within
    /// the stream's duplicate window is still that task. `fence`: the
    /// task is stored only under it ([`Fence`]; `HostError::Fenced`
    /// otherwise).
    pub(crate) async fn submit_keyed(
        &self,
        request: SubmitRequest,
        unused_key: bool,
        fence: Option<Fence>,
    ) -> Result<Submitted, HostError> {
        use tracing::Instrument;
        // The first span of the task's trace (a child of the submitter's,
        // when it sent one); every later span of the task is under it. A
        // task not traced makes none.
        let (span, trace) = match crate::trace::decide(request.trace.as_deref()) {
            crate::trace::Decision::Record => {
                let span = tracing::info_span!(
                    target: crate::trace::TARGET,
                    "task.submit",
                    otel.kind = "server",
                    task.capability = %request.capability,
                    task.id = tracing::field::Empty,
                    orch.host = %self.host.id(),
                );
                crate::trace::adopt(&span, request.trace.as_deref());
                let trace = crate::trace::of(&span, request.trace.as_deref());
                (span, trace)
            }
            crate::trace::Decision::Skip(trace) => (tracing::Span::none(), trace),
        };
        self.admit(SubmitRequest { trace, ..request }, unused_key, fence)
            .instrument(span)
            .await
    }

    async fn admit(
        &self,
        mut request: SubmitRequest,
        unused_key: bool,
        fence: Option<Fence>,
    ) -> Result<Submitted, HostError> {
        use tracing::Instrument;
        if self.host.is_stopping() {
            return Err(HostError::ShuttingDown);
        }
        if request.capability.is_empty() {
            return Err(HostError::InvalidRequest("capability is empty".into()));
        }
        if !self.store.serves(&request.capability) {
            self.store.reachable()?;
            return Err(HostError::UnknownCapability(request.capability));
        }
        let limit = self.store.max_payload();
        let size = request.payload.len() as u64;
        if size > limit {
            return Err(HostError::PayloadTooLarge { size, limit });
        }
        if request.deadline == Some(Duration::ZERO) {
            return Err(HostError::InvalidRequest(
                "the deadline must be after now".into(),
            ));
        }
        if let Some(k) = &request.idempotency_key {
            check_key(k)?;
        }
        let key = request.idempotency_key;
        // Admission control: every accepted task holds memory until it
        // ends. A retry of a task accepted already is not new work: it gets
        // that task, whatever the load.
        let max = self.host.config().host.max_unfinished;
        // Held until the store has counted this task (the end of this call).
        let _admitting = Held::take(&self.counts.admitting, usize::MAX);
        let in_flight = self
            .counts
            .admitting
            .load(Ordering::Acquire)
            .saturating_sub(1);
        if self.store.unfinished() + in_flight >= max {
            let existing = match key.as_deref() {
                Some(key) => self.store.find_key(key).await?,
                None => None,
            };
            return match existing {
                Some(id) => Ok(Submitted {
                    task: self.store.get(&id).await?.record,
                    existing: true,
                }),
                None => Err(HostError::NoCapacity { limit: max }),
            };
        }
        let now = now_ms();
        let deadline_ms = match request.deadline {
            None => None,
            Some(d) => Some(
                u64::try_from(d.as_millis())
                    .ok()
                    .and_then(|ms| now.checked_add(ms))
                    .ok_or_else(|| {
                        HostError::InvalidRequest(format!(
                            "the deadline {} ms is too far away",
                            d.as_millis()
                        ))
                    })?,
            ),
        };
        let record = TaskRecord {
            priority: request.priority,
            deadline_ms,
            idempotency_key: key.clone(),
            trace: request.trace.take(),
            ..TaskRecord::queued(
                self.store.new_id(key.as_deref()),
                request.capability,
                now,
                size,
            )
        };
        // On a task of its own: a caller dropped mid-way (a client that
        // disconnected) must not drop a store write half done, e.g. a task
        // journaled but not yet handed to the scheduler, which would then
        // wait for the host's restart to run.
        let (store, events, new) = (self.store.clone(), self.events().clone(), record.clone());
        tracing::Span::current().record("task.id", record.id.as_str());
        let span = crate::trace::under(
            record.trace.as_deref(),
            || tracing::info_span!(target: crate::trace::TARGET, "task.accept", store = store.name()),
        );
        let accept = tokio::spawn(
            async move {
                let stored = |r: &TaskRecord| events.record(EventKind::Accepted, r);
                store
                    .accept(new, request.payload, &stored, unused_key, fence.as_ref())
                    .await
            }
            .instrument(span),
        );
        let accepted = accept.await.map_err(|e| HostError::Unavailable {
            what: format!("task {}: its submission stopped", record.id),
            source: Box::new(e),
        })??;
        match accepted {
            Accepted::Existing(id) => Ok(Submitted {
                task: self.store.get(&id).await?.record,
                existing: true,
            }),
            Accepted::New => Ok(Submitted {
                task: record,
                existing: false,
            }),
        }
    }

    /// Submits and, with `wait`, waits up to that long for the task to end.
    pub async fn submit_and_wait(
        &self,
        request: SubmitRequest,
        wait: Option<Duration>,
    ) -> Result<(Stored, bool), HostError> {
        self.submit_then_wait(request, wait, |_| {}).await
    }

    /// [`TaskService::submit_and_wait`], calling `submitted` once the task
    /// is stored, before the wait (the API records it in the audit trail
    /// then, so that a client that hangs up while waiting is recorded).
    pub async fn submit_then_wait(
        &self,
        request: SubmitRequest,
        wait: Option<Duration>,
        submitted: impl FnOnce(&Submitted),
    ) -> Result<(Stored, bool), HostError> {
        let on_submitted = submitted;
        // Taken before the task is stored: a refused wait must not be a
        // refused submission of a task that was accepted.
        let _waiting = match wait {
            Some(_) => Some(self.wait_slot()?),
            None => None,
        };
        let submitted = self.submit(request).await?;
        on_submitted(&submitted);
        let stored = match wait {
            Some(w) => {
                self.store
                    .wait(&submitted.task.id, w, !submitted.existing)
                    .await?
            }
            None if submitted.existing => self.store.get(&submitted.task.id).await?,
            None => Stored::record(submitted.task),
        };
        Ok((stored, submitted.existing))
    }

    /// Reads and a cancel answer at once while the store cannot be reached
    /// (a cluster's connection is down), rather than after the NATS
    /// client's request timeout.
    pub async fn get(&self, id: &str) -> Result<Stored, HostError> {
        self.store.reachable()?;
        self.store.get(id).await
    }

    /// A wait, unlike a read, goes on while the store cannot be reached:
    /// its client asked to wait, and a reconnect is usually soon.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Stored, HostError> {
        let _waiting = self.wait_slot()?;
        self.store.wait(id, timeout, false).await
    }

    pub async fn list(&self, query: &ListQuery) -> Result<Vec<TaskRecord>, HostError> {
        self.store.reachable()?;
        self.store.list(query).await
    }

    /// Cancels a task that has not ended: it ends as `cancelled` at once; a
    /// queued task never runs, a running attempt on this host is stopped
    /// (its instance freed), and one on another host is stopped when that
    /// host hears of it; whatever it returns is fenced. A task that has
    /// ended is returned as it is.
    pub async fn cancel(&self, id: &str) -> Result<Stored, HostError> {
        self.store.reachable()?;
        self.store.cancel(id).await
    }
}

/// The longest idempotency key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;

/// An idempotency key is stored with its task and, in a cluster, sent in a
/// NATS header: it must be short, and async-nats panics on a line break in
/// a header value. An empty key is refused rather than taken as none, so that a
/// client that meant to send one does not silently get duplicates.
fn check_key(key: &str) -> Result<(), HostError> {
    let problem = if key.is_empty() {
        "is empty (leave it out for none)".to_string()
    } else if key.len() > MAX_KEY_BYTES {
        format!(
            "is {} bytes, past the limit of {MAX_KEY_BYTES} bytes",
            key.len()
        )
    } else if key.chars().any(char::is_control) {
        "contains a control character".to_string()
    } else {
        return Ok(());
    };
    Err(HostError::InvalidRequest(format!(
        "idempotency_key {problem}"
    )))
}
