//! The task contract a client sees, checked once against a lone host and
//! once against a 2-host cluster: every case below runs in both modes
//! (`mod lone` and `mod cluster` of each case), with the same assertions.
//! In the cluster, tasks are submitted to host A, which serves nothing, and
//! run on host B: every case crosses hosts.
use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{p, stderr, HostProc, NatsServer, Orch};

/// A deployment under test: where clients submit, and where tasks run.
pub struct Deployment {
    _nats: Option<NatsServer>,
    homes: Vec<Orch>,
    hosts: Vec<HostProc>,
}

#[derive(Clone, Copy)]
pub enum Mode {
    Lone,
    Cluster,
}

/// Every host's configuration, with a case's own `[host]` keys.
fn config(host_keys: &str) -> String {
    format!("[host]\nmax_attempts = 2\n{host_keys}\n[limits]\nmax_fuel = 1000000000000\n")
}

/// Plugins every deployment serves: echo, sleep (one instance, so a
/// second task waits for the first), panic (traps every time), tally (an
/// instance serves 3 tasks in a row, and counts them), nap-lean (waits in
/// a host call, so that a cancel stops it at once).
fn install(orch: &Orch, config: &str) {
    orch.config(config);
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    for (plugin, capability, extra) in [
        (
            "sleep",
            "test.sleep",
            // It can spin for 120 s: only a cancel frees its one slot sooner.
            "[limits]\nmax_instances = 1\nfuel = 1000000000000\ntimeout = \"120s\"\n",
        ),
        ("panic", "test.panic", ""),
        ("tally", "test.tally", "[limits]\nreuse = 3\n"),
        ("nap-lean", "test.nap-lean", ""),
    ] {
        crate::common::install_fixture(orch, plugin, capability, extra);
    }
}

impl Deployment {
    /// Every host with the common configuration and `host_keys` in its
    /// `[host]` table.
    pub fn start(mode: Mode, host_keys: &str) -> Deployment {
        let config = config(host_keys);
        match mode {
            Mode::Lone => {
                let orch = Orch::new();
                install(&orch, &config);
                let host = HostProc::start(&orch);
                Deployment {
                    _nats: None,
                    homes: vec![orch],
                    hosts: vec![host],
                }
            }
            Mode::Cluster => {
                let nats = NatsServer::start();
                let a = Orch::new();
                a.config(&config);
                let b = Orch::new();
                install(&b, &config);
                let hb = HostProc::start_with(&b, &["--nats", nats.url.as_str()]);
                let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
                // A submits only once it sees B's capabilities.
                crate::common::until_serving(&ha, "test.panic", 1);
                Deployment {
                    _nats: Some(nats),
                    homes: vec![a, b],
                    hosts: vec![ha, hb],
                }
            }
        }
    }

    /// Where clients submit.
    pub fn api(&self) -> &HostProc {
        &self.hosts[0]
    }

    /// Where the tasks run.
    pub fn runner(&self) -> &HostProc {
        self.hosts.last().unwrap()
    }

    /// The CLI on the submitting host's data directory.
    pub fn cli(&self) -> &Orch {
        &self.homes[0]
    }
}

/// Server-sent events of a host's `/v1/events`, read on a thread.
struct Watch {
    rx: mpsc::Receiver<Value>,
}

impl Watch {
    /// Connected when this returns: every later event is seen.
    fn open(host: &HostProc, query: &str) -> Watch {
        let response = ureq::get(&format!("{}/v1/events?{query}", host.url))
            .call()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let reader = BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if let Some(data) = line.strip_prefix("data:") {
                    if let Ok(v) = serde_json::from_str(data.trim()) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Watch { rx }
    }

    /// Events until (and with) the first of `kind`, bounded in time.
    fn until(&self, kind: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let event = self
                .rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {kind} event; saw {seen:?}"));
            let done = event["kind"] == kind;
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

fn submit(d: &Deployment, body: Value) -> (u16, Value) {
    d.api().post("/v1/tasks", &body)
}

/// Defines one contract case as a test in each mode.
macro_rules! contract {
    ($name:ident, $body:expr) => {
        contract!($name, config = "", $body);
    };
    ($name:ident, config = $config:expr, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn lone() {
                let case: fn(&Deployment) = $body;
                case(&Deployment::start(Mode::Lone, $config));
            }
            #[test]
            fn cluster() {
                let case: fn(&Deployment) = $body;
                case(&Deployment::start(Mode::Cluster, $config));
            }
        }
    };
}

contract!(an_unknown_capability_is_refused_at_submit, |d| {
    let (code, body) = submit(d, json!({ "capability": "no.such", "input": "x" }));
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["kind"], "unknown-capability", "{body}");
    let out = d.cli().run(&[
        "task",
        "submit",
        "--api",
        &d.api().url,
        "--capability",
        "no.such",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("no agent provides capability no.such"));
});

contract!(
    a_waited_submission_exits_with_its_tasks_code_in_text_and_json,
    |d| {
        let submit = |capability: &str, input: &str, deadline: &str, json: bool| {
            let mut args = vec![
                "task",
                "submit",
                "--api",
                &d.api().url,
                "--capability",
                capability,
                "--input",
                input,
                "--deadline",
                deadline,
                "--wait",
            ];
            if json {
                args.extend(["--output", "json"]);
            }
            d.cli().run(&args)
        };
        let dir = d.cli().home.path();
        let (ok, spin) = (dir.join("ok.txt"), dir.join("spin.txt"));
        std::fs::write(&ok, "ok").unwrap();
        std::fs::write(&spin, "5000").unwrap();
        for json in [false, true] {
            let done = submit("echo", ok.to_str().unwrap(), "30s", json);
            assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
            // Past its deadline: 4, a limit, in either output.
            let late = submit("test.sleep", spin.to_str().unwrap(), "300ms", json);
            assert_eq!(
                late.status.code(),
                Some(4),
                "json {json}: {}",
                stderr(&late)
            );
            if json {
                let task: Value = serde_json::from_slice(&late.stdout).unwrap();
                assert_eq!(task["error"]["kind"], "deadline-exceeded", "{task}");
                // `get --wait` exits by the outcome as `submit --wait`
                // does, in either output; a plain `get` that found it is 0.
                let id = task["id"].as_str().unwrap();
                for (args, code) in [
                    (&["--wait"][..], 4),
                    (&["--wait", "--output", "json"][..], 4),
                    (&[][..], 0),
                    (&["--output", "json"][..], 0),
                ] {
                    let mut get = vec!["task", "get", "--api", &d.api().url, id];
                    get.extend(args);
                    let out = d.cli().run(&get);
                    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
                }
            }
        }
        // A completed task's `get --wait` is 0; a cancelled one's is 1.
        let post = |body: Value| d.api().post("/v1/tasks", &body).1;
        let done = post(json!({ "capability": "echo", "input": "x" }));
        let cancelled = post(json!({ "capability": "test.sleep", "input": "60000" }));
        let cancelled = cancelled["id"].as_str().unwrap();
        let (code, _) = d
            .api()
            .post(&format!("/v1/tasks/{cancelled}/cancel"), &json!({}));
        assert_eq!(code, 200);
        for (id, code) in [(done["id"].as_str().unwrap(), 0), (cancelled, 1)] {
            for output in ["text", "json"] {
                let out = d.cli().run(&[
                    "task",
                    "get",
                    "--api",
                    &d.api().url,
                    id,
                    "--wait",
                    "--output",
                    output,
                ]);
                assert_eq!(
                    out.status.code(),
                    Some(code),
                    "{id} {output}: {}",
                    stderr(&out)
                );
            }
        }
    }
);

contract!(a_malformed_deadline_or_priority_is_refused, |d| {
    for body in [
        json!({ "capability": "echo", "deadline": "soon" }),
        json!({ "capability": "echo", "deadline": "0ms" }),
        json!({ "capability": "echo", "priority": "high" }),
        json!({ "capability": "echo", "priority": 1.5 }),
    ] {
        let (code, answer) = submit(d, body.clone());
        assert_eq!(code, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["kind"], "invalid-request", "{answer}");
    }
    // Inside: the smallest valid forms are accepted.
    let (code, answer) = submit(
        d,
        json!({ "capability": "echo", "deadline": "1m", "priority": -5 }),
    );
    assert_eq!(code, 201, "{answer}");
});

contract!(
    a_deadline_passed_while_running_is_deadline_exceeded_with_the_given_deadline,
    |d| {
        let (code, task) = d.api().post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": "test.sleep", "input": "5000", "deadline": "300ms" }),
        );
        assert_eq!(code, 201, "{task}");
        assert_eq!(task["status"], "failed", "{task}");
        assert_eq!(task["error"]["kind"], "deadline-exceeded", "{task}");
        let message = task["error"]["message"].as_str().unwrap();
        assert!(message.contains("deadline of 300 ms"), "{message}");
        // The attempt it stopped names the same deadline (it said what was
        // left of it when the attempt started, 298 ms or so).
        assert_eq!(task["attempt_errors"][0]["message"], message, "{task}");
        // So does one that first waited 500 ms for the one slot (in a
        // cluster on the stream, and its delivery's scheduler had only
        // about 1,000 ms of it left).
        let (code, holder) = submit(d, json!({ "capability": "test.sleep", "input": "500" }));
        assert_eq!(code, 201, "{holder}");
        let holder = holder["id"].as_str().unwrap().to_string();
        d.api().until("the sleep holds the slot", |h| {
            h.get(&format!("/v1/tasks/{holder}")).1["status"] == "running"
        });
        let (code, task) = d.api().post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": "test.sleep", "input": "5000", "deadline": "1500ms" }),
        );
        assert_eq!(code, 201, "{task}");
        assert_eq!(task["error"]["kind"], "deadline-exceeded", "{task}");
        assert_eq!(task["attempts"], 1, "{task}");
        let message = task["error"]["message"].as_str().unwrap();
        assert!(message.contains("deadline of 1500 ms"), "{message}");
        assert_eq!(task["attempt_errors"][0]["message"], message, "{task}");
        // Inside the deadline: completed.
        let (_, task) = d.api().post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": "test.sleep", "input": "1", "deadline": "30s" }),
        );
        assert_eq!(task["status"], "completed", "{task}");
    }
);

// A task waiting for a slot (on a lone host in its scheduler's queue, in a
// cluster on the stream: host B's one test.sleep slot is busy) fails at its
// deadline, not when the slot frees; one with a later deadline runs.
contract!(
    a_queued_task_fails_at_its_deadline_not_when_a_slot_frees,
    |d| {
        let (code, holder) = submit(d, json!({ "capability": "test.sleep", "input": "3000" }));
        assert_eq!(code, 201, "{holder}");
        let holder = holder["id"].as_str().unwrap().to_string();
        d.api().until("the sleep holds the slot", |h| {
            h.get(&format!("/v1/tasks/{holder}")).1["status"] == "running"
        });
        let queue = |deadline: &str| -> String {
            let (code, task) = submit(
                d,
                json!({ "capability": "test.sleep", "input": "1", "deadline": deadline }),
            );
            assert_eq!(code, 201, "{task}");
            task["id"].as_str().unwrap().to_string()
        };
        let (short, long) = (queue("300ms"), queue("30s"));
        let short = d.api().wait(&short);
        assert_eq!(short["status"], "failed", "{short}");
        assert_eq!(short["error"]["kind"], "deadline-exceeded", "{short}");
        assert!(
            short["error"]["message"]
                .as_str()
                .unwrap()
                .contains("deadline of 300 ms"),
            "{short}"
        );
        assert_eq!(short["attempts"], 0, "{short}");
        let waited =
            short["finished_at_ms"].as_u64().unwrap() - short["submitted_at_ms"].as_u64().unwrap();
        assert!(
        (300..2000).contains(&waited),
        "failed {waited} ms after its submission, against a deadline of 300 ms and a slot busy for 3 s"
    );
        assert_eq!(d.api().wait(&long)["status"], "completed");
        assert_eq!(d.api().wait(&holder)["status"], "completed");
        // In a cluster the runner took the failed task before the later one
        // (the stream's order) and acked it as it was: no fenced outcome, and
        // the task still has no attempt.
        let (_, status) = d.runner().get("/v1/status");
        if !status["cluster"].is_null() {
            assert_eq!(status["cluster"]["fenced"], 0, "{status}");
        }
        let id = short["id"].as_str().unwrap();
        assert_eq!(d.api().wait(id)["attempts"], 0);
    }
);

contract!(
    a_resubmission_with_the_same_idempotency_key_is_the_same_task,
    |d| {
        let body = json!({ "capability": "echo", "input": "once", "idempotency_key": "order-17" });
        let (first_code, first) = d.api().post("/v1/tasks?wait=60s", &body);
        assert_eq!(first_code, 201, "{first}");
        assert_eq!(first["result"], "once", "{first}");
        let (again_code, again) = d.api().post("/v1/tasks?wait=60s", &body);
        assert_eq!(again_code, 200, "{again}");
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["result"], "once", "{again}");
        // Another key is another task.
        let (code, other) = submit(
            d,
            json!({ "capability": "echo", "input": "once", "idempotency_key": "order-18" }),
        );
        assert_eq!(code, 201, "{other}");
        assert_ne!(other["id"], first["id"]);
    }
);

// Within the retention a key's second submission is the first task; once
// the task is dropped (3 s here), the key makes a new task that runs. (In a
// cluster the task stream's duplicate window dropped that publish as a
// repeat: the task was answered `queued` and never existed.)
contract!(
    a_key_resubmitted_after_the_retention_is_a_new_task,
    config = "retention = \"3s\"",
    |d| {
        let body = |input: &str| json!({ "capability": "echo", "input": input, "idempotency_key": "order-19" });
        let (code, first) = d.api().post("/v1/tasks?wait=60s", &body("first"));
        assert_eq!(code, 201, "{first}");
        assert_eq!(first["result"], "first", "{first}");
        let id = first["id"].as_str().unwrap().to_string();
        // Inside the retention: the same task.
        let (code, again) = d.api().post("/v1/tasks?wait=60s", &body("second"));
        assert_eq!(code, 200, "{again}");
        assert_eq!(again["result"], "first", "{again}");
        d.api()
            .until("the task is dropped after its retention", |h| {
                h.get(&format!("/v1/tasks/{id}")).0 == 404
            });
        // Past it: a new task, run.
        let (code, new) = d.api().post("/v1/tasks?wait=60s", &body("second"));
        assert_eq!(code, 201, "{new}");
        assert_eq!(new["status"], "completed", "{new}");
        assert_eq!(new["result"], "second", "{new}");
    }
);

// Two submissions of one key at once, with different bodies: one task,
// whose record while it waits is the body that runs (in a cluster both
// wrote a record; the second overwrote the first), and the other body
// leaves no record behind, also under another capability.
contract!(
    a_key_submitted_twice_at_once_is_one_task_recorded_as_the_body_that_runs,
    |d| {
        let (code, holder) = submit(d, json!({ "capability": "test.sleep", "input": "60000" }));
        assert_eq!(code, 201, "{holder}");
        let holder = holder["id"].as_str().unwrap().to_string();
        d.api().until("the sleep holds the slot", |h| {
            h.get(&format!("/v1/tasks/{holder}")).1["status"] == "running"
        });
        let mut ids = Vec::new();
        for round in 0..20 {
            let key = format!("race-{round}");
            let first = json!({ "capability": "test.sleep", "input": "1", "priority": 1, "idempotency_key": key });
            let other = match round % 2 {
                0 => "test.sleep",
                _ => "echo",
            };
            let second = json!({ "capability": other, "input": "22", "priority": 2, "idempotency_key": key });
            let barrier = std::sync::Barrier::new(2);
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| {
                    barrier.wait();
                    submit(d, first)
                });
                let b = s.spawn(|| {
                    barrier.wait();
                    submit(d, second)
                });
                (a.join().unwrap(), b.join().unwrap())
            });
            let mut codes = [a.0, b.0];
            codes.sort();
            assert_eq!(codes, [200, 201], "{a:?} {b:?}");
            assert_eq!(a.1["id"], b.1["id"], "{a:?} {b:?}");
            ids.push(a.1["id"].as_str().unwrap().to_string());
        }
        let fields = |t: &Value| {
            (
                t["capability"].clone(),
                t["priority"].clone(),
                t["payload_bytes"].clone(),
            )
        };
        let waiting: Vec<Value> = ids
            .iter()
            .map(|id| d.api().get(&format!("/v1/tasks/{id}")).1)
            .collect();
        let (code, _) = d
            .api()
            .post(&format!("/v1/tasks/{holder}/cancel"), &json!({}));
        assert_eq!(code, 200);
        for (id, seen) in ids.iter().zip(&waiting) {
            let ended = d.api().wait(id);
            assert_eq!(ended["status"], "completed", "{ended}");
            assert_eq!(fields(seen), fields(&ended), "{seen} then {ended}");
        }
        d.api().until("no record of a losing body is left", |h| {
            h.get("/v1/tasks?status=queued").1["tasks"]
                .as_array()
                .is_some_and(|t| t.is_empty())
        });
    }
);

contract!(
    an_idempotency_key_is_taken_up_to_256_bytes_and_refused_past_it_or_empty,
    |d| {
        let at = "k".repeat(256);
        let body = json!({ "capability": "echo", "input": "x", "idempotency_key": at });
        let (code, first) = d.api().post("/v1/tasks?wait=60s", &body);
        assert_eq!(code, 201, "{first}");
        assert_eq!(first["idempotency_key"], json!(at), "{first}");
        let (code, again) = d.api().post("/v1/tasks?wait=60s", &body);
        assert_eq!(code, 200, "{again}");
        assert_eq!(again["id"], first["id"]);
        // Past the limit, empty, or with a line break (in a cluster it
        // would end the NATS header it travels in): refused, naming why.
        for (key, why) in [
            ("k".repeat(257), "is 257 bytes, past the limit of 256 bytes"),
            (String::new(), "is empty"),
            ("a\r\nNats-Rollup: all".to_string(), "control character"),
        ] {
            let (code, refused) = submit(
                d,
                json!({ "capability": "echo", "input": "x", "idempotency_key": key }),
            );
            assert_eq!(code, 400, "{refused}");
            assert_eq!(refused["error"]["kind"], "invalid-request", "{refused}");
            let message = refused["error"]["message"].as_str().unwrap();
            assert!(message.contains(why), "{refused}");
            assert!(message.contains("idempotency_key "), "{refused}");
        }
    }
);

contract!(
    a_trapping_task_is_dead_after_every_attempt_with_each_error,
    |d| {
        let (code, task) = d.api().post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": "test.panic", "input": "boom" }),
        );
        assert_eq!(code, 201, "{task}");
        assert_eq!(task["status"], "dead", "{task}");
        assert_eq!(task["attempts"], 2, "{task}");
        assert_eq!(task["error"]["kind"], "trap", "{task}");
        let attempts = task["attempt_errors"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "{task}");
        for a in attempts {
            assert_eq!(a["agent"], "panic@0.1.0", "{task}");
            assert_eq!(a["kind"], "trap", "{task}");
        }
        let (_, listed) = d.api().get("/v1/tasks?status=dead&capability=test.panic");
        let ids: Vec<&Value> = listed["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["id"])
            .collect();
        assert_eq!(ids, vec![&task["id"]], "{listed}");
    }
);

contract!(
    a_plugin_with_reuse_serves_tasks_in_a_row_on_one_instance_until_one_fails,
    |d| {
        let tally = |input: &str| {
            let (code, task) = d.api().post(
                "/v1/tasks?wait=60s",
                &json!({ "capability": "test.tally", "input": input }),
            );
            assert_eq!(code, 201, "{task}");
            task
        };
        // One task at a time: each finds the instance the last one left.
        let served: Vec<Value> = (0..7).map(|_| tally("count")["result"].clone()).collect();
        assert_eq!(served, ["1", "2", "3", "1", "2", "3", "1"], "{served:?}");
        // A trap drops the instance (the retry gets a fresh one, which
        // traps too); the next task starts on a fresh instance.
        let trapped = tally("trap");
        assert_eq!(trapped["status"], "dead", "{trapped}");
        assert_eq!(trapped["error"]["kind"], "trap", "{trapped}");
        assert_eq!(tally("count")["result"], "1");
    }
);

contract!(a_cancelled_task_ends_cancelled_and_frees_its_slot, |d| {
    let runner = Watch::open(d.runner(), "capability=test.sleep");
    let submitter = Watch::open(d.api(), "capability=test.sleep");
    // The sleep plugin has one instance: this task holds it for 60 s, and
    // the next one waits in the queue behind it.
    let (code, long) = submit(d, json!({ "capability": "test.sleep", "input": "60000" }));
    assert_eq!(code, 201, "{long}");
    let long = long["id"].as_str().unwrap().to_string();
    let started = runner.until("started");
    assert_eq!(
        started.last().unwrap()["task"],
        long.as_str(),
        "{started:?}"
    );
    let (code, queued) = submit(d, json!({ "capability": "test.sleep", "input": "60000" }));
    assert_eq!(code, 201, "{queued}");
    let queued = queued["id"].as_str().unwrap().to_string();
    // Cancel the queued one, then the running one through the host that
    // runs it (in a cluster, a host's stream has only its own events).
    for (host, id) in [(d.api(), &queued), (d.runner(), &long)] {
        let (code, cancelled) = host.post(&format!("/v1/tasks/{id}/cancel"), &json!({}));
        assert_eq!(code, 200, "{cancelled}");
        assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
        assert_eq!(cancelled["error"]["kind"], "cancelled", "{cancelled}");
    }
    // The running attempt was stopped and its outcome fenced, after the
    // task's end: `cancelled`, then `fenced`.
    let fenced = runner.until("fenced");
    let of_long: Vec<&Value> = fenced
        .iter()
        .filter(|e| e["task"] == long.as_str())
        .map(|e| &e["kind"])
        .collect();
    assert_eq!(of_long, ["cancelled", "fenced"], "{fenced:?}");
    let ended = submitter.until("cancelled");
    assert!(ended.iter().any(|e| e["kind"] == "cancelled"));
    // The instance is free: a short task completes well within the long
    // one's 60 s (the sleep plugin may run for 120 s).
    let (_, short) = d.api().post(
        "/v1/tasks?wait=20s",
        &json!({ "capability": "test.sleep", "input": "1" }),
    );
    assert_eq!(short["status"], "completed", "{short}");
    // The queued one never started: the short task's events came after
    // every event of it, and none of them is its start.
    let after = runner.until("completed");
    let starts: Vec<&Value> = started
        .iter()
        .chain(fenced.iter())
        .chain(after.iter())
        .filter(|e| e["kind"] == "started" && e["task"] == queued.as_str())
        .collect();
    assert!(starts.is_empty(), "{starts:?}");
    // They stay cancelled, and cancelling an ended task changes nothing.
    assert_eq!(d.api().wait(&long)["status"], "cancelled");
    assert_eq!(d.api().wait(&queued)["status"], "cancelled");
    let (_, again) = d.api().post(
        &format!("/v1/tasks/{}/cancel", short["id"].as_str().unwrap()),
        &json!({}),
    );
    assert_eq!(again["status"], "completed", "{again}");
    let out = d
        .cli()
        .run(&["task", "cancel", "--api", &d.api().url, "tnosuchtask"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
});

// An attempt waiting in a host call stops as soon as the cancel reaches
// it, before the cancel's write of the task's end is durable: the host
// that took the cancel (and runs the task) still tells of the end first.
contract!(
    a_cancel_is_told_before_the_fenced_outcome_of_the_attempt_it_stops,
    |d| {
        let runner = Watch::open(d.runner(), "capability=test.nap-lean");
        for _ in 0..5 {
            let (code, task) = submit(
                d,
                json!({ "capability": "test.nap-lean", "input": "60000", "deadline": "90s" }),
            );
            assert_eq!(code, 201, "{task}");
            let id = task["id"].as_str().unwrap();
            let started = runner.until("started");
            assert_eq!(started.last().unwrap()["task"], id, "{started:?}");
            let (code, cancelled) = d
                .runner()
                .post(&format!("/v1/tasks/{id}/cancel"), &json!({}));
            assert_eq!(code, 200, "{cancelled}");
            assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
            let seen = runner.until("fenced");
            let kinds: Vec<&Value> = seen.iter().map(|e| &e["kind"]).collect();
            assert_eq!(kinds, ["cancelled", "fenced"], "{seen:?}");
            assert!(seen.iter().all(|e| e["task"] == id), "{seen:?}");
        }
    }
);

// A task cancelled while it waits in the scheduler of the host that is to
// run it (for the one engine slot, which a sleep holds; in a cluster that
// host has pulled it) had no attempt: nothing of it is fenced. (On a lone
// host the runner is the host that accepted it.)
contract!(
    a_task_cancelled_while_it_waits_for_a_slot_has_nothing_fenced,
    config = "instance_slots = 1",
    |d| {
        let runner = Watch::open(d.runner(), "");
        let (code, holder) = submit(d, json!({ "capability": "test.sleep", "input": "60000" }));
        assert_eq!(code, 201, "{holder}");
        let holder = holder["id"].as_str().unwrap().to_string();
        let started = runner.until("started");
        assert_eq!(started.last().unwrap()["task"], holder.as_str());
        let (code, waiting) = submit(d, json!({ "capability": "echo", "input": "x" }));
        assert_eq!(code, 201, "{waiting}");
        let waiting = waiting["id"].as_str().unwrap().to_string();
        d.runner()
            .until("the echo waits in the runner's scheduler", |h| {
                h.get("/v1/status").1["queues"]["echo"] == 1
            });
        for id in [&waiting, &holder] {
            let (code, cancelled) = d
                .runner()
                .post(&format!("/v1/tasks/{id}/cancel"), &json!({}));
            assert_eq!(cancelled["status"], "cancelled", "{code} {cancelled}");
        }
        // Everything of the cancelled echo comes before this task's end.
        let (_, after) = d.api().post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": "echo", "input": "after" }),
        );
        assert_eq!(after["status"], "completed", "{after}");
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|e: &Value| e["kind"] == "completed" && e["task"] == after["id"])
        {
            seen.extend(runner.until("completed"));
        }
        let of_waiting: Vec<&Value> = seen
            .iter()
            .filter(|e| e["task"] == waiting.as_str() && e["kind"] != "accepted")
            .map(|e| &e["kind"])
            .collect();
        assert_eq!(of_waiting, ["cancelled"], "{seen:?}");
        // The holder's attempt was running: its outcome is fenced.
        assert!(
            seen.iter()
                .any(|e| e["task"] == holder.as_str() && e["kind"] == "fenced"),
            "{seen:?}"
        );
    }
);

contract!(every_transition_is_one_event_with_the_tasks_figures, |d| {
    let submitter = Watch::open(d.api(), "capability=echo");
    let runner = Watch::open(d.runner(), "capability=echo");
    let (code, task) = d.api().post(
        "/v1/tasks?wait=60s",
        &json!({ "capability": "echo", "input": "hello" }),
    );
    assert_eq!(code, 201, "{task}");
    let accepted = submitter.until("accepted");
    let accepted = accepted.last().unwrap();
    assert_eq!(accepted["task"], task["id"]);
    assert_eq!(accepted["tenant"], "default");
    assert_eq!(accepted["principal"], "anonymous");
    let ran = runner.until("completed");
    let kinds: Vec<&str> = ran
        .iter()
        .filter(|e| e["task"] == task["id"])
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    let expected: &[&str] = if d.hosts.len() == 1 {
        &["accepted", "started", "completed"]
    } else {
        &["started", "completed"]
    };
    assert_eq!(kinds, expected, "{ran:?}");
    // Every event of the task says when it was submitted, also where it
    // runs on a host it was not submitted through.
    for event in ran.iter().filter(|e| e["task"] == task["id"]) {
        assert_eq!(event["submitted_at_ms"], task["submitted_at_ms"], "{event}");
    }
    let completed = ran.last().unwrap();
    assert_eq!(completed["agent"], "echo@0.1.0");
    assert_eq!(completed["attempt"], 1);
    assert_eq!(completed["fuel_used"], task["fuel_used"]);
    assert!(completed["host"].as_str().is_some(), "{completed}");
    // A task that traps on every attempt: retried, then dead.
    let runner = Watch::open(d.runner(), "capability=test.panic");
    let (_, dead) = d.api().post(
        "/v1/tasks?wait=60s",
        &json!({ "capability": "test.panic", "input": "boom" }),
    );
    assert_eq!(dead["status"], "dead", "{dead}");
    let ran = runner.until("dead");
    let kinds: Vec<(&str, u64)> = ran
        .iter()
        .filter(|e| e["task"] == dead["id"])
        .map(|e| (e["kind"].as_str().unwrap(), e["attempt"].as_u64().unwrap()))
        .collect();
    let mut expected = vec![("started", 1), ("retried", 1), ("started", 2), ("dead", 2)];
    if d.hosts.len() == 1 {
        expected.insert(0, ("accepted", 0));
    }
    assert_eq!(kinds, expected, "{ran:?}");
    assert_eq!(ran.last().unwrap()["error"], "trap");
    for event in ran.iter().filter(|e| e["task"] == dead["id"]) {
        assert_eq!(event["submitted_at_ms"], dead["submitted_at_ms"], "{event}");
        // The wait in the scheduler is the first attempt's alone (a
        // cluster's retry, a new delivery, carried one too).
        let first_start = event["kind"] == "started" && event["attempt"] == 1;
        assert_eq!(event["waited_us"].is_u64(), first_start, "{event}");
    }
});

contract!(listing_filters_by_status_and_capability, |d| {
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, t) = d.api().post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": "echo", "input": format!("{i}") }),
        );
        assert_eq!(t["status"], "completed", "{t}");
        ids.push(t["id"].clone());
    }
    let (_, failed) = d.api().post(
        "/v1/tasks?wait=60s",
        &json!({ "capability": "test.sleep", "input": "not a number" }),
    );
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["kind"], "invalid-input", "{failed}");
    let (_, listed) = d.api().get("/v1/tasks?status=completed&capability=echo");
    let listed: Vec<Value> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].clone())
        .collect();
    ids.reverse();
    assert_eq!(listed, ids, "newest first");
    let (_, listed) = d.api().get("/v1/tasks?status=failed");
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 1, "{listed}");
    let (_, listed) = d.api().get("/v1/tasks?limit=2");
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 2, "{listed}");
    // A query that does not parse is the API's JSON error, like any other.
    // So is a key the endpoint does not take, on every endpoint.
    let one = format!("/v1/tasks/{}?bogus=1", ids[0].as_str().unwrap());
    for bad in [
        "/v1/tasks?status=finished",
        "/v1/tasks?limit=abc",
        "/v1/tasks?bogus=1",
        "/v1/tasks?capability=*",
        "/v1/tasks?capability=echo.%3E",
        "/v1/tasks?capability=a%20b",
        &one,
        "/v1/events?bogus=1",
        "/v1/runs?bogus=1",
    ] {
        let (code, refused) = d.api().get(bad);
        assert_eq!(code, 400, "{bad}: {refused}");
        assert_eq!(
            refused["error"]["kind"], "invalid-request",
            "{bad}: {refused}"
        );
    }
});

contract!(an_unknown_task_id_is_404_in_any_form, |d| {
    for id in ["t01nosuchtask", "not a valid id", "x.y.z"] {
        let url = format!("/v1/tasks/{}", id.replace(' ', "%20"));
        let (code, body) = d.api().get(&url);
        assert_eq!(code, 404, "{id}: {body}");
        assert_eq!(body["error"]["kind"], "not-found", "{body}");
    }
    // An id no task can have is 404 at once, also when asked to wait (the
    // bound is far below the 60 s asked for).
    let started = std::time::Instant::now();
    let (code, body) = d.api().get("/v1/tasks/not%20an%20id?wait=60s");
    assert_eq!(code, 404, "{body}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // An id that is not UTF-8 once decoded is a malformed request, in the
    // API's JSON error form like every other.
    for url in ["/v1/tasks/%FF%FE", "/v1/tasks/%FF/cancel", "/v1/runs/%C3"] {
        let (code, body) = if url.ends_with("cancel") {
            d.api().post(url, &json!({}))
        } else {
            d.api().get(url)
        };
        assert_eq!(code, 400, "{url}: {body}");
        assert_eq!(body["error"]["kind"], "invalid-request", "{url}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains("UTF-8"),
            "{url}: {body}"
        );
    }
});

contract!(
    waiting_requests_past_max_waits_are_429,
    config = "max_waits = 1",
    |d| {
        let (code, long) = submit(d, json!({ "capability": "test.sleep", "input": "60000" }));
        assert_eq!(code, 201, "{long}");
        let id = long["id"].as_str().unwrap().to_string();
        // One request waits (at the bound): it holds the one place until the
        // task ends.
        let url = d.api().url.clone();
        let waiter = std::thread::spawn(move || loop {
            let mut r = HostProc::agent()
                .get(&format!("{url}/v1/tasks/{id}?wait=60s"))
                .call()
                .unwrap();
            let code = r.status().as_u16();
            // Refused only while a probe below held the place for 1 ms.
            if code != 429 {
                return (code, r.body_mut().read_to_string().unwrap());
            }
        });
        // Past the bound: refused once the waiter waits. Until then each
        // probe is itself a wait of 1 ms.
        let probe = format!("/v1/tasks/{}?wait=1ms", long["id"].as_str().unwrap());
        let mut refused = Value::Null;
        d.api().until("the waiter holds the one place", |h| {
            let (code, body) = h.get(&probe);
            assert!(code == 200 || code == 429, "{body}");
            refused = body;
            code == 429
        });
        assert_eq!(refused["error"]["kind"], "no-capacity", "{refused}");
        assert!(
            refused["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1 requests wait"),
            "{refused}"
        );
        // A request without a wait is not one.
        let (code, _) = d
            .api()
            .get(&format!("/v1/tasks/{}", long["id"].as_str().unwrap()));
        assert_eq!(code, 200);
        // The waiter is answered when the task ends.
        let (_, t) = d.api().post(
            &format!("/v1/tasks/{}/cancel", long["id"].as_str().unwrap()),
            &json!({}),
        );
        assert_eq!(t["status"], "cancelled", "{t}");
        let (code, body) = waiter.join().unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("cancelled"), "{body}");
    }
);

contract!(
    a_payload_of_16_mib_is_accepted_and_one_byte_more_is_413,
    |d| {
        let limit = 16usize << 20;
        let task = crate::common::payload_limit_pair(d.api(), "echo", limit);
        assert_eq!(task["payload_bytes"], limit, "{task}");
        let id = task["id"].as_str().unwrap();
        let done = d.api().wait(id);
        assert_eq!(done["status"], "completed", "{}", done["error"]);
        let result = done["result_base64"].as_str().unwrap();
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(result)
            .unwrap();
        assert_eq!(bytes, vec![0xffu8; limit]);
    }
);

contract!(
    a_text_payload_of_16_mib_whose_json_escapes_double_it_goes_through_the_cli,
    |d| {
        let limit = 16usize << 20;
        // As JSON text, 32 MiB: past the request body's limit (about 21.4
        // MiB). The CLI sends such text as base64, so it is taken whole.
        let text = "\n".repeat(limit);
        let file = d.cli().home.path().join("lines.txt");
        std::fs::write(&file, &text).unwrap();
        let out = d.cli().run(&[
            "task",
            "submit",
            "--api",
            &d.api().url,
            "--capability",
            "echo",
            "--input",
            file.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let id = crate::common::stdout(&out).trim().to_string();
        let done = d.api().wait(&id);
        assert_eq!(done["status"], "completed", "{}", done["error"]);
        assert_eq!(done["payload_bytes"], limit, "{}", done["error"]);
        assert_eq!(done["result"].as_str().map(str::len), Some(limit));
    }
);

contract!(
    a_body_far_past_the_limit_is_refused_through_the_cli_with_exit_3,
    |d| {
        // The host answers 413 before it has read such a body and closes
        // the connection, so the CLI may see a broken pipe instead of the
        // answer: either way it is a refusal, exit 3, not "cannot reach".
        let big = d.cli().home.path().join("big.bin");
        std::fs::write(&big, vec![b'a'; 40 << 20]).unwrap();
        let lines = d.cli().home.path().join("big.jsonl");
        let line = json!({ "capability": "echo", "input": "a".repeat(1 << 20) }).to_string();
        std::fs::write(&lines, vec![line; 24].join("\n")).unwrap();
        for (flag, file) in [("--input", &big), ("--batch", &lines)] {
            let mut args = vec![
                "task",
                "submit",
                "--api",
                &d.api().url,
                flag,
                file.to_str().unwrap(),
            ];
            if flag == "--input" {
                args.extend(["--capability", "echo"]);
            }
            let out = d.cli().run(&args);
            assert_eq!(out.status.code(), Some(3), "{flag}: {}", stderr(&out));
            assert!(stderr(&out).contains("past"), "{flag}: {}", stderr(&out));
        }
        // The host still serves.
        let id = d.api().submit("echo", "still here");
        assert_eq!(d.api().wait(&id)["result"], "still here");
    }
);

contract!(unknown_endpoints_and_methods_answer_a_json_error, |d| {
    let (code, body) = d.api().get("/v1/no-such-thing");
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["kind"], "not-found", "{body}");
    let (code, body) = d.api().post("/v1/status", &json!({}));
    assert_eq!(code, 405, "{body}");
    assert_eq!(body["error"]["kind"], "invalid-request", "{body}");
});

contract!(
    past_max_unfinished_a_submission_is_429_and_a_keyed_retry_gets_its_task,
    config = "max_unfinished = 2",
    |d| {
        // Two tasks that do not end by themselves for 120 s: the limit.
        let mut ids = Vec::new();
        for key in ["a", "b"] {
            let (code, t) = submit(
                d,
                json!({ "capability": "test.sleep", "input": "60000", "idempotency_key": key }),
            );
            assert_eq!(code, 201, "{t}");
            ids.push(t["id"].as_str().unwrap().to_string());
        }
        let (code, refused) = submit(d, json!({ "capability": "echo", "input": "x" }));
        assert_eq!(code, 429, "{refused}");
        assert_eq!(refused["error"]["kind"], "no-capacity", "{refused}");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains("max_unfinished"), "{message}");
        // A retry of an accepted task is not new work.
        let (code, again) = submit(
            d,
            json!({ "capability": "test.sleep", "input": "60000", "idempotency_key": "a" }),
        );
        assert_eq!(code, 200, "{again}");
        assert_eq!(again["id"], ids[0].as_str());
        let out = d.cli().run(&[
            "task",
            "submit",
            "--api",
            &d.api().url,
            "--capability",
            "echo",
        ]);
        assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
        // Ended tasks free their room.
        for id in &ids {
            let (_, t) = d.api().post(&format!("/v1/tasks/{id}/cancel"), &json!({}));
            assert_eq!(t["status"], "cancelled", "{t}");
        }
        let (code, t) = d.api().post(
            "/v1/tasks?wait=30s",
            &json!({ "capability": "echo", "input": "room" }),
        );
        assert_eq!(code, 201, "{t}");
        assert_eq!(t["result"], "room", "{t}");
    }
);

contract!(watching_a_task_ends_when_the_task_has_ended, |d| {
    let (_, task) = d.api().post(
        "/v1/tasks?wait=60s",
        &json!({ "capability": "echo", "input": "done" }),
    );
    assert_eq!(task["status"], "completed", "{task}");
    // Ended before the watch began: it ends at once, in both modes (in a
    // cluster the run's events were on the other host).
    let out = d.cli().run(&[
        "task",
        "watch",
        "--api",
        &d.api().url,
        "--task",
        task["id"].as_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Its end, from the task's record: the event was not on this stream.
    let out = crate::common::stdout(&out);
    let last: Value = serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(last["kind"], "completed", "{out}");
    assert_eq!(last["task"], task["id"], "{out}");
    assert_eq!(last["agent"], "echo@0.1.0", "{out}");
});

/// POSTs JSON lines to `/v1/tasks:batch` and returns the status and the
/// answer's lines.
fn batch(d: &Deployment, query: &str, lines: &[String]) -> (u16, Vec<Value>) {
    batch_bytes(d, query, lines.join("\n").into_bytes())
}

fn batch_bytes(d: &Deployment, query: &str, body: Vec<u8>) -> (u16, Vec<Value>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut response = agent
        .post(&format!("{}/v1/tasks:batch{query}", d.api().url))
        .header("content-type", "application/x-ndjson")
        .send(&body[..])
        .unwrap();
    let code = response.status().as_u16();
    let text = response
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap();
    let answers = if code == 200 {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    } else {
        vec![serde_json::from_str(&text).unwrap()]
    };
    (code, answers)
}

// A batch with one idempotency key on two lines: both lines answer with
// the task once it has ended, the second as `existing`. (On a lone host the
// second line's wait could come between the first's journal commit and
// its tracking, and answered `queued` at once: 2 in 20 batches.)
contract!(
    a_batch_with_a_key_on_two_lines_answers_both_when_the_task_ends,
    |d| {
        for i in 0..40 {
            let key = format!("twice-{i}");
            let lines = vec![
                json!({ "capability": "echo", "input": "a" }).to_string(),
                json!({ "capability": "echo", "input": "b", "idempotency_key": key }).to_string(),
                json!({ "capability": "echo", "input": "c", "idempotency_key": key }).to_string(),
            ];
            let (code, answers) = batch(d, "?wait=60s", &lines);
            assert_eq!(code, 200, "{answers:?}");
            assert_eq!(answers.len(), 3, "{answers:?}");
            let keyed: Vec<&Value> = answers.iter().filter(|a| a["index"] != 0).collect();
            for a in answers.iter() {
                assert_eq!(a["task"]["status"], "completed", "batch {i}: {answers:?}");
            }
            assert_eq!(
                keyed[0]["task"]["id"], keyed[1]["task"]["id"],
                "{answers:?}"
            );
            let existing: Vec<bool> = keyed
                .iter()
                .map(|a| a["existing"].as_bool().unwrap())
                .collect();
            assert!(
                existing.contains(&true) && existing.contains(&false),
                "{answers:?}"
            );
        }
    }
);

/// `orch task submit --batch FILE --wait` of `lines`.
fn cli_batch_wait(d: &Deployment, lines: &[String]) -> std::process::Output {
    let file = d.cli().home.path().join("batch.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    d.cli().run(&[
        "task",
        "submit",
        "--api",
        &d.api().url,
        "--batch",
        file.to_str().unwrap(),
        "--wait",
    ])
}

contract!(
    a_batch_answers_every_line_and_streams_results_as_tasks_end,
    |d| {
        let lines = vec![
            json!({ "capability": "echo", "input": "a" }).to_string(),
            json!({ "capability": "no.such", "input": "x" }).to_string(),
            String::new(),
            json!({ "capability": "echo", "input": "b", "priority": 3 }).to_string(),
            "{not json".to_string(),
        ];
        // A batch of no task is refused.
        let (code, answers) = batch(d, "", &[String::new(), " ".into()]);
        assert_eq!(code, 400, "{answers:?}");
        assert_eq!(answers[0]["error"]["kind"], "invalid-request");
        // Without wait: one answer per non-blank line, in the batch's order.
        let (code, answers) = batch(d, "", &lines);
        assert_eq!(code, 200);
        // A line that is not UTF-8 is refused alone, like one that is not
        // JSON.
        let mut body = lines[0].clone().into_bytes();
        body.extend_from_slice(b"\n{\"capability\": \"echo\", \"input\": \"\xff\xfe\"}\n");
        body.extend_from_slice(lines[3].as_bytes());
        let (code, mixed) = batch_bytes(d, "", body);
        assert_eq!(code, 200, "{mixed:?}");
        assert_eq!(mixed.len(), 3, "{mixed:?}");
        assert_eq!(mixed[0]["task"]["capability"], "echo", "{mixed:?}");
        assert_eq!(mixed[1]["error"]["kind"], "invalid-request", "{mixed:?}");
        let message = mixed[1]["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("line 2: not UTF-8"), "{message}");
        assert_eq!(mixed[2]["task"]["priority"], 3, "{mixed:?}");
        // A line of JSON that is not an object, even one whose elements
        // would fill the fields in order, says what a task is.
        let (code, arrays) = batch(d, "", &["[]".to_string(), r#"["echo", "hi"]"#.to_string()]);
        assert_eq!(code, 200, "{arrays:?}");
        for (i, answer) in arrays.iter().enumerate() {
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("line {}: expected a task: a JSON object", i + 1)),
                "{message}"
            );
        }
        let indexes: Vec<u64> = answers
            .iter()
            .map(|a| a["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, [0, 1, 2, 3]);
        assert_eq!(answers[0]["task"]["capability"], "echo", "{}", answers[0]);
        assert_eq!(answers[1]["code"], 400);
        assert_eq!(answers[1]["error"]["kind"], "unknown-capability");
        assert_eq!(answers[2]["task"]["priority"], 3);
        assert_eq!(answers[3]["error"]["kind"], "invalid-request");
        assert!(answers[3]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 5:"));
        for a in [&answers[0], &answers[2]] {
            let id = a["task"]["id"].as_str().unwrap();
            assert_eq!(d.api().wait(id)["status"], "completed");
        }
        // With wait: every line answered once, tasks with their results.
        let (code, answers) = batch(d, "?wait=60s", &lines);
        assert_eq!(code, 200);
        let mut by_index: Vec<(u64, Value)> = answers
            .into_iter()
            .map(|a| (a["index"].as_u64().unwrap(), a))
            .collect();
        by_index.sort_by_key(|(i, _)| *i);
        assert_eq!(by_index.len(), 4);
        assert_eq!(by_index[0].1["task"]["result"], "a", "{}", by_index[0].1);
        assert_eq!(by_index[2].1["task"]["result"], "b", "{}", by_index[2].1);
        assert_eq!(by_index[1].1["error"]["kind"], "unknown-capability");
        // The CLI prints every line and exits with the first failure's code.
        let out = cli_batch_wait(d, &lines);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert_eq!(crate::common::stdout(&out).lines().count(), 4);
    }
);

contract!(
    a_waited_batch_exits_with_the_code_of_its_first_failing_line_in_the_files_order,
    |d| {
        // The first line's task traps on every attempt (exit 5) and ends
        // after its retries; the second is refused at once (exit 3), so its
        // answer comes first.
        let lines = [
            json!({ "capability": "test.panic", "input": "boom" }).to_string(),
            json!({ "capability": "no.such", "input": "x" }).to_string(),
        ];
        let out = cli_batch_wait(d, &lines);
        let printed: Vec<Value> = crate::common::stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(printed.len(), 2, "{printed:?}");
        assert_eq!(printed[0]["index"], 1, "answered first: {printed:?}");
        assert_eq!(printed[1]["task"]["status"], "dead", "{printed:?}");
        assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    }
);

contract!(
    a_batch_of_10000_lines_is_answered_and_one_more_is_refused,
    |d| {
        let line = json!({ "capability": "no.such" }).to_string();
        let (code, answers) = batch(d, "", &vec![line.clone(); 10_000]);
        assert_eq!(code, 200);
        assert_eq!(answers.len(), 10_000);
        assert!(answers.iter().all(|a| a["code"] == 400));
        let (code, answers) = batch(d, "", &vec![line; 10_001]);
        assert_eq!(code, 400, "{:?}", answers);
        assert_eq!(answers[0]["error"]["kind"], "invalid-request");
        assert!(answers[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 10000 tasks; this one has 10001"));
    }
);
