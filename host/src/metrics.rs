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
    /// Last values of the cluster counters, which the router keeps: a
    /// scrape adds what they grew by. Held for a whole scrape, so that two
    /// at once do not see each other's half-set gauges.
    cluster_seen: Mutex<[u64; 3]>,
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

    pub fn audit_written(&self, n: u64) {
        self.audit_entries.inc_by(n);
    }

    pub fn audit_dropped(&self) {
        self.audit_dropped.inc();
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
            }
        }
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
    }
}
