//! Many hosts over NATS: joining, heartbeats and membership. This is the
//! only module that talks to NATS; every subject it uses is built in
//! [`subjects`].
//!
//! Each host publishes a heartbeat every [`HEARTBEAT`] with its id, API
//! address, capabilities, free capacity and load, and listens to everyone's.
//! A host whose heartbeats stop for [`DEAD_AFTER`] is reported dead; a host
//! that stops cleanly says so (a leave message) and is reported as left at
//! once. Heartbeats are core NATS (at most once): a lost one only delays
//! nothing, since the next follows 250 ms later.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

pub mod audit;
pub mod calls;
pub mod keys;
pub mod messages;
pub mod tasks;
pub mod workflows;

/// How often a host announces itself.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// Silence after which a host is reported dead (four missed heartbeats).
pub const DEAD_AFTER: Duration = Duration::from_millis(1000);
/// A host silent (dead or left) this long is dropped from the member table.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most hosts the member table holds; heartbeats of further new names are
/// ignored (any NATS client can publish one).
pub const MAX_MEMBERS: usize = 1024;

/// Subject names. All of orch's traffic lives under `orch.v1.`; the
/// version changes when a message format changes incompatibly.
pub mod subjects {
    pub const PREFIX: &str = "orch.v1";

    pub fn heartbeat(host: &str) -> String {
        format!("{PREFIX}.hosts.{host}.heartbeat")
    }

    pub fn leave(host: &str) -> String {
        format!("{PREFIX}.hosts.{host}.leave")
    }

    /// A message between agents; `subject` is relative, as agents name it.
    pub fn message(subject: &str) -> String {
        format!("{PREFIX}.msg.{subject}")
    }

    /// A copy of each message an agent publishes (not requests), for the
    /// workflow triggers: a subscriber here must not answer requests on
    /// `msg`, where "no responders" means no agent subscribes.
    pub fn published(subject: &str) -> String {
        format!("{PREFIX}.published.{subject}")
    }

    /// Tasks for one capability, as other clients publish them (the
    /// JetStream stream's subjects).
    pub fn task(capability: &str) -> String {
        format!("{PREFIX}.task.{capability}")
    }

    /// A task that an orch host publishes: its id in the subject, so that
    /// the stream can be asked for it by id (`TaskStore::key_used`). The id
    /// comes first: `task-id.*.<capability>` matches no other capability's
    /// tasks, whose capabilities have other numbers of tokens or other
    /// tokens. `None` when the id is not one subject token.
    pub fn task_with_id(capability: &str, id: &str) -> Option<String> {
        is_token(id).then(|| format!("{PREFIX}.task-id.{id}.{capability}"))
    }

    /// Whether `id` is one subject token of the characters orch's ids use.
    fn is_token(id: &str) -> bool {
        let token = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        !id.is_empty() && id.chars().all(token)
    }

    /// The schedule the server keeps for a task with a deadline (see
    /// `tasks::TaskRouter::schedule_deadline`); `None` when the id is not
    /// one subject token.
    pub fn deadline_schedule(id: &str) -> Option<String> {
        is_token(id).then(|| format!("{PREFIX}.deadline.at.{id}"))
    }

    /// Where the server publishes a task's schedule when it is due; the
    /// last token is the task id.
    pub fn deadlines_due() -> String {
        format!("{PREFIX}.deadline.due")
    }

    /// What a capability's consumer takes: both forms above.
    pub fn task_filters(capability: &str) -> Vec<String> {
        vec![task(capability), format!("{PREFIX}.task-id.*.{capability}")]
    }

    /// The fence of a workflow run (see `service::Fence`), in the tasks'
    /// stream so that a task's publish can be checked against it.
    pub fn fence(name: &str) -> String {
        format!("{PREFIX}.fence.{name}")
    }

    /// Where the server republishes each stored result (see
    /// `tasks::TaskRouter`); the last tokens are the task id.
    pub fn results() -> String {
        format!("{PREFIX}.results")
    }

    /// Where a cancel is announced to every host (core NATS).
    pub fn cancels() -> String {
        format!("{PREFIX}.cancel")
    }

    pub fn cancel(task: &str) -> String {
        format!("{PREFIX}.cancel.{task}")
    }

    /// Everyone's heartbeats and leave messages.
    pub fn all_hosts() -> String {
        format!("{PREFIX}.hosts.*.*")
    }
}

/// How to reach the NATS server.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// One URL or several, comma-separated (`nats://127.0.0.1:4222`).
    pub url: String,
    pub token: Option<String>,
    /// A `.creds` file (user JWT and nkey seed).
    pub creds: Option<PathBuf>,
    /// A CA certificate (PEM) to verify the server's TLS certificate with.
    pub tls_ca: Option<PathBuf>,
    /// Set the cluster's retention of finished tasks to this host's
    /// `[host] retention` even when that is shorter than the cluster's: a
    /// host otherwise only lengthens it (see [`retention_for`]).
    pub shorten_retention: bool,
}

/// NATS's default duplicate window for a stream.
pub(crate) const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// The retention (`max_age`) a host sets on a cluster stream that has
/// `current` when its own `[host] retention` is `mine`; `None` to leave
/// it. The longest any host asked for wins, so one host's shorter setting
/// cannot drop the results other hosts' clients still expect; `shorten`
/// (`--shorten-retention`) applies `mine` in any case. `max_age` 0 is
/// NATS's "no limit".
pub fn retention_for(current: Duration, mine: Duration, shorten: bool) -> Option<Duration> {
    let longer = !current.is_zero() && mine > current;
    (current != mine && (shorten || longer)).then_some(mine)
}

#[derive(Debug, thiserror::Error)]
pub struct ClusterError {
    pub url: String,
    pub kind: ClusterErrorKind,
    /// What was being done: "credentials FILE", "stream ORCH_TASKS", ...
    pub what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

/// What kind of cluster failure: reaching the server, or a request to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterErrorKind {
    Connect,
    Request,
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            ClusterErrorKind::Connect => write!(f, "cannot connect to NATS at {}: ", self.url)?,
            ClusterErrorKind::Request => write!(f, "NATS at {}: ", self.url)?,
        }
        if !self.what.is_empty() {
            write!(f, "{}: ", self.what)?;
        }
        write!(f, "{}", self.source)
    }
}

impl ClusterError {
    pub fn new(
        url: &str,
        kind: ClusterErrorKind,
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ClusterError {
        ClusterError {
            url: url.to_string(),
            kind,
            what: what.into(),
            source: source.into(),
        }
    }

    pub fn kind(&self) -> ClusterErrorKind {
        self.kind
    }
}

/// What a host announces in every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub host: String,
    /// The host's HTTP API, if it has one.
    pub api: Option<String>,
    pub capabilities: Vec<String>,
    /// Task slots free right now, over all its agents.
    pub free: u64,
    pub running: u64,
    pub queued: u64,
    /// Unix milliseconds when it was sent.
    pub at_ms: u64,
}

/// One host as this host sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    pub host: String,
    /// `alive`, `dead` (no heartbeat for a second) or `left` (stopped
    /// cleanly); `unknown` for another host not heard from for a second
    /// while this host is not connected to its NATS server (it hears no
    /// one), or in the first second after it connects again. This host
    /// itself is always `alive`.
    pub state: &'static str,
    /// Milliseconds since its last heartbeat arrived.
    pub last_heartbeat_ms: u64,
    /// When that heartbeat was sent, Unix milliseconds (the sender's clock).
    pub sent_at_ms: u64,
    pub api: Option<String>,
    pub capabilities: Vec<String>,
    pub free: u64,
    pub running: u64,
    pub queued: u64,
}

struct Seen {
    heartbeat: Heartbeat,
    at: Instant,
    left: bool,
    /// Whether its death has been logged, so it is logged once.
    reported_dead: bool,
}

type Members = Arc<Mutex<BTreeMap<String, Seen>>>;

fn live_capabilities(members: &Members) -> std::collections::BTreeSet<String> {
    lock(members)
        .values()
        .filter(|s| !s.left && s.at.elapsed() <= DEAD_AFTER)
        .flat_map(|s| s.heartbeat.capabilities.iter().cloned())
        .collect()
}

/// Whether some live host serves `capability`, without building the set.
fn serves(members: &Members, capability: &str) -> bool {
    lock(members).values().any(|s| {
        !s.left
            && s.at.elapsed() <= DEAD_AFTER
            && s.heartbeat.capabilities.iter().any(|c| c == capability)
    })
}

fn lock(m: &Mutex<BTreeMap<String, Seen>>) -> MutexGuard<'_, BTreeMap<String, Seen>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// This host's membership in the cluster. Dropping it stops the heartbeats
/// without a leave message (as a crash would); call [`Cluster::leave`] to
/// stop cleanly.
pub struct Cluster {
    client: async_nats::Client,
    id: String,
    url: String,
    shorten_retention: bool,
    members: Members,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Counts the connections made to the server, the first included: a
    /// change means the server may have forgotten this host's pull
    /// requests.
    connects: tokio::sync::watch::Receiver<u64>,
    /// Milliseconds after `started` since when this host has been connected
    /// (`u64::MAX` while it is not), as the watcher last saw.
    hearing_since: Arc<std::sync::atomic::AtomicU64>,
    started: Instant,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Cluster {
    /// Connects, starts listening to the other hosts and starts this host's
    /// heartbeats; `report` is called for each heartbeat. The connection
    /// reconnects by itself (with backoff) when the server goes away.
    pub async fn join(
        options: &NatsOptions,
        id: &str,
        report: impl Fn() -> Heartbeat + Send + Sync + 'static,
    ) -> Result<Cluster, ClusterError> {
        let url = options.url.clone();
        let connect_error = |what: String, e: Box<dyn std::error::Error + Send + Sync>| {
            ClusterError::new(&url, ClusterErrorKind::Connect, what, e)
        };
        let (connected, connects) = tokio::sync::watch::channel(0u64);
        let connected = Arc::new(connected);
        let mut connect = async_nats::ConnectOptions::new()
            .name(format!("orch-host-{id}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let connected = connected.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; reconnecting")
                        }
                        async_nats::Event::Connected => {
                            connected.send_modify(|n| *n += 1);
                            tracing::info!("connected to NATS")
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                }
            });
        if let Some(token) = &options.token {
            connect = connect.token(token.clone());
        }
        if let Some(creds) = &options.creds {
            connect = connect
                .credentials_file(creds)
                .await
                .map_err(|e| connect_error(format!("credentials {}", creds.display()), e.into()))?;
        }
        if let Some(ca) = &options.tls_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        let addrs: Vec<async_nats::ServerAddr> = options
            .url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<_, _>>()
            .map_err(|e| connect_error("bad URL".into(), e.into()))?;
        let client = connect
            .connect(addrs)
            .await
            .map_err(|e| connect_error(String::new(), e.into()))?;

        let members: Members = Arc::new(Mutex::new(BTreeMap::new()));
        let mut incoming = client.subscribe(subjects::all_hosts()).await.map_err(|e| {
            ClusterError::new(
                &url,
                ClusterErrorKind::Request,
                "subscribe to heartbeats",
                e,
            )
        })?;
        let listen_members = members.clone();
        let listener = tokio::spawn(async move {
            while let Some(message) = incoming.next().await {
                let leaving = message.subject.ends_with(".leave");
                let Ok(heartbeat) = serde_json::from_slice::<Heartbeat>(&message.payload) else {
                    tracing::warn!(subject = %message.subject, "unreadable host message");
                    continue;
                };
                if !tasks::is_task_id(&heartbeat.host) {
                    tracing::warn!(subject = %message.subject, "a host message with an invalid host id; ignored");
                    continue;
                }
                let mut members = lock(&listen_members);
                if leaving {
                    tracing::info!(host = %heartbeat.host, "host left");
                }
                // Bounded: long-silent hosts are forgotten, and past the
                // limit a new name is not taken in.
                members.retain(|_, seen| seen.at.elapsed() <= FORGET_AFTER);
                if members.len() >= MAX_MEMBERS && !members.contains_key(&heartbeat.host) {
                    tracing::warn!(host = %heartbeat.host, limit = MAX_MEMBERS, "member table full; heartbeat ignored");
                    continue;
                }
                members.insert(
                    heartbeat.host.clone(),
                    Seen {
                        heartbeat,
                        at: Instant::now(),
                        left: leaving,
                        reported_dead: false,
                    },
                );
            }
        });
        let beat_client = client.clone();
        let subject = subjects::heartbeat(id);
        let beater = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(HEARTBEAT);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let heartbeat = report();
                if let Ok(bytes) = serde_json::to_vec(&heartbeat) {
                    // While disconnected the client buffers; a heartbeat that
                    // cannot be sent is simply skipped.
                    let _ = beat_client.publish(subject.clone(), bytes.into()).await;
                }
            }
        });
        let watch_members = members.clone();
        let (watch_client, own_id) = (client.clone(), id.to_string());
        let hearing_since = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let watch_since = hearing_since.clone();
        let started = Instant::now();
        let watcher = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(100));
            let mut was_connected = true;
            loop {
                ticker.tick().await;
                // Cut off from the server, this host hears no one: that
                // says nothing of the others (their state is `unknown`),
                // nor in the first second after it is connected again,
                // before their heartbeats come back.
                if watch_client.connection_state() != async_nats::connection::State::Connected {
                    was_connected = false;
                    watch_since.store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                if !was_connected {
                    was_connected = true;
                    let now = started.elapsed().as_millis() as u64;
                    watch_since.store(now, std::sync::atomic::Ordering::Relaxed);
                }
                let since = watch_since.load(std::sync::atomic::Ordering::Relaxed);
                if started.elapsed().as_millis() as u64
                    <= since.saturating_add(DEAD_AFTER.as_millis() as u64)
                {
                    continue;
                }
                for (host, seen) in lock(&watch_members).iter_mut() {
                    if *host == own_id {
                        continue;
                    }
                    if !seen.left && !seen.reported_dead && seen.at.elapsed() > DEAD_AFTER {
                        seen.reported_dead = true;
                        tracing::warn!(host = %host, "host missed its heartbeats for 1 s: dead");
                    }
                }
            }
        });
        Ok(Cluster {
            client,
            id: id.to_string(),
            url: options.url.clone(),
            shorten_retention: options.shorten_retention,
            members,
            tasks: Mutex::new(vec![listener, beater, watcher]),
            connects,
            hearing_since,
            started,
        })
    }

    /// Sets the retention of the stream whose `config` this is for this
    /// host's `[host] retention` (see [`retention_for`]); whether it
    /// changed. With `warn`, a longer retention kept is logged.
    pub(crate) fn set_retention(
        &self,
        config: &mut async_nats::jetstream::stream::Config,
        mine: Duration,
        warn: bool,
    ) -> bool {
        let Some(age) = retention_for(config.max_age, mine, self.shorten_retention) else {
            if warn && config.max_age != mine {
                let cluster = match config.max_age.is_zero() {
                    true => "with no limit".to_string(),
                    false => format!("for {:?}", config.max_age),
                };
                tracing::warn!(
                    stream = %config.name,
                    "this host's [host] retention is {mine:?}; the cluster keeps finished tasks {cluster}, \
                     the longest any host asked for, and keeps doing so; to shorten it for every host, \
                     start a host with --shorten-retention"
                );
            }
            return false;
        };
        tracing::info!(stream = %config.name, "cluster retention set from {:?} to this host's {age:?}", config.max_age);
        config.max_age = age;
        // NATS's default window, but never longer than max_age: the server
        // refuses that.
        config.duplicate_window = match age.is_zero() {
            true => DUPLICATE_WINDOW,
            false => age.min(DUPLICATE_WINDOW),
        };
        true
    }

    /// [`Cluster::set_retention`] for stream `name`, written to the server
    /// if it changed.
    pub(crate) async fn align_retention(
        &self,
        js: &async_nats::jetstream::Context,
        name: &str,
        mine: Duration,
    ) -> Result<(), ClusterError> {
        let err = |e: Box<dyn std::error::Error + Send + Sync>| {
            ClusterError::new(
                &self.url,
                ClusterErrorKind::Request,
                format!("stream {name}"),
                e,
            )
        };
        let mut stream = js.get_stream(name).await.map_err(|e| err(e.into()))?;
        let mut config = stream
            .info()
            .await
            .map_err(|e| err(e.into()))?
            .config
            .clone();
        if self.set_retention(&mut config, mine, false) {
            js.update_stream(config).await.map_err(|e| err(e.into()))?;
        }
        Ok(())
    }

    /// Whether this host's connection to its NATS server is up.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether this host has been connected for long enough to have heard
    /// every live host's heartbeat.
    fn hearing(&self) -> bool {
        let since = self
            .hearing_since
            .load(std::sync::atomic::Ordering::Relaxed);
        self.connected()
            && self.started.elapsed().as_millis() as u64
                > since.saturating_add(DEAD_AFTER.as_millis() as u64)
    }

    /// Every host heard from since this one joined, itself included.
    pub fn members(&self) -> Vec<Member> {
        let connected = self.hearing();
        lock(&self.members)
            .values()
            .map(|seen| {
                let silent = seen.at.elapsed();
                let h = &seen.heartbeat;
                let state = if seen.left {
                    "left"
                } else if h.host == self.id {
                    // It answers; whether its heartbeats get through is
                    // `connected`.
                    "alive"
                } else if silent > DEAD_AFTER {
                    if connected {
                        "dead"
                    } else {
                        "unknown"
                    }
                } else {
                    "alive"
                };
                Member {
                    host: h.host.clone(),
                    state,
                    last_heartbeat_ms: silent.as_millis() as u64,
                    sent_at_ms: h.at_ms,
                    api: h.api.clone(),
                    capabilities: h.capabilities.clone(),
                    free: h.free,
                    running: h.running,
                    queued: h.queued,
                }
            })
            .collect()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Capabilities some live host (this one included) serves.
    pub fn capabilities(&self) -> std::collections::BTreeSet<String> {
        live_capabilities(&self.members)
    }

    fn stop(&self) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        for t in tasks.drain(..) {
            t.abort();
        }
    }

    /// Stops the heartbeats and tells the others this host is leaving.
    pub async fn leave(&self, last: Heartbeat) -> Result<(), ClusterError> {
        self.stop();
        let bytes = serde_json::to_vec(&last).unwrap_or_default();
        let url = &self.url;
        self.client
            .publish(subjects::leave(&self.id), bytes.into())
            .await
            .map_err(|e| ClusterError::new(url, ClusterErrorKind::Request, "leave", e))?;
        self.client
            .flush()
            .await
            .map_err(|e| ClusterError::new(url, ClusterErrorKind::Request, "leave", e))
    }
}
