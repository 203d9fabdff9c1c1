//! Tasks through JetStream, for hosts in a cluster.
//!
//! - A submitted task is one message on `orch.v1.task-id.<id>.<capability>`
//!   (other clients: `orch.v1.task.<capability>`) in the work-queue stream
//!   `ORCH_TASKS` (file storage), with `Nats-Msg-Id` set to the task id so
//!   the stream drops a duplicate submission. Its queued record
//!   goes to the KV bucket `ORCH_QUEUED` at the same time, so any host can
//!   show it.
//! - Every host that serves a capability pulls from one durable consumer per
//!   capability (`cap_<capability with . as _>`), only as many messages as it
//!   has free slots for that capability, and runs each task once in its local
//!   scheduler while it sends progress acks.
//! - The outcome goes to the KV bucket `ORCH_RESULTS` with a create-only
//!   write over every status of the task id (see `keys`): the first attempt
//!   to finish writes the one result, and a late attempt (the task was
//!   redelivered elsewhere while this host was paused) is fenced. The message is acked only after the result is
//!   stored; a retryable failure is nak'd with a backoff, and on its last
//!   delivery becomes a dead letter carrying every attempt's error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use base64::Engine as _;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{keys, subjects, Cluster, ClusterError, ClusterErrorKind, Members};
use crate::daemon::{now_ms, Accepted, ErrorInfo, Host, HostError, Status, TaskRecord};
use crate::error::TaskError;
use crate::sandbox::{Outcome, SubCall, SubCallFuture, TaskOutput};
use crate::scheduler::{CancellationToken, Remote};
use crate::service::{run, BoxFuture, EventKind, Fence, ListQuery, Stored, TaskStore};

pub const STREAM: &str = "ORCH_TASKS";
pub const QUEUED: &str = "ORCH_QUEUED";
pub const RESULTS: &str = "ORCH_RESULTS";
/// Object store for payloads and results too large for one NATS message.
pub const OBJECTS: &str = "ORCH_OBJECTS";
/// The schedules that fail a queued task at its deadline whatever became
/// of the host it was submitted through (NATS 2.12 message schedules).
pub const DEADLINES: &str = "ORCH_DEADLINES";
/// The durable consumer, shared by every host, of the schedules due.
const DEADLINES_CONSUMER: &str = "deadlines";
/// Set on a task whose payload is in [`OBJECTS`]: the object's name. The
/// message's body is empty then.
pub const HEADER_PAYLOAD_OBJECT: &str = "Orch-Payload-Object";
/// An unacked task is redelivered this long after its last (progress) ack.
pub const ACK_WAIT: Duration = Duration::from_secs(2);
/// Progress acks keep a long task from being redelivered.
const PROGRESS_EVERY: Duration = Duration::from_millis(700);
/// A task running longer than this gets a "running" record.
const RUNNING_AFTER: Duration = Duration::from_millis(100);

pub const HEADER_TASK_ID: &str = "Orch-Task-Id";
pub const HEADER_PRIORITY: &str = "Orch-Priority";
pub const HEADER_DEADLINE: &str = "Orch-Deadline-Ms";
pub const HEADER_SUBMITTED: &str = "Orch-Submitted-Ms";
pub const HEADER_KEY: &str = "Orch-Idempotency-Key";
/// Set by an orch host on the tasks it publishes: the host's id. Such a
/// message needs no claim of its id when it runs (see `run_and_store`).
pub const HEADER_HOST: &str = "Orch-Host";
/// Set on a `tasks.call` sub-task: the most fuel it may use (its caller's).
pub const HEADER_FUEL: &str = "Orch-Fuel-Limit";
/// Set on a `tasks.call` sub-task: its depth in the call tree.
pub const HEADER_DEPTH: &str = "Orch-Call-Depth";

/// A finished task as stored in `ORCH_RESULTS`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredResult {
    pub task: TaskRecord,
    /// The result bytes, base64.
    pub result_base64: Option<String>,
    /// Instead of `result_base64` for a result too large for one NATS
    /// message: its object's name in `ORCH_OBJECTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_object: Option<String>,
    /// The failure as a typed error, so that a caller on another host gets
    /// the same `TaskError` as a local one (the record has its kind and text
    /// only). Absent in results of older hosts and of other clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
}

/// A task as read back: its record, its result and its typed error.
struct Fetched {
    record: TaskRecord,
    result: Option<Vec<u8>>,
    error: Option<TaskError>,
}

impl Fetched {
    fn pair(self) -> (TaskRecord, Option<Vec<u8>>) {
        (self.record, self.result)
    }

    fn stored(self) -> Stored {
        Stored {
            record: self.record,
            result: self.result,
            error: self.error,
        }
    }
}

/// Stops the task if this host runs it, and remembers it was cancelled.
fn note_cancel(
    running: &Mutex<HashMap<String, CancellationToken>>,
    cancelled: &Mutex<RecentCancels>,
    id: &str,
) {
    if let Some(token) = running.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
        token.cancel();
    }
    let mut recent = cancelled.lock().unwrap_or_else(|p| p.into_inner());
    if recent.ids.insert(id.to_string()) {
        recent.order.push_back(id.to_string());
    }
    while recent.order.len() > RECENT_CANCELS {
        if let Some(old) = recent.order.pop_front() {
            recent.ids.remove(&old);
        }
    }
}

/// The ids cancelled lately, oldest first, and as a set for lookups.
#[derive(Default)]
struct RecentCancels {
    order: std::collections::VecDeque<String>,
    ids: std::collections::HashSet<String>,
}

/// Makes (or opens) the stream of the deadline schedules; one made
/// without `allow_msg_schedules` gets it, and one made without a
/// `max_age` (by hosts from before it had one) gets the cluster's
/// retention, `kept_for`.
async fn deadline_stream(
    js: &jetstream::Context,
    config: stream::Config,
    kept_for: Duration,
) -> Result<stream::Stream, Box<dyn std::error::Error + Send + Sync>> {
    let mut stream = js.get_or_create_stream(config).await?;
    let current = stream.info().await?.config.clone();
    let unbounded = current.max_age.is_zero() && !kept_for.is_zero();
    if !current.allow_message_schedules || unbounded {
        let mut config = stream::Config {
            allow_message_schedules: true,
            ..current
        };
        if unbounded {
            config.max_age = kept_for;
            // Never longer than max_age: the server refuses that.
            config.duplicate_window = config.duplicate_window.min(kept_for);
        }
        js.update_stream(config).await?;
    }
    Ok(stream)
}

/// The consumer for a capability. Consumer names may not contain dots.
pub fn consumer_name(capability: &str) -> String {
    let safe: String = capability
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("cap_{safe}")
}

/// A task id that is the same for every submission with the same
/// idempotency key, so that the stream's dedupe and the id agree.
fn id_for_key(key: &str) -> String {
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    format!("k{}", &digest[..20])
}

#[derive(Default)]
struct Counters {
    fenced: AtomicU64,
    redelivered: AtomicU64,
    /// Task messages ended without running: no valid task id.
    terminated: AtomicU64,
    /// Task messages acked without running: their id already ran.
    duplicates: AtomicU64,
}

/// A stream's configuration as the server has it now.
async fn current_config(
    stream: &mut jetstream::stream::Stream,
) -> Result<stream::Config, Box<dyn std::error::Error + Send + Sync>> {
    Ok(stream.info().await?.config.clone())
}

/// Whether a server version (`2.15.1`, `2.12.0-beta.1`) is at least
/// `major.minor`; an unreadable one is not.
fn server_is_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version.split(['.', '-']).map(|p| p.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
}

/// Whether `id` can name a task: 1-64 of letters, digits, '-', '_' and
/// '.' (every such id is a valid KV key). A message with any other id is
/// terminated, never redelivered.
pub fn is_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// KV key of the claim that an id has been taken to run. Task ids have no
/// `/`, so no task's key is a claim's.
fn claim_key(id: &str) -> String {
    format!("claim/{id}")
}

/// A stored value that does not decode: the store's fault, not the
/// request's, and not one a retry mends.
fn corrupt(id: &str, bucket: &str, e: serde_json::Error) -> HostError {
    HostError::Corrupt {
        what: format!("task {id}: the value in {bucket} does not decode"),
        source: Box::new(e),
    }
}

/// The JetStream side of a host in a cluster.
pub struct TaskRouter {
    js: jetstream::Context,
    stream: stream::Stream,
    queued: kv::Store,
    host: Host,
    max_deliver: u32,
    counters: Arc<Counters>,
    /// Capability → its pull loop.
    loops: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    /// Tasks this host has pulled and not finished, per capability.
    taken: Arc<Mutex<HashMap<String, u32>>>,
    freed: Arc<tokio::sync::Notify>,
    /// Requests waiting for a task's result, woken by the results the
    /// server republishes on `orch.v1.results.<task id>`.
    waiters: Waiters,
    /// For each task this host published and whose result has not arrived:
    /// the receiving end of its waiter, registered before the publish so
    /// that a fast result cannot slip past it.
    pending: Pending,
    /// The cluster's member table, for the capabilities of live hosts.
    members: Members,
    url: String,
    /// The largest value the server stores (its max_payload, less room for
    /// the headers of a KV write).
    max_value: usize,
    /// Tasks this host runs now, to stop one when it is cancelled. At most
    /// one entry per slot.
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    client: async_nats::Client,
    /// Payloads and results larger than one message.
    objects: jetstream::object_store::ObjectStore,
    /// Tasks cancelled lately, so that a delivery of one does not run it.
    /// Bounded: the oldest are forgotten (their results fence them anyway).
    cancelled: Arc<Mutex<RecentCancels>>,
    /// Changes when the connection to the server is made again.
    connects: tokio::sync::watch::Receiver<u64>,
    /// Subscriptions to the result notices of the tasks waited for here.
    notices: Notices,
    /// The deadlines of the tasks published here, earliest first, so that
    /// one still waiting on the stream fails at its deadline (see
    /// [`TaskRouter::expire`]). Entries of ended tasks (no longer in
    /// `pending`) are skipped, and dropped when they outnumber the rest.
    deadlines: Mutex<std::collections::BinaryHeap<std::cmp::Reverse<(u64, String)>>>,
    /// Told when a deadline earlier than the ones waited for is added.
    deadline_added: Arc<tokio::sync::Notify>,
    /// Tasks published here whose result notice did not come within
    /// [`PENDING_MAX_AGE`] (it may have been lost) and whose deadline is
    /// ahead: no longer counted unfinished here, but still failed at their
    /// deadline if they wait then. Each leaves at its deadline.
    deadline_only: Mutex<std::collections::HashSet<String>>,
    /// [`DEADLINES`]; `None` on a server older than 2.12, or when it
    /// could not be made.
    deadline_stream: Option<stream::Stream>,
    /// Deadline schedules being written (see `schedule_deadline`).
    scheduling: Arc<tokio::sync::Semaphore>,
    /// The loop taking the schedules due; stopped with the pull loops.
    due_loop: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Forgets a wait of `id` when dropped: see [`TaskRouter::forget_closed_waiters`].
struct WaitEnd<'a> {
    router: &'a TaskRouter,
    id: &'a str,
}

impl Drop for WaitEnd<'_> {
    fn drop(&mut self) {
        self.router.forget_closed_waiters(self.id);
    }
}

/// A host hears of the results it waits for, and of no others: one
/// subscription to `orch.v1.results.<id>` per task submitted through this
/// host and not ended, or waited for here, made before the task is
/// published or its result read. (A subscription to every result would
/// send each one to every host.) Each costs the NATS client about 6.5 KiB,
/// so past `limit` of them the host subscribes to every result instead,
/// until fewer than half that many are watched again.
struct Notices {
    client: async_nats::Client,
    url: String,
    waiters: Waiters,
    pending: Pending,
    /// Task id → the task that reads its one notice. At most `limit`.
    watched: Arc<Mutex<HashMap<String, tokio::task::AbortHandle>>>,
    /// While too many tasks are watched: the reader of every result, told
    /// to stop through the sender.
    every: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    limit: usize,
}

impl Notices {
    fn subscribe_error(&self, subject: &str, e: async_nats::SubscribeError) -> HostError {
        HostError::Unavailable {
            what: format!("NATS at {}: subscribe to {subject}", self.url),
            source: Box::new(e),
        }
    }

    /// Subscribes to the notice of `id`'s result unless this host does
    /// already. Returns once the subscription is sent to the server, ahead
    /// of anything this host sends after it.
    async fn watch(&self, id: &str) -> Result<(), HostError> {
        if self
            .every
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return Ok(());
        }
        let crowded = {
            let watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
            if watched.contains_key(id) {
                return Ok(());
            }
            watched.len() >= self.limit
        };
        if crowded {
            return self.watch_every().await;
        }
        self.watch_one(id).await
    }

    async fn watch_one(&self, id: &str) -> Result<(), HostError> {
        let subject = format!("{}.{id}", subjects::results());
        let mut sub = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| self.subscribe_error(&subject, e))?;
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if watched.contains_key(id) {
            // Another request subscribed meanwhile; this one unsubscribes
            // as it drops.
            return Ok(());
        }
        let (waiters, pending, all) = (
            self.waiters.clone(),
            self.pending.clone(),
            self.watched.clone(),
        );
        let key = id.to_string();
        let reader = tokio::spawn(async move {
            if let Some(message) = sub.next().await {
                wake(&waiters, &pending, &key, &message.payload);
            }
            // Its own entry only: a newer reader may have replaced it.
            let mut all = all.lock().unwrap_or_else(|p| p.into_inner());
            if all.get(&key).map(|r| r.id()) == Some(tokio::task::id()) {
                all.remove(&key);
            }
            // Dropping `sub` unsubscribes.
        });
        watched.insert(id.to_string(), reader.abort_handle());
        Ok(())
    }

    /// Subscribes to every result, for the tasks past `limit`.
    async fn watch_every(&self) -> Result<(), HostError> {
        let prefix = format!("{}.", subjects::results());
        let subject = format!("{prefix}>");
        let mut sub = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| self.subscribe_error(&subject, e))?;
        let mut every = self.every.lock().unwrap_or_else(|p| p.into_inner());
        if every.is_some() {
            return Ok(());
        }
        let (waiters, pending, watched) = (
            self.waiters.clone(),
            self.pending.clone(),
            self.watched.clone(),
        );
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut draining = false;
            loop {
                let message = tokio::select! {
                    m = sub.next() => m,
                    _ = &mut stopped, if !draining => {
                        // Unsubscribed, and the notices already on their
                        // way still read: none is lost in the switch.
                        draining = true;
                        let _ = sub.drain().await;
                        continue;
                    }
                };
                let Some(message) = message else { break };
                if let Some(id) = message.subject.as_str().strip_prefix(&prefix) {
                    wake(&waiters, &pending, id, &message.payload);
                }
            }
            // A task that ended while the switch was made may have got a
            // subscription of its own after its notice, which nothing would
            // end: drop every one nothing here waits for.
            let waiters = waiters.lock().unwrap_or_else(|p| p.into_inner());
            let pending = pending.lock().unwrap_or_else(|p| p.into_inner());
            watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|id, reader| {
                    let keep = waiters.contains_key(id) || pending.contains_key(id);
                    if !keep {
                        reader.abort();
                    }
                    keep
                });
        });
        tracing::info!(limit = self.limit, "more tasks wait for results here than the per-task subscriptions allowed; hearing every result");
        *every = Some(stop);
        Ok(())
    }

    /// Back to a subscription per task once fewer than half the limit are
    /// waited for: each gets its own before the one to every result goes,
    /// so that none is left without.
    async fn settle(&self) {
        // Taken first: a wait registered from here on subscribes for
        // itself, and one registered before is in the list below (a task
        // is registered before its subscription is asked for).
        let Some(stop) = self.every.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut ids: BTreeSet<String> = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        ids.extend(
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned(),
        );
        if ids.len() * 2 >= self.limit {
            // Still too many: keep hearing every result.
            let mut every = self.every.lock().unwrap_or_else(|p| p.into_inner());
            if every.is_none() {
                *every = Some(stop);
            }
            return;
        }
        for id in ids {
            let watched = self
                .watched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id);
            if watched {
                continue;
            }
            if let Err(e) = self.watch_one(&id).await {
                tracing::warn!(task = %id, error = %e, "cannot subscribe to a result; its waiters read the bucket");
            }
        }
        // The reader drains its subscription, then drops the subscriptions
        // of the tasks that ended meanwhile.
        let _ = stop.send(());
        tracing::info!("back to a subscription per task waited for");
    }

    /// Unsubscribes from the notice of `id`: nothing here waits for it.
    fn drop_notice(&self, id: &str) {
        if let Some(reader) = self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id)
        {
            reader.abort();
        }
    }
}

/// Most per-task result subscriptions a host keeps (less if `[host]
/// max_waits` is less): about 27 MiB of the NATS client's buffers.
const MAX_WATCHED: usize = 4096;

/// Most cancelled ids a host remembers.
const RECENT_CANCELS: usize = 4096;

/// A task this host runs, registered for cancellation until dropped.
struct Running<'a> {
    router: &'a TaskRouter,
    id: String,
    token: CancellationToken,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.router
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl TaskRouter {
    /// Creates (or opens) the stream and buckets and starts pulling for the
    /// capabilities this host serves.
    pub async fn start(
        cluster: &Cluster,
        host: Host,
        max_deliver: u32,
    ) -> Result<Arc<TaskRouter>, ClusterError> {
        let url = cluster.url.clone();
        let err = |what: &str, e: Box<dyn std::error::Error + Send + Sync>| {
            ClusterError::new(&url, ClusterErrorKind::Request, what, e)
        };
        // Results are fenced with a header 2.11 brought; an older server
        // would ignore it and store two results for one task.
        let version = cluster.client.server_info().version;
        if !server_is_at_least(&version, 2, 11) {
            return Err(err(
                "server version",
                format!("nats-server {version} is older than 2.11, which orch needs to keep one result per task").into(),
            ));
        }
        let js = jetstream::new(cluster.client.clone());
        // Tasks, and the workflow runs' fences, which a task's publish is
        // checked against (`service::Fence`); no consumer takes the fences.
        let task_subjects = vec![
            format!("{}.task.>", subjects::PREFIX),
            format!("{}.task-id.>", subjects::PREFIX),
            format!("{}.fence.>", subjects::PREFIX),
        ];
        let mut stream = js
            .get_or_create_stream(stream::Config {
                name: STREAM.to_string(),
                subjects: task_subjects.clone(),
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                // Submissions with the same `Nats-Msg-Id` within it are
                // dropped.
                duplicate_window: super::DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .map_err(|e| err("stream ORCH_TASKS", e.into()))?;
        // A stream made before fences or task ids gets their subjects;
        // subjects a later version added stay.
        let config = current_config(&mut stream)
            .await
            .map_err(|e| err("stream ORCH_TASKS", e))?;
        let missing: Vec<String> = task_subjects
            .into_iter()
            .filter(|s| !config.subjects.contains(s))
            .collect();
        if !missing.is_empty() {
            let mut subjects = config.subjects.clone();
            subjects.extend(missing);
            js.update_stream(stream::Config { subjects, ..config })
                .await
                .map_err(|e| err("stream ORCH_TASKS", e.into()))?;
        }
        // Finished tasks are kept for `[host] retention`, as on a lone host:
        // the server drops results, records and claims older than that.
        let retention = host.config().host.retention;
        let bucket = |name: &str| kv::Config {
            bucket: name.to_string(),
            history: 1,
            storage: stream::StorageType::File,
            max_age: retention,
            ..Default::default()
        };
        let queued = match js.get_key_value(QUEUED).await {
            Ok(b) => b,
            Err(_) => js
                .create_key_value(bucket(QUEUED))
                .await
                .map_err(|e| err("bucket ORCH_QUEUED", e.into()))?,
        };
        // The server republishes every stored result on a core subject,
        // which is how waiters learn of it: after the write, never for a
        // write that failed (a fenced result), and without a consumer.
        let republish = stream::Republish {
            // `<status>.<capability>.<id>` keys, republished as
            // `orch.v1.results.<id>`.
            source: format!("$KV.{RESULTS}.*.*.>"),
            destination: format!("{}.>", subjects::results()),
            headers_only: false,
        };
        // Results are written and read with the raw stream API (see
        // `keys`); the bucket is made as a KV bucket all the same, so that
        // `nats kv` tools read it.
        match js.get_key_value(RESULTS).await {
            Ok(_) => {}
            Err(_) => drop(
                js.create_key_value(kv::Config {
                    republish: Some(republish.clone()),
                    ..bucket(RESULTS)
                })
                .await
                .map_err(|e| err("bucket ORCH_RESULTS", e.into()))?,
            ),
        };
        // A bucket made before results were republished gets them now, and
        // one with a shorter retention gets this host's (`set_retention`).
        let mut kept_for = retention;
        for (name, republish) in [(RESULTS, Some(republish)), (QUEUED, None)] {
            let mut backing = js
                .get_stream(format!("KV_{name}"))
                .await
                .map_err(|e| err(name, e.into()))?;
            let mut config = backing
                .info()
                .await
                .map_err(|e| err(name, e.into()))?
                .config
                .clone();
            // Per-message TTLs for the queued records' delete markers.
            let ttl = name == QUEUED;
            let retention_set = cluster.set_retention(&mut config, retention, name == RESULTS);
            if name == RESULTS {
                kept_for = config.max_age;
            }
            let stale = (republish.is_some() && config.republish != republish)
                || retention_set
                || (ttl && !config.allow_message_ttl);
            if stale {
                config.allow_message_ttl |= ttl;
                if republish.is_some() {
                    config.republish = republish;
                }
                js.update_stream(config)
                    .await
                    .map_err(|e| err(&format!("bucket {name}: update"), e.into()))?;
            }
        }
        // A keyed task resubmitted once the cluster has dropped the first
        // (after the retention) is a new task, as on a lone host: the task
        // stream's duplicate window, within which the server would drop its
        // publish as a repeat of the first, is never longer than the
        // retention.
        let config = current_config(&mut stream)
            .await
            .map_err(|e| err("stream ORCH_TASKS", e))?;
        // Never past the stream's own max_age either (the server refuses
        // that), should an operator have given it one.
        let window = [kept_for, config.max_age]
            .into_iter()
            .filter(|d| !d.is_zero())
            .fold(super::DUPLICATE_WINDOW, Duration::min);
        if config.duplicate_window != window {
            js.update_stream(stream::Config {
                duplicate_window: window,
                ..config
            })
            .await
            .map_err(|e| err("stream ORCH_TASKS: duplicate window", e.into()))?;
        }
        let objects = match js.get_object_store(OBJECTS).await {
            Ok(o) => {
                cluster
                    .align_retention(&js, &format!("OBJ_{OBJECTS}"), retention)
                    .await?;
                o
            }
            Err(_) => js
                .create_object_store(jetstream::object_store::Config {
                    bucket: OBJECTS.to_string(),
                    max_age: retention,
                    storage: stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| err("object store ORCH_OBJECTS", e.into()))?,
        };
        let deadline_stream = if server_is_at_least(&version, 2, 12) {
            let config = stream::Config {
                name: DEADLINES.to_string(),
                subjects: vec![
                    format!("{}.deadline.at.>", subjects::PREFIX),
                    format!("{}.>", subjects::deadlines_due()),
                ],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                allow_message_schedules: true,
                // A schedule outlives its task's records by no more than the
                // tasks' retention: one further ahead is dropped with them,
                // so the stream holds at most one per task of the retention.
                max_age: retention,
                ..Default::default()
            };
            match deadline_stream(&js, config, kept_for).await {
                Ok(stream) => {
                    if let Err(e) = cluster.align_retention(&js, DEADLINES, retention).await {
                        tracing::warn!(error = %e, "cannot set the retention of ORCH_DEADLINES; its schedules are kept as before");
                    }
                    Some(stream)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot make the stream ORCH_DEADLINES: a task waiting on the stream fails at its deadline only while the host it was submitted through runs");
                    None
                }
            }
        } else {
            tracing::warn!(version = %version, "nats-server is older than 2.12: a task waiting on the stream fails at its deadline only while the host it was submitted through runs");
            None
        };
        let waiters: Waiters = Arc::default();
        let pending: Pending = Arc::default();
        let watch_limit = host.config().host.max_waits.clamp(1, MAX_WATCHED);
        let router = Arc::new(TaskRouter {
            objects,
            js,
            stream,
            queued,
            host,
            max_deliver: max_deliver.max(1),
            counters: Arc::new(Counters::default()),
            loops: Mutex::new(HashMap::new()),
            taken: Arc::new(Mutex::new(HashMap::new())),
            freed: Arc::new(tokio::sync::Notify::new()),
            members: cluster.members.clone(),
            url,
            max_value: (cluster.client.server_info().max_payload).saturating_sub(4 << 10),
            running: Arc::new(Mutex::new(HashMap::new())),
            client: cluster.client.clone(),
            cancelled: Arc::new(Mutex::new(RecentCancels::default())),
            connects: cluster.connects.clone(),
            notices: Notices {
                client: cluster.client.clone(),
                url: cluster.url.clone(),
                waiters: waiters.clone(),
                pending: pending.clone(),
                watched: Arc::default(),
                every: Mutex::new(None),
                limit: watch_limit,
            },
            waiters,
            pending,
            deadlines: Mutex::default(),
            deadline_added: Arc::default(),
            deadline_only: Mutex::default(),
            deadline_stream,
            scheduling: Arc::new(tokio::sync::Semaphore::new(MAX_SCHEDULING)),
            due_loop: Mutex::default(),
        });
        router
            .host
            .scheduler()
            .set_remote(Arc::new(RemoteCalls(Arc::downgrade(&router))));
        router.follow_capabilities();
        router.follow_deadlines();
        router.follow_due_deadlines();
        router.follow_cancels(&cluster.client).await?;
        Ok(router)
    }

    /// A cancel made on any host stops the task's attempt on this one.
    async fn follow_cancels(&self, client: &async_nats::Client) -> Result<(), ClusterError> {
        let (running, cancelled) = (self.running.clone(), self.cancelled.clone());
        self.follow(client, subjects::cancels(), move |id, _| {
            note_cancel(&running, &cancelled, id)
        })
        .await
    }

    /// Calls `each` with the rest of the subject (after `prefix.`) and the
    /// payload of every core NATS message under `prefix`.
    async fn follow(
        &self,
        client: &async_nats::Client,
        prefix: String,
        each: impl Fn(&str, &bytes::Bytes) + Send + 'static,
    ) -> Result<(), ClusterError> {
        let prefix = format!("{prefix}.");
        let mut sub = client.subscribe(format!("{prefix}>")).await.map_err(|e| {
            ClusterError::new(
                &self.url,
                ClusterErrorKind::Request,
                format!("subscribe {prefix}>"),
                e,
            )
        })?;
        tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                if let Some(rest) = message.subject.as_str().strip_prefix(&prefix) {
                    each(rest, &message.payload);
                }
            }
        });
        Ok(())
    }

    /// Drops the pending results older than [`PENDING_MAX_AGE`], with
    /// their waiters.
    fn forget_stale_pending(&self) {
        let old: Vec<String> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, (since, _))| since.elapsed() > PENDING_MAX_AGE)
            .map(|(k, _)| k.clone())
            .collect();
        if old.is_empty() {
            return;
        }
        // A task whose deadline is still ahead is still failed at its
        // deadline if it waits then (`follow_deadlines`), without counting
        // as unfinished here.
        let ahead: std::collections::HashSet<String> = {
            let now = now_ms();
            let old: std::collections::HashSet<&String> = old.iter().collect();
            let heap = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
            heap.iter()
                .filter(|std::cmp::Reverse((d, id))| {
                    d.saturating_add(DEADLINE_GRACE.as_millis() as u64) >= now && old.contains(id)
                })
                .map(|std::cmp::Reverse((_, id))| id.clone())
                .collect()
        };
        let stale: Vec<String> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            old.into_iter()
                .filter(|k| pending.remove(k).is_some())
                .collect()
        };
        // Bounded: past the limit a task's deadline is applied when a host
        // takes it, as for another client's task.
        let mut only = self.deadline_only.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_DEADLINE_ONLY.saturating_sub(only.len());
        only.extend(ahead.into_iter().take(room));
        for id in stale {
            self.forget_closed_waiters(&id);
        }
    }

    /// Stores `bytes` as the object `name`, in chunks a NATS message
    /// carries.
    async fn put_object(&self, name: &str, bytes: &[u8]) -> Result<(), HostError> {
        let meta = jetstream::object_store::ObjectMetadata {
            name: name.to_string(),
            chunk_size: Some((128 << 10).min(self.max_value.max(1))),
            ..Default::default()
        };
        let mut reader = bytes;
        self.objects
            .put(meta, &mut reader)
            .await
            .map_err(|e| self.error(&format!("ORCH_OBJECTS put {name}"), e))?;
        Ok(())
    }

    /// Reads the object `name`, refusing one larger than `limit`.
    async fn get_object(&self, name: &str, limit: u64) -> Result<Vec<u8>, ObjectError> {
        use tokio::io::AsyncReadExt;
        let object = match self.objects.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => {
                return Err(ObjectError::Missing)
            }
            Err(e) => {
                return Err(ObjectError::Nats(
                    self.error(&format!("ORCH_OBJECTS get {name}"), e),
                ))
            }
        };
        let size = object.info().size as u64;
        if size > limit {
            return Err(ObjectError::TooLarge { size, limit });
        }
        let mut bytes = Vec::with_capacity(size as usize);
        object
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ObjectError::Nats(self.error(&format!("ORCH_OBJECTS read {name}"), e)))?;
        Ok(bytes)
    }

    /// A stored result with its bytes, read from the object store when
    /// they are there.
    async fn decode(&self, stored: StoredResult) -> Result<Fetched, HostError> {
        let object = stored.result_object.clone();
        let mut fetched = decode_stored(stored);
        if let Some(name) = object {
            // A result is never larger than the memory its agent may have.
            let limit = self.host.config().limits.max_memory;
            match self.get_object(&name, limit).await {
                Ok(bytes) => fetched.result = Some(bytes),
                Err(ObjectError::Nats(e)) => return Err(e),
                Err(e) => {
                    return Err(HostError::Corrupt {
                        what: format!("task {}: its result {name}", fetched.record.id),
                        source: Box::new(e),
                    })
                }
            }
        }
        Ok(fetched)
    }

    /// Registers a task this host is about to run, for cancellation.
    fn running(&self, id: &str) -> Running<'_> {
        let token = CancellationToken::new();
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), token.clone());
        Running {
            router: self,
            id: id.to_string(),
            token,
        }
    }

    fn was_cancelled(&self, id: &str) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ids
            .contains(id)
    }

    /// A NATS fault: the request was fine, the broker failed it.
    fn error(&self, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> HostError {
        HostError::Unavailable {
            what: format!("NATS at {}: {what}", self.url),
            source: Box::new(e),
        }
    }

    /// Starts and stops pull loops as the host's capabilities change, and
    /// wakes them when a capability gains slots (an agent installed or
    /// upgraded), so that tasks waiting on the stream take the new slots
    /// without waiting for a busy one to free.
    fn follow_capabilities(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut slots: BTreeMap<String, u32> = BTreeMap::new();
            loop {
                let Some(router) = weak.upgrade() else { return };
                let want: BTreeSet<String> =
                    router.host.scheduler().capabilities().into_iter().collect();
                let now: BTreeMap<String, u32> = want
                    .iter()
                    .map(|cap| (cap.clone(), router.capacity(cap)))
                    .collect();
                if now
                    .iter()
                    .any(|(cap, n)| slots.get(cap).is_some_and(|before| n > before))
                {
                    router.freed.notify_waiters();
                }
                slots = now;
                {
                    let mut loops = router.loops.lock().unwrap_or_else(|p| p.into_inner());
                    loops.retain(|cap, handle| {
                        let keep = want.contains(cap);
                        if !keep {
                            handle.abort();
                        }
                        keep
                    });
                    for cap in want {
                        if let std::collections::hash_map::Entry::Vacant(slot) =
                            loops.entry(cap.clone())
                        {
                            slot.insert(tokio::spawn(pull_loop(router.clone(), cap)));
                        }
                    }
                }
                router.forget_stale_pending();
                router.notices.settle().await;
                drop(router);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    /// Stops pulling; tasks already pulled and not finished are redelivered
    /// elsewhere after the ack wait.
    pub fn stop(&self) {
        for (_, handle) in self.loops.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            handle.abort();
        }
        if let Some(handle) = self
            .due_loop
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            handle.abort();
        }
    }

    pub fn fenced(&self) -> u64 {
        self.counters.fenced.load(Ordering::Relaxed)
    }

    /// Tasks on the stream now: waiting for a host, or taken and not yet
    /// acked, over the whole cluster.
    pub async fn on_stream(&self) -> Result<u64, HostError> {
        // Every message less the workflow runs' fences (one a run taken
        // over): tasks have a subject each, fences are few.
        let mut stream = self.stream.clone();
        let messages = stream
            .info()
            .await
            .map_err(|e| self.error("stream ORCH_TASKS", e))?
            .state
            .messages;
        let mut counts = self
            .stream
            .info_with_subjects(format!("{}.fence.>", subjects::PREFIX))
            .await
            .map_err(|e| self.error("stream ORCH_TASKS", e))?;
        let mut fences = 0u64;
        while let Some(count) = counts.next().await {
            let (_, n) = count.map_err(|e| self.error("stream ORCH_TASKS", e))?;
            fences += n as u64;
        }
        Ok(messages.saturating_sub(fences))
    }

    /// Task messages terminated for want of a valid task id.
    pub fn terminated(&self) -> u64 {
        self.counters.terminated.load(Ordering::Relaxed)
    }

    /// Task messages acked without running because their id already ran.
    pub fn duplicates(&self) -> u64 {
        self.counters.duplicates.load(Ordering::Relaxed)
    }

    pub fn redelivered(&self) -> u64 {
        self.counters.redelivered.load(Ordering::Relaxed)
    }

    /// Capabilities some live host serves.
    fn live_capabilities(&self) -> BTreeSet<String> {
        super::live_capabilities(&self.members)
    }

    /// A `tasks.call` sub-task for a capability only other hosts serve: on
    /// the stream like any task, with the caller's deadline, remaining fuel
    /// and the call depth in its headers.
    async fn call_remote(&self, call: SubCall, priority: i32, trace: Option<String>) -> Outcome {
        let fuel = call.fuel;
        match self.call_remote_result(call, priority, trace).await {
            Ok(output) => Outcome {
                fuel_used: output.fuel_used,
                result: Ok(output),
                memory: 0,
            },
            // Charged what the remote attempt reported using; its whole
            // allowance when it reported nothing (it never ran here).
            Err((error, used)) => Outcome {
                fuel_used: used.unwrap_or(fuel).min(fuel),
                result: Err(error),
                memory: 0,
            },
        }
    }

    async fn call_remote_result(
        &self,
        call: SubCall,
        priority: i32,
        trace: Option<String>,
    ) -> Result<TaskOutput, (TaskError, Option<u64>)> {
        if !self.live_capabilities().contains(&call.capability) {
            return Err((
                TaskError::Unavailable(format!("no agent provides capability {}", call.capability)),
                Some(0),
            ));
        }
        // `call.parent` is the sub-task's own id, PARENT.N; nested deep under
        // a long id it may be too long for the bus, and then gets a new one.
        let id = if is_task_id(&call.parent) {
            call.parent.clone()
        } else {
            self.host.new_task_id()
        };
        let now = now_ms();
        let left = call.deadline.saturating_duration_since(Instant::now());
        let record = TaskRecord {
            priority,
            deadline_ms: Some(now + left.as_millis() as u64),
            trace,
            ..TaskRecord::queued(
                id.clone(),
                call.capability.clone(),
                now,
                call.payload.len() as u64,
            )
        };
        let host_error = |e: HostError| (TaskError::Host(e.to_string()), None);
        let mut extra = async_nats::HeaderMap::new();
        extra.insert(HEADER_FUEL, call.fuel.to_string().as_str());
        extra.insert(HEADER_DEPTH, call.depth.to_string().as_str());
        self.publish(&record, call.payload, extra, None)
            .await
            .map_err(host_error)?;
        let Fetched {
            record: done,
            result,
            error: typed,
        } = self.wait_for(&id, left, true).await.map_err(host_error)?;
        match done.status {
            Status::Completed => Ok(TaskOutput {
                result: result.unwrap_or_default(),
                fuel_used: done.fuel_used.unwrap_or(0),
                elapsed: Duration::from_millis(
                    done.finished_at_ms.unwrap_or(now).saturating_sub(now),
                ),
                subtasks: done.subtasks.unwrap_or(0),
                subtask_fuel: done.subtask_fuel.unwrap_or(0),
                calls: done.calls,
            }),
            Status::Failed | Status::Dead | Status::Cancelled => {
                let e = done.error.unwrap_or(ErrorInfo {
                    kind: "host".into(),
                    message: "no error recorded".into(),
                });
                // The typed error when the host that ran it sent one.
                let error =
                    typed.unwrap_or_else(|| TaskError::from_kind(&e.kind, &e.message, call.fuel));
                Err((error, done.fuel_used))
            }
            // Not finished within the caller's deadline.
            Status::Queued | Status::Running => Err((
                TaskError::DeadlineExceeded {
                    ms: left.as_millis() as u64,
                },
                None,
            )),
        }
    }

    /// Stores the queued record, then publishes the task.
    async fn publish(
        &self,
        record: &TaskRecord,
        mut payload: Vec<u8>,
        extra: async_nats::HeaderMap,
        fence: Option<&Fence>,
    ) -> Result<bool, HostError> {
        let json: bytes::Bytes = serde_json::to_vec(record)
            .map_err(|e| self.error("encode", e))?
            .into();
        let mut headers = extra;
        if payload.len() > self.max_value {
            // Too large for one message: the message carries the object's
            // name, and the object is stored before the message.
            let name = payload_object(&record.id);
            self.put_object(&name, &payload).await?;
            headers.insert(HEADER_PAYLOAD_OBJECT, name.as_str());
            payload = Vec::new();
        }
        headers.insert(HEADER_TASK_ID, record.id.as_str());
        headers.insert(HEADER_HOST, self.host.id());
        headers.insert(HEADER_PRIORITY, record.priority.to_string().as_str());
        headers.insert(
            HEADER_SUBMITTED,
            record.submitted_at_ms.to_string().as_str(),
        );
        if let Some(d) = record.deadline_ms {
            headers.insert(HEADER_DEADLINE, d.to_string().as_str());
        }
        if let Some(k) = &record.idempotency_key {
            headers.insert(HEADER_KEY, k.as_str());
        }
        if let Some(t) = &record.trace {
            headers.insert(crate::trace::HEADER, t.as_str());
        }
        if let Some(f) = fence {
            // Stored only if the run's last fence is still the one this
            // driver knows: the server checks it in the same write.
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                f.sequence.to_string().as_str(),
            );
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence-Subject",
                subjects::fence(&f.name).as_str(),
            );
        }
        // The queued record and the task are written at the same time: the
        // task carries everything a host needs in its headers, and a record
        // that lands after the result is read second (results are read
        // first). The write is sent before the task on this connection, so
        // it lands long before the task can end and its record be deleted.
        // Under a fence or a key the record is created, not overwritten:
        // another submission's record of the same task (same key, same id)
        // stays, and the publish below settles whose it is. `None`: that
        // record was there.
        let put = async {
            let key = keys::queued(&record.capability, &record.id);
            if fence.is_none() && record.idempotency_key.is_none() {
                return self
                    .queued
                    .put(key, json.clone())
                    .await
                    .map(Some)
                    .map_err(|e| self.error("ORCH_QUEUED", e));
            }
            match self.queued.create(key, json.clone()).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(self.error("ORCH_QUEUED", e)),
            }
        };
        let subject = || {
            subjects::task_with_id(&record.capability, &record.id)
                .unwrap_or_else(|| subjects::task(&record.capability))
        };
        // A replicated stream answers a repeat of an id whose first message
        // it has not stored yet with 10158, not with the duplicate ack
        // (which names the kept message); asked again shortly, it answers
        // that. Only a keyed task's id can be sent twice at once, so only
        // then are the headers kept to send again.
        let resend = record.idempotency_key.is_some().then(|| headers.clone());
        let payload: bytes::Bytes = payload.into();
        let publish = async {
            let send = async |headers: async_nats::HeaderMap| {
                let sent = self
                    .js
                    .send_publish(
                        subject(),
                        jetstream::message::PublishMessage::build()
                            .payload(payload.clone())
                            .headers(headers)
                            .message_id(&record.id),
                    )
                    .await
                    .map_err(|e| self.error("publish", e))?;
                Ok::<_, HostError>(sent.await)
            };
            let mut ack = send(headers).await?;
            let mut tries = 0;
            while let (Err(e), Some(headers)) = (&ack, &resend) {
                if tries == IN_PROCESS_TRIES || !id_in_process(e) {
                    break;
                }
                tries += 1;
                tokio::time::sleep(IN_PROCESS_PAUSE).await;
                ack = send(headers.clone()).await?;
            }
            ack.map_err(|e| match e.kind() {
                jetstream::context::PublishErrorKind::WrongLastSequence => {
                    HostError::Fenced(format!(
                        "task {}: another driver raised the fence of {}",
                        record.id,
                        fence.map_or("", |f| f.name.as_str())
                    ))
                }
                _ => self.error("publish ack", e),
            })
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let key = record.id.clone();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .push(tx);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), (Instant::now(), Some(rx)));
        // Subscribed before the task is on the stream, so that a fast
        // result cannot slip past its notice; and after the task is
        // registered, so that a switch between subscriptions sees it.
        if let Err(e) = self.notices.watch(&record.id).await {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            self.forget_closed_waiters(&key);
            return Err(e);
        }
        let (put, ack) = tokio::join!(put, publish);
        if put.is_err() || ack.is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            self.forget_closed_waiters(&record.id);
        }
        if let (Ok(Some(rev)), Err(_)) = (&put, &ack) {
            // The submitter is told it failed: no record may say queued for
            // a task that is not on the stream (a keyed retry would find it).
            // Only this write's: another submission of the task may have
            // written one since.
            let queued_key = keys::queued(&record.capability, &record.id);
            if let Err(e) = self
                .queued
                .delete_expect_revision(&queued_key, Some(*rev))
                .await
            {
                tracing::warn!(task = %record.id, error = %e, "cannot delete the record of a task that was not published");
            }
        }
        let rev = put?;
        let ack = ack?;
        let duplicate = ack.duplicate;
        let queued_key = keys::queued(&record.capability, &record.id);
        match (duplicate, rev) {
            // The same key submitted twice at once, and this record was
            // written first: the stream took the other submission's task,
            // so this record (its body, maybe its capability) is not the
            // task's. Under the same capability the other one overwrites
            // it (below); deleting it first would leave the task with no
            // record until then, read as "no such task". Under another
            // capability it goes. The server answers a duplicate with the
            // sequence of the message it kept, whose subject names the
            // capability; a message no longer there has been acked, so its
            // task has ended.
            (true, Some(rev)) => {
                use jetstream::stream::RawMessageErrorKind;
                let keep = match self.stream.get_raw_message(ack.sequence).await {
                    // Also not when the task has ended meanwhile and this
                    // record was created after its record's removal.
                    Ok(kept) if kept.subject.as_str() == subject() => {
                        !matches!(self.read_result(&record.id).await, Ok(Some(_)))
                    }
                    Ok(_) => false,
                    Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => false,
                    // Unknown: a record left under another capability would
                    // be listed until the retention time, while one deleted
                    // under this one is rewritten by the other submission.
                    Err(e) => {
                        tracing::debug!(task = %record.id, error = %e, "cannot read the task a repeated submission was dropped for");
                        false
                    }
                };
                if !keep {
                    if let Err(e) = self
                        .queued
                        .delete_expect_revision(&queued_key, Some(rev))
                        .await
                    {
                        tracing::debug!(task = %record.id, error = %e, "the record of a repeated submission was rewritten meanwhile");
                    }
                }
            }
            // The stream took this task, but another submission of the key
            // wrote its record first: this one's replaces it, unless the
            // task has ended by now (then nothing would delete it, and the
            // task would be listed as queued).
            (false, None) if fence.is_none() => {
                if let Ok(rev) = self.queued.put(&queued_key, json).await {
                    if matches!(self.read_result(&record.id).await, Ok(Some(_))) {
                        if let Err(e) = self
                            .queued
                            .delete_expect_revision(&queued_key, Some(rev))
                            .await
                        {
                            tracing::debug!(task = %record.id, error = %e, "the record of a task that ended was rewritten meanwhile");
                        }
                    }
                }
            }
            _ => {}
        }
        if let (false, Some(deadline)) = (duplicate, record.deadline_ms) {
            self.add_deadline(deadline, &record.id);
            self.schedule_deadline(&record.id, deadline);
        }
        Ok(duplicate)
    }

    fn add_deadline(&self, deadline: u64, id: &str) {
        let unfinished = self.pending.lock().unwrap_or_else(|p| p.into_inner()).len();
        let mut heap = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        if heap.len() > 2 * unfinished + 1024 {
            // Locks in the order deadlines, pending, deadline_only; never
            // the other way.
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let only = self.deadline_only.lock().unwrap_or_else(|p| p.into_inner());
            heap.retain(|std::cmp::Reverse((_, id))| pending.contains_key(id) || only.contains(id));
        }
        let earliest = heap
            .peek()
            .is_none_or(|std::cmp::Reverse((d, _))| deadline < *d);
        heap.push(std::cmp::Reverse((deadline, id.to_string())));
        if earliest {
            self.deadline_added.notify_one();
        }
    }

    /// Has the server publish the task's id on [`subjects::deadlines_due`]
    /// [`DEADLINE_BACKSTOP`] after this host's own look at its deadline
    /// would be (a NATS 2.12 message schedule in [`DEADLINES`]), so that
    /// some host fails it if it still waits on the stream then, also when
    /// this host has stopped, restarted or lost the server by then. One
    /// schedule per task: its subject is the task id, and publishing it
    /// again replaces it. Best effort, and off the submission's path: sent
    /// after the task is on the stream, by a task of its own (at most
    /// [`MAX_SCHEDULING`] at once; past that, and when the write fails,
    /// this host's own look still applies).
    fn schedule_deadline(&self, id: &str, deadline: u64) {
        let (Some(_), Some(subject)) = (&self.deadline_stream, subjects::deadline_schedule(id))
        else {
            return;
        };
        let Ok(permit) = self.scheduling.clone().try_acquire_owned() else {
            tracing::debug!(task = %id, "too many deadline schedules being written; this host's own look at the deadline still applies");
            return;
        };
        let due = deadline
            .saturating_add((DEADLINE_GRACE + DEADLINE_BACKSTOP).as_millis() as u64)
            .min(i64::MAX as u64);
        let Some(at) = chrono::DateTime::from_timestamp_millis(due as i64) else {
            return;
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Schedule",
            format!(
                "@at {}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            )
            .as_str(),
        );
        headers.insert(
            "Nats-Schedule-Target",
            format!("{}.{id}", subjects::deadlines_due()).as_str(),
        );
        let js = self.js.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let sent = async {
                js.send_publish(
                    subject,
                    jetstream::message::PublishMessage::build()
                        .payload(deadline.to_string().into())
                        .headers(headers),
                )
                .await?
                .await
                .map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)
            };
            if let Err(e) = sent.await {
                tracing::debug!(task = %id, error = %e, "cannot schedule the task's deadline at the server; this host's own look still applies");
            }
            drop(permit);
        });
    }

    /// Takes the deadline schedules as they come due (any host may get
    /// one) and fails each task still waiting on the stream, as
    /// [`TaskRouter::expire`] does for this host's own deadlines.
    fn follow_due_deadlines(self: &Arc<Self>) {
        let Some(stream) = self.deadline_stream.clone() else {
            return;
        };
        let weak = Arc::downgrade(self);
        let handle = tokio::spawn(async move {
            let prefix = format!("{}.", subjects::deadlines_due());
            loop {
                let consumer = stream
                    .get_or_create_consumer(
                        DEADLINES_CONSUMER,
                        consumer::pull::Config {
                            durable_name: Some(DEADLINES_CONSUMER.to_string()),
                            filter_subject: format!("{prefix}>"),
                            ack_policy: consumer::AckPolicy::Explicit,
                            // A host that stops or freezes with
                            // schedules taken leaves them to the others
                            // this soon.
                            ack_wait: DEADLINE_ACK_WAIT,
                            max_deliver: -1,
                            ..Default::default()
                        },
                    )
                    .await;
                let messages = match consumer {
                    // Requests that expire within a second, so that the
                    // server stops handing schedules to a host that froze
                    // or lost its network without closing its connection.
                    Ok(c) => c
                        .stream()
                        .max_messages_per_batch(4)
                        .expires(Duration::from_secs(1))
                        .messages()
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let mut messages = match messages {
                    Ok(m) => m,
                    Err(e) => {
                        if weak.strong_count() == 0 {
                            return;
                        }
                        tracing::warn!(error = %e, "cannot take the deadline schedules due; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(message) = messages.next().await {
                    let Some(router) = weak.upgrade() else { return };
                    match message {
                        Ok(message) => router.due_deadline(&prefix, message).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "while taking the deadline schedules due");
                            drop(router);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
                if weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        *self.due_loop.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// One due deadline schedule: the task fails if it still waits on the
    /// stream; the schedule is acked, or looked at again a second later
    /// when that cannot be told (at most [`DEADLINE_TRIES`] times).
    async fn due_deadline(&self, prefix: &str, message: jetstream::Message) {
        let id = message.subject.as_str().strip_prefix(prefix).unwrap_or("");
        let deadline = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|d| d.parse::<u64>().ok());
        let outcome = match deadline {
            Some(deadline) if !id.is_empty() => self.expire(id, deadline).await,
            _ => {
                tracing::warn!(subject = %message.subject, "a deadline schedule without a task id or deadline; dropped");
                Ok(())
            }
        };
        let tries = message.info().map(|i| i.delivered as u64).unwrap_or(0);
        let ack = match outcome {
            Ok(()) => AckKind::Ack,
            Err(e) if tries >= DEADLINE_TRIES => {
                tracing::warn!(task = %id, error = %e, tries, "cannot tell whether a task waits past its deadline; its schedule is dropped (a host that takes it fails it)");
                AckKind::Ack
            }
            Err(e) => {
                tracing::debug!(task = %id, error = %e, "cannot fail a task waiting past its deadline yet");
                AckKind::Nak(Some(Duration::from_secs(1)))
            }
        };
        if let Err(e) = message.ack_with(ack).await {
            tracing::debug!(task = %id, error = %e, "cannot acknowledge a deadline schedule; it comes again");
        }
    }

    /// Fails, at its deadline, a task published here that is still waiting
    /// on the stream (every slot of the hosts serving it busy, or none
    /// serving it), as a lone host fails a task waiting for a slot. The
    /// check comes [`DEADLINE_GRACE`] after the deadline, so that a task
    /// that ended just in time has its result stored first; a task a host
    /// has taken is left to that host, which stops it at its deadline.
    fn follow_deadlines(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let added = self.deadline_added.clone();
        tokio::spawn(async move {
            loop {
                let Some(router) = weak.upgrade() else { return };
                let now = now_ms();
                let (due, next) = {
                    let mut heap = router.deadlines.lock().unwrap_or_else(|p| p.into_inner());
                    let mut due = Vec::new();
                    while let Some(std::cmp::Reverse((d, _))) = heap.peek() {
                        if d.saturating_add(DEADLINE_GRACE.as_millis() as u64) > now {
                            break;
                        }
                        if let Some(std::cmp::Reverse(entry)) = heap.pop() {
                            due.push(entry);
                        }
                    }
                    (due, heap.peek().map(|std::cmp::Reverse((d, _))| *d))
                };
                let due: Vec<(u64, String)> = {
                    let pending = router.pending.lock().unwrap_or_else(|p| p.into_inner());
                    let mut only = router
                        .deadline_only
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    due.into_iter()
                        .filter(|(_, id)| only.remove(id) | pending.contains_key(id))
                        .collect()
                };
                futures_util::stream::iter(due)
                    .for_each_concurrent(32, |(deadline, id)| {
                        let router = &router;
                        async move {
                            if let Err(e) = router.expire(&id, deadline).await {
                                // Looked at again in a second, while the
                                // task is unfinished here.
                                tracing::debug!(task = %id, error = %e, "cannot fail a task waiting past its deadline yet");
                                let again = now_ms() + 1000 - DEADLINE_GRACE.as_millis() as u64;
                                router
                                    .deadline_only
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .insert(id.clone());
                                router
                                    .deadlines
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(std::cmp::Reverse((again, id)));
                            }
                        }
                    })
                    .await;
                // Retries pushed meanwhile may come first.
                let next = router
                    .deadlines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .peek()
                    .map(|std::cmp::Reverse((d, _))| *d)
                    .or(next);
                drop(router);
                let sleep = match next {
                    Some(d) => Duration::from_millis(
                        d.saturating_add(DEADLINE_GRACE.as_millis() as u64)
                            .saturating_sub(now_ms()),
                    ),
                    None => Duration::from_secs(60),
                };
                tokio::select! {
                    () = tokio::time::sleep(sleep) => {}
                    () = added.notified() => {}
                }
            }
        });
    }

    /// Ends a task that waits on the stream past its deadline as failed
    /// with `deadline-exceeded`, with a create-only write of its result: a
    /// host that takes it later fails it too (the deadline has passed) and
    /// its write is fenced.
    async fn expire(&self, id: &str, deadline: u64) -> Result<(), HostError> {
        use crate::service::TaskStore as _;
        self.reachable()?;
        let current = match self.fetch(id).await {
            Ok(current) => current,
            Err(HostError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if current.record.status.is_final() {
            // Its notice was lost: it is not unfinished any more.
            self.forget_pending(id);
            return Ok(());
        }
        if current.record.status != Status::Queued {
            return Ok(());
        }
        // The record's deadline decides: a schedule of an earlier task
        // under the same id (a keyed resubmission after the first one was
        // removed) must not fail one with a later deadline, or none.
        if current.record.deadline_ms.is_none_or(|d| d > now_ms()) {
            return Ok(());
        }
        let mut record = current.record;
        let error = TaskError::DeadlineExceeded {
            ms: record
                .deadline_ms
                .unwrap_or(deadline)
                .saturating_sub(record.submitted_at_ms),
        };
        // As a lone host records a task that never left its queue: no
        // attempt, so no host or agent ran it.
        record.end(Status::Failed, &error);
        record.fuel_used = Some(0);
        if let Some(stored) = self.end_here(record, error).await? {
            // Off the stream, so that it does not wait there for a host.
            self.drop_task_message(&stored.task.capability, id).await;
        }
        Ok(())
    }

    /// Stores the end of a task that no attempt here ends (a cancel, a
    /// deadline passed on the stream) with the create-only write of its
    /// result, and emits its event at once (an attempt this host stops or
    /// fences later is told after it); `None` when it had an end already.
    /// Written, the task is no longer unfinished here, whenever its
    /// notification comes, and its queued record goes.
    async fn end_here(
        &self,
        record: TaskRecord,
        error: TaskError,
    ) -> Result<Option<StoredResult>, HostError> {
        let stored = StoredResult {
            task: record,
            result_base64: None,
            result_object: None,
            error: Some(error),
        };
        let json = serde_json::to_vec(&stored).map_err(|e| self.error("encode", e))?;
        if !self.create_result(&stored.task, json).await? {
            return Ok(None);
        }
        self.host.events().ended(&stored.task);
        self.forget_pending(&stored.task.id);
        self.forget_queued(&stored.task.capability, &stored.task.id)
            .await;
        Ok(Some(stored))
    }

    /// A task submitted here that has ended: its waiters that stopped
    /// waiting, and its notice subscription if none waits, go too.
    fn forget_pending(&self, id: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.forget_closed_waiters(id);
    }

    /// Puts an admitted task on the stream; returns once the stream has
    /// stored it. A keyed task whose id exists already is that task: found
    /// by a read first (its stream message may be gone, and the duplicate
    /// window with it), unless the caller knows the key is unused.
    async fn accept(
        &self,
        record: TaskRecord,
        payload: Vec<u8>,
        stored: &(dyn Fn(&TaskRecord) + Send + Sync),
        unused_key: bool,
        fence: Option<&Fence>,
    ) -> Result<Accepted, HostError> {
        if record.idempotency_key.is_some() && !unused_key {
            // A task that ends between fetch's reads is found by the
            // publish below (a repeat within the duplicate window).
            match self.fetch_with(&record.id, false).await {
                Ok(_) => return Ok(Accepted::Existing(record.id)),
                Err(HostError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let duplicate = self
            .publish(&record, payload, async_nats::HeaderMap::new(), fence)
            .await?;
        Ok(if duplicate {
            Accepted::Existing(record.id)
        } else {
            // On the stream already: another host may be running it.
            stored(&record);
            Accepted::New
        })
    }

    /// Ends a task as cancelled with a create-only write of its result, so
    /// that it is that or the result of an attempt that finished first;
    /// then tells every host, so that one running it stops.
    async fn cancel(&self, id: &str) -> Result<Stored, HostError> {
        let current = self.fetch(id).await?;
        if current.record.status.is_final() {
            return Ok(current.stored());
        }
        let mut record = current.record;
        record.end(Status::Cancelled, &TaskError::Cancelled);
        let Some(stored) = self.end_here(record, TaskError::Cancelled).await? else {
            return Ok(self.fetch(id).await?.stored());
        };
        note_cancel(&self.running, &self.cancelled, id);
        // At most once: a host that misses it runs the task to its end and
        // its result is fenced.
        if let Err(e) = self
            .client
            .publish(subjects::cancel(id), bytes::Bytes::new())
            .await
        {
            tracing::warn!(task = %id, error = %e, "cannot announce a cancel");
        }
        self.drop_task_message(&stored.task.capability, id).await;
        Ok(decode_stored(stored).stored())
    }

    /// Removes a cancelled task's message from the stream, found by the
    /// task id in its subject, so that no host takes it any more: a host
    /// that missed the cancel's announcement (disconnected, or started
    /// since) would otherwise run it, and only its outcome would be fenced.
    /// A delivery under way is not recalled (the announcement stops it).
    /// Another client's message has no id in its subject and stays: the
    /// host that takes it runs it, unless it heard the cancel.
    async fn drop_task_message(&self, capability: &str, id: &str) {
        let Some(subject) = subjects::task_with_id(capability, id) else {
            return;
        };
        use jetstream::stream::LastRawMessageErrorKind;
        let message = match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message,
            // Taken and acked already, or never published with its id.
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return,
            Err(e) => {
                tracing::debug!(task = %id, error = %e, "cannot find an ended task's message on the stream");
                return;
            }
        };
        if let Err(e) = self.stream.delete_message(message.sequence).await {
            tracing::debug!(task = %id, error = %e, "cannot remove an ended task's message; a host that takes it and missed the cancel runs it (its outcome is fenced)");
            return;
        }
        // A payload too large for the message is in the object store, and
        // no host will take and delete it now.
        let object = message
            .headers
            .get(HEADER_PAYLOAD_OBJECT)
            .map(|v| v.to_string());
        if let Some(name) = object {
            if let Err(e) = self.objects.delete(&name).await {
                tracing::debug!(object = %name, error = %e, "cannot delete a payload object; it expires with the retention time");
            }
        }
    }

    /// The task's final record with its result, or its queued record.
    pub async fn get(&self, id: &str) -> Result<TaskRecord, HostError> {
        Ok(self.get_with_result(id).await?.0)
    }

    pub async fn get_with_result(
        &self,
        id: &str,
    ) -> Result<(TaskRecord, Option<Vec<u8>>), HostError> {
        self.fetch(id).await.map(Fetched::pair)
    }

    async fn fetch(&self, id: &str) -> Result<Fetched, HostError> {
        self.fetch_with(id, true).await
    }

    /// [`TaskRouter::fetch`]; without `reread`, a task that ended between
    /// its two reads reads as not found (for a caller that has another
    /// check for it, and would pay a third round trip on every miss).
    async fn fetch_with(&self, id: &str, reread: bool) -> Result<Fetched, HostError> {
        // Not a key the buckets can hold: no such task (and not a NATS fault).
        if !is_task_id(id) {
            return Err(HostError::NotFound(id.to_string()));
        }
        if let Some(bytes) = self.read_result(id).await? {
            let stored: StoredResult =
                serde_json::from_slice(&bytes).map_err(|e| corrupt(id, "ORCH_RESULTS", e))?;
            return self.decode(stored).await;
        }
        match self.read_queued(id).await? {
            Some(bytes) => Ok(Fetched {
                record: serde_json::from_slice(&bytes)
                    .map_err(|e| corrupt(id, "ORCH_QUEUED", e))?,
                result: None,
                error: None,
            }),
            // The task may have ended between the two reads: its result is
            // stored before its record goes, so it is there now.
            None if !reread => Err(HostError::NotFound(id.to_string())),
            None => match self.read_result(id).await? {
                Some(bytes) => {
                    let stored: StoredResult = serde_json::from_slice(&bytes)
                        .map_err(|e| corrupt(id, "ORCH_RESULTS", e))?;
                    self.decode(stored).await
                }
                None => Err(HostError::NotFound(id.to_string())),
            },
        }
    }

    /// Waits up to `timeout` for the task's result.
    pub async fn wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<(TaskRecord, Option<Vec<u8>>), HostError> {
        self.wait_for(id, timeout, false).await.map(Fetched::pair)
    }

    /// Like [`TaskRouter::wait`] for a task this host has just submitted:
    /// it cannot have a result yet, so the two reads that check for one
    /// are skipped (they would sit on the task's critical path).
    pub async fn wait_submitted(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<(TaskRecord, Option<Vec<u8>>), HostError> {
        self.wait_for(id, timeout, true).await.map(Fetched::pair)
    }

    async fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        just_submitted: bool,
    ) -> Result<Fetched, HostError> {
        // Not an id a task can have: no such task, at once.
        if !is_task_id(id) {
            return Err(HostError::NotFound(id.to_string()));
        }
        let until = tokio::time::Instant::now() + timeout;
        // Declared before the receiver, so that it runs after the receiver
        // is dropped, however the wait ends (a caller that hangs up drops
        // it half way).
        let _end = WaitEnd { router: self, id };
        if just_submitted {
            // The entry stays (the task is unfinished) until its result
            // arrives; only its receiver is taken.
            let rx = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(id)
                .and_then(|(_, rx)| rx.take());
            if let Some(rx) = rx {
                return self.await_result(id, rx, until).await;
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_string())
            .or_default()
            .push(tx);
        // Subscribed before the read, so that a result stored after the
        // read is announced to this host.
        self.notices.watch(id).await?;
        // A task published straight to the stream by another client has no
        // record until a host picks it up; wait for it all the same.
        match self.fetch(id).await {
            Ok(current) if current.record.status.is_final() => {
                drop(rx);
                self.forget_pending(id);
                return Ok(current);
            }
            Ok(_) | Err(HostError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.await_result(id, rx, until).await
    }

    /// Waits for the result's notification until `until`. The notification
    /// is core NATS (at most once: it is lost if this host is disconnected
    /// when it is sent), so the bucket is also read after 1 s, then at
    /// doubling intervals up to 5 s.
    async fn await_result(
        &self,
        id: &str,
        mut rx: tokio::sync::oneshot::Receiver<bytes::Bytes>,
        until: tokio::time::Instant,
    ) -> Result<Fetched, HostError> {
        let mut check = Duration::from_secs(1);
        let outcome = loop {
            let next = (tokio::time::Instant::now() + check).min(until);
            match tokio::time::timeout_at(next, &mut rx).await {
                // The notification carries the stored value: no read needed.
                Ok(Ok(bytes)) => match serde_json::from_slice::<StoredResult>(&bytes) {
                    Ok(stored) => return self.decode(stored).await,
                    Err(_) => break self.fetch(id).await,
                },
                Ok(Err(_)) => break self.fetch(id).await,
                Err(_) => {}
            }
            let current = self.fetch(id).await;
            let done = matches!(&current, Ok(c) if c.record.status.is_final());
            if done || tokio::time::Instant::now() >= until {
                break current;
            }
            check = (check * 2).min(Duration::from_secs(5));
        };
        drop(rx);
        if matches!(&outcome, Ok(c) if c.record.status.is_final()) {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        self.forget_closed_waiters(id);
        outcome
    }

    /// Drops the waiters of `id` that stopped waiting without a
    /// notification, and the subscription to its notice if nothing here
    /// waits for it any more. The waiters stay locked until then, so that
    /// a wait registering meanwhile keeps (or makes) the subscription.
    /// Locks are taken in the order waiters, pending, watched.
    fn forget_closed_waiters(&self, id: &str) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                waiters.remove(id);
            }
        }
        if waiters.contains_key(id) {
            return;
        }
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id);
        if !pending {
            self.notices.drop_notice(id);
        }
    }

    /// Newest first: the newest `limit` results and unfinished records
    /// that match, merged by submission time. Each bucket is read from its
    /// end through the server's subject index (see [`keys`]), so a request
    /// reads about what it returns, never every task.
    pub async fn list(
        &self,
        status: Option<Status>,
        capability: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TaskRecord>, HostError> {
        let mut found: Vec<TaskRecord> = Vec::new();
        if status.is_none_or(Status::is_final) {
            let filter = keys::results_where(RESULTS, status, capability);
            let ended = keys::newest(
                &self.client,
                &format!("KV_{RESULTS}"),
                &filter,
                limit,
                |e| {
                    serde_json::from_slice::<StoredResult>(&e.payload)
                        .ok()
                        .map(|stored| stored.task)
                },
            )
            .await
            .map_err(|e| self.error(RESULTS, e))?;
            found.extend(ended);
        }
        if status.is_none_or(|s| !s.is_final()) {
            // At most `max_unfinished` per host: the records of ended tasks
            // are removed.
            let ended: BTreeSet<String> = found.iter().map(|r| r.id.clone()).collect();
            let filter = keys::queued_where(QUEUED, capability);
            let unfinished =
                keys::newest(&self.client, &format!("KV_{QUEUED}"), &filter, limit, |e| {
                    if e.deleted {
                        return None;
                    }
                    serde_json::from_slice::<TaskRecord>(&e.payload)
                        .ok()
                        .filter(|r| status.is_none_or(|s| r.status == s) && !ended.contains(&r.id))
                })
                .await
                .map_err(|e| self.error(QUEUED, e))?;
            found.extend(unfinished);
        }
        found.sort_by(|a, b| (b.submitted_at_ms, &b.id).cmp(&(a.submitted_at_ms, &a.id)));
        found.truncate(limit);
        Ok(found)
    }

    /// Slots for `capability` on this host.
    fn capacity(&self, capability: &str) -> u32 {
        self.host
            .agents()
            .iter()
            .filter(|a| a.capabilities.iter().any(|c| c == capability))
            .map(|a| a.max_in_flight)
            .sum()
    }

    /// Slots for `capability` on this host that pulled tasks hold.
    fn taken(&self, capability: &str) -> u32 {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(capability)
            .copied()
            .unwrap_or(0)
    }

    fn take(&self, capability: &str, n: i64) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let entry = taken.entry(capability.to_string()).or_insert(0);
        *entry = (i64::from(*entry) + n).max(0) as u32;
    }
}

type Waiters = Arc<Mutex<HashMap<String, Vec<tokio::sync::oneshot::Sender<bytes::Bytes>>>>>;
/// Since when, and the receiving end of its waiter.
/// Tasks submitted through this host without their result yet: since
/// when, and the receiving end of its waiter until a wait takes it.
type Pending = Arc<
    Mutex<
        HashMap<
            String,
            (
                Instant,
                Option<tokio::sync::oneshot::Receiver<bytes::Bytes>>,
            ),
        >,
    >,
>;

/// A task submitted here whose result notification was lost is forgotten
/// after this long (a later wait reads the bucket), so that lost
/// notifications cannot grow the map.
const PENDING_MAX_AGE: Duration = Duration::from_secs(600);

/// How long after a task's deadline its submitting host looks whether it
/// still waits on the stream: a host that took it just in time stops it at
/// the deadline and stores its end well within this.
const DEADLINE_GRACE: Duration = Duration::from_millis(250);

/// Most tasks kept for their deadline alone (see `TaskRouter::deadline_only`).
const MAX_DEADLINE_ONLY: usize = 65_536;

/// How long after the submitting host's own look ([`DEADLINE_GRACE`]) the
/// server's schedule of a deadline is due: while that host runs, it has
/// failed the task by then, and the schedule's delivery finds it ended.
const DEADLINE_BACKSTOP: Duration = Duration::from_secs(1);

/// Deliveries of one due schedule before it is dropped (it is looked at
/// again a second after each failed look, e.g. while the host is cut off
/// from the server).
const DEADLINE_TRIES: u64 = 120;

/// How long a host has to ack a due schedule before the server gives it to
/// another (see `follow_due_deadlines`).
const DEADLINE_ACK_WAIT: Duration = Duration::from_secs(2);

/// Most deadline schedules written at once by one host.
const MAX_SCHEDULING: usize = 1024;

/// Hands a stored result to the requests waiting for it.
fn wake(waiters: &Waiters, pending: &Pending, key: &str, value: &bytes::Bytes) {
    let woken = waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key);
    for w in woken.into_iter().flatten() {
        let _ = w.send(value.clone());
    }
    // Nobody took it: whoever asks later reads the bucket.
    pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(key);
}

fn decode_stored(stored: StoredResult) -> Fetched {
    let result = stored
        .result_base64
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
    Fetched {
        record: stored.task,
        result,
        error: stored.error,
    }
}

/// How long one pull request waits at the server for tasks. The server
/// answers an expired request with the count it did not deliver.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Past the newest request's expiry by this much, no request of this host
/// can be alive at the server: whatever it still counted as asked for was
/// lost with a status message.
const PULL_GRACE: Duration = Duration::from_secs(1);

/// Pulls tasks for one capability while this host has free slots for it.
async fn pull_loop(router: Arc<TaskRouter>, capability: String) {
    loop {
        let consumer = make_consumer(&router, &capability).await;
        loop {
            match pull(&router, &capability, &consumer).await {
                // A fresh inbox: the server drops the old one's requests,
                // which nothing hears any more.
                Pulled::Again => continue,
                Pulled::ConsumerGone => {
                    tracing::warn!(capability = %capability, "the capability's consumer is gone; making it again");
                    break;
                }
                Pulled::Failed(e) => {
                    tracing::warn!(capability = %capability, error = %e, "cannot pull tasks; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

async fn make_consumer(router: &TaskRouter, capability: &str) -> consumer::PullConsumer {
    let name = consumer_name(capability);
    loop {
        // Created, or updated when an older host made it with other
        // filters; its state (what is pending and acked) stays.
        let made = router
            .stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subjects: subjects::task_filters(capability),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                // Unlimited: a delivery cut off by a host crash must
                // always get another; the attempt limit for failures is
                // applied here, from the delivery count.
                max_deliver: -1,
                ..Default::default()
            })
            .await;
        match made {
            Ok(c) => return c,
            Err(e) => {
                tracing::warn!(capability = %capability, error = %e, "cannot create or update the capability's consumer (a setting of it that cannot be updated: delete it, and a host makes it again); retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

enum Pulled {
    /// Pull again on a new inbox.
    Again,
    ConsumerGone,
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// One long-lived pull on one inbox: pull requests for exactly the slots
/// nothing is asked for yet, so that the host never holds more tasks than
/// it can start. `asked` counts what the requests out may still bring: less
/// one per task delivered, less a request's remainder when it ends (the
/// server says it in `Nats-Pending-Messages`). Past the newest request's
/// expiry, nothing can be out. After a reconnect, or a status that cannot
/// be counted, the pull starts again on a new inbox.
async fn pull(
    router: &Arc<TaskRouter>,
    capability: &str,
    consumer: &consumer::PullConsumer,
) -> Pulled {
    let inbox = router.client.new_inbox();
    let mut sub = match router.client.subscribe(inbox.clone()).await {
        Ok(s) => s,
        Err(e) => return Pulled::Failed(e.into()),
    };
    let subject = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{STREAM}.{}",
        consumer.cached_info().name
    );
    let mut connects = router.connects.clone();
    connects.borrow_and_update();
    let mut asked: u32 = 0;
    // When the newest request expires at the server.
    let mut last_expiry = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        if asked > 0 && last_expiry + PULL_GRACE <= now {
            asked = 0;
        }
        // Registered before the slots are counted, so that a slot freed
        // from here on wakes this loop.
        let freed = router.freed.notified();
        let capacity = router.capacity(capability);
        let free = capacity.saturating_sub(router.taken(capability));
        let want = free.saturating_sub(asked);
        // One request for several freed slots while tasks are still coming.
        if want > 0 && (asked == 0 || want >= (capacity / 4).max(1)) {
            let request = format!(
                "{{\"batch\":{want},\"expires\":{}}}",
                PULL_EXPIRES.as_nanos()
            );
            if let Err(e) = router
                .client
                .publish_with_reply(subject.clone(), inbox.clone(), request.into())
                .await
            {
                return Pulled::Failed(e.into());
            }
            asked += want;
            last_expiry = now + PULL_EXPIRES;
        }
        let message = tokio::select! {
            () = freed => continue,
            changed = connects.changed() => match changed {
                // Made again (the first connection is 1): the server may
                // have forgotten the requests, or may still serve them.
                Ok(()) if *connects.borrow_and_update() > 1 => return Pulled::Again,
                Ok(()) => continue,
                Err(e) => return Pulled::Failed(e.into()),
            },
            () = tokio::time::sleep_until(last_expiry + PULL_GRACE), if asked > 0 => continue,
            message = sub.next() => message,
        };
        let Some(message) = message else {
            return Pulled::Failed("the pull subscription ended".into());
        };
        match message.status {
            None | Some(async_nats::StatusCode::OK) => {
                asked = asked.saturating_sub(1);
                router.take(capability, 1);
                let message = jetstream::Message {
                    message,
                    context: router.js.clone(),
                };
                tokio::spawn(run_one(router.clone(), capability.to_string(), message));
            }
            Some(async_nats::StatusCode::IDLE_HEARTBEAT) => {}
            Some(async_nats::StatusCode::NO_RESPONDERS) => {
                return Pulled::Failed("JetStream does not answer".into());
            }
            Some(status) => {
                let description = message.description.as_deref().unwrap_or_default();
                if description == "Consumer Deleted" {
                    return Pulled::ConsumerGone;
                }
                let left = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Pending-Messages"))
                    .and_then(|v| v.as_str().parse::<u32>().ok());
                match left {
                    // A request ended: expired (408), or ended by the server
                    // (409: leadership change, shutdown).
                    Some(left) => {
                        asked = asked.saturating_sub(left);
                        tracing::debug!(capability = %capability, %status, description, left, "pull request ended");
                    }
                    // Refused (a consumer limit) or not countable: asking
                    // again at once would be refused again.
                    None => {
                        return Pulled::Failed(
                            format!("the server ended a pull request: {status} {description}")
                                .into(),
                        )
                    }
                }
            }
        }
    }
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    message.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// Runs one pulled task and stores its outcome, then acks, naks or fences.
async fn run_one(router: Arc<TaskRouter>, capability: String, message: jetstream::Message) {
    let mut slot = Slot {
        router: &router,
        capability: &capability,
        held: true,
    };
    let outcome = run_and_store(&router, &capability, &message, &mut slot).await;
    slot.release();
    let ack = match outcome {
        // A plain ack, not one the server confirms: if it is lost, the task
        // is delivered again, finds its result stored and is acked then.
        Ok(Settle::Ack) => message.ack().await,
        Ok(Settle::Nak(delay)) => message.ack_with(AckKind::Nak(Some(delay))).await,
        Ok(Settle::Term) => message.ack_with(AckKind::Term).await,
        Err(e) => {
            let delivered = message.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
            if delivered < router.max_deliver.saturating_mul(2).max(4) {
                // Storing the outcome failed: deliver it again later.
                tracing::error!(error = %e, delivered, "cannot store a task's outcome; it will be delivered again");
                message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await
            } else {
                // It keeps failing: end it rather than run the agent again
                // and again, with the reason as its result if that can be
                // stored.
                router.counters.terminated.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, delivered, "cannot store a task's outcome after repeated deliveries; terminated");
                router.give_up(&capability, &message, &e).await;
                message.ack_with(AckKind::Term).await
            }
        }
    };
    if let Err(e) = ack {
        tracing::warn!(error = %e, "ack failed; the task may be delivered again and is fenced then");
    }
}

enum Settle {
    Ack,
    Nak(Duration),
    /// Never deliver again: the message cannot be a task.
    Term,
}

/// A pulled task's claim on one of the host's slots for its capability.
struct Slot<'a> {
    router: &'a TaskRouter,
    capability: &'a str,
    held: bool,
}

impl Slot<'_> {
    /// Frees the slot (once) and wakes the pull loop.
    fn release(&mut self) {
        if std::mem::take(&mut self.held) {
            self.router.take(self.capability, -1);
            self.router.freed.notify_waiters();
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

async fn run_and_store(
    router: &TaskRouter,
    capability: &str,
    message: &jetstream::Message,
    slot: &mut Slot<'_>,
) -> Result<Settle, HostError> {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
    let Some(id) = header(message, HEADER_TASK_ID)
        .filter(|id| is_task_id(id))
        .map(String::from)
    else {
        router.counters.terminated.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            subject = %message.subject,
            id = ?header(message, HEADER_TASK_ID).map(|id| crate::text::escape_control(id).into_owned()),
            "a task message without a valid Orch-Task-Id (1-64 letters, digits, '-', '_', '.'); terminated"
        );
        return Ok(Settle::Term);
    };
    // A message claims its task id with its stream sequence the first time
    // it is delivered. Another message with the same id (another
    // Nats-Msg-Id, or one sent after the duplicate window) finds the claim
    // of a different sequence and does not run the agent again: the first
    // message's result, or its redelivery after a crash, is that id's one
    // result. The sequence, not the delivery count, tells the two apart:
    // a server restart can deliver the same message again as a first.
    let sequence = message
        .info()
        .map(|i| i.stream_sequence.to_string())
        .unwrap_or_default();
    // An orch host does not publish a task id twice: its ids are fresh
    // ULIDs, a keyed id is looked up before it is published again, and a
    // retried caller's sub-tasks carry its attempt (`ID.N-A`). So only
    // messages from other clients (no Orch-Host header) make the claim,
    // which costs a round trip to the server.
    let mut delivered = delivered;
    let from_orch = header(message, HEADER_HOST).is_some();
    if delivered > 1 {
        router.counters.redelivered.fetch_add(1, Ordering::Relaxed);
    }
    // Every delivery of such a message checks the claim, its first one
    // makes it: a first delivery that failed at the claim comes back with a
    // higher count and must still be checked.
    if !from_orch {
        match router
            .queued
            .create(claim_key(&id), sequence.clone().into_bytes().into())
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let claim = router
                    .queued
                    .get(claim_key(&id))
                    .await
                    .map_err(|e| router.error("ORCH_QUEUED claim", e))?;
                if claim.as_deref() != Some(sequence.as_bytes()) {
                    router.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(task = %id, "a second message for a task id that already ran or runs; acked without running");
                    return Ok(Settle::Ack);
                }
                // This message again: look for its stored outcome below.
                if delivered == 1 {
                    router.counters.redelivered.fetch_add(1, Ordering::Relaxed);
                    delivered = 2;
                }
            }
            Err(e) => return Err(router.error("ORCH_QUEUED claim", e)),
        }
    }
    // On a redelivery a result may exist already (an earlier delivery
    // finished but its ack was lost), and the queued record holds the
    // errors of the earlier attempts. A first delivery needs neither: its
    // headers carry what the record needs, which saves two round trips.
    let stored = if delivered > 1 {
        if router.read_result(&id).await.ok().flatten().is_some() {
            // Ended already; a record a retry wrote meanwhile goes too.
            router.forget_queued(capability, &id).await;
            return Ok(Settle::Ack);
        }
        router.read_queued(&id).await.ok().flatten()
    } else {
        None
    };
    // Taken past its deadline: its submitter may have failed it for that
    // while it waited (`TaskRouter::expire`); then it is acked as it is.
    let late = header(message, HEADER_DEADLINE)
        .and_then(|d| d.parse::<u64>().ok())
        .is_some_and(|d| d <= now_ms());
    if late && delivered == 1 && router.read_result(&id).await.ok().flatten().is_some() {
        return Ok(Settle::Ack);
    }
    // A stored record that does not decode (another version wrote it, or it
    // was damaged) is replaced by one built from the headers, rather than
    // failing the delivery again and again.
    let stored = stored.and_then(|bytes| match serde_json::from_slice::<TaskRecord>(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(task = %id, error = %e, "the queued record does not decode; using the message's headers");
            None
        }
    });
    let mut record = match stored {
        Some(record) => record,
        None => TaskRecord {
            priority: header(message, HEADER_PRIORITY)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            deadline_ms: header(message, HEADER_DEADLINE).and_then(|d| d.parse().ok()),
            idempotency_key: header(message, HEADER_KEY).map(String::from),
            trace: header(message, crate::trace::HEADER)
                .filter(|t| crate::trace::is_valid(t))
                .map(String::from),
            ..TaskRecord::queued(
                id.clone(),
                capability.to_string(),
                header(message, HEADER_SUBMITTED)
                    .and_then(|d| d.parse().ok())
                    .unwrap_or_else(now_ms),
                message.payload.len() as u64,
            )
        },
    };
    // Another client's task on its first delivery has no queued record
    // (orch writes one for the tasks it publishes, and for a retry): unless
    // this attempt writes a running record, there is none to remove.
    let unrecorded = !from_orch && delivered == 1;
    // Registered before the check, so that a cancel arriving from now on
    // stops the attempt, and one that came before is seen here.
    let cancel = router.running(&id);
    // Cancelled while it waited on the stream: the cancel stored its end.
    if router.was_cancelled(&id) {
        return Ok(Settle::Ack);
    }
    record.status = Status::Running;
    record.attempts = delivered;
    record.host = Some(router.host.id().to_string());
    // A retry's record names the agent of the attempt before, maybe on
    // another host; this attempt's is not known until it ends.
    record.agent = None;
    // A task still running after RUNNING_AFTER is shown as running (a
    // short task does not write it: that saves a write per task), and
    // progress acks keep the message from being redelivered until it is
    // settled, storing a large result included. One spawned task for both.
    let (shown_tx, shown_rx) = tokio::sync::oneshot::channel::<()>();
    let (ran_tx, ran_rx) = tokio::sync::oneshot::channel::<()>();
    let _watchdog = AbortOnDrop({
        let acker = message.clone();
        let queued = router.queued.clone();
        let key = keys::queued(capability, &id);
        let json = serde_json::to_vec(&record).ok();
        // A task taken close to its deadline is shown running at once, so
        // that its submitter, which fails a task still queued
        // DEADLINE_GRACE after its deadline, leaves it to this host.
        let show_after = match record.deadline_ms {
            Some(d) if d < now_ms() + (RUNNING_AFTER + DEADLINE_GRACE).as_millis() as u64 => {
                Duration::ZERO
            }
            _ => RUNNING_AFTER,
        };
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(show_after) => {
                    if let Some(json) = json {
                        // Said even if the write failed: it may have been
                        // stored all the same.
                        let _ = queued.put(key, json.into()).await;
                        let _ = shown_tx.send(());
                    } else {
                        drop(shown_tx);
                    }
                }
                // The run ended first: nothing to show.
                _ = ran_rx => drop(shown_tx),
            }
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                if acker.ack_with(AckKind::Progress).await.is_err() {
                    return;
                }
            }
        })
    });
    // The attempts before this delivery, on any host.
    record.attempts = delivered - 1;
    // A sub-task of another host's task keeps its caller's bounds.
    let depth: Option<u32> = header(message, HEADER_DEPTH).and_then(|d| d.parse().ok());
    let fuel: Option<u64> = header(message, HEADER_FUEL).and_then(|f| f.parse().ok());
    let object = header(message, HEADER_PAYLOAD_OBJECT).map(String::from);
    let payload = match &object {
        None => message.payload.to_vec(),
        Some(name) => {
            let limit = router.host.config().limits.defaults.max_payload;
            match router.get_object(name, limit).await {
                Ok(bytes) => bytes,
                Err(ObjectError::Nats(e)) => return Err(e),
                Err(e) => {
                    // The payload is gone (past retention, or deleted) or
                    // not one this host takes: the task cannot run, now or
                    // later; its submitter gets why.
                    let error = match e {
                        ObjectError::TooLarge { size, limit } => {
                            TaskError::PayloadTooLarge { size, limit }
                        }
                        _ => TaskError::Unavailable(format!("the task's payload {name}: {e}")),
                    };
                    record.attempts = delivered;
                    let settle = router.store_failure(record, error).await;
                    drop(ran_tx);
                    let shown = shown_rx.await.is_ok();
                    if shown || !unrecorded {
                        router.forget_queued(capability, &id).await;
                    }
                    return settle;
                }
            }
        }
    };
    record.payload_bytes = payload.len() as u64;
    let ran = run::execute(
        router.host.scheduler(),
        run::Run {
            record,
            payload,
            max_attempts: Some(1),
            sub_task: depth.zip(fuel),
            cancel: Some(cancel.token.clone()),
            host: Some(router.host.id().to_string()),
        },
    )
    .await;
    drop(cancel);
    drop(ran_tx);
    // The agent's instance is free: the pull loop may fetch the next task
    // while this one's outcome is stored.
    slot.release();
    let (mut record, result, typed_error) = match ran {
        // This host is draining: the task stays on the stream for another
        // host or for this one's restart, as on a lone host it stays in the
        // journal. It never becomes a final failure for that.
        // This host is draining, or no longer serves the capability: the
        // task stays on the stream for another host or for this one's
        // restart, as on a lone host it stays in the journal. It never
        // becomes a final failure for that.
        Err(run::NotRun::Draining | run::NotRun::NoAgent(_)) => {
            return Ok(Settle::Nak(Duration::from_millis(100)))
        }
        Ok(run::Ended {
            record,
            result,
            error,
        }) => (record, result, error),
    };
    let retryable = typed_error.as_ref().is_some_and(TaskError::is_retryable)
        && record.status != Status::Cancelled;
    let backoff = Duration::from_millis(50u64 << delivered.min(6));
    // Like the scheduler on a lone host: no retry that would start past
    // the task's deadline.
    let too_late = record
        .deadline_ms
        .is_some_and(|d| d <= now_ms() + backoff.as_millis() as u64);
    // A sub-task gets one attempt: its caller decides what to do.
    if retryable && delivered < router.max_deliver && depth.is_none() && !too_late {
        // Another delivery, maybe on another host, after a backoff.
        record.status = Status::Queued;
        record.finished_at_ms = None;
        record.error = None;
        // Null until the task ends, as on a lone host.
        record.fuel_used = None;
        // After the running record, if one is being written, so that this
        // one stays.
        let _ = shown_rx.await;
        if let Ok(json) = serde_json::to_vec(&record) {
            let _ = router
                .queued
                .put(keys::queued(capability, &id), json.into())
                .await;
        }
        if let Some(last) = record.attempt_errors.last() {
            router
                .host
                .events()
                .emit(EventKind::Retried, &id, capability, |e| {
                    e.agent = record.agent.clone();
                    e.attempt = record.attempts;
                    e.error = Some(last.kind.clone());
                    e.submitted_at_ms = Some(record.submitted_at_ms);
                });
        }
        return Ok(Settle::Nak(backoff));
    }
    // The last delivery of a retryable failure: a dead letter, as on a lone
    // host after its last attempt.
    if retryable && depth.is_none() {
        record.status = Status::Dead;
    }
    let span = result_span(&record);
    let settle =
        tracing::Instrument::instrument(router.store_result(record, result, typed_error), span)
            .await?;
    // Ended: its record leaves the unfinished ones, after a running record
    // being written, if any, so that none is left behind.
    let shown = shown_rx.await.is_ok();
    if shown || !unrecorded {
        router.forget_queued(capability, &id).await;
    }
    if let Some(name) = object {
        // The task has its result: its payload is not needed any more.
        if let Err(e) = router.objects.delete(&name).await {
            tracing::debug!(object = %name, error = %e, "cannot delete a payload object; it expires with the retention time");
        }
    }
    Ok(settle)
}

/// The span of a task's result write, in the task's trace.
pub(crate) fn result_span(record: &TaskRecord) -> tracing::Span {
    crate::trace::under(record.trace.as_deref(), || {
        tracing::info_span!(
            target: crate::trace::TARGET,
            "task.result",
            task.id = %record.id,
            task.status = record.status.as_str(),
        )
    })
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TaskRouter {
    /// Stores, if it can, a `host` failure as the end of a task whose
    /// outcome could not be stored delivery after delivery.
    async fn give_up(&self, capability: &str, message: &jetstream::Message, why: &HostError) {
        let Some(id) = header(message, HEADER_TASK_ID).filter(|id| is_task_id(id)) else {
            return;
        };
        let record = TaskRecord::queued(id.to_string(), capability.to_string(), now_ms(), 0);
        let error = TaskError::Host(format!(
            "its outcome could not be stored, delivery after delivery: {}",
            crate::text::escape_capped(&why.to_string(), 1 << 10)
        ));
        if let Err(e) = self.store_failure(record, error).await {
            tracing::error!(task = %id, error = %e, "cannot store the task's failure either");
        }
    }

    /// Stores a failure of a task that could not run.
    async fn store_failure(
        &self,
        mut record: TaskRecord,
        error: TaskError,
    ) -> Result<Settle, HostError> {
        record.end(Status::Failed, &error);
        self.store_result(record, None, Some(error)).await
    }

    /// Stores a task's outcome with a create-only write: the first outcome
    /// stands, a later one is fenced. A result too large for one message
    /// goes to the object store first.
    async fn store_result(
        &self,
        record: TaskRecord,
        result: Option<Vec<u8>>,
        typed_error: Option<TaskError>,
    ) -> Result<Settle, HostError> {
        let router = self;
        let id = record.id.clone();
        let mut stored = StoredResult {
            task: record,
            result_base64: None,
            result_object: None,
            error: typed_error,
        };
        if let Some(bytes) = result {
            // base64 takes 4/3 of the bytes; the record needs room too.
            if bytes.len() / 3 * 4 + (16 << 10) > router.max_value {
                let name = result_object(&id);
                router.put_object(&name, &bytes).await?;
                stored.result_object = Some(name);
            } else {
                stored.result_base64 =
                    Some(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
        }
        let mut json =
            serde_json::to_vec(&stored).map_err(|e| HostError::InvalidRequest(e.to_string()))?;
        if json.len() > router.max_value {
            // The server would refuse the write, and a delivery that cannot
            // store its outcome would run again and again: the submitter gets
            // this error as the task's result instead.
            let size = json.len();
            stored.result_base64 = None;
            stored.result_object = None;
            stored.error = Some(TaskError::ResultTooLarge {
                size: size as u64,
                limit: router.max_value as u64,
            });
            for attempt in &mut stored.task.attempt_errors {
                attempt.message = crate::text::escape_capped(&attempt.message, 1 << 10);
            }
            stored.task.status = Status::Failed;
            stored.task.error = Some(ErrorInfo {
            kind: "result-too-large".into(),
            message: format!(
                "result too large for the cluster: stored with its record it is {size} bytes, past the {} bytes a NATS message may carry on this server (max_payload)",
                router.max_value
            ),
        });
            json = serde_json::to_vec(&stored)
                .map_err(|e| HostError::InvalidRequest(e.to_string()))?;
        }
        if router.create_result(&stored.task, json).await? {
            router.host.events().ended(&stored.task);
        } else {
            // Another host finished this task first (it was redelivered while
            // this one was slow or paused), or it was cancelled: that result
            // stands.
            // Only an attempt's outcome is fenced (as on a lone host): not
            // a task cancelled while it waited in this host's scheduler.
            if crate::service::run::attempt_outcome(&stored.task) {
                router.counters.fenced.fetch_add(1, Ordering::Relaxed);
                router.host.events().record(EventKind::Fenced, &stored.task);
            }
            // A cancelled attempt's end always finds the cancel's: nothing
            // for an operator to look at.
            if stored.task.status == Status::Cancelled {
                tracing::debug!(task = %id, "a cancelled attempt's end was fenced by the cancel's");
            } else if stored.task.agent.is_none()
                && matches!(stored.error, Some(TaskError::DeadlineExceeded { .. }))
            {
                // Taken past its deadline, after its submitter failed it.
                tracing::debug!(task = %id, "a task taken past its deadline had been failed for it");
            } else {
                tracing::warn!(task = %id, "a late result was fenced: the task already has one");
            }
        }
        Ok(Settle::Ack)
    }
}

impl TaskRouter {
    /// Writes a task's result unless it has one, under any status: `false`
    /// when it had one (this outcome is fenced).
    async fn create_result(&self, task: &TaskRecord, json: Vec<u8>) -> Result<bool, HostError> {
        let key = keys::result(task.status, &task.capability, &task.id);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence-Subject",
            keys::result_of(RESULTS, &task.id).as_str(),
        );
        let ack = async {
            self.js
                .send_publish(
                    format!("$KV.{RESULTS}.{key}"),
                    jetstream::message::PublishMessage::build()
                        .payload(json.into())
                        .headers(headers),
                )
                .await?
                .await
        };
        match ack.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Ok(false)
            }
            Err(e) => Err(self.error("ORCH_RESULTS", e)),
        }
    }

    /// The stored result of `id`, whatever its status.
    async fn read_result(&self, id: &str) -> Result<Option<bytes::Bytes>, HostError> {
        let entry = keys::last(
            &self.client,
            &format!("KV_{RESULTS}"),
            &keys::result_of(RESULTS, id),
        )
        .await
        .map_err(|e| self.error("ORCH_RESULTS", e))?;
        Ok(entry.map(|e| e.payload))
    }

    /// The queued or running record of `id`, if it has not ended.
    async fn read_queued(&self, id: &str) -> Result<Option<bytes::Bytes>, HostError> {
        let (stream, filter) = (format!("KV_{QUEUED}"), keys::queued_of(QUEUED, id));
        let entry = keys::last(&self.client, &stream, &filter)
            .await
            .map_err(|e| self.error("ORCH_QUEUED", e))?;
        match entry {
            None => Ok(None),
            Some(entry) if !entry.deleted => Ok(Some(entry.payload)),
            // The newest write of the id is a removal: of the task's own
            // record (it has ended, or its publish failed), or of the
            // record of a repeated submission under another capability,
            // which can come after the task's (see `publish`). The task's
            // record, if any, is the newest last write of a key that is
            // not a removal; a task id has a key under one capability, two
            // when its key was submitted twice at once with two.
            Some(_) => keys::last_each(&self.client, &stream, &filter, 4)
                .await
                .map(|each| {
                    each.into_iter()
                        .filter(|e| !e.deleted)
                        .max_by_key(|e| e.sequence)
                        .map(|e| e.payload)
                })
                .map_err(|e| self.error("ORCH_QUEUED", e)),
        }
    }

    /// Removes the queued or running record of a task that has ended: a
    /// KV delete marker that itself expires after [`MARKER_TTL`] (a
    /// per-message TTL), so that listings do not walk the markers of every
    /// task of the retention time. A marker, unlike a purge, is a message of
    /// the bucket's stream: it is stored after the record's write, which
    /// reached the server before the task could even start. Sent without
    /// waiting for the answer: no round trip on every task's path. A record
    /// left by a lost marker (a disconnect) shows the task unfinished in
    /// lists until the retention time; reads of the task take its result.
    async fn forget_queued(&self, capability: &str, id: &str) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        headers.insert("Nats-TTL", MARKER_TTL);
        let subject = format!("$KV.{QUEUED}.{}", keys::queued(capability, id));
        let sent = self
            .client
            .publish_with_headers(subject, headers, bytes::Bytes::new())
            .await;
        if let Err(e) = sent {
            tracing::debug!(task = %id, error = %e, "cannot remove the queued record of an ended task");
        }
    }
}

/// How many times a publish answered "duplicate message id is in process"
/// is sent again, [`IN_PROCESS_PAUSE`] apart.
const IN_PROCESS_TRIES: u32 = 50;
const IN_PROCESS_PAUSE: Duration = Duration::from_millis(20);

/// Whether a replicated stream refused a publish because another message
/// with its id is being stored (JetStream error 10158).
fn id_in_process(e: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| e.error_code() == jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT)
}

/// How long the delete marker of an ended task's queued record stays.
const MARKER_TTL: &str = "1s";

/// Why an object could not be read.
#[derive(Debug, thiserror::Error)]
enum ObjectError {
    #[error("not in the object store (expired or deleted)")]
    Missing,
    #[error("{size} bytes, past the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error(transparent)]
    Nats(HostError),
}

fn payload_object(id: &str) -> String {
    format!("payload/{id}")
}

fn result_object(id: &str) -> String {
    format!("result/{id}")
}

/// `tasks.call` to other hosts, for the scheduler.
struct RemoteCalls(std::sync::Weak<TaskRouter>);

impl Remote for RemoteCalls {
    fn call(&self, call: SubCall, priority: i32, trace: Option<String>) -> SubCallFuture {
        let router = self.0.upgrade();
        Box::pin(async move {
            match router {
                Some(router) => router.call_remote(call, priority, trace).await,
                None => Outcome::failed(TaskError::Unavailable(
                    "the host has left the cluster".into(),
                )),
            }
        })
    }
}

/// JetStream as the task store of a host in a cluster.
impl TaskStore for TaskRouter {
    fn name(&self) -> &'static str {
        "JetStream"
    }

    /// Some live host (this one included) serves it.
    fn serves(&self, capability: &str) -> bool {
        super::serves(&self.members, capability)
    }

    /// Without a connection no host's heartbeat arrives, this host's own
    /// included: every capability would look unserved.
    fn reachable(&self) -> Result<(), HostError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            state => Err(self.error(
                "not connected",
                std::io::Error::new(std::io::ErrorKind::NotConnected, state.to_string()),
            )),
        }
    }

    /// The host's limit, as on a lone host: a payload too large for one
    /// NATS message travels through the object store.
    fn max_payload(&self) -> u64 {
        self.host.config().limits.defaults.max_payload
    }

    /// Tasks submitted here whose results have not come back: what this
    /// host holds in memory for them.
    fn unfinished(&self) -> usize {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn counts(&self) -> (usize, usize) {
        let scheduler = self.host.scheduler();
        let queued = scheduler.queued().iter().map(|(_, n)| n).sum();
        (queued, scheduler.running() as usize)
    }

    fn new_id(&self, key: Option<&str>) -> String {
        // The stream drops a second message with the same id, so a keyed
        // task's id must be the same on every host.
        match key {
            Some(k) => id_for_key(k),
            None => self.host.new_task_id(),
        }
    }

    fn retention(&self) -> BoxFuture<'_, Result<Option<Duration>, HostError>> {
        Box::pin(async move {
            let mut results = self
                .js
                .get_stream(format!("KV_{RESULTS}"))
                .await
                .map_err(|e| self.error("ORCH_RESULTS", e))?;
            let info = results
                .info()
                .await
                .map_err(|e| self.error("ORCH_RESULTS", e))?;
            let age = info.config.max_age;
            Ok((!age.is_zero()).then_some(age))
        })
    }

    fn find_key<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, HostError>> {
        Box::pin(async move {
            let id = id_for_key(key);
            match self.fetch(&id).await {
                Ok(_) => Ok(Some(id)),
                Err(HostError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn accept<'a>(
        &'a self,
        record: TaskRecord,
        payload: Vec<u8>,
        stored: &'a (dyn Fn(&TaskRecord) + Send + Sync),
        unused_key: bool,
        fence: Option<&'a Fence>,
    ) -> BoxFuture<'a, Result<Accepted, HostError>> {
        Box::pin(TaskRouter::accept(
            self, record, payload, stored, unused_key, fence,
        ))
    }

    fn raise_fence<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<u64>, HostError>> {
        Box::pin(async move {
            let subject = subjects::fence(name);
            let ack = self
                .js
                .publish(subject.clone(), bytes::Bytes::new())
                .await
                .map_err(|e| self.error("fence", e))?
                .await
                .map_err(|e| self.error("fence ack", e))?;
            // One message per fence: the last, whose sequence is the fence.
            if let Err(e) = self.stream.purge().filter(subject).keep(1).await {
                tracing::warn!(fence = %name, error = %e, "cannot trim a run's earlier fences");
            }
            Ok(Some(ack.sequence))
        })
    }

    /// From the stream's leader: a fence raised before this call is seen.
    fn fence_sequence<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, HostError>> {
        use jetstream::stream::LastRawMessageErrorKind;
        Box::pin(async move {
            match self
                .stream
                .get_last_raw_message_by_subject(&subjects::fence(name))
                .await
            {
                Ok(m) => Ok(Some(m.sequence)),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(Some(0)),
                Err(e) => Err(self.error("fence", e)),
            }
        })
    }

    fn drop_fence<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), HostError>> {
        Box::pin(async move {
            self.stream
                .purge()
                .filter(subjects::fence(name))
                .await
                .map_err(|e| self.error("fence purge", e))?;
            Ok(())
        })
    }

    /// Looks in the tasks' stream itself, where the fence is: a task of
    /// the key stored before the fence is there, by the id in its subject,
    /// until a host acks it, and a host acks only after storing its result,
    /// which is read second. (The key's queued record is in another stream
    /// and may be written after its task, or not at all.) Both are read
    /// from the streams' leaders.
    fn key_used<'a>(
        &'a self,
        key: &'a str,
        capability: &'a str,
    ) -> BoxFuture<'a, Result<bool, HostError>> {
        use jetstream::stream::LastRawMessageErrorKind;
        Box::pin(async move {
            let id = id_for_key(key);
            if let Some(subject) = subjects::task_with_id(capability, &id) {
                match self.stream.get_last_raw_message_by_subject(&subject).await {
                    Ok(_) => return Ok(true),
                    Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                    Err(e) => return Err(self.error("ORCH_TASKS key check", e)),
                }
            }
            // Not a direct get, which a replica that lags could answer.
            let results = self
                .js
                .get_stream_no_info(format!("KV_{RESULTS}"))
                .await
                .map_err(|e| self.error("ORCH_RESULTS", e))?;
            match results
                .get_last_raw_message_by_subject(&keys::result_of(RESULTS, &id))
                .await
            {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(false),
                Err(e) => Err(self.error("ORCH_RESULTS key check", e)),
            }
        })
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stored, HostError>> {
        Box::pin(async move { self.fetch(id).await.map(Fetched::stored) })
    }

    fn wait<'a>(
        &'a self,
        id: &'a str,
        timeout: Duration,
        fresh: bool,
    ) -> BoxFuture<'a, Result<Stored, HostError>> {
        Box::pin(async move { self.wait_for(id, timeout, fresh).await.map(Fetched::stored) })
    }

    fn list<'a>(
        &'a self,
        query: &'a ListQuery,
    ) -> BoxFuture<'a, Result<Vec<TaskRecord>, HostError>> {
        Box::pin(TaskRouter::list(
            self,
            query.status,
            query.capability.as_deref(),
            query.limit,
        ))
    }

    fn cancel<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Stored, HostError>> {
        Box::pin(TaskRouter::cancel(self, id))
    }
}

#[cfg(test)]
mod tests {
    use super::server_is_at_least;

    #[test]
    fn a_server_before_2_11_is_refused_and_2_11_on_is_taken() {
        assert!(!server_is_at_least("2.10.22", 2, 11));
        assert!(!server_is_at_least("2.9.15", 2, 11));
        assert!(server_is_at_least("2.11.0", 2, 11));
        assert!(server_is_at_least("2.15.1", 2, 11));
        assert!(server_is_at_least("2.12.0-beta.1", 2, 11));
        assert!(server_is_at_least("3.0.0", 2, 11));
        assert!(!server_is_at_least("", 2, 11));
        assert!(!server_is_at_least("v2.x", 2, 11));
    }
}
