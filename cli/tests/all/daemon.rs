//! `orch host start` as operators run it: a real host process with its HTTP
//! API on a free loopback port, driven through the CLI and the API, killed
//! with SIGKILL and stopped with SIGTERM.
use std::collections::{BTreeMap, BTreeSet};

use crate::common::{p, stderr, stdout, HostProc, Orch};
use serde_json::{json, Value};

/// The sleep fixture (busy-waits N ms) with a manifest, so it can be installed.
fn install_sleep(orch: &Orch) {
    let manifest = "[plugin]\nname = \"sleep\"\nversion = \"0.1.0\"\ncapabilities = [\"test.sleep\"]\n\n[limits]\nfuel = 10000000000\n";
    let wasm = orch.work.path().join("sleep.wasm");
    std::fs::copy(p("sleep"), &wasm).unwrap();
    std::fs::write(orch.work.path().join("sleep.toml"), manifest).unwrap();
    orch.ok(&["plugin", "install", "-y", wasm.to_str().unwrap()]);
}

#[test]
fn the_cli_submits_waits_lists_and_installs_while_the_host_runs() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("wordcount")]);
    let host = HostProc::start(&orch);
    let input = orch.work.path().join("doc.md");
    std::fs::write(&input, "# One\na b c\n# Two\nd e\n").unwrap();
    let input = input.to_str().unwrap();

    // The CLI finds the host through $ORCH_HOME/host.json.
    let out = orch.ok(&[
        "task",
        "submit",
        "--capability",
        "text.wordcount",
        "--input",
        input,
        "--wait",
    ]);
    assert_eq!(out, r#"{"words":9,"lines":4,"bytes":22}"#);

    let submitted: Value = orch.json(&[
        "task",
        "submit",
        "--capability",
        "text.wordcount",
        "--input",
        input,
        "--priority",
        "3",
        "--output",
        "json",
    ]);
    let id = submitted["id"].as_str().unwrap();
    assert_eq!(submitted["capability"], "text.wordcount");
    assert_eq!(submitted["priority"], 3);
    let task = orch.json(&[
        "task", "get", id, "--wait", "--output", "json", "--api", &host.url,
    ]);
    assert_eq!(task["id"], id);
    assert_eq!(task["status"], "completed");
    assert_eq!(task["attempts"], 1);
    assert_eq!(task["agent"], "wordcount@0.1.0");
    assert_eq!(task["result"], r#"{"words":9,"lines":4,"bytes":22}"#);
    assert!(task["error"].is_null());
    assert!(task["fuel_used"].as_u64().unwrap() > 0);

    let list = orch.json(&["task", "list", "--output", "json"]);
    let ids: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], id, "newest first");
    // --limit, as a pair: 1 lists the newest; 0 is refused, not "no tasks".
    let newest = orch.json(&["task", "list", "--limit", "1", "--output", "json"]);
    assert_eq!(newest["tasks"].as_array().unwrap().len(), 1, "{newest}");
    let out = orch.run(&["task", "list", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--limit"), "{}", stderr(&out));

    // A capability nobody provides is refused at submit, and nothing is kept.
    let submit_report = || {
        orch.run(&[
            "task",
            "submit",
            "--capability",
            "text.report",
            "--input",
            input,
        ])
    };
    let out = submit_report();
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("no agent provides capability text.report"),
        "{}",
        stderr(&out)
    );
    assert_eq!(host.count("queued") + host.count("completed"), 2);
    // A wait of nothing is refused before anything is submitted.
    let out = orch.run(&[
        "task",
        "submit",
        "--capability",
        "text.wordcount",
        "--input",
        input,
        "--wait",
        "--timeout",
        "0s",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--timeout must be greater than zero"),
        "{}",
        stderr(&out)
    );
    assert_eq!(host.count("queued") + host.count("completed"), 2);

    // Installing while the host runs: the CLI tells the host, which serves
    // the plugin at once; the planner's sub-tasks run on wordcount.
    let out = orch.ok(&["plugin", "install", "-y", &p("planner")]);
    assert!(out.contains("now serves planner@0.1.0"), "{out}");
    let report = orch.json(&[
        "task",
        "submit",
        "--capability",
        "text.report",
        "--input",
        input,
        "--wait",
        "--output",
        "json",
    ]);
    assert_eq!(report["status"], "completed");
    assert_eq!(report["subtasks"], 2);
    let calls = report["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    for call in calls {
        assert_eq!(call["capability"], "text.wordcount");
        assert_eq!(call["outcome"], "ok");
        assert!(call["deadline_ms"].as_u64().unwrap() > 0, "{call}");
        assert!(call["fuel_used"].as_u64().unwrap() > 0, "{call}");
    }
    assert!(report["subtask_fuel"].as_u64().unwrap() > 0);
    assert!(report["result"]
        .as_str()
        .unwrap()
        .ends_with(r#""total":{"words":9,"lines":4,"bytes":22}}"#));

    let status = orch.json(&["status", "--output", "json"]);
    let caps: Vec<&str> = status["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(caps, ["text.report", "text.wordcount"]);
    assert_eq!(status["tasks"]["queued"], 0);
    let text = orch.ok(&["status"]);
    assert!(
        text.contains("planner@0.1.0") && text.contains("breaker closed"),
        "{text}"
    );

    // Removing while running: the capability is gone for new tasks.
    let out = orch.ok(&["plugin", "remove", "planner"]);
    assert!(out.contains("no longer serves planner@0.1.0"), "{out}");
    assert_eq!(submit_report().status.code(), Some(3));
}

#[test]
fn idempotency_keys_return_the_first_task() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    let host = HostProc::start(&orch);
    let body = json!({ "capability": "echo", "input": "once", "idempotency_key": "order-17" });
    let (first_code, first) = host.post("/v1/tasks", &body);
    let (again_code, again) = host.post("/v1/tasks", &body);
    assert_eq!((first_code, again_code), (201, 200));
    assert_eq!(first["id"], again["id"]);
    assert_eq!(first["idempotency_key"], "order-17");
    let other = host.post(
        "/v1/tasks",
        &json!({ "capability": "echo", "input": "x", "idempotency_key": "order-18" }),
    );
    assert_ne!(other.1["id"], first["id"]);
    host.until("both tasks end", |h| h.count("completed") == 2);
    // The key still holds after a restart: it is in the journal.
    host.kill9();
    let host = HostProc::start(&orch);
    let (code, replay) = host.post("/v1/tasks", &body);
    assert_eq!(code, 200);
    assert_eq!(replay["id"], first["id"]);
    assert_eq!(replay["result"], "once");
    assert_eq!(host.count("completed"), 2);
}

#[test]
fn kill_9_loses_no_accepted_task_and_each_ends_with_one_result() {
    let orch = Orch::new();
    // One slot and 40 ms tasks: 200 tasks are 8 s of work, far more than
    // submitting them takes, so the kill finds a backlog.
    orch.config("[host]\ninstances = 1\n");
    install_sleep(&orch);
    let host = HostProc::start(&orch);
    const N: usize = 200;
    let mut accepted = BTreeSet::new();
    for _ in 0..N {
        accepted.insert(host.submit("test.sleep", "40"));
    }
    assert_eq!(accepted.len(), N);
    host.until("some tasks complete", |h| h.count("completed") >= 10);
    host.kill9();

    // Everything the dead host accepted is in its journal; some of it had
    // not run yet.
    let host = HostProc::start(&orch);
    let requeued: usize = host
        .banner
        .split("; ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no requeue count in {:?}", host.banner));
    assert!(requeued > 0 && requeued < N, "{}", host.banner);
    let mut results = BTreeMap::new();
    for id in &accepted {
        let task = host.wait(id);
        assert_eq!(task["status"], "completed", "{task}");
        let ms: u64 = task["result"].as_str().unwrap().parse().unwrap();
        assert!(ms >= 40, "{task}");
        results.insert(id.clone(), task["attempts"].as_u64().unwrap());
    }
    assert_eq!(results.len(), N);
    // One record per accepted id, and nothing else.
    let (_, all) = host.get("/v1/tasks?limit=10000");
    let listed: Vec<String> = all["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed.len(), N);
    assert_eq!(listed.into_iter().collect::<BTreeSet<_>>(), accepted);
}

#[test]
fn sigterm_finishes_the_running_task_and_keeps_the_queued_ones() {
    let orch = Orch::new();
    orch.config("[host]\ninstances = 1\n");
    install_sleep(&orch);
    let mut host = HostProc::start(&orch);
    // The first task long enough that the signal surely finds it running.
    let ids: Vec<String> = (0..6)
        .map(|i| host.submit("test.sleep", if i == 0 { "3000" } else { "300" }))
        .collect();
    host.until("the first task runs", |h| {
        h.get(&format!("/v1/tasks/{}", ids[0])).1["status"] == "running"
    });
    host.signal("-TERM");
    let status = host.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let log = std::fs::read_to_string(orch.work.path().join("host.log")).unwrap();
    assert!(
        log.contains("stopped: 0 running task(s) cut off; 5 task(s) stay in the journal"),
        "{log}"
    );
    // No host.json is left behind to mislead the CLI.
    assert!(!orch.home.path().join("host.json").exists());

    let host = HostProc::start(&orch);
    // The running task finished before the host stopped: its result was
    // stored by the old process.
    let first = host.get(&format!("/v1/tasks/{}", ids[0])).1;
    assert_eq!(first["status"], "completed", "{first}");
    for id in &ids[1..] {
        assert_eq!(host.wait(id)["status"], "completed");
    }
}

#[test]
fn hot_upgrade_under_load_fails_no_task() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("counter")]);
    let host = HostProc::start(&orch);
    let url = host.url.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (upgraded_tx, upgraded_rx) = std::sync::mpsc::channel::<()>();
    let load = std::thread::spawn(move || {
        let host = HostProc::agent();
        let mut before = Vec::new();
        let mut after = Vec::new();
        let mut upgraded = false;
        let mut since = 0;
        // Keep submitting until 50 tasks went in after the upgrade.
        while since < 50 {
            if !upgraded && upgraded_rx.try_recv().is_ok() {
                upgraded = true;
            }
            let mut r = host
                .post(&format!("{url}/v1/tasks"))
                .header("content-type", "application/json")
                .send(json!({ "capability": "counter", "input": "" }).to_string())
                .unwrap();
            assert_eq!(r.status().as_u16(), 201);
            let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            if upgraded {
                after.push(id);
                since += 1;
            } else {
                before.push(id);
                if before.len() == 50 {
                    let _ = tx.send(());
                }
            }
        }
        (before, after)
    });
    rx.recv().unwrap();
    let out = orch.ok(&["plugin", "upgrade", "counter", &p("counter-next"), "-y"]);
    assert!(out.contains("now serves counter@0.2.0"), "{out}");
    upgraded_tx.send(()).unwrap();
    let (before, after) = load.join().unwrap();
    let mut agents = BTreeMap::new();
    for id in before.iter().chain(&after) {
        let task = host.wait(id);
        assert_eq!(task["status"], "completed", "{task}");
        *agents
            .entry(task["agent"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    // Tasks submitted after the upgrade returned all ran on the new version.
    for id in &after {
        assert_eq!(host.wait(id)["agent"], "counter@0.2.0");
    }
    assert!(agents.contains_key("counter@0.1.0"), "{agents:?}");
    assert_eq!(host.count("failed") + host.count("dead"), 0);
}

#[test]
fn finished_tasks_are_dropped_after_the_retention_time() {
    let orch = Orch::new();
    orch.config("[host]\nretention = \"2s\"\n");
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    let host = HostProc::start(&orch);
    let id = host.submit("echo", "short-lived");
    // Inside the retention time the result is there...
    assert_eq!(host.wait(&id)["result"], "short-lived");
    // ...and past it, the task is gone.
    host.until("the task expires", |h| {
        h.get(&format!("/v1/tasks/{id}")).0 == 404
    });
    let (code, v) = host.get(&format!("/v1/tasks/{id}"));
    assert_eq!(code, 404);
    assert_eq!(v["error"]["kind"], "not-found");
}

#[test]
fn the_api_reports_bad_requests_with_a_kind_and_message() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    let host = HostProc::start(&orch);
    let (code, v) = host.post(
        "/v1/tasks",
        &json!({ "capability": "echo", "input": "a", "input_base64": "YQ==" }),
    );
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (400, Some("invalid-request"))
    );
    let (code, v) = host.post(
        "/v1/tasks",
        &json!({ "capability": "echo", "deadline": "soon" }),
    );
    assert_eq!(code, 400);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("deadline"),
        "{v}"
    );
    let (code, v) = host.get("/v1/tasks?status=lost");
    assert_eq!(code, 400, "{v}");
    // An array is not read as the fields in order; an object is a task.
    let (code, v) = host.post("/v1/tasks", &json!(["echo", "hi"]));
    assert_eq!(code, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert_eq!(
        message,
        "the request body: invalid type: sequence, expected a task: a JSON object \
         such as {\"capability\": \"echo\", \"input\": \"hi\"}"
    );
    let (code, v) = host.post_raw("/v1/tasks", "{\"capability\": ");
    assert_eq!(code, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("the request body is not valid JSON: ")
            && message.contains("EOF while parsing a value at line 1 column 15"),
        "{message}"
    );
    assert_eq!(host.count("queued") + host.count("completed"), 0);
    let (code, v) = host.post(
        "/v1/tasks",
        &json!({ "capability": "echo", "input_base64": "AP8=" }),
    );
    assert_eq!(code, 201);
    let task = host.wait(v["id"].as_str().unwrap());
    assert_eq!(task["result_base64"], "AP8=");
    // An API on a routable address is refused: it has no authentication.
    let out = orch.run(&["host", "start", "--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
    let _ = stdout(&out);
}

#[test]
fn agents_send_messages_within_their_grants() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("messenger")]);
    let host = HostProc::start(&orch);
    let ask = |capability: &str, input: &str| -> String {
        let (code, task) = host.post(
            "/v1/tasks?wait=30s",
            &json!({ "capability": capability, "input": input }),
        );
        assert_eq!(code, 201, "{task}");
        assert_eq!(task["status"], "completed", "{task}");
        task["result"].as_str().unwrap().to_string()
    };
    // Granted and subscribed: the request reaches the subscriber (here the
    // same plugin) as a task, and its result is the reply.
    assert_eq!(ask("test.request", "ping.hello\nhi"), "pong: hi");
    assert_eq!(ask("test.publish", "ping.hello\nhi"), "sent");
    // Granted, but nobody subscribes.
    assert_eq!(
        ask("test.request", "ping.other\nhi"),
        "error: no agent subscribes to ping.other"
    );
    // The subscriber's failure comes back as the request's error.
    assert_eq!(
        ask("test.request", "ping.hello\nfail"),
        "error: the subscriber failed: agent failed: refused fail on ping.hello"
    );
    // Outside the grant: refused by the host, for requests and publishes.
    let denied = "error: subject secret.plans is not granted to messenger (the manifest's [grants] messaging lists [\"ping.*\"])";
    assert_eq!(ask("test.request", "secret.plans\nhi"), denied);
    assert_eq!(ask("test.publish", "secret.plans\nhi"), denied);
}

/// Installs the spin fixture with one slot and `fuel` per task.
fn install_spin(orch: &Orch, fuel: u64) {
    let wasm = orch.work.path().join("spin.wasm");
    std::fs::copy(p("spin"), &wasm).unwrap();
    std::fs::write(
        orch.work.path().join("spin.toml"),
        format!("[plugin]\nname = \"spin\"\nversion = \"0.1.0\"\ncapabilities = [\"test.spin\"]\n[limits]\nfuel = {fuel}\nmax_instances = 1\n"),
    )
    .unwrap();
    orch.ok(&["plugin", "install", "-y", wasm.to_str().unwrap()]);
}

#[test]
fn accepted_tasks_are_bounded_with_a_429_as_a_pair() {
    let orch = Orch::new();
    // Fuel for several seconds of spinning: the two tasks must still run
    // while a CLI process starts on a loaded machine.
    orch.config("[host]\nmax_unfinished = 2\n[limits]\nmax_fuel = 1000000000000\n");
    install_spin(&orch, 100000000000);
    let host = HostProc::start(&orch);
    let spin = json!({ "capability": "test.spin", "input": "x", "deadline": "5s" });
    let keyed = json!({ "capability": "test.spin", "input": "x", "deadline": "5s", "idempotency_key": "k-1" });
    let inside: Vec<String> = [&spin, &keyed]
        .into_iter()
        .map(|body| {
            let (code, task) = host.post("/v1/tasks", body);
            assert_eq!(code, 201, "{task}");
            task["id"].as_str().unwrap().to_string()
        })
        .collect();
    let (code, refused) = host.post("/v1/tasks", &spin);
    assert_eq!(code, 429, "{refused}");
    assert_eq!(refused["error"]["kind"], "no-capacity", "{refused}");
    // A retry of a task accepted already is not refused: it gets that task.
    let (code, again) = host.post("/v1/tasks", &keyed);
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["id"], inside[1].as_str());
    // The CLI says so with its own exit code: try again later.
    let out = orch.run(&[
        "task",
        "submit",
        "--capability",
        "test.spin",
        "--api",
        &host.url,
    ]);
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("no capacity"), "{}", stderr(&out));
    for id in inside {
        assert_eq!(host.wait(&id)["status"], "failed");
    }
    let (code, task) = host.post("/v1/tasks", &spin);
    assert_eq!(code, 201, "room again: {task}");
}

#[test]
fn a_missed_deadline_names_the_deadline_given() {
    let orch = Orch::new();
    install_spin(&orch, 10000000000);
    let host = HostProc::start(&orch);
    // One runs into its deadline; one waits behind it past its own.
    let running = host.post(
        "/v1/tasks",
        &json!({ "capability": "test.spin", "input": "x", "deadline": "400ms" }),
    );
    let queued = host.post(
        "/v1/tasks",
        &json!({ "capability": "test.spin", "input": "y", "deadline": "200ms" }),
    );
    for ((_, task), given) in [(running, 400), (queued, 200)] {
        let done = host.wait(task["id"].as_str().unwrap());
        assert_eq!(done["error"]["kind"], "deadline-exceeded", "{done}");
        assert_eq!(
            done["error"]["message"],
            format!("deadline exceeded: the task did not end within its deadline of {given} ms"),
            "{done}"
        );
    }
}

#[test]
fn capabilities_and_message_subjects_are_apart() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("messenger")]);
    orch.ok(&["plugin", "install", "-y", &p("caller")]);
    let host = HostProc::start(&orch);
    // The caller has no messaging grant: a capability named like the host's
    // old spelling of a subscription reaches no subscriber.
    let (code, task) = host.post(
        "/v1/tasks?wait=30s",
        &json!({ "capability": "test.call", "input": "msg:ping.hello\nhi" }),
    );
    assert_eq!(code, 201, "{task}");
    assert_eq!(
        task["result"], "call-error unavailable: no agent provides capability msg:ping.hello",
        "{task}"
    );
    // Nor can a task be submitted for it.
    let (code, refused) = host.post(
        "/v1/tasks",
        &json!({ "capability": "msg:ping.hello", "input": "hi" }),
    );
    assert_ne!(code, 201, "{refused}");
    // The subscriber still gets the messages sent to it.
    let (_, task) = host.post(
        "/v1/tasks?wait=30s",
        &json!({ "capability": "test.request", "input": "ping.hello\nhi" }),
    );
    assert_eq!(task["result"], "pong: hi", "{task}");
    // An agent that declares such a capability is refused when it loads.
    let out = orch.run(&["run", &p("impostor")]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid descriptor: capability name \"msg:ping.hello\": a capability name is 1-128 characters of letters, digits, '.', '-' and '_'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_subscription_outside_the_grants_is_refused_at_install() {
    let orch = Orch::new();
    let wasm = orch.stage("messenger", "messenger", |m| {
        m.replace(
            "subscriptions = [\"ping.hello\"]",
            "subscriptions = [\"orders.created\"]",
        )
    });
    let out = orch.run(&["plugin", "install", "-y", &wasm]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("field `plugin.subscriptions`: orders.created is not within the subjects granted in grants.messaging"),
        "{}",
        stderr(&out)
    );
}

/// `orch status --watch` prints the status again at each interval until
/// stopped (one JSON object per refresh with --output json, off a terminal).
#[test]
fn status_watch_refreshes_until_stopped() {
    use std::io::BufRead;
    let orch = Orch::new();
    let host = HostProc::start(&orch);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_orch"))
        .args([
            "status",
            "--watch",
            "--interval",
            "100ms",
            "--output",
            "json",
        ])
        .args(["--api", &host.url])
        .env("ORCH_HOME", orch.home.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let statuses: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| l.unwrap())
        .filter(|l| !l.is_empty())
        .take(3)
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(statuses.len(), 3);
    assert!(statuses.iter().all(|s| s["host"] == statuses[0]["host"]));
    // A bad interval is refused before anything is shown.
    let out = orch.run(&["status", "--watch", "--interval", "0ms", "--api", &host.url]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        crate::common::stderr(&out)
    );
}

/// A durable agent (the planner, `durable = true`) whose host is killed
/// after some of its `tasks.call` sub-tasks ended: after the restart its
/// task runs again and the recorded calls are replayed, so each section is
/// counted once (at most one more: the one counting at the kill), and the
/// report is the one a run without the kill gives.
#[test]
fn a_durable_agent_replays_its_recorded_calls_after_kill_9() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("planner")]);
    // One section at a time, so the kill finds some counted, some not.
    let counter = orch.stage("wordcount-js", "wordcount-js", |m| {
        m.replace("[limits]\n", "[limits]\nmax_instances = 1\n")
    });
    orch.ok(&["plugin", "install", "-y", &counter]);
    let doc: String = (1..=12)
        .map(|i| format!("# Part {i}\n{}\n", "word ".repeat(i * 3)))
        .collect();
    let host = HostProc::start(&orch);
    let reference = host.wait(&host.submit("text.report", &doc));
    assert_eq!(reference["status"], "completed", "{reference}");

    let started = |host: &HostProc| {
        let response = ureq::get(&format!("{}/v1/events?capability=text.wordcount", host.url))
            .call()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Value>();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let reader = std::io::BufReader::new(response.into_body().into_reader());
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if let Some(data) = line.strip_prefix("data:") {
                    if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                        if v["kind"] == "started" && tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        rx
    };
    let before = started(&host);
    let id = host.submit("text.report", &doc);
    // Four starts on one slot: the first sections have ended, and a
    // section's call is recorded as it ends.
    for _ in 0..4 {
        before
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a section started");
    }
    host.kill9();
    // What the durable log holds of this report's calls at the kill: those
    // are replayed, every other section runs again.
    let recorded = {
        use redb::ReadableTable;
        let db = redb::Database::open(orch.home.path().join("calls.redb")).unwrap();
        let txn = db.begin_read().unwrap();
        let calls: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("calls");
        let table = txn.open_table(calls).unwrap();
        let prefix = format!("{id}/");
        table
            .iter()
            .unwrap()
            .filter(|row| {
                row.as_ref()
                    .is_ok_and(|(k, _)| k.value().starts_with(&prefix))
            })
            .count()
    };
    assert!((1..12).contains(&recorded), "{recorded} calls recorded");
    let host = HostProc::start(&orch);
    let report = host.wait(&id);
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["result"], reference["result"], "the report changed");
    // The restarted host's own count of wordcount attempts (sub-tasks
    // included): it starts at 0 with the process, so none is missed.
    let metrics = HostProc::agent()
        .get(&format!("{}/metrics", host.url))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let counted_after: usize = metrics
        .lines()
        .filter(|l| {
            l.starts_with("orch_task_attempts_total{")
                && l.contains("capability=\"text.wordcount\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .sum();
    // Exactly the sections without a record ran again.
    assert_eq!(counted_after, 12 - recorded, "{recorded} recorded");
    eprintln!("calls recorded at the kill: {recorded}; sections run after it: {counted_after}");
}

/// A client that keeps the event stream (or the dashboard) open does not
/// keep SIGTERM from stopping the host: the stream ends at the stop.
#[test]
fn sigterm_ends_open_event_streams_and_the_host_exits() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    let mut host = HostProc::start(&orch);
    let events = crate::workflow::Events::open(&host, "");
    let id = host.submit("echo", "x");
    events.next("completed");
    assert_eq!(host.wait(&id)["status"], "completed");
    host.signal("-TERM");
    // Waited for on a thread, so that a host that never exits fails the
    // test instead of hanging it.
    let mut child = std::mem::replace(
        &mut host.child,
        std::process::Command::new("true").spawn().unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the host did not exit within 60 s of SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
}

/// `[host] instance_slots`, as a pair: with 4 slots, 4 tasks that wait
/// 1 s in a host call (the `nap` fixture sleeps through WASI's clock)
/// all run at once; 8 at once wait for a free slot in turn, never more
/// than 4 running, and none fails for lack of one.
#[test]
fn tasks_past_the_instance_slots_wait_for_one_and_none_fails() {
    const SLOTS: usize = 4;
    let orch = Orch::new();
    orch.config(&format!(
        "[host]\ninstance_slots = {SLOTS}\ninstances = {}\n",
        SLOTS * 2
    ));
    orch.ok(&["plugin", "install", "-y", &p("nap")]);
    let host = HostProc::start(&orch);
    let run = |n: usize| -> usize {
        let lines = vec![json!({ "capability": "test.nap", "input": "1000" }); n];
        // Each task ran from its end less the time the agent slept. Its end
        // is written after its slot is freed, so on a loaded machine the
        // next task may start a little before it: 150 ms either side is
        // not an overlap (two waves are 1 s apart, one wave overlaps by
        // most of its second).
        let mut edges = Vec::new();
        for task in host.batch(&lines) {
            assert_eq!(task["status"], "completed", "{task}");
            let slept: u64 = task["result"].as_str().unwrap().parse().unwrap();
            assert!(slept >= 1000, "{task}");
            let end = task["finished_at_ms"].as_u64().unwrap();
            edges.push((end - slept + 150, 1i32));
            edges.push((end - 150, -1i32));
        }
        edges.sort();
        let (mut now, mut most) = (0i32, 0i32);
        for (_, step) in edges {
            now += step;
            most = most.max(now);
        }
        most as usize
    };
    assert_eq!(run(SLOTS), SLOTS, "tasks within the slots run at once");
    assert_eq!(run(SLOTS * 2), SLOTS, "tasks past the slots wait for one");
}

/// A plugin with `reuse` whose kept instance holds the host's only slot
/// runs its next task on that instance (placement takes the slot with the
/// instance in it, instead of dropping it for a slot); another plugin's
/// task takes the slot from it.
#[test]
fn a_kept_instance_holding_the_only_slot_serves_its_plugin_and_yields_to_others() {
    let orch = Orch::new();
    orch.config("[host]\ninstance_slots = 1\n");
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    orch.ok(&["plugin", "install", "-y", &p("tally")]);
    let host = HostProc::start(&orch);
    let task = |capability: &str, input: &str| {
        let (code, task) = host.post(
            "/v1/tasks?wait=60s",
            &json!({ "capability": capability, "input": input }),
        );
        assert_eq!(code, 201, "{task}");
        assert_eq!(task["status"], "completed", "{task}");
        task["result"].as_str().unwrap().to_string()
    };
    // tally.toml: reuse = 3.
    let served: Vec<String> = (0..4).map(|_| task("test.tally", "count")).collect();
    assert_eq!(served, ["1", "2", "3", "1"]);
    assert_eq!(task("echo", "x"), "x");
    assert_eq!(task("test.tally", "count"), "1");
}

/// A second host on the home of a running one is refused, says why, and
/// leaves the first one serving.
#[test]
fn a_second_host_on_the_same_home_is_refused_and_says_why() {
    let orch = Orch::new();
    let host = HostProc::start(&orch);
    let out = orch.run(&["host", "start", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("another process has it open: is a host already running on this home?"),
        "{}",
        stderr(&out)
    );
    assert_eq!(host.get("/v1/status").0, 200);
}
