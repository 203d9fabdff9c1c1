//! Prometheus metrics of a host, in the OpenMetrics text format
//! (`GET /metrics`), with the `prometheus-client` crate.
//!
//! Counters and histograms of tasks are fed by the task events
//! ([`crate::service::TaskEvent`]), in one place ([`Metrics::observe`]),
//! whichever store the host uses. Gauges of the present state (queues,
//! agents, cluster members) are read when the endpoint is scraped. Labels
//! are bounded: capabilities and agents are those of installed plugins
//! (a task for any other capability is refused before it is stored), error
//! kinds are a fixed set, and no label holds a task id.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::service::{EventKind, TaskEvent};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    capability: String,
    agent: String,
    /// completed, failed, dead or cancelled.
    outcome: String,
    /// The error kind; empty for a completed task.
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Attempt {
    capability: String,
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Capability {
    capability: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Trap {
    capability: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Agent {
    agent: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkflowStatus {
    workflow: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Member {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemberState {
    state: String,
}

/// The present state a scrape reports, read by the API from the host.
#[derive(Default)]
pub struct Snapshot {
    /// Tasks queued in this host's scheduler, per capability.
    pub queued: Vec<(String, usize)>,
    /// Per agent: label, tasks in flight, slots, breaker (0 closed, 1
    /// half-open, 2 open), reliability score.
    pub agents: Vec<(String, u32, u32, i64, f64)>,
    /// Cluster members per state; empty on a lone host.
    pub members: Vec<(String, i64)>,
    /// Seconds since each member's last heartbeat (hosts that left are not
    /// listed); empty on a lone host.
    pub heartbeats: Vec<(String, f64)>,
    /// This host's cluster counters: deliveries after the first, task
    /// messages terminated for want of an id, duplicates acked unrun.
    pub redelivered: u64,
    pub terminated: u64,
    pub duplicates: u64,
    /// The engine's instance slots free now, those held by kept instances
    /// included, and the instances kept ([limits] reuse).
    pub free_instances: usize,
    pub kept_instances: usize,
}

/// The host's metrics.
pub struct Metrics {
    registry: Registry,
    tasks: Family<Outcome, Counter>,
    attempts: Family<Attempt, Counter>,
    retries: Family<Capability, Counter>,
    fenced: Family<Capability, Counter>,
    queue_wait: Family<Capability, Histogram>,
    submit_to_result: Family<Capability, Histogram>,
    fuel: Family<Capability, Histogram>,
    queued: Family<Capability, Gauge>,
    in_flight: Family<Agent, Gauge>,
    free_slots: Family<Agent, Gauge>,
    breaker: Family<Agent, Gauge>,
    free_instances: Gauge,
    kept_instances: Gauge,
    score: Family<Agent, Gauge<f64, AtomicU64>>,
    members: Family<MemberState, Gauge>,
    heartbeat_age: Family<Member, Gauge<f64, AtomicU64>>,
    workflow_runs: Family<WorkflowStatus, Counter>,
    workflow_steps: Family<WorkflowStatus, Counter>,
    redelivered: Counter,
    terminated: Counter,
    duplicates: Counter,
    audit_entries: Counter,
    audit_dropped: Counter,
    run_time: Family<Capability, Histogram>,
    memory: Family<Capability, Histogram>,
    traps: Family<Trap, Counter>,
    journal_commit: Histogram,
    /// The last minutes of ended tasks, for the dashboard.
    recent: Mutex<Recent>,
    /// Last values of the cluster counters, which the router keeps: a
    /// scrape adds what they grew by. Held for a whole scrape, so that two
    /// at once do not see each other's half-set gauges.
    cluster_seen: Mutex<[u64; 3]>,
}

/// Width of one bucket of the recent-activity series (`GET /v1/stats`).
pub const RECENT_STEP_MS: u64 = 5_000;
/// Buckets kept: 10 minutes.
pub const RECENT_BUCKETS: usize = 120;
/// Upper bounds of the latency buckets, in ms (the last catches the rest):
/// quantiles are read as the bound of the bucket they fall in.
const LATENCY_BOUNDS_MS: [u64; 40] = [
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    8,
    10,
    13,
    16,
    20,
    25,
    32,
    40,
    50,
    64,
    80,
    100,
    128,
    160,
    200,
    256,
    320,
    400,
    512,
    640,
    800,
    1000,
    1280,
    1600,
    2000,
    2560,
    3200,
    4000,
    5120,
    6400,
    8000,
    10000,
    u64::MAX,
];

#[derive(Clone)]
struct Bucket {
    start_ms: u64,
    ended: u64,
    failed: u64,
    latency: [u32; LATENCY_BOUNDS_MS.len()],
}

#[derive(Default)]
struct Recent {
    buckets: std::collections::VecDeque<Bucket>,
    totals: RecentTotals,
}

/// Tasks that ended on this host since it started, by outcome.
#[derive(Default, Clone, serde::Serialize)]
pub struct RecentTotals {
    pub completed: u64,
    pub failed: u64,
    pub dead: u64,
    pub cancelled: u64,
}

/// One bucket as the dashboard reads it.
#[derive(serde::Serialize)]
pub struct RecentPoint {
    pub at_ms: u64,
    /// Tasks that ended in the bucket, and those of them that failed or
    /// were dead letters.
    pub ended: u64,
    pub failed: u64,
    /// Submission to end; null for a bucket with no task.
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
}

#[derive(serde::Serialize)]
pub struct RecentJson {
    pub step_ms: u64,
    pub totals: RecentTotals,
    pub series: Vec<RecentPoint>,
}

impl Recent {
    fn ended(&mut self, e: &TaskEvent) {
        let start_ms = e.at_ms - e.at_ms % RECENT_STEP_MS;
        if self.buckets.back().is_none_or(|b| b.start_ms < start_ms) {
            if self.buckets.len() == RECENT_BUCKETS {
                self.buckets.pop_front();
            }
            self.buckets.push_back(Bucket {
                start_ms,
                ended: 0,
                failed: 0,
                latency: [0; LATENCY_BOUNDS_MS.len()],
            });
        }
        let totals = &mut self.totals;
        let failed = match e.kind {
            EventKind::Completed => {
                totals.completed += 1;
                false
            }
            EventKind::Failed => {
                totals.failed += 1;
                true
            }
            EventKind::Dead => {
                totals.dead += 1;
                true
            }
            _ => {
                totals.cancelled += 1;
                false
            }
        };
        // Events of one host come in about time order; a late one counts
        // in the newest bucket.
        let Some(bucket) = self.buckets.back_mut() else {
            return;
        };
        bucket.ended += 1;
        bucket.failed += u64::from(failed);
        let took = e.took_ms.unwrap_or(0);
        let i = LATENCY_BOUNDS_MS.partition_point(|&b| b < took);
        if let Some(n) = bucket.latency.get_mut(i) {
            *n = n.saturating_add(1);
        }
    }

    fn json(&self, now_ms: u64) -> RecentJson {
        let last = now_ms - now_ms % RECENT_STEP_MS;
        // Oldest first; none before the clock's start.
        let series = (0..RECENT_BUCKETS as u64)
            .rev()
            .filter_map(|back| last.checked_sub(back * RECENT_STEP_MS))
            .map(|at_ms| {
                let bucket = self.buckets.iter().find(|b| b.start_ms == at_ms);
                let quantile = |q: f64| {
                    let b = bucket?;
                    let want = ((b.ended as f64) * q).ceil().max(1.0) as u64;
                    let mut seen = 0u64;
                    for (i, n) in b.latency.iter().enumerate() {
                        seen += u64::from(*n);
                        if seen >= want {
                            // The open last bucket reads as the bound below it.
                            return Some(LATENCY_BOUNDS_MS[i.min(LATENCY_BOUNDS_MS.len() - 2)]);
                        }
                    }
                    None
                };
                RecentPoint {
                    at_ms,
                    ended: bucket.map_or(0, |b| b.ended),
                    failed: bucket.map_or(0, |b| b.failed),
                    p50_ms: quantile(0.5),
                    p99_ms: quantile(0.99),
                }
            })
            .collect();
        RecentJson {
            step_ms: RECENT_STEP_MS,
            totals: self.totals.clone(),
            series,
        }
    }
}

/// Seconds, from 1 ms to about 9 minutes.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            tasks: Family::default(),
            attempts: Family::default(),
            retries: Family::default(),
            fenced: Family::default(),
            queue_wait: Family::new_with_constructor(seconds),
            submit_to_result: Family::new_with_constructor(seconds),
            fuel: Family::new_with_constructor(|| {
                // 1,000 to about 10^13 fuel.
                Histogram::new(exponential_buckets(1000.0, 10.0, 11))
            }),
            queued: Family::default(),
            in_flight: Family::default(),
            free_slots: Family::default(),
            breaker: Family::default(),
            free_instances: Gauge::default(),
            kept_instances: Gauge::default(),
            score: Family::default(),
            members: Family::default(),
            heartbeat_age: Family::default(),
            workflow_runs: Family::default(),
            workflow_steps: Family::default(),
            redelivered: Counter::default(),
            terminated: Counter::default(),
            duplicates: Counter::default(),
            audit_entries: Counter::default(),
            audit_dropped: Counter::default(),
            run_time: Family::new_with_constructor(seconds),
            memory: Family::new_with_constructor(|| {
                // 64 KiB (one wasm page) to 4 GiB.
                Histogram::new(exponential_buckets(65536.0, 4.0, 9))
            }),
            traps: Family::default(),
            journal_commit: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            recent: Mutex::new(Recent::default()),
            cluster_seen: Mutex::new([0; 3]),
            registry: Registry::default(),
        };
        registry.register(
            "orch_tasks",
            "Tasks that ended on this host, by capability, agent, outcome and error kind",
            m.tasks.clone(),
        );
        registry.register(
            "orch_task_attempts",
            "Attempts started on this host",
            m.attempts.clone(),
        );
        registry.register(
            "orch_task_retries",
            "Attempts that failed and were retried",
            m.retries.clone(),
        );
        registry.register(
            "orch_fenced_results",
            "Outcomes dropped because the task already had its result",
            m.fenced.clone(),
        );
        registry.register(
            "orch_task_queue_wait_seconds",
            "Time a task waited in this host's scheduler before its first attempt here started",
            m.queue_wait.clone(),
        );
        registry.register(
            "orch_task_submit_to_result_seconds",
            "Time from submission to the task's end",
            m.submit_to_result.clone(),
        );
        registry.register(
            "orch_task_fuel_used",
            "Fuel a task used (its successful attempt, or its last)",
            m.fuel.clone(),
        );
        registry.register(
            "orch_queue_depth",
            "Tasks waiting in this host's scheduler",
            m.queued.clone(),
        );
        registry.register(
            "orch_agent_tasks_in_flight",
            "Tasks an agent runs now",
            m.in_flight.clone(),
        );
        registry.register(
            "orch_agent_free_slots",
            "Tasks an agent could start now",
            m.free_slots.clone(),
        );
        registry.register(
            "orch_instance_slots_free",
            "Engine instance slots free now, those held by kept instances included",
            m.free_instances.clone(),
        );
        registry.register(
            "orch_instances_kept",
            "Instances kept for their plugin's next task ([limits] reuse)",
            m.kept_instances.clone(),
        );
        registry.register(
            "orch_agent_breaker_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open",
            m.breaker.clone(),
        );
        registry.register(
            "orch_agent_reliability_score",
            "Placement score from success rate and latency, 0 to 1",
            m.score.clone(),
        );
        registry.register(
            "orch_cluster_members",
            "Hosts in the member table, by state",
            m.members.clone(),
        );
        registry.register(
            "orch_jetstream_redeliveries",
            "Task deliveries after the first, taken by this host",
            m.redelivered.clone(),
        );
        registry.register(
            "orch_jetstream_terminated",
            "Task messages ended for want of a valid task id",
            m.terminated.clone(),
        );
        registry.register(
            "orch_jetstream_duplicates",
            "Second messages for a task id that already ran, acked unrun",
            m.duplicates.clone(),
        );
        registry.register(
            "orch_cluster_heartbeat_age_seconds",
            "Time since each cluster member's last heartbeat reached this host",
            m.heartbeat_age.clone(),
        );
        registry.register(
            "orch_workflow_runs",
            "Workflow runs that ended on this host (the host driving them), by workflow and status",
            m.workflow_runs.clone(),
        );
        registry.register(
            "orch_workflow_steps",
            "Steps of those runs, by workflow and the status they ended with",
            m.workflow_steps.clone(),
        );
        registry.register(
            "orch_task_run_seconds",
            "Time an attempt ran on this host (instantiate and the guest's handle, host calls included)",
            m.run_time.clone(),
        );
        registry.register(
            "orch_task_memory_bytes",
            "The most linear memory an attempt's instance had",
            m.memory.clone(),
        );
        registry.register(
            "orch_task_traps",
            "Attempts the sandbox stopped, by kind: trap, fuel-exhausted, memory-limit, table-limit, deadline-exceeded, host-call-data-limit",
            m.traps.clone(),
        );
        registry.register(
            "orch_journal_commit_seconds",
            "Time of one commit (fsynced) of the lone host's task journal, with every write queued for it",
            m.journal_commit.clone(),
        );
        registry.register(
            "orch_audit_entries",
            "Audit entries this host stored",
            m.audit_entries.clone(),
        );
        registry.register(
            "orch_audit_dropped",
            "Audit entries dropped because the audit store was too far behind",
            m.audit_dropped.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Counts an attempt that ended on this host.
    pub fn attempt_ended(
        &self,
        capability: &str,
        _agent: &str,
        ran: std::time::Duration,
        memory: u64,
        error: Option<&crate::error::TaskError>,
    ) {
        let label = Capability {
            capability: capability.to_string(),
        };
        self.run_time
            .get_or_create(&label)
            .observe(ran.as_secs_f64());
        if memory > 0 {
            self.memory.get_or_create(&label).observe(memory as f64);
        }
        let kind = error.map(|e| e.kind());
        if let Some(
            kind @ ("trap"
            | "fuel-exhausted"
            | "memory-limit"
            | "table-limit"
            | "deadline-exceeded"
            | "host-call-data-limit"),
        ) = kind
        {
            self.traps
                .get_or_create(&Trap {
                    capability: capability.to_string(),
                    kind: kind.to_string(),
                })
                .inc();
        }
    }

    /// Times one journal commit.
    pub fn journal_committed(&self, took: std::time::Duration) {
        self.journal_commit.observe(took.as_secs_f64());
    }

    pub fn audit_written(&self, n: u64) {
        self.audit_entries.inc_by(n);
    }

    pub fn audit_dropped(&self) {
        self.audit_dropped.inc();
    }

    pub fn audit_dropped_count(&self) -> u64 {
        self.audit_dropped.get()
    }

    /// Counts a workflow run that ended here, and its steps.
    pub fn workflow_ended<'a>(
        &self,
        workflow: &str,
        status: &str,
        steps: impl Iterator<Item = &'a str>,
    ) {
        let label = |status: &str| WorkflowStatus {
            workflow: workflow.to_string(),
            status: status.to_string(),
        };
        self.workflow_runs.get_or_create(&label(status)).inc();
        for s in steps {
            self.workflow_steps.get_or_create(&label(s)).inc();
        }
    }

    /// Counts one task event.
    pub fn observe(&self, e: &TaskEvent) {
        let capability = || Capability {
            capability: e.capability.clone(),
        };
        match e.kind {
            EventKind::Accepted => {}
            EventKind::Started => {
                self.attempts
                    .get_or_create(&Attempt {
                        capability: e.capability.clone(),
                        agent: e.agent.clone().unwrap_or_default(),
                    })
                    .inc();
                if let Some(waited) = e.waited_us {
                    self.queue_wait
                        .get_or_create(&capability())
                        .observe(waited as f64 / 1e6);
                }
            }
            EventKind::Retried => {
                self.retries.get_or_create(&capability()).inc();
            }
            EventKind::Fenced => {
                self.fenced.get_or_create(&capability()).inc();
            }
            EventKind::Completed | EventKind::Failed | EventKind::Dead | EventKind::Cancelled => {
                self.tasks
                    .get_or_create(&Outcome {
                        capability: e.capability.clone(),
                        agent: e.agent.clone().unwrap_or_default(),
                        outcome: e.kind.as_str().to_string(),
                        error: e.error.clone().unwrap_or_default(),
                    })
                    .inc();
                if let Some(took) = e.took_ms {
                    self.submit_to_result
                        .get_or_create(&capability())
                        .observe(took as f64 / 1000.0);
                }
                if let Some(fuel) = e.fuel_used {
                    self.fuel.get_or_create(&capability()).observe(fuel as f64);
                }
                self.recent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ended(e);
            }
        }
    }

    /// Tasks that ended on this host: totals since it started, and the
    /// last [`RECENT_BUCKETS`] buckets of [`RECENT_STEP_MS`] (oldest
    /// first, empty ones included) up to `now_ms`.
    pub fn recent(&self, now_ms: u64) -> RecentJson {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .json(now_ms)
    }

    /// The metrics as OpenMetrics text, with the gauges set from `now`.
    pub fn render(&self, now: Snapshot) -> String {
        let mut seen = self.cluster_seen.lock().unwrap_or_else(|p| p.into_inner());
        // Label sets of agents or capabilities that are gone go too.
        self.queued.clear();
        for (capability, n) in now.queued {
            self.queued
                .get_or_create(&Capability { capability })
                .set(n as i64);
        }
        for family in [&self.in_flight, &self.free_slots, &self.breaker] {
            family.clear();
        }
        self.score.clear();
        for (agent, in_flight, slots, breaker, score) in now.agents {
            let label = Agent { agent };
            self.in_flight
                .get_or_create(&label)
                .set(i64::from(in_flight));
            self.free_slots
                .get_or_create(&label)
                .set(i64::from(slots.saturating_sub(in_flight)));
            self.breaker.get_or_create(&label).set(breaker);
            self.score.get_or_create(&label).set(score);
        }
        self.members.clear();
        for (state, n) in now.members {
            self.members.get_or_create(&MemberState { state }).set(n);
        }
        // Members that left (or were forgotten) go.
        self.heartbeat_age.clear();
        for (host, age) in now.heartbeats {
            self.heartbeat_age.get_or_create(&Member { host }).set(age);
        }
        self.free_instances.set(now.free_instances as i64);
        self.kept_instances.set(now.kept_instances as i64);
        let counters = [&self.redelivered, &self.terminated, &self.duplicates];
        let values = [now.redelivered, now.terminated, now.duplicates];
        for ((counter, value), last) in counters.iter().zip(values).zip(seen.iter_mut()) {
            counter.inc_by(value.saturating_sub(*last));
            *last = (*last).max(value);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_task_is_counted_with_its_outcome_and_times() {
        let m = Metrics::new();
        let event = TaskEvent {
            kind: EventKind::Completed,
            task: "t1".into(),
            capability: "text.wordcount".into(),
            host: "h".into(),
            agent: Some("wordcount@0.1.0".into()),
            attempt: 1,
            at_ms: 2_000,
            submitted_at_ms: Some(1_000),
            took_ms: Some(1_000),
            waited_us: None,
            fuel_used: Some(5_000),
            error: None,
            tenant: "default".into(),
            principal: "anonymous".into(),
        };
        m.observe(&event);
        m.observe(&event);
        let text = m.render(Snapshot::default());
        assert!(text.contains(
            "orch_tasks_total{capability=\"text.wordcount\",agent=\"wordcount@0.1.0\",outcome=\"completed\",error=\"\"} 2"
        ), "{text}");
        assert!(
            text.contains(
                "orch_task_submit_to_result_seconds_count{capability=\"text.wordcount\"} 2"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
        let recent = m.recent(2_000);
        assert_eq!(recent.totals.completed, 2);
        let last = recent.series.last().unwrap();
        assert_eq!(
            (last.ended, last.p50_ms, last.p99_ms),
            (2, Some(1000), Some(1000))
        );
        // Ten minutes later the bucket is the oldest one shown, then gone.
        let later = m.recent(2_000 + (RECENT_BUCKETS as u64 - 1) * RECENT_STEP_MS);
        assert_eq!(later.series.len(), RECENT_BUCKETS);
        assert_eq!((later.series[0].at_ms, later.series[0].ended), (0, 2));
        let gone = m.recent(2_000 + RECENT_BUCKETS as u64 * RECENT_STEP_MS);
        assert!(gone.series.iter().all(|p| p.ended == 0));
    }
}
