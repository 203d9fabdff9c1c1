//! The host's `/metrics`, scraped by a real Prometheus server (Debian's
//! `prometheus` package, which `plugins/build.sh` installs) and read back through
//! Prometheus's own query API; the cluster's heartbeat gauge read directly.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{install_fixture, p, HostProc, Orch};

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) every second.
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: orch\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = crate::common::unused_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the prometheus binary (plugins/build.sh installs Debian's prometheus)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// The value of an instant query that returns one sample, once it
    /// equals `want`; bounded at 60 s, asking every 200 ms.
    fn until_equals(&mut self, query: &str, want: f64) {
        let started = Instant::now();
        let mut last = Value::Null;
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = self.child.try_wait() {
                let log = std::fs::read_to_string(self._dir.path().join("prometheus.log"))
                    .unwrap_or_default();
                panic!("prometheus exited ({status}):\n{log}");
            }
            if let Ok(mut r) = ureq::get(&format!("{}/api/v1/query", self.url))
                .query("query", query)
                .call()
            {
                let body: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap())
                    .unwrap_or(Value::Null);
                let value = body["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok());
                if value == Some(want) {
                    return;
                }
                last = body;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{query} did not reach {want} within 60 s; last answer: {last}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_task_counts_and_histograms_by_outcome() {
    let orch = Orch::new();
    orch.config("[host]\nmax_attempts = 2\n");
    orch.ok(&["plugin", "install", "-y", &p("wordcount")]);
    install_fixture(&orch, "panic", "test.panic", "");
    orch.ok(&["plugin", "install", "-y", &p("tally")]);
    let host = HostProc::start(&orch);
    for i in 0..7 {
        let (code, task) = host.post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": "text.wordcount", "input": format!("one two {i}") }),
        );
        assert_eq!(code, 201, "{task}");
        assert_eq!(task["status"], "completed", "{task}");
    }
    let (_, task) = host.post(
        "/v1/tasks?wait=60s",
        &json!({ "capability": "test.panic", "input": "x" }),
    );
    assert_eq!(task["status"], "dead", "{task}");
    // Workflow runs: two that complete, one whose step fails (each step a
    // task: 9 wordcount tasks in all, and 2 dead panic tasks).
    for (name, capability) in [("wm", "text.wordcount"), ("wf-fail", "test.panic")] {
        let def = format!(
            "name = \"{name}\"\nversion = 1\n[[steps]]\nid = \"only\"\ncapability = \"{capability}\"\n"
        );
        let (code, answer) = crate::workflow::register(&host, &def);
        assert_eq!(code, 201, "{answer}");
    }
    for (name, status) in [
        ("wm", "completed"),
        ("wm", "completed"),
        ("wf-fail", "failed"),
    ] {
        let run = crate::workflow::start(&host, name, json!({ "input": "a b" }), true);
        assert_eq!(run["status"], status, "{run}");
    }
    // A refused submission is no task: not counted.
    let (code, _) = host.post("/v1/tasks", &json!({ "capability": "no.such" }));
    assert_eq!(code, 400);

    let target = host.url.trim_start_matches("http://");
    let mut prometheus = Prometheus::start(target);
    prometheus.until_equals("up{job=\"orch\"}", 1.0);
    // tally.toml: reuse = 3. Its instance is kept after this task (for
    // 30 s without another: checked first, well within that).
    let (_, task) = host.post(
        "/v1/tasks?wait=60s",
        &json!({ "capability": "test.tally", "input": "count" }),
    );
    assert_eq!(task["result"], "1", "{task}");
    prometheus.until_equals("orch_instances_kept", 1.0);
    prometheus.until_equals("orch_instance_slots_free", 256.0);
    prometheus.until_equals(
        "sum(orch_tasks_total{capability=\"text.wordcount\",outcome=\"completed\"})",
        9.0,
    );
    prometheus.until_equals(
        "sum(orch_tasks_total{capability=\"test.panic\",outcome=\"dead\",error=\"trap\"})",
        2.0,
    );
    prometheus.until_equals(
        "sum(orch_task_submit_to_result_seconds_count{capability=\"text.wordcount\"})",
        9.0,
    );
    prometheus.until_equals(
        "sum(orch_task_queue_wait_seconds_count{capability=\"text.wordcount\"})",
        9.0,
    );
    prometheus.until_equals(
        "sum(orch_task_fuel_used_count{capability=\"text.wordcount\"})",
        9.0,
    );
    // Two attempts of each trapping task, one retried.
    prometheus.until_equals(
        "sum(orch_task_attempts_total{capability=\"test.panic\"})",
        4.0,
    );
    prometheus.until_equals(
        "sum(orch_task_retries_total{capability=\"test.panic\"})",
        2.0,
    );
    // Each attempt's run time and peak memory; the trapping attempts by
    // kind; the journal's commits.
    for metric in [
        "orch_task_run_seconds_count",
        "orch_task_memory_bytes_count",
    ] {
        prometheus.until_equals(
            &format!("sum({metric}{{capability=\"text.wordcount\"}})"),
            9.0,
        );
    }
    prometheus.until_equals(
        "sum(orch_task_traps_total{capability=\"test.panic\",kind=\"trap\"})",
        4.0,
    );
    prometheus.until_equals("sum(orch_journal_commit_seconds_count) > bool 0", 1.0);
    prometheus.until_equals("sum(orch_agent_free_slots)", 48.0);
    prometheus.until_equals(
        "sum(orch_workflow_runs_total{workflow=\"wm\",status=\"completed\"})",
        2.0,
    );
    prometheus.until_equals(
        "sum(orch_workflow_runs_total{workflow=\"wf-fail\",status=\"failed\"})",
        1.0,
    );
    prometheus.until_equals("sum(orch_workflow_steps_total{status=\"completed\"})", 2.0);
    prometheus.until_equals(
        "sum(orch_workflow_steps_total{workflow=\"wf-fail\",status=\"failed\"})",
        1.0,
    );
}

/// The seconds since each member's last heartbeat: under a second while
/// the other host beats, past a second once it was killed.
#[test]
fn heartbeat_age_of_each_member_is_a_gauge() {
    let nats = crate::common::NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let hb = HostProc::start_with(&b, &args);
    let b_id = hb.get("/v1/status").1["host"].as_str().unwrap().to_string();
    let age = |h: &HostProc| -> Option<f64> {
        let text = HostProc::agent()
            .get(&format!("{}/metrics", h.url))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let prefix = format!("orch_cluster_heartbeat_age_seconds{{host=\"{b_id}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
    };
    ha.until("A lists B's heartbeat age", |h| age(h).is_some());
    let alive = age(&ha).unwrap();
    assert!((0.0..1.0).contains(&alive), "{alive}");
    hb.kill9();
    ha.until("B's heartbeat age passes a second", |h| {
        age(h).is_some_and(|a| a > 1.0)
    });
}
