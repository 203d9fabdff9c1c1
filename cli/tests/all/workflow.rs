//! Workflows on real hosts with real agents: each case runs against a lone
//! host and against a 2-host cluster over a real nats-server (runs are
//! started and driven on host A, which serves no plugin; their tasks run on
//! host B), with the same assertions.
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::common::{p, HostProc, NatsServer, Orch};

pub struct Deployment {
    _nats: Option<NatsServer>,
    _homes: Vec<Orch>,
    hosts: Vec<HostProc>,
}

#[derive(Clone, Copy)]
pub enum Mode {
    Lone,
    Cluster,
}

const CONFIG: &str = "[host]\nmax_attempts = 1\n[limits]\nmax_fuel = 1000000000000\n";

/// echo, flaky and kvtool with their manifests, and sleep with room for
/// four 10 s spins at once.
fn install(orch: &Orch) {
    orch.config(CONFIG);
    for plugin in ["echo", "flaky", "kvtool"] {
        orch.ok(&["plugin", "install", "-y", &p(plugin)]);
    }
    crate::common::install_fixture(
        orch,
        "sleep",
        "test.sleep",
        "[limits]\nmax_instances = 4\nfuel = 1000000000000\ntimeout = \"20s\"\n",
    );
}

impl Deployment {
    /// With more plugins (installed with their manifests) on the runner.
    pub fn with(mode: Mode, extra: &[&str]) -> Deployment {
        let install = |orch: &Orch| {
            install(orch);
            for plugin in extra {
                orch.ok(&["plugin", "install", "-y", &p(plugin)]);
            }
        };
        match mode {
            Mode::Lone => {
                let orch = Orch::new();
                install(&orch);
                let host = HostProc::start(&orch);
                Deployment {
                    _nats: None,
                    _homes: vec![orch],
                    hosts: vec![host],
                }
            }
            Mode::Cluster => {
                let nats = NatsServer::start();
                let a = Orch::new();
                a.config(CONFIG);
                let b = Orch::new();
                install(&b);
                let hb = HostProc::start_with(&b, &["--nats", nats.url.as_str()]);
                let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
                crate::common::until_serving(&ha, "test.sleep", 1);
                Deployment {
                    _nats: Some(nats),
                    _homes: vec![a, b],
                    hosts: vec![ha, hb],
                }
            }
        }
    }

    /// Where runs are started (and driven).
    pub fn api(&self) -> &HostProc {
        &self.hosts[0]
    }

    /// Where their tasks run.
    pub fn runner(&self) -> &HostProc {
        self.hosts.last().unwrap()
    }
}

/// Registers a TOML definition; the API's status and answer.
pub fn register(host: &HostProc, toml: &str) -> (u16, Value) {
    let mut r = HostProc::agent()
        .post(&format!("{}/v1/workflows", host.url))
        .header("content-type", "application/toml")
        .send(toml)
        .unwrap();
    let code = r.status().as_u16();
    (
        code,
        serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap(),
    )
}

fn registered(host: &HostProc, toml: &str) {
    let (code, answer) = register(host, toml);
    assert_eq!(code, 201, "{answer}");
}

/// Starts a run; waits for its end when `wait`.
pub fn start(host: &HostProc, name: &str, body: Value, wait: bool) -> Value {
    let path = if wait {
        format!("/v1/workflows/{name}/runs?wait=60s")
    } else {
        format!("/v1/workflows/{name}/runs")
    };
    let (code, run) = host.post(&path, &body);
    assert_eq!(code, 201, "{run}");
    run
}

pub fn wait_run(host: &HostProc, id: &str) -> Value {
    let (code, run) = host.get(&format!("/v1/runs/{id}?wait=60s"));
    assert_eq!(code, 200, "{run}");
    assert!(
        run["status"] != "running" && run["status"] != "compensating",
        "{run}"
    );
    run
}

pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {run}"))
}

fn ms(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a time: {v}"))
}

/// Task events of a host, read on a thread.
pub struct Events {
    rx: mpsc::Receiver<Value>,
}

impl Events {
    /// Connected when this returns: every later event is seen.
    pub fn open(host: &HostProc, query: &str) -> Events {
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
        Events { rx }
    }

    /// The next event of `kind`, bounded in time.
    pub fn next(&self, kind: &str) -> Value {
        self.next_of(&[kind])
    }

    /// The next event of any of `kinds`, bounded in time.
    pub fn next_of(&self, kinds: &[&str]) -> Value {
        loop {
            let event = self
                .rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no {kinds:?} event"));
            if kinds.iter().any(|k| event["kind"] == *k) {
                return event;
            }
        }
    }
}

macro_rules! both {
    ($name:ident, $body:expr) => {
        both!($name, plugins = [], $body);
    };
    ($name:ident, plugins = [$($plugin:expr),*], $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn lone() {
                let case: fn(&Deployment) = $body;
                case(&Deployment::with(Mode::Lone, &[$($plugin),*]));
            }
            #[test]
            fn cluster() {
                let case: fn(&Deployment) = $body;
                case(&Deployment::with(Mode::Cluster, &[$($plugin),*]));
            }
        }
    };
}

both!(
    independent_steps_run_at_once_and_a_join_waits_for_both,
    plugins = ["nap"],
    |d| {
        // Steps that wait in a host call, not spin: on two busy cores two
        // spinning steps can run at once and still take twice as long.
        registered(
            d.api(),
            r#"
name = "par"
version = 1
[[steps]]
id = "a"
capability = "test.nap"
input = "1000"
[[steps]]
id = "b"
capability = "test.nap"
input = "1000"
[[steps]]
id = "join"
capability = "echo"
after = ["a", "b"]
input = { a = "${steps.a}", b = "${steps.b}" }
"#,
        );
        let run = start(d.api(), "par", json!({}), true);
        assert_eq!(run["status"], "completed", "{run}");
        let (a, b, join) = (step(&run, "a"), step(&run, "b"), step(&run, "join"));
        // Each waited 1 s; together they took well under 2 s.
        let first = ms(&a["started_at_ms"]).min(ms(&b["started_at_ms"]));
        let last = ms(&a["ended_at_ms"]).max(ms(&b["ended_at_ms"]));
        assert!(
            last - first < 1800,
            "a and b took {} ms together: {run}",
            last - first
        );
        assert!(ms(&a["started_at_ms"]) < ms(&b["ended_at_ms"]), "{run}");
        assert!(ms(&b["started_at_ms"]) < ms(&a["ended_at_ms"]), "{run}");
        assert!(ms(&join["started_at_ms"]) >= last, "{run}");
        // The join's input was built from both results (the ms waited, as JSON).
        assert!(join["result"]["a"].as_u64().unwrap() >= 1000, "{run}");
        assert!(join["result"]["b"].as_u64().unwrap() >= 1000, "{run}");
    }
);

both!(a_run_needs_no_body_but_a_body_must_be_json, |d| {
    registered(
        d.api(),
        "name = \"nobody\"\nversion = 1\n[[steps]]\nid = \"a\"\ncapability = \"echo\"\n",
    );
    let post = |body: &str, content_type: Option<&str>| {
        let mut req = HostProc::agent().post(&format!(
            "{}/v1/workflows/nobody/runs?wait=30s",
            d.api().url
        ));
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let mut r = req.send(body.to_string()).unwrap();
        let code = r.status().as_u16();
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        (code, v)
    };
    // No body, and no content type: every field takes its default.
    let (code, run) = post("", None);
    assert_eq!(code, 201, "{run}");
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["input"], Value::Null, "{run}");
    // JSON without its content type is read as JSON.
    let (code, run) = post(r#"{"input": {"n": 1}}"#, None);
    assert_eq!(code, 201, "{run}");
    assert_eq!(run["input"], json!({"n": 1}), "{run}");
    // A body that is not the JSON object is refused, naming why.
    let (code, refused) = post("input=1", Some("application/x-www-form-urlencoded"));
    assert_eq!(code, 400, "{refused}");
    assert_eq!(refused["error"]["kind"], "invalid-request", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the body: "),
        "{refused}"
    );
});

both!(an_unknown_workflow_or_run_is_404_in_any_form, |d| {
    for name in ["nosuch", "a%20b", "a.%3E", "%2A"] {
        for (code, body) in [
            d.api().get(&format!("/v1/workflows/{name}")),
            d.api()
                .post(&format!("/v1/workflows/{name}/runs"), &json!({})),
        ] {
            assert_eq!(code, 404, "{name}: {body}");
            assert_eq!(body["error"]["kind"], "not-found", "{name}: {body}");
        }
    }
    for id in ["01nosuchrun", "a%20b", "a.%3E", "%2A"] {
        for (code, body) in [
            d.api().get(&format!("/v1/runs/{id}")),
            d.api().post(&format!("/v1/runs/{id}/cancel"), &json!({})),
        ] {
            assert_eq!(code, 404, "{id}: {body}");
            assert_eq!(body["error"]["kind"], "not-found", "{id}: {body}");
        }
    }
});

both!(
    a_new_run_is_stored_with_its_first_steps_already_started,
    |d| {
        registered(
            d.api(),
            r#"
name = "first"
version = 1
[[steps]]
id = "a"
capability = "test.sleep"
input = "1000"
[[steps]]
id = "b"
capability = "echo"
after = ["a"]
input = "${steps.a}"
"#,
        );
        // The record that creates the run says that `a` started (one
        // write, not two, before its task); `b` waits for it.
        let run = start(d.api(), "first", json!({}), false);
        let (a, b) = (step(&run, "a"), step(&run, "b"));
        assert_eq!(a["status"], "running", "{run}");
        assert_eq!(a["input"], json!("1000"), "{run}");
        // Its first attempt counts from its start, not from its end.
        assert_eq!(a["attempts"], 1, "{run}");
        assert_eq!(step(&run, "b")["attempts"], 0, "{run}");
        assert!(
            ms(&a["started_at_ms"]) >= ms(&run["created_at_ms"]),
            "{run}"
        );
        assert_eq!(b["status"], "pending", "{run}");
        let id = run["id"].as_str().unwrap();
        let (code, stored) = d.api().get(&format!("/v1/runs/{id}"));
        assert_eq!(code, 200, "{stored}");
        assert_eq!(step(&stored, "a")["status"], "running", "{stored}");
        assert_eq!(step(&stored, "a")["attempts"], 1, "{stored}");
        let done = wait_run(d.api(), id);
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(step(&done, "a")["attempts"], 1, "{done}");
        assert_eq!(
            step(&done, "b")["result"],
            step(&done, "a")["result"],
            "{done}"
        );
    }
);

both!(
    a_fan_out_keeps_the_order_and_never_runs_more_than_its_cap,
    |d| {
        registered(
            d.api(),
            r#"
name = "fan"
version = 1
[[steps]]
id = "each"
capability = "echo"
for_each = "${input/list}"
concurrency = 5
input = { n = "${item}", of = "${input/name}" }
"#,
        );
        let list: Vec<u64> = (0..200).collect();
        let run = start(
            d.api(),
            "fan",
            json!({ "input": { "list": list, "name": "x" } }),
            true,
        );
        assert_eq!(run["status"], "completed", "{run}");
        let each = step(&run, "each");
        assert_eq!(each["elements"], 200);
        let expected: Vec<Value> = (0..200).map(|n| json!({ "n": n, "of": "x" })).collect();
        assert_eq!(each["result"], Value::Array(expected));
        // 200 tasks, never more than 5 between their submission and their
        // end (the driver submits an element after it saw another's end,
        // so at equal milliseconds an end comes first).
        let (_, tasks) = d.api().get("/v1/tasks?capability=echo&limit=1000");
        let prefix = format!("wf/{}/each/", run["id"].as_str().unwrap());
        let mut edges: Vec<(u64, i64)> = Vec::new();
        for t in tasks["tasks"].as_array().unwrap() {
            if t["idempotency_key"]
                .as_str()
                .is_some_and(|k| k.starts_with(&prefix))
            {
                edges.push((ms(&t["submitted_at_ms"]), 1));
                edges.push((ms(&t["finished_at_ms"]), -1));
            }
        }
        assert_eq!(edges.len(), 400, "{tasks}");
        edges.sort();
        let (mut open, mut most) = (0i64, 0i64);
        for (_, delta) in edges {
            open += delta;
            most = most.max(open);
        }
        assert!(most <= 5, "{most} elements ran at once, past the cap of 5");
        assert!(most >= 2, "the elements ran one at a time");
    }
);

both!(
    conditions_skip_steps_and_if_skipped_decides_for_dependants,
    |d| {
        registered(
            d.api(),
            r#"
name = "cond"
version = 1
[[steps]]
id = "check"
capability = "echo"
input = { ok = "${input/go}" }
[[steps]]
id = "yes"
capability = "echo"
after = ["check"]
input = "yes"
when = { value = "${steps.check/ok}" }
[[steps]]
id = "no"
capability = "echo"
after = ["check"]
input = "no"
when = { value = "${steps.check/ok}", equals = false }
[[steps]]
id = "after_yes"
capability = "echo"
after = ["yes"]
input = "after"
[[steps]]
id = "always"
capability = "echo"
after = ["yes"]
if_skipped = "run"
input = "always"
"#,
        );
        let statuses = |run: &Value| -> Vec<String> {
            ["yes", "no", "after_yes", "always"]
                .iter()
                .map(|s| step(run, s)["status"].as_str().unwrap().to_string())
                .collect()
        };
        let run = start(d.api(), "cond", json!({ "input": { "go": true } }), true);
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(
            statuses(&run),
            ["completed", "skipped", "completed", "completed"]
        );
        let run = start(d.api(), "cond", json!({ "input": { "go": false } }), true);
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(
            statuses(&run),
            ["skipped", "completed", "skipped", "completed"]
        );
    }
);

both!(
    compensations_run_in_the_reverse_of_completion_order_in_a_diamond,
    |d| {
        // Each compensation is a `recover` call of flaky on one kv counter:
        // its result is its call number, so the results give the order.
        registered(
            d.api(),
            r#"
name = "diamond"
version = 1
[[steps]]
id = "a"
capability = "test.kv"
input = "set a 1"
compensate = { capability = "test.flaky", input = "recover undo 0" }
[[steps]]
id = "b"
capability = "test.sleep"
after = ["a"]
input = "30"
compensate = { capability = "test.flaky", input = "recover undo 0" }
[[steps]]
id = "c"
capability = "test.kv"
after = ["a"]
input = "set c 1"
compensate = { capability = "test.flaky", input = "recover undo 0" }
[[steps]]
id = "d"
capability = "test.flaky"
after = ["b", "c"]
input = "fail"
"#,
        );
        let run = start(d.api(), "diamond", json!({}), true);
        assert_eq!(run["status"], "compensated", "{run}");
        assert_eq!(run["error"]["step"], "d", "{run}");
        assert_eq!(step(&run, "d")["status"], "failed");
        let mut by_completion: Vec<&Value> =
            ["a", "b", "c"].iter().map(|s| step(&run, s)).collect();
        by_completion.sort_by_key(|s| std::cmp::Reverse(s["completed_order"].as_u64().unwrap()));
        let calls: Vec<String> = by_completion
            .iter()
            .map(|s| {
                let c = &s["compensation"];
                assert_eq!(c["status"], "completed", "{run}");
                let task = d.api().wait(c["task_id"].as_str().unwrap());
                task["result"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(calls, ["1", "2", "3"], "undo order by completion: {run}");
        assert_eq!(
            by_completion[2]["id"], "a",
            "a completed first, so is undone last"
        );
    }
);

both!(
    a_failing_compensation_leaves_the_run_compensation_failed,
    |d| {
        registered(
            d.api(),
            r#"
name = "undo-fails"
version = 1
[[steps]]
id = "a"
capability = "echo"
input = "a"
compensate = { capability = "echo" }
[[steps]]
id = "b"
capability = "echo"
after = ["a"]
input = "b"
compensate = { capability = "test.flaky", input = "fail", retry = { attempts = 2, backoff = "10ms" } }
[[steps]]
id = "c"
capability = "test.flaky"
after = ["b"]
input = "fail"
"#,
        );
        let run = start(d.api(), "undo-fails", json!({}), true);
        assert_eq!(run["status"], "compensation-failed", "{run}");
        assert_eq!(step(&run, "a")["compensation"]["status"], "completed");
        let b = &step(&run, "b")["compensation"];
        assert_eq!(b["status"], "failed", "{run}");
        assert_eq!(b["attempts"], 2, "{run}");
        let message = run["error"]["message"].as_str().unwrap();
        // The lists, why b's compensation failed, and why the undoing began.
        assert!(
            message.starts_with(
                "undone: [a]; not undone: [b]; compensation of b: retryable failure: asked to fail; "
            ) && message.ends_with("asked to fail")
                && message.matches("asked to fail").count() == 2,
            "{run}"
        );
        assert_eq!(run["error"]["step"], "c", "{run}");
        // The default compensation input: the step's input and result.
        let a_undo = d
            .api()
            .wait(step(&run, "a")["compensation"]["task_id"].as_str().unwrap());
        let input: Value = serde_json::from_str(a_undo["result"].as_str().unwrap()).unwrap();
        assert_eq!(input, json!({ "input": "a", "result": "a" }));
    }
);

both!(
    a_fan_out_that_fails_or_is_cancelled_names_its_element_and_has_no_task,
    |d| {
        registered(
            d.api(),
            r#"
name = "fanfail"
version = 1
[[steps]]
id = "each"
capability = "test.flaky"
for_each = "${input}"
concurrency = 1
"#,
        );
        let run = start(
            d.api(),
            "fanfail",
            json!({"input": ["ok", "fail", "ok"]}),
            true,
        );
        let each = step(&run, "each");
        assert_eq!(each["status"], "failed", "{run}");
        assert_eq!(each["error"]["kind"], "retryable", "{run}");
        assert!(
            each["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("element 1: "),
            "{run}"
        );
        // A fan-out has no task of its own (docs/api.md), also when an
        // element failed.
        assert_eq!(each["task_id"], Value::Null, "{run}");
        assert_eq!(each["agent"], Value::Null, "{run}");

        registered(
            d.api(),
            r#"
name = "fancancel"
version = 1
[[steps]]
id = "each"
capability = "test.sleep"
for_each = "${input}"
concurrency = 1
"#,
        );
        let events = Events::open(d.runner(), "capability=test.sleep");
        let run = start(
            d.api(),
            "fancancel",
            // Long enough that the cancel surely comes while element 0 runs.
            json!({"input": ["3000", "300", "300"]}),
            false,
        );
        events.next("started");
        let id = run["id"].as_str().unwrap();
        let (code, cancelled) = d.api().post(&format!("/v1/runs/{id}/cancel"), &json!({}));
        assert_eq!(code, 200, "{cancelled}");
        let run = wait_run(d.api(), id);
        assert_eq!(run["status"], "cancelled", "{run}");
        let each = step(&run, "each");
        assert_eq!(each["status"], "failed", "{run}");
        assert_eq!(each["error"]["kind"], "cancelled", "{run}");
        assert!(
            each["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("element 1: the run was cancelled before this element started"),
            "{run}"
        );
        // It started: attempts count from the start, as for any step.
        assert_eq!(each["attempts"], 1, "{run}");
        assert_eq!(each["task_id"], Value::Null, "{run}");
    }
);

both!(a_cancel_waits_for_the_running_step_then_undoes_it, |d| {
    registered(
        d.api(),
        r#"
name = "cancel"
version = 1
[[steps]]
id = "slow"
capability = "test.sleep"
input = "1000"
compensate = { capability = "echo" }
[[steps]]
id = "next"
capability = "echo"
after = ["slow"]
"#,
    );
    let events = Events::open(d.runner(), "capability=test.sleep");
    let run = start(d.api(), "cancel", json!({}), false);
    events.next("started");
    let id = run["id"].as_str().unwrap();
    let (code, cancelled) = d.api().post(&format!("/v1/runs/{id}/cancel"), &json!({}));
    assert_eq!(code, 200, "{cancelled}");
    assert_eq!(cancelled["cancel_requested"], true);
    let run = wait_run(d.api(), id);
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(step(&run, "slow")["status"], "completed", "{run}");
    assert_eq!(
        step(&run, "slow")["compensation"]["status"],
        "completed",
        "{run}"
    );
    assert_eq!(step(&run, "next")["status"], "not-run", "{run}");
    // A second cancel of an ended run returns it as it is.
    let (code, again) = d.api().post(&format!("/v1/runs/{id}/cancel"), &json!({}));
    assert_eq!(code, 200);
    assert_eq!(again["status"], "cancelled");
});

// The cancel comes while the last step runs: that step is waited for, and
// then every completed step is undone (the run did not do all it had to
// before the cancel).
both!(
    a_cancel_during_the_last_step_waits_for_it_then_undoes_every_step,
    |d| {
        registered(
            d.api(),
            r#"
name = "cancellast"
version = 1
[[steps]]
id = "first"
capability = "echo"
input = "one"
compensate = { capability = "echo" }
[[steps]]
id = "last"
capability = "test.sleep"
input = "1000"
after = ["first"]
compensate = { capability = "echo" }
"#,
        );
        let events = Events::open(d.runner(), "capability=test.sleep");
        let run = start(d.api(), "cancellast", json!({}), false);
        events.next("started");
        let id = run["id"].as_str().unwrap();
        let (code, cancelled) = d.api().post(&format!("/v1/runs/{id}/cancel"), &json!({}));
        assert_eq!(code, 200, "{cancelled}");
        assert_eq!(cancelled["cancel_requested"], true, "{cancelled}");
        let run = wait_run(d.api(), id);
        assert_eq!(run["status"], "cancelled", "{run}");
        for name in ["first", "last"] {
            assert_eq!(step(&run, name)["status"], "completed", "{run}");
            assert_eq!(
                step(&run, name)["compensation"]["status"],
                "completed",
                "{run}"
            );
        }
    }
);

both!(
    a_cancel_during_a_retry_backoff_ends_the_run_cancelled,
    |d| {
        registered(
            d.api(),
            r#"
name = "backoff"
version = 1
[[steps]]
id = "a"
capability = "echo"
input = "a"
compensate = { capability = "echo" }
[[steps]]
id = "spin"
capability = "test.sleep"
after = ["a"]
input = "1000"
timeout = "100ms"
retry = { attempts = 5, backoff = "5s" }
"#,
        );
        let events = Events::open(d.runner(), "capability=test.sleep");
        let run = start(d.api(), "backoff", json!({}), false);
        // The first attempt ran out of time; the step waits 5 s to retry.
        assert_eq!(events.next("failed")["error"], "deadline-exceeded");
        let id = run["id"].as_str().unwrap();
        let (code, _) = d.api().post(&format!("/v1/runs/{id}/cancel"), &json!({}));
        assert_eq!(code, 200);
        let run = wait_run(d.api(), id);
        assert_eq!(run["status"], "cancelled", "{run}");
        assert_eq!(run["error"]["kind"], "cancelled", "{run}");
        let spin = step(&run, "spin");
        assert_eq!(spin["attempts"], 1, "no attempt after the cancel: {run}");
        assert_eq!(spin["error"]["kind"], "deadline-exceeded", "{run}");
        assert_eq!(
            step(&run, "a")["compensation"]["status"],
            "completed",
            "{run}"
        );
    }
);

both!(
    a_run_input_is_taken_up_to_the_record_limit_and_413_past_it,
    |d| {
        registered(
            d.api(),
            r#"
name = "big"
version = 1
[[steps]]
id = "a"
capability = "echo"
input = "x"
"#,
        );
        let run = start(
            d.api(),
            "big",
            json!({ "input": "i".repeat(850 * 1024) }),
            true,
        );
        assert_eq!(run["status"], "completed", "{}", run["error"]);
        let (code, refused) = d.api().post(
            "/v1/workflows/big/runs",
            &json!({ "input": "i".repeat(900 * 1024) }),
        );
        assert_eq!(code, 413, "{}", refused["error"]);
        assert_eq!(refused["error"]["kind"], "payload-too-large");
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("past the limit of 921600 bytes"),
            "{message}"
        );
    }
);

both!(
    an_error_that_quotes_a_huge_value_is_kept_short_in_the_run,
    |d| {
        registered(
            d.api(),
            r#"
name = "quote"
version = 1
[[steps]]
id = "a"
capability = "echo"
input = "a"
[[steps]]
id = "each"
capability = "echo"
after = ["a"]
for_each = "${input/xs}"
"#,
        );
        // Not an array: the step fails with an error that quotes the value,
        // 800,000 bytes, twice (the step's error and the run's).
        let xs = "x".repeat(800_000);
        let run = start(d.api(), "quote", json!({ "input": { "xs": xs } }), true);
        assert_eq!(run["status"], "failed", "{}", &run.to_string()[..2000]);
        let error = &step(&run, "each")["error"];
        assert_eq!(error["kind"], "invalid-input", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(message.len() < 1100, "{} bytes", message.len());
        assert!(message.ends_with("more bytes not kept)"), "{message}");
        assert!(run["error"]["message"].as_str().unwrap().len() < 1100);
        // The run's record: the input, and little more.
        assert!(
            run.to_string().len() < 820_000,
            "{} bytes",
            run.to_string().len()
        );
    }
);

both!(
    a_run_deadline_cuts_the_step_short_and_undoes_the_rest,
    |d| {
        registered(
            d.api(),
            r#"
name = "deadline"
version = 1
[[steps]]
id = "first"
capability = "echo"
compensate = { capability = "echo" }
[[steps]]
id = "spin"
capability = "test.sleep"
after = ["first"]
input = "${input/ms}"
"#,
        );
        // Inside the deadline: completes.
        let run = start(
            d.api(),
            "deadline",
            json!({ "input": { "ms": "50" }, "deadline": "10s" }),
            true,
        );
        assert_eq!(run["status"], "completed", "{run}");
        // Past it: the step gets only the time left, and the run is undone.
        let run = start(
            d.api(),
            "deadline",
            json!({ "input": { "ms": "5000" }, "deadline": "400ms" }),
            true,
        );
        assert_eq!(run["status"], "compensated", "{run}");
        let spin = step(&run, "spin");
        assert_eq!(spin["status"], "failed", "{run}");
        assert_eq!(spin["error"]["kind"], "deadline-exceeded", "{run}");
        let took = ms(&run["ended_at_ms"]) - ms(&run["created_at_ms"]);
        assert!(took < 3000, "the run took {took} ms with a 400 ms deadline");

        // Past it while a step waits to retry: the step fails with the
        // deadline and with what its last attempt said, one attempt made.
        registered(
            d.api(),
            r#"
name = "backoff"
version = 1
deadline = "500ms"
[[steps]]
id = "again"
capability = "test.flaky"
input = "fail"
retry = { attempts = 5, backoff = "10s" }
"#,
        );
        let run = start(d.api(), "backoff", json!({}), true);
        assert_eq!(run["status"], "failed", "{run}");
        let again = step(&run, "again");
        assert_eq!(again["status"], "failed", "{run}");
        assert_eq!(again["attempts"], 1, "{run}");
        assert_eq!(again["error"]["kind"], "deadline-exceeded", "{run}");
        assert_eq!(
            again["error"]["message"],
            "the run's deadline passed before attempt 2; attempt 1: retryable failure: asked to fail",
            "{run}"
        );
        assert!(again["task_id"].is_string(), "{run}");
        let took = ms(&run["ended_at_ms"]) - ms(&run["created_at_ms"]);
        assert!(took < 5000, "the run took {took} ms with a 500 ms deadline");
    }
);

/// Definitions that break each rule, and the message each gets (golden
/// files in `cli/tests/workflows/invalid/`: NAME.toml and NAME.err).
#[test]
fn each_invalid_definition_is_refused_naming_the_step_and_field() {
    let orch = Orch::new();
    install(&orch);
    let host = HostProc::start(&orch);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workflows/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    let bless = std::env::var_os("BLESS").is_some();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let (code, answer) = register(&host, &text);
        assert_eq!(code, 400, "{}: {answer}", file.display());
        assert_eq!(answer["error"]["kind"], "invalid-workflow");
        let message = answer["error"]["message"].as_str().unwrap().to_string() + "\n";
        let golden = file.with_extension("err");
        if bless {
            std::fs::write(&golden, &message).unwrap();
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_default();
        assert_eq!(message, expected, "{}", file.display());
    }
    // A valid one is stored once; the same version again is refused; a
    // capability no agent serves is a warning, and fails its step when run.
    let valid =
        "name = \"ok\"\nversion = 1\n[[steps]]\nid = \"x\"\ncapability = \"nobody.serves\"\n";
    let (code, answer) = register(&host, valid);
    assert_eq!(code, 201, "{answer}");
    assert_eq!(
        answer["warnings"],
        json!(["no agent provides capability nobody.serves now"])
    );
    let (code, answer) = register(&host, valid);
    assert_eq!(code, 409, "{answer}");
    assert_eq!(answer["error"]["kind"], "already-exists");
    // At the limits themselves (past them: past-limits.toml).
    let at_limits = "name = \"at-limits\"\nversion = 1\n[[steps]]\nid = \"a\"\ncapability = \"echo\"\nfor_each = [1, 2]\nconcurrency = 1000\nretry = { attempts = 100, backoff = \"1h\" }\n";
    let (code, answer) = register(&host, at_limits);
    assert_eq!(code, 201, "{answer}");
    let run = start(&host, "ok", json!({}), true);
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(step(&run, "x")["error"]["kind"], "unavailable", "{run}");
    // And through the CLI: the same message, exit code 3.
    let path = orch.work.path().join("bad.toml");
    std::fs::write(&path, "name = \"w\"\nversion = 1\nsteps = []\n").unwrap();
    let out = orch.run(&[
        "workflow",
        "register",
        path.to_str().unwrap(),
        "--api",
        &host.url,
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        crate::common::stderr(&out).contains("steps: a workflow needs at least one step"),
        "{}",
        crate::common::stderr(&out)
    );
}

#[test]
fn a_definition_is_taken_up_to_256_kib_and_refused_past_it() {
    let orch = Orch::new();
    let host = HostProc::start(&orch);
    let definition = |name: &str, description: usize| {
        json!({
            "name": name,
            "version": 1,
            "description": "d".repeat(description),
            "steps": [{ "id": "a", "capability": "echo" }],
        })
    };
    // Sized as JSON: the rest of the definition is under 200 bytes.
    let (code, answer) = host.post("/v1/workflows", &definition("inside", 255 * 1024));
    assert_eq!(code, 201, "{}", answer["error"]);
    let (code, answer) = host.post("/v1/workflows", &definition("past", 256 * 1024));
    assert_eq!(code, 400, "{}", answer["error"]);
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("past the limit of 262144 bytes"),
        "{message}"
    );
}

/// kill -9 of a lone host with 50 runs in flight: after the restart every
/// run ends, and a step that had completed is never run again (each step's
/// kv counter says how often it ran); one that was running at the kill ran
/// at most once more (its task again, as tasks run at least once).
#[test]
fn after_kill_9_a_lone_host_resumes_every_run_and_reruns_no_completed_step() {
    let orch = Orch::new();
    install(&orch);
    let host = HostProc::start(&orch);
    // Eight counted steps, each followed by a 30 ms spin (at most four at
    // once), so that many runs are part done when the host is killed.
    let steps: String = (1..=8)
        .map(|n| {
            let after = if n == 1 {
                String::new()
            } else {
                format!("after = [\"w{}\"]\n", n - 1)
            };
            format!(
                "[[steps]]\nid = \"s{n}\"\ncapability = \"test.flaky\"\n{after}input = \"${{input/s{n}}}\"\n\
                 [[steps]]\nid = \"w{n}\"\ncapability = \"test.sleep\"\nafter = [\"s{n}\"]\ninput = \"30\"\n"
            )
        })
        .collect();
    registered(&host, &format!("name = \"long\"\nversion = 1\n{steps}"));
    let mut ids = Vec::new();
    for r in 0..50 {
        // Each step counts its runs under its own kv key.
        let input: serde_json::Map<String, Value> = (1..=8)
            .map(|n| (format!("s{n}"), json!(format!("recover r{r}s{n} 0"))))
            .collect();
        let run = start(&host, "long", json!({ "input": input }), false);
        ids.push(run["id"].as_str().unwrap().to_string());
    }
    // Kill once some steps have completed and some runs have not ended.
    host.until("some runs are part done", |h| {
        let (_, runs) = h.get("/v1/runs?limit=100");
        let runs = runs["runs"].as_array().unwrap().clone();
        let done = |r: &Value| {
            r["steps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["status"] == "completed")
                .count()
        };
        runs.iter().map(done).sum::<usize>() >= 20 && runs.iter().any(|r| done(r) < 8)
    });
    let (_, before) = host.get("/v1/runs?limit=100");
    host.kill9();
    let completed_before: HashMap<(String, String), String> = before["runs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["steps"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["status"] == "completed")
                .map(move |s| {
                    (
                        (
                            r["id"].as_str().unwrap().to_string(),
                            s["id"].as_str().unwrap().to_string(),
                        ),
                        s["result"].to_string(),
                    )
                })
        })
        .collect();
    let unfinished = before["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "running")
        .count();
    assert!(unfinished > 0);
    let host = HostProc::start(&orch);
    let mut reran = 0;
    for (r, id) in ids.iter().enumerate() {
        let run = wait_run(&host, id);
        assert_eq!(run["status"], "completed", "{run}");
        for n in 1..=8 {
            let s = step(&run, &format!("s{n}"));
            // The counter after this step's last run.
            let runs: u64 = s["result"].as_u64().unwrap_or_else(|| panic!("{run}"));
            let key = (id.clone(), format!("s{n}"));
            match completed_before.get(&key) {
                // Completed before the kill: its recorded result stands,
                // and it never ran again.
                Some(result) => {
                    assert_eq!(result, &s["result"].to_string(), "r{r} s{n}: {run}");
                    assert_eq!(runs, 1, "r{r} s{n} ran again after it completed: {run}");
                }
                // Running at the kill: its task ran again, at most once more.
                None => {
                    assert!(runs <= 2, "r{r} s{n} ran {runs} times");
                    reran += usize::from(runs == 2);
                }
            }
        }
    }
    eprintln!(
        "{} steps had completed before the kill; {reran} ran twice",
        completed_before.len()
    );
}

/// A 3-host cluster: A starts and drives runs and serves nothing, B runs
/// the tasks, C serves nothing; B and C can take a run over.
struct Three {
    _nats: NatsServer,
    _homes: Vec<Orch>,
    a: Option<HostProc>,
    b: HostProc,
    c: HostProc,
}

impl Three {
    fn start() -> Three {
        let nats = NatsServer::start();
        let (a, b, c) = (Orch::new(), Orch::new(), Orch::new());
        a.config(CONFIG);
        c.config(CONFIG);
        install(&b);
        let args = ["--nats", nats.url.as_str()];
        let hb = HostProc::start_with(&b, &args);
        let ha = HostProc::start_with(&a, &args);
        let hc = HostProc::start_with(&c, &args);
        for h in [&ha, &hc] {
            crate::common::until_serving(h, "test.sleep", 1);
        }
        Three {
            _nats: nats,
            _homes: vec![a, b, c],
            a: Some(ha),
            b: hb,
            c: hc,
        }
    }

    fn a(&self) -> &HostProc {
        self.a.as_ref().unwrap()
    }
}

fn host_id(h: &HostProc) -> String {
    h.get("/v1/status").1["host"].as_str().unwrap().to_string()
}

const COUNTED: &str = r#"
name = "counted"
version = 1
[[steps]]
id = "s1"
capability = "test.flaky"
input = "recover s1 0"
[[steps]]
id = "s2"
capability = "test.sleep"
after = ["s1"]
input = "1500"
[[steps]]
id = "s3"
capability = "test.flaky"
after = ["s2"]
input = "recover s3 0"
"#;

/// kill -9 of the host driving a run while a step runs: another host (B or
/// C) takes the run over once its lease ends (2 s, plus a 1 s scan), the
/// running step's task is the same task, and no step runs twice.
#[test]
fn a_cluster_run_survives_kill_9_of_its_driving_host() {
    let mut t = Three::start();
    registered(t.a(), COUNTED);
    let events = Events::open(&t.b, "capability=test.sleep");
    let run = start(t.a(), "counted", json!({}), false);
    let id = run["id"].as_str().unwrap().to_string();
    let a = host_id(t.a());
    let started = events.next("started");
    let killed = std::time::Instant::now();
    t.a.take().unwrap().kill9();
    let run = wait_run(&t.c, &id);
    assert_eq!(run["status"], "completed", "{run}");
    // B or C, whichever scanned first.
    assert!(
        !run["owner"].as_str().unwrap().starts_with(&format!("{a}/")),
        "{run}"
    );
    // s1 and s3 each ran once (their kv counters), s2's task ran once.
    assert_eq!(step(&run, "s1")["result"], 1, "{run}");
    assert_eq!(step(&run, "s3")["result"], 1, "{run}");
    // s2's task is the one that was running at the kill, run once.
    let s2_id = step(&run, "s2")["task_id"].as_str().unwrap();
    assert_eq!(started["task"], s2_id, "{run}");
    let s2 = d_task(&t.b, s2_id);
    assert_eq!(s2["attempts"], 1, "{s2}");
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the run ended {took:?} after the kill"
    );
}

/// In a cluster too a step's task and the run's write that says the step
/// started go at the same time, so a driving host that dies between them
/// leaves the task stored and the step `pending`. This makes that state
/// (the driving host killed, the run edited in its bucket before its lease
/// ends, a cancel added) and checks that the host that takes the run over
/// finds the task by its key, after raising the run's fence: the step is
/// waited for, not left `not-run` with its task running on its own, and is
/// undone; no second task runs for it.
#[test]
fn a_step_stored_but_not_written_as_started_is_found_by_the_host_that_takes_over() {
    let mut t = Three::start();
    registered(
        t.a(),
        "name = \"pair\"\nversion = 1\n\
         [[steps]]\nid = \"a\"\ncapability = \"echo\"\ninput = \"a\"\n\
         compensate = { capability = \"echo\", input = \"undo a\" }\n\
         [[steps]]\nid = \"b\"\ncapability = \"test.sleep\"\nafter = [\"a\"]\ninput = \"1500\"\n\
         compensate = { capability = \"echo\", input = \"undo b\" }\n\
         [[steps]]\nid = \"c\"\ncapability = \"echo\"\nafter = [\"b\"]\ninput = \"c\"\n",
    );
    let run = start(t.a(), "pair", json!({ "input": null }), false);
    let id = run["id"].as_str().unwrap().to_string();
    t.a().until("step b runs", |h| {
        let (_, run) = h.get(&format!("/v1/runs/{id}"));
        step(&run, "b")["status"] == "running"
    });
    t.a.take().unwrap().kill9();
    // The lease A wrote last has at least 1.3 s left: the edit lands first.
    crate::common::runtime().block_on(async {
        let client = async_nats::connect(t._nats.url.as_str()).await.unwrap();
        let kv = async_nats::jetstream::new(client)
            .get_key_value("ORCH_RUNS")
            .await
            .unwrap();
        let entry = kv.entry(&id).await.unwrap().unwrap();
        let mut record: Value = serde_json::from_slice(&entry.value).unwrap();
        assert!(
            record["lease_until_ms"].as_u64().unwrap() > orch::daemon::now_ms(),
            "{record}"
        );
        let b = record["steps"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|s| s["id"] == "b")
            .unwrap();
        assert_eq!(b["status"], "running", "{b}");
        b["status"] = json!("pending");
        b["started_at_ms"] = Value::Null;
        b["input"] = Value::Null;
        b["task_id"] = Value::Null;
        b["attempts"] = json!(0);
        record["cancel_requested"] = json!(true);
        let value = serde_json::to_vec(&record).unwrap();
        kv.update(&id, value.into(), entry.revision).await.unwrap();
    });
    let run = wait_run(&t.c, &id);
    assert_eq!(run["status"], "cancelled", "{run}");
    let b = step(&run, "b");
    assert_eq!(b["status"], "completed", "{run}");
    assert_eq!(step(&run, "c")["status"], "not-run", "{run}");
    for s in ["b", "a"] {
        assert_eq!(
            step(&run, s)["compensation"]["status"],
            "completed",
            "{run}"
        );
    }
    // b's task is the one A submitted: one task for its key.
    let (_, tasks) = t.c.get("/v1/tasks?capability=test.sleep&limit=10");
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1, "{tasks}");
}

/// A cancel through a host that does not drive the run raises the run's
/// fence, so that the driver, which reads the cancel only at its next write
/// of the run, can store no task of the run after it. Here the step before
/// ends right after the cancel is answered (its agent waits for a reply
/// that this test sends then), and the driver starts the next step at once,
/// at the same time as its write: that step's task is refused, the driver,
/// still the run's owner, takes the new fence and the cancel, and the step
/// stays `not-run`. The first step is undone by the same driver, under the
/// new fence, without waiting for a lease to end.
#[test]
fn a_cancel_through_another_host_fences_the_run_and_no_step_starts_after_it() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    a.config(CONFIG);
    b.config(CONFIG);
    for plugin in ["echo", "messenger"] {
        b.ok(&["plugin", "install", "-y", &p(plugin)]);
    }
    let args = ["--nats", nats.url.as_str()];
    let hb = HostProc::start_with(&b, &args);
    let ha = HostProc::start_with(&a, &args);
    crate::common::until_serving(&ha, "test.request", 1);
    registered(
        &ha,
        "name = \"held\"\nversion = 1\n\
         [[steps]]\nid = \"a\"\ncapability = \"test.request\"\ninput = \"ping.hold\\nx\"\n\
         compensate = { capability = \"echo\", input = \"undo a\" }\n\
         [[steps]]\nid = \"b\"\ncapability = \"echo\"\nafter = [\"a\"]\ninput = \"b\"\n",
    );
    let rt = crate::common::runtime();
    let client = rt.block_on(async_nats::connect(nats.url.as_str())).unwrap();
    let mut requests = rt
        .block_on(client.subscribe("orch.v1.msg.ping.hold"))
        .unwrap();
    rt.block_on(client.flush()).unwrap();
    let run = start(&ha, "held", json!({ "input": null }), false);
    let id = run["id"].as_str().unwrap().to_string();
    let owner = run["owner"].as_str().unwrap().to_string();
    assert!(owner.starts_with(&host_id(&ha)), "{run}");
    let request = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), requests.next()).await })
        .expect("step a's request within 30 s")
        .unwrap();
    let (code, cancelled) = hb.post(&format!("/v1/runs/{id}/cancel"), &json!({}));
    assert_eq!(code, 200, "{cancelled}");
    // The fence is up once the cancel is answered.
    rt.block_on(async {
        let tasks = async_nats::jetstream::new(client.clone())
            .get_stream("ORCH_TASKS")
            .await
            .unwrap();
        let fence = tasks
            .get_last_raw_message_by_subject(&format!("orch.v1.fence.{id}"))
            .await;
        assert!(fence.is_ok(), "no fence after the cancel: {fence:?}");
        client
            .publish(request.reply.unwrap(), "held".into())
            .await
            .unwrap();
        client.flush().await.unwrap();
    });
    let run = wait_run(&hb, &id);
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(step(&run, "a")["status"], "completed", "{run}");
    assert_eq!(step(&run, "a")["result"], "held", "{run}");
    assert_eq!(
        step(&run, "a")["compensation"]["status"],
        "completed",
        "{run}"
    );
    assert_eq!(step(&run, "b")["status"], "not-run", "{run}");
    assert_eq!(run["owner"], owner.as_str(), "the same driver: {run}");
    // No task of b was stored.
    let (_, tasks) = hb.get("/v1/tasks?capability=echo&limit=10");
    let ids: Vec<&Value> = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["id"])
        .collect();
    assert_eq!(ids.len(), 1, "only a's compensation: {tasks}");
}

fn d_task(h: &HostProc, id: &str) -> Value {
    h.wait(id)
}

/// SIGSTOP of the driving host past its lease: another host takes the run
/// over and ends it; when the paused host comes back, its next write is
/// refused (it logs that it stopped driving) and the run stays as the
/// other host left it.
#[test]
fn a_paused_driving_host_that_comes_back_is_fenced() {
    let t = Three::start();
    registered(t.a(), COUNTED);
    let events = Events::open(&t.b, "capability=test.sleep");
    let run = start(t.a(), "counted", json!({}), false);
    let id = run["id"].as_str().unwrap().to_string();
    let a = host_id(t.a());
    events.next("started");
    t.a().signal("-STOP");
    let ended = wait_run(&t.c, &id);
    assert_eq!(ended["status"], "completed", "{ended}");
    assert!(
        !ended["owner"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{a}/")),
        "{ended}"
    );
    t.a().signal("-CONT");
    let log = t._homes[0].work.path().join("host.log");
    t.c.until("host A logs that it was fenced", |_| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("another host drives this workflow run now")
    });
    let (_, after) = t.c.get(&format!("/v1/runs/{id}"));
    assert_eq!(after, ended, "the fenced host changed the run");
    assert_eq!(step(&after, "s1")["result"], 1);
    assert_eq!(step(&after, "s3")["result"], 1);
}

fn example(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../plugins/workflows")
            .join(name),
    )
    .unwrap()
}

/// The shop's stock of a SKU and its revenue, through shop.stock.
fn shop(d: &Deployment, sku: &str) -> Value {
    let id = d.api().submit("shop.stock", sku);
    let task = d.api().wait(&id);
    serde_json::from_str(task["result"].as_str().unwrap()).unwrap()
}

both!(
    the_order_example_undoes_its_kv_effects_when_a_step_fails,
    plugins = ["shop-js"],
    |d| {
        registered(d.api(), &example("order.toml"));
        let order = |id: &str, card: &str, address: &str| json!({ "input": { "id": id, "sku": "lamp", "count": 2, "amount": 40, "card": card, "address": address } });
        let run = start(d.api(), "order", order("o1", "visa", "1 Main St"), true);
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(
            step(&run, "ship")["result"],
            json!({ "tracking": "TRK-o1" })
        );
        let after_first = shop(d, "lamp");
        assert_eq!(
            after_first,
            json!({ "sku": "lamp", "stock": 98, "revenue": 40 })
        );
        // Declined: the reservation is released; nothing was charged.
        let run = start(d.api(), "order", order("o2", "declined", "1 Main St"), true);
        assert_eq!(run["status"], "compensated", "{run}");
        assert_eq!(step(&run, "reserve")["compensation"]["status"], "completed");
        assert_eq!(step(&run, "ship")["status"], "not-run");
        assert_eq!(shop(d, "lamp"), after_first);
        // Shipping fails: the charge is refunded, then the stock released.
        let run = start(d.api(), "order", order("o3", "visa", "nowhere"), true);
        assert_eq!(run["status"], "compensated", "{run}");
        assert_eq!(step(&run, "charge")["compensation"]["status"], "completed");
        assert_eq!(step(&run, "reserve")["compensation"]["status"], "completed");
        assert_eq!(shop(d, "lamp"), after_first);
    }
);

both!(
    the_pipeline_example_counts_each_section_and_adds_them_up,
    plugins = ["docs-py", "wordcount"],
    |d| {
        registered(d.api(), &example("pipeline.toml"));
        let doc = "# One\nalpha beta\n# Two\ngamma delta epsilon\n# Three\nzeta\n";
        let run = start(
            d.api(),
            "pipeline",
            json!({ "input": { "text": doc } }),
            true,
        );
        assert_eq!(run["status"], "completed", "{run}");
        assert_eq!(step(&run, "count")["elements"], 3);
        let result = &step(&run, "aggregate")["result"];
        // Each section's words, its heading's included.
        assert_eq!(
            result["words_by_section"],
            json!({ "One": 4, "Two": 5, "Three": 3 })
        );
        let whole = d.api().wait(&d.api().submit("text.wordcount", doc));
        let whole: Value = serde_json::from_str(whole["result"].as_str().unwrap()).unwrap();
        assert_eq!(result["total"], whole, "{run}");
    }
);

/// A schedule every 2 s on a 3-host cluster (every host runs the same
/// schedule): each tick starts one run, whichever host gets there first.
/// The runs' step is one `recover` call of flaky on one kv counter, so
/// their results are the call numbers: 1..n with none twice means n runs
/// ran it once each; the runs' ticks are 2 s apart with none missing.
#[test]
fn a_schedule_starts_one_run_per_tick_across_three_hosts() {
    let t = Three::start();
    registered(
        t.a(),
        r#"
name = "tick"
version = 1
[[steps]]
id = "count"
capability = "test.flaky"
input = "recover ticks 0"
[[triggers]]
schedule = "*/2 * * * * *"
input = { from = "schedule" }
"#,
    );
    let out = t._homes[0].ok(&["workflow", "triggers", "--api", &t.a().url]);
    assert!(
        out.contains("tick v1") && out.contains("*/2 * * * * *") && out.contains("UTC"),
        "{out}"
    );
    let events = Events::open(&t.b, "capability=test.flaky");
    for _ in 0..3 {
        events.next("completed");
    }
    // A step's task ends before its run is written as completed, by
    // whichever host drives it.
    let mut runs = Vec::new();
    t.c.until("three completed runs", |c| {
        let (_, listed) = c.get("/v1/runs?workflow=tick&status=completed&limit=100");
        runs = listed["runs"].as_array().cloned().unwrap_or_default();
        runs.len() >= 3
    });
    let mut calls: Vec<u64> = runs
        .iter()
        .map(|r| step(r, "count")["result"].as_u64().unwrap())
        .collect();
    calls.sort();
    let n = calls.len() as u64;
    assert_eq!(
        calls,
        (1..=n).collect::<Vec<_>>(),
        "a tick ran twice: {runs:?}"
    );
    let mut ticks: Vec<u64> = runs
        .iter()
        .map(|r| {
            assert_eq!(r["input"], json!({ "from": "schedule" }));
            ulid::Ulid::from_string(r["id"].as_str().unwrap())
                .unwrap()
                .timestamp_ms()
        })
        .collect();
    ticks.sort();
    for pair in ticks.windows(2) {
        assert_eq!(pair[1] - pair[0], 2000, "ticks {ticks:?}");
    }
    assert!(ticks.iter().all(|t| t % 2000 == 0), "{ticks:?}");
}

both!(
    a_message_an_agent_publishes_starts_one_run_with_it_as_input,
    plugins = ["messenger"],
    |d| {
        registered(
            d.api(),
            r#"
name = "on-order"
version = 1
[[steps]]
id = "echo"
capability = "echo"
input = { got = "${input/n}" }
[[triggers]]
subject = "ping.order"
"#,
        );
        let out = d._homes[0].ok(&["workflow", "triggers", "--api", &d.api().url]);
        assert!(out.contains("subject ping.order"), "{out}");
        let events = Events::open(d.runner(), "capability=echo");
        for n in 1..=3 {
            let id = d
                .api()
                .submit("test.publish", &format!("ping.order\n{{\"n\": {n}}}"));
            assert_eq!(d.api().wait(&id)["result"], "sent");
        }
        for _ in 0..3 {
            events.next("completed");
        }
        let (_, runs) = d.api().get("/v1/runs?workflow=on-order&limit=100");
        let runs = runs["runs"].as_array().unwrap();
        let mut got: Vec<u64> = runs
            .iter()
            .map(|r| step(r, "echo")["input"]["got"].as_u64().unwrap())
            .collect();
        got.sort();
        assert_eq!(got, [1, 2, 3], "one run per message: {runs:?}");
    }
);

/// Edits a run's record in a lone host's `workflows.redb` (the host
/// stopped), keeping its revision: the state a crash at some moment leaves.
fn edit_stored_run(orch: &Orch, id: &str, edit: impl FnOnce(&mut Value)) {
    let db = redb::Database::open(orch.home.path().join("workflows.redb")).unwrap();
    use redb::ReadableTable;
    let runs: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("runs");
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(runs).unwrap();
        let stored = table.get(id).unwrap().unwrap().value().to_vec();
        let (rev, record) = stored.split_at(8);
        let mut record: Value = serde_json::from_slice(record).unwrap();
        edit(&mut record);
        let mut value = rev.to_vec();
        value.extend(serde_json::to_vec(&record).unwrap());
        table.insert(id, value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

/// A step of a run's record, to edit.
fn step_mut<'a>(record: &'a mut Value, id: &str) -> &'a mut Value {
    record["steps"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["id"] == id)
        .unwrap()
}

/// On a lone host a step's task and the run's write that says the step
/// started go at the same time. A crash between them leaves the task
/// stored and the step `pending`; this makes that state (the run edited in
/// `workflows.redb` with the host killed, a cancel added) and checks that
/// the restarted host finds the task by its key: the step is waited for,
/// not left `not-run` with its task running on its own, and is undone.
#[test]
fn a_step_stored_before_a_crash_but_not_written_as_started_is_waited_for_and_undone() {
    let orch = Orch::new();
    install(&orch);
    orch.ok(&["plugin", "install", "-y", &p("nap")]);
    let host = HostProc::start(&orch);
    registered(
        &host,
        "name = \"pair\"\nversion = 1\n\
         [[steps]]\nid = \"a\"\ncapability = \"echo\"\ninput = \"a\"\n\
         compensate = { capability = \"echo\", input = \"undo a\" }\n\
         [[steps]]\nid = \"b\"\ncapability = \"test.nap\"\nafter = [\"a\"]\ninput = \"1500\"\n\
         compensate = { capability = \"echo\", input = \"undo b\" }\n\
         [[steps]]\nid = \"c\"\ncapability = \"echo\"\nafter = [\"b\"]\ninput = \"c\"\n",
    );
    let run = start(&host, "pair", json!({ "input": null }), false);
    let id = run["id"].as_str().unwrap().to_string();
    host.until("step b runs", |h| {
        let (_, run) = h.get(&format!("/v1/runs/{id}"));
        step(&run, "b")["status"] == "running"
    });
    host.kill9();
    edit_stored_run(&orch, &id, |record| {
        let b = step_mut(record, "b");
        assert_eq!(b["status"], "running", "{b}");
        b["status"] = json!("pending");
        b["started_at_ms"] = Value::Null;
        b["input"] = Value::Null;
        b["task_id"] = Value::Null;
        record["cancel_requested"] = json!(true);
    });
    let host = HostProc::start(&orch);
    let run = wait_run(&host, &id);
    assert_eq!(run["status"], "cancelled", "{run}");
    let b = step(&run, "b");
    assert_eq!(b["status"], "completed", "{run}");
    assert_eq!(step(&run, "c")["status"], "not-run", "{run}");
    // The nap's result: the milliseconds it slept.
    assert!(b["result"].as_u64().is_some_and(|ms| ms >= 1500), "{run}");
    for s in ["b", "a"] {
        assert_eq!(
            step(&run, s)["compensation"]["status"],
            "completed",
            "{run}"
        );
    }
    // b's task is the one stored before the crash: one task for its key.
    let (_, tasks) = host.get("/v1/tasks?capability=test.nap&limit=10");
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 1, "{tasks}");
}

/// A later attempt of a step that a driver submitted before a crash is
/// waited for when the run is cancelled meanwhile, not left to run on its
/// own: completed, it is undone. This makes that state from a run that
/// ended (its record edited in `workflows.redb` with the host killed: the
/// step whose second attempt completed is back to `running`, the step
/// after it to `pending`, the run to `running` with a cancel) and checks
/// the restarted host.
#[test]
fn a_later_attempt_stored_before_a_crash_is_waited_for_and_undone_after_a_cancel() {
    let orch = Orch::new();
    install(&orch);
    let host = HostProc::start(&orch);
    registered(
        &host,
        "name = \"again\"\nversion = 1\n\
         [[steps]]\nid = \"a\"\ncapability = \"echo\"\ninput = \"a\"\n\
         compensate = { capability = \"echo\", input = \"undo a\" }\n\
         [[steps]]\nid = \"b\"\ncapability = \"test.flaky\"\nafter = [\"a\"]\n\
         input = \"recover again-b 1\"\nretry = { attempts = 2, backoff = \"50ms\" }\n\
         compensate = { capability = \"echo\", input = \"undo b\" }\n\
         [[steps]]\nid = \"c\"\ncapability = \"echo\"\nafter = [\"b\"]\ninput = \"c\"\n\
         when = { value = \"${steps.b}\", equals = 99 }\n",
    );
    let run = start(&host, "again", json!({ "input": null }), true);
    assert_eq!(run["status"], "completed", "{run}");
    // c never had a task: the crash is to look as if it came before c.
    assert_eq!(step(&run, "c")["status"], "skipped", "{run}");
    assert_eq!(step(&run, "b")["attempts"], 2, "{run}");
    let id = run["id"].as_str().unwrap().to_string();
    host.kill9();
    edit_stored_run(&orch, &id, |record| {
        record["status"] = json!("running");
        record["ended_at_ms"] = Value::Null;
        record["cancel_requested"] = json!(true);
        record["completed"] = json!(1);
        let b = step_mut(record, "b");
        b["status"] = json!("running");
        b["attempts"] = json!(1);
        for field in [
            "ended_at_ms",
            "result",
            "completed_order",
            "task_id",
            "agent",
            "fuel_used",
        ] {
            b[field] = Value::Null;
        }
        let c = step_mut(record, "c");
        c["status"] = json!("pending");
        c["attempts"] = json!(0);
        for field in [
            "started_at_ms",
            "ended_at_ms",
            "input",
            "result",
            "completed_order",
            "task_id",
            "agent",
            "fuel_used",
        ] {
            c[field] = Value::Null;
        }
    });
    let host = HostProc::start(&orch);
    let run = wait_run(&host, &id);
    assert_eq!(run["status"], "cancelled", "{run}");
    // b's second attempt, found by its key: completed (the flaky call 2),
    // and undone, after which a is.
    let b = step(&run, "b");
    assert_eq!(b["status"], "completed", "{run}");
    assert_eq!(b["result"], 2, "{run}");
    assert_eq!(b["attempts"], 2, "{run}");
    assert_eq!(step(&run, "c")["status"], "not-run", "{run}");
    for s in ["b", "a"] {
        assert_eq!(
            step(&run, s)["compensation"]["status"],
            "completed",
            "{run}"
        );
    }
    // No third call: the attempts that ran are the two before the crash.
    let (_, tasks) = host.get("/v1/tasks?capability=test.flaky&limit=10");
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 2, "{tasks}");
}
