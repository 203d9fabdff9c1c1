//! Hosts joined through a real nats-server (started by the test on a free
//! loopback port): membership by heartbeat, a killed host reported dead, a
//! stopped host reported as left, a restarted host back under its id, and
//! hosts reconnecting after the server restarts.
use std::time::{Duration, Instant};

use crate::common::{hosts, p, until_serving, HostProc, NatsServer, Orch, TestCa, TestOperator};
use futures_util::StreamExt;
use serde_json::{json, Value};

fn state_of(h: &HostProc, id: &str) -> Option<String> {
    hosts(h)
        .into_iter()
        .find(|m| m["host"] == id)
        .map(|m| m["state"].as_str().unwrap().to_string())
}

fn host_id(orch: &Orch) -> String {
    std::fs::read_to_string(orch.home.path().join("host-id")).unwrap()
}

#[test]
fn hosts_see_each_other_and_a_killed_host_turns_dead() {
    let nats = NatsServer::start();
    let (a, b, c) = (Orch::new(), Orch::new(), Orch::new());
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    b.ok(&["plugin", "install", "-y", &p("wordcount")]);
    c.ok(&["plugin", "install", "-y", &p("counter")]);
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let hb = HostProc::start_with(&b, &args);
    let hc = HostProc::start_with(&c, &args);
    let (ida, idb, idc) = (host_id(&a), host_id(&b), host_id(&c));

    ha.until("three live hosts", |h| {
        hosts(h).iter().filter(|m| m["state"] == "alive").count() == 3
    });
    let members = hosts(&ha);
    let b_seen = members.iter().find(|m| m["host"] == idb.as_str()).unwrap();
    assert_eq!(
        b_seen["capabilities"],
        serde_json::json!(["text.wordcount"])
    );
    assert_eq!(b_seen["free"], 16);
    assert_eq!(b_seen["api"], hb.url.as_str());
    // Any host answers for all: the CLI against host B lists A too.
    hb.until("B sees three live hosts", |h| {
        hosts(h).iter().filter(|m| m["state"] == "alive").count() == 3
    });
    let text = b.ok(&["status"]);
    assert!(
        text.contains(&ida) && text.contains("alive") && text.contains("[echo]"),
        "{text}"
    );

    // SIGKILL: no leave message; the others notice the silence.
    let killed = Instant::now();
    hc.kill9();
    let mut dead = Value::Null;
    ha.until("the killed host is reported dead", |h| {
        match hosts(h).into_iter().find(|m| m["host"] == idc) {
            Some(m) if m["state"] == "dead" => {
                dead = m;
                true
            }
            _ => false,
        }
    });
    let detected = killed.elapsed();
    // Dead after 1 s without a heartbeat (they come every 250 ms), seen
    // within 3 s of the kill. The silence is measured from the last
    // heartbeat, which a loaded machine may have sent late, not from the
    // kill, so the bound below is the API's own account of it; that hosts
    // which beat are not called dead is what the checks above show.
    assert!(
        dead["last_heartbeat_ms"].as_u64().unwrap() >= 1000,
        "{dead}"
    );
    assert!(detected < Duration::from_secs(3), "{detected:?}");
    eprintln!("dead host detected after {detected:?}");

    // A restarted host comes back under the same id, with no manual step.
    let hc = HostProc::start_with(&c, &args);
    ha.until("the restarted host is alive", |h| {
        state_of(h, &idc).as_deref() == Some("alive")
    });

    // SIGTERM: the host says goodbye and is shown as left at once.
    let mut hb = hb;
    hb.signal("-TERM");
    ha.until("the stopped host is reported as left", |h| {
        state_of(h, &idb).as_deref() == Some("left")
    });
    assert!(hb.child.wait().unwrap().success());
    // Its tasks were the stream's, not in a journal of its own.
    let log = std::fs::read_to_string(b.work.path().join("host.log")).unwrap();
    assert!(
        log.contains(
            "unfinished tasks stay on the NATS stream and run on any host that serves them"
        ),
        "{log}"
    );
    drop(hc);
}

#[test]
fn hosts_reconnect_after_the_server_restarts() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    b.ok(&["plugin", "install", "-y", &p("echo")]);
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let _hb = HostProc::start_with(&b, &args);
    let idb = host_id(&b);
    ha.until("both hosts alive", |h| {
        state_of(h, &idb).as_deref() == Some("alive")
    });

    let nats = nats.restart();
    let restarted_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // B's heartbeats stop reaching A while the server is down; after the
    // restart both reconnect on their own and A hears B again: a heartbeat
    // B sent after the restart.
    ha.until("a heartbeat from B after the restart", |h| {
        hosts(h).iter().any(|m| {
            m["host"] == idb.as_str()
                && m["state"] == "alive"
                && m["sent_at_ms"].as_u64().unwrap() > restarted_ms
        })
    });
    drop(nats);
}

#[test]
fn a_submission_while_the_server_is_down_is_unavailable_not_unknown() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    // B serves nothing: it is there to be seen.
    let b = Orch::new();
    let _hb = HostProc::start_with(&b, &["--nats", nats.url.as_str()]);
    let idb = host_id(&b);
    ha.until("B alive", |h| state_of(h, &idb).as_deref() == Some("alive"));
    until_serving(&ha, "echo", 1);
    let (code, first) = ha.post("/v1/tasks", &json!({ "capability": "echo" }));
    assert_eq!(code, 201);
    let first = first["id"].as_str().unwrap().to_string();
    drop(nats);
    // No heartbeat arrives, its own included: no host seems to serve echo.
    // The host still shows itself alive, says it is not connected, and
    // does not call B dead: it cannot tell.
    let ida = host_id(&a);
    ha.until("the host hears no one", |h| {
        let (_, status) = h.get("/v1/status");
        let hosts = status["cluster"]["hosts"].as_array().unwrap().clone();
        let silent = |m: &Value| m["last_heartbeat_ms"].as_u64().unwrap() > 1000;
        status["cluster"]["connected"] == false
            && hosts.len() == 2
            && hosts.iter().all(|m| {
                silent(m)
                    && if m["host"] == ida.as_str() {
                        m["state"] == "alive"
                    } else {
                        m["state"] == "unknown"
                    }
            })
    });
    let out = a.run(&["status", "--api", &ha.url]);
    assert_eq!(out.status.code(), Some(0));
    let printed = crate::common::stdout(&out);
    assert!(
        printed.contains("not connected: other hosts as last heard")
            && printed.contains("unknown tasks on the stream"),
        "{printed}"
    );
    let (code, answer) = ha.post("/v1/tasks", &json!({ "capability": "echo" }));
    assert_eq!(code, 503, "{answer}");
    assert_eq!(answer["error"]["kind"], "unavailable", "{answer}");
    let out = a.run(&["task", "submit", "--api", &ha.url, "--capability", "echo"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        crate::common::stderr(&out)
    );
    // Reads answer at once that the server is not reachable, rather than
    // after the NATS client's request timeout.
    for path in [
        "/v1/tasks".to_string(),
        format!("/v1/tasks/{first}"),
        "/v1/tasks?status=queued".to_string(),
        "/v1/runs?limit=1".to_string(),
    ] {
        let (code, answer) = ha.get(&path);
        assert_eq!(code, 503, "{path}: {answer}");
        assert_eq!(answer["error"]["kind"], "unavailable", "{answer}");
        assert!(
            answer["error"]["message"]
                .as_str()
                .unwrap()
                .contains("not connected"),
            "{answer}"
        );
    }
    // A capability nobody ever served is unavailable too: the host cannot
    // tell while it hears no one.
    let (code, answer) = ha.post("/v1/tasks", &json!({ "capability": "no.such" }));
    assert_eq!(
        (code, answer["error"]["kind"].as_str()),
        (503, Some("unavailable"))
    );
}

#[test]
fn a_host_without_a_reachable_server_says_so() {
    let orch = Orch::new();
    let port = crate::common::unused_port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = orch.run(&["host", "start", "--listen", "127.0.0.1:0", "--nats", &url]);
    assert_eq!(out.status.code(), Some(1));
    let err = crate::common::stderr(&out);
    assert!(
        err.contains(&format!("cannot connect to NATS at {url}")),
        "{err}"
    );
}

use crate::common::install_fixture;

fn install_sleep(orch: &Orch) {
    install_fixture(
        orch,
        "sleep",
        "test.sleep",
        "\n[limits]\nfuel = 10000000000\n",
    );
}

/// Waits until `h` sees `n` live hosts that serve `capability`.
#[test]
fn tasks_run_only_on_hosts_with_the_capability() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    b.ok(&["plugin", "install", "-y", &p("wordcount")]);
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let hb = HostProc::start_with(&b, &args);
    until_serving(&ha, "text.wordcount", 1);
    until_serving(&hb, "echo", 1);
    let (ida, idb) = (host_id(&a), host_id(&b));
    for i in 0..20 {
        // Submitted to the host that does not serve it.
        let id = ha.submit("text.wordcount", &format!("w{i} x"));
        let task = ha.wait(&id);
        assert_eq!(task["status"], "completed", "{task}");
        assert_eq!(task["host"], idb.as_str());
        assert_eq!(
            task["result"],
            r#"{"words":2,"lines":0,"bytes":4}"#
                .replace('4', &(3 + format!("{i}").len()).to_string())
        );
        let id = hb.submit("echo", &format!("e{i}"));
        let task = hb.wait(&id);
        assert_eq!(
            (task["host"].as_str(), task["result"].as_str()),
            (Some(ida.as_str()), Some(format!("e{i}").as_str()))
        );
    }
    // Nobody serves it: refused at submit, as on a lone host.
    let (code, v) = ha.post(
        "/v1/tasks",
        &serde_json::json!({ "capability": "image.resize" }),
    );
    assert_eq!(
        (code, v["error"]["kind"].as_str()),
        (400, Some("unknown-capability"))
    );
}

#[test]
fn a_duplicate_submission_is_one_task() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("counter")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "counter", 1);
    let body = serde_json::json!({ "capability": "counter", "idempotency_key": "invoice-7" });
    let (first_code, first) = ha.post("/v1/tasks?wait=30s", &body);
    let (again_code, again) = ha.post("/v1/tasks?wait=30s", &body);
    assert_eq!((first_code, again_code), (201, 200));
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["result"], first["result"]);
    // The counter ran once: a second run would have stored 2.
    let (_, other) = ha.post(
        "/v1/tasks?wait=30s",
        &serde_json::json!({ "capability": "counter" }),
    );
    assert_eq!(other["result"], "2");
    let (_, list) = ha.get("/v1/tasks?limit=100");
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2);
}

#[test]
fn sigkill_of_a_host_midway_loses_and_duplicates_nothing() {
    const N: usize = 1000;
    let nats = NatsServer::start();
    let homes = [Orch::new(), Orch::new(), Orch::new()];
    for h in &homes {
        h.config("[host]\ninstances = 2\n");
        install_sleep(h);
    }
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&homes[0], &args);
    let hb = HostProc::start_with(&homes[1], &args);
    let hc = HostProc::start_with(&homes[2], &args);
    until_serving(&ha, "test.sleep", 3);
    let idc = host_id(&homes[2]);
    // Four clients submit to A and B.
    let urls = [ha.url.clone(), hb.url.clone()];
    let ids: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let url = urls[w % 2].clone();
                s.spawn(move || {
                    let agent = HostProc::agent();
                    (0..N / 4)
                        .map(|_| {
                            let mut r = agent
                                .post(&format!("{url}/v1/tasks"))
                                .header("content-type", "application/json")
                                .send(r#"{"capability":"test.sleep","input":"20"}"#)
                                .unwrap();
                            assert_eq!(r.status().as_u16(), 201);
                            let v: Value =
                                serde_json::from_str(&r.body_mut().read_to_string().unwrap())
                                    .unwrap();
                            v["id"].as_str().unwrap().to_string()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(ids.len(), N);
    // Kill C while it runs tasks.
    hc.until("C runs tasks", |h| {
        let agents = h.get("/v1/agents").1;
        let a = &agents["agents"][0];
        a["in_flight"].as_u64().unwrap() >= 1 && a["completed"].as_u64().unwrap() >= 10
    });
    hc.kill9();
    let killed = Instant::now();
    let killed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut redispatch_ms = 0;
    let mut by_host = std::collections::BTreeMap::new();
    let mut redelivered = 0;
    for id in &ids {
        let task = ha.wait(id);
        assert_eq!(task["status"], "completed", "{task}");
        assert!(task["result"].as_str().unwrap().parse::<u64>().unwrap() >= 20);
        if task["attempts"].as_u64().unwrap() > 1 {
            redelivered += 1;
            let done = task["finished_at_ms"].as_u64().unwrap();
            redispatch_ms = redispatch_ms.max(done.saturating_sub(killed_ms));
            assert_ne!(task["host"], idc.as_str());
        }
        *by_host
            .entry(task["host"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    let all_done = killed.elapsed();
    eprintln!(
        "{N} tasks: per host {by_host:?}; {redelivered} redelivered, the last done {redispatch_ms} ms after the kill; all done {all_done:?} after it"
    );
    // C's tasks in flight went to the others, within the ack wait (2 s)
    // and a run.
    assert!(redelivered >= 1);
    assert!(redispatch_ms < 3_000, "{redispatch_ms} ms");
    // One record per task, none extra.
    let (_, list) = ha.get("/v1/tasks?limit=10000");
    let listed: std::collections::BTreeSet<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), N);
    assert!(ids.iter().all(|id| listed.contains(id.as_str())));
    assert!(by_host.len() == 3, "{by_host:?}");
}

#[test]
fn a_paused_hosts_late_result_is_fenced() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    for h in [&a, &b] {
        h.config("[host]\ninstances = 1\n");
        install_sleep(h);
    }
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    until_serving(&ha, "test.sleep", 1);
    let id = ha.submit("test.sleep", "1500");
    ha.until("A runs the task", |h| {
        h.get(&format!("/v1/tasks/{id}")).1["status"] == "running"
    });
    ha.signal("-STOP");
    // B joins; once A's delivery is past the ack wait, B gets the task.
    let hb = HostProc::start_with(&b, &args);
    let task = hb.wait(&id);
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["host"], host_id(&b).as_str());
    assert_eq!(task["attempts"], 2);
    ha.signal("-CONT");
    // A finishes its copy and finds the result taken.
    ha.until("A fences its late result", |h| {
        h.get("/v1/status").1["cluster"]["fenced"] == 1
    });
    let again = hb.get(&format!("/v1/tasks/{id}")).1;
    assert_eq!(again["host"], host_id(&b).as_str());
    assert_eq!(again["finished_at_ms"], task["finished_at_ms"]);
}

#[test]
fn a_poison_task_becomes_a_dead_letter_while_others_flow() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    for h in [&a, &b] {
        install_fixture(h, "panic", "test.panic", "");
        h.ok(&["plugin", "install", "-y", &p("echo")]);
    }
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let _hb = HostProc::start_with(&b, &args);
    until_serving(&ha, "test.panic", 2);
    let poison = ha.submit("test.panic", "bad input");
    let others: Vec<String> = (0..50).map(|i| ha.submit("echo", &i.to_string())).collect();
    for (i, id) in others.iter().enumerate() {
        assert_eq!(ha.wait(id)["result"], i.to_string());
    }
    let dead = ha.wait(&poison);
    assert_eq!(dead["status"], "dead", "{dead}");
    assert_eq!(dead["attempts"], 3);
    let errors = dead["attempt_errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{dead}");
    assert!(errors.iter().all(|e| e["kind"] == "trap"), "{dead}");
    assert!(
        dead["error"]["message"]
            .as_str()
            .unwrap()
            .contains("agent gave up: bad input"),
        "{dead}"
    );
}

#[test]
fn a_nats_restart_mid_run_loses_no_accepted_task() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.config("[host]\ninstances = 2\n");
    install_sleep(&a);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "test.sleep", 1);
    let ids: Vec<String> = (0..200).map(|_| ha.submit("test.sleep", "10")).collect();
    let nats = nats.restart();
    for id in &ids {
        let task = ha.wait(id);
        assert_eq!(task["status"], "completed", "{task}");
    }
    drop(nats);
}

#[test]
fn a_plain_nats_client_can_submit_a_task_as_documented() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "echo", 1);
    // docs/cluster.md: a JetStream publish on orch.v1.task.<capability>
    // with Nats-Msg-Id and Orch-Task-Id, the payload as the body.
    let republished = submit_from_outside(&nats, "job-42", 2);
    assert_eq!(republished["task"]["status"], "completed", "{republished}");
    // "from outside", base64.
    assert_eq!(republished["result_base64"], "ZnJvbSBvdXRzaWRl");
    let task = ha.wait("job-42");
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["result"], "from outside");
    // The second publish was a duplicate: one task.
    let (_, list) = ha.get("/v1/tasks?limit=10");
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list}");
}

/// A listing asks the server only for what it returns: the matches near
/// the stream's end, found by the server's subject index. A read of every
/// entry (the listing before the indexed keys) would hand all 4,003 to
/// `keep`.
#[test]
fn a_listing_reads_matches_near_the_end_not_every_entry() {
    use orch::cluster::keys;
    let nats = NatsServer::start();
    let rt = crate::common::runtime();
    rt.block_on(async {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "T".into(),
            subjects: vec!["t.>".into()],
            allow_direct: true,
            ..Default::default()
        })
        .await
        .unwrap();
        let subjects = (0..2000)
            .map(|i| format!("t.a.{i}"))
            .chain((0..3).map(|i| format!("t.b.{i}")))
            .chain((2000..4000).map(|i| format!("t.a.{i}")));
        let mut acks = Vec::new();
        for subject in subjects {
            acks.push(js.publish(subject, "x".into()).await.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
        let mut kept = 0;
        let found = keys::newest(&client, "T", "t.b.>", 3, |e| {
            kept += 1;
            Some(e.sequence)
        })
        .await
        .unwrap();
        assert_eq!(found, [2003, 2002, 2001]);
        assert_eq!(kept, 3);
        let mut kept = 0;
        let found = keys::newest(&client, "T", "t.a.>", 5, |e| {
            kept += 1;
            Some(e.sequence)
        })
        .await
        .unwrap();
        assert_eq!(found, [4003, 4002, 4001, 4000, 3999]);
        // One window of 256 sequences from the end, not the whole stream.
        assert!(kept <= 256, "{kept} entries read");
    });
}

/// A listing reads the buckets from their end through the server's
/// subject index: a match far behind hundreds of newer tasks of another
/// capability is found, and the newest come first.
#[test]
fn a_listing_finds_old_matches_behind_many_newer_tasks() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    install_sleep(&a);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "echo", 1);
    until_serving(&ha, "test.sleep", 1);
    let old = ha.submit("test.sleep", "0");
    assert_eq!(ha.wait(&old)["status"], "completed");
    // More than the first window a listing of 100 reads (400 sequences).
    let ids: Vec<String> = (0..600)
        .map(|i| {
            let (code, task) = ha.post(
                "/v1/tasks?wait=60s",
                &json!({ "capability": "echo", "input": i.to_string() }),
            );
            assert_eq!(code, 201, "{task}");
            task["id"].as_str().unwrap().to_string()
        })
        .collect();
    let (code, list) = ha.get("/v1/tasks?capability=test.sleep");
    assert_eq!(code, 200, "{list}");
    let found: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(found, [old.as_str()]);
    let (_, list) = ha.get("/v1/tasks?status=completed&capability=echo&limit=3");
    let newest: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = ids.iter().rev().take(3).map(String::as_str).collect();
    assert_eq!(newest, expected);
    // No task is queued or running any more: their records were deleted.
    let (_, list) = ha.get("/v1/tasks?status=queued");
    assert_eq!(list["tasks"], json!([]));
    let (_, list) = ha.get("/v1/tasks?limit=1000");
    assert_eq!(list["tasks"].as_array().unwrap().len(), 601);
}

#[test]
fn a_results_bucket_made_without_republish_gets_it() {
    let nats = NatsServer::start();
    let rt = crate::common::runtime();
    let js = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
        // As a host before results were republished made it.
        js.create_key_value(async_nats::jetstream::kv::Config {
            bucket: "ORCH_RESULTS".into(),
            history: 1,
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
        js
    });
    let republish = || {
        rt.block_on(async {
            let mut stream = js.get_stream("KV_ORCH_RESULTS").await.unwrap();
            stream.info().await.unwrap().config.republish.clone()
        })
    };
    assert_eq!(republish(), None);
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "echo", 1);
    let republish = republish().expect("the host adds republish to the bucket");
    assert_eq!(republish.source, "$KV.ORCH_RESULTS.*.*.>");
    assert_eq!(republish.destination, "orch.v1.results.>");
    let id = ha.submit("echo", "after the upgrade");
    assert_eq!(ha.wait(&id)["result"], "after the upgrade");
}

/// A stream and a consumer made by a host before tasks carried their id
/// in the subject: the host adds the subject and the consumer's filter, and
/// takes both kinds of task.
#[test]
fn a_tasks_stream_and_consumer_made_before_task_ids_get_their_subjects() {
    use async_nats::jetstream::{consumer, stream};
    let nats = NatsServer::start();
    let rt = crate::common::runtime();
    let js = rt.block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats.url.as_str()).await.unwrap());
        let tasks = js
            .create_stream(stream::Config {
                name: "ORCH_TASKS".into(),
                subjects: vec!["orch.v1.task.>".into(), "orch.v1.fence.>".into()],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
        tasks
            .create_consumer(consumer::pull::Config {
                durable_name: Some("cap_echo".into()),
                filter_subject: "orch.v1.task.echo".into(),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .unwrap();
        js
    });
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "echo", 1);
    let (subjects, filters) = rt.block_on(async {
        let mut tasks = js.get_stream("ORCH_TASKS").await.unwrap();
        let subjects = tasks.info().await.unwrap().config.subjects.clone();
        let mut echo: consumer::PullConsumer = tasks.get_consumer("cap_echo").await.unwrap();
        let config = echo.info().await.unwrap().config.clone();
        (subjects, config.filter_subjects)
    });
    assert!(
        subjects.contains(&"orch.v1.task-id.>".to_string()),
        "{subjects:?}"
    );
    assert_eq!(filters, ["orch.v1.task.echo", "orch.v1.task-id.*.echo"]);
    let id = ha.submit("echo", "after the upgrade");
    assert_eq!(ha.wait(&id)["result"], "after the upgrade");
    // Another client's task, on the subject without an id.
    let republished = submit_from_outside(&nats, "outside-1", 1);
    assert_eq!(republished["task"]["status"], "completed", "{republished}");
}

/// Publishes an echo task "from outside" `times` times as docs/cluster.md
/// describes (a JetStream publish on orch.v1.task.echo with Nats-Msg-Id and
/// Orch-Task-Id `id`), and returns the result the server republishes on
/// orch.v1.results.<id> once it is stored.
fn submit_from_outside(nats: &NatsServer, id: &str, times: usize) -> Value {
    crate::common::runtime().block_on(async {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let mut results = client
            .subscribe(format!("orch.v1.results.{id}"))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let js = async_nats::jetstream::new(client);
        for _ in 0..times {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            headers.insert("Orch-Task-Id", id);
            js.publish_with_headers("orch.v1.task.echo", headers, "from outside".into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let message = tokio::time::timeout(Duration::from_secs(30), results.next())
            .await
            .expect("no result republished within 30 s")
            .unwrap();
        serde_json::from_slice::<Value>(&message.payload).unwrap()
    })
}

#[test]
fn tasks_call_reaches_an_agent_on_another_host() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    a.ok(&["plugin", "install", "-y", &p("planner")]);
    b.ok(&["plugin", "install", "-y", &p("wordcount")]);
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let _hb = HostProc::start_with(&b, &args);
    until_serving(&ha, "text.wordcount", 1);
    let doc = "# One\na b\n# Two\nc d e\n";
    let (code, report) = ha.post(
        "/v1/tasks?wait=30s",
        &serde_json::json!({ "capability": "text.report", "input": doc }),
    );
    assert_eq!(code, 201, "{report}");
    assert_eq!(report["status"], "completed", "{report}");
    assert_eq!(report["host"], host_id(&a).as_str());
    let total = format!(r#""total":{{"words":9,"lines":4,"bytes":{}}}}}"#, doc.len());
    assert!(
        report["result"].as_str().unwrap().ends_with(&total),
        "{report}"
    );
    // The two sections were counted on B, under ids derived from the
    // planner's, with the planner's remaining fuel as their limit.
    let calls = report["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c["outcome"] == "ok"), "{report}");
    let id = report["id"].as_str().unwrap();
    for n in 1..=2 {
        let sub = ha.get(&format!("/v1/tasks/{id}.{n}")).1;
        assert_eq!(sub["status"], "completed", "{sub}");
        assert_eq!(sub["host"], host_id(&b).as_str());
    }
}

#[test]
fn messages_cross_hosts_within_the_grants() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    // A sends but does not subscribe; B subscribes to ping.hello.
    let sender = a.stage("messenger", "messenger", |m| {
        m.replace("subscriptions = [\"ping.hello\"]\n", "")
    });
    a.ok(&["plugin", "install", "-y", &sender]);
    b.ok(&["plugin", "install", "-y", &p("messenger")]);
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let _hb = HostProc::start_with(&b, &args);
    until_serving(&ha, "test.request", 2);
    let ask = |input: &str| -> String {
        let (code, task) = ha.post(
            "/v1/tasks?wait=30s",
            &serde_json::json!({ "capability": "test.request", "input": input }),
        );
        assert_eq!(code, 201, "{task}");
        task["result"].as_str().unwrap().to_string()
    };
    // B's subscription answers A's request. A's host subscribes to nothing,
    // so the answer can only come from B. Until B has subscribed, the
    // request finds no one; that is the event to wait for.
    ha.until("B answers", |_| ask("ping.hello\nhi") == "pong: hi");
    assert_eq!(ask("ping.hello\nacross"), "pong: across");
    assert_eq!(
        ask("secret.plans\nhi"),
        "error: subject secret.plans is not granted to messenger (the manifest's [grants] messaging lists [\"ping.*\"])"
    );
    assert_eq!(
        ask("ping.nobody\nhi"),
        "error: no agent subscribes to ping.nobody"
    );
}

/// `orch host start` joining `nats` with `extra` arguments must fail:
/// status 1 and an error naming the server. Returns the error.
fn refused_join(orch: &Orch, nats: &NatsServer, extra: &[&str]) -> String {
    let mut args = vec![
        "host",
        "start",
        "--listen",
        "127.0.0.1:0",
        "--nats",
        &nats.url,
    ];
    args.extend_from_slice(extra);
    let out = orch.run(&args);
    assert_eq!(out.status.code(), Some(1));
    let err = crate::common::stderr(&out);
    assert!(
        err.contains(&format!("cannot connect to NATS at {}", nats.url)),
        "{err}"
    );
    err
}

/// A host joining `nats` with `extra` arguments serves echo tasks.
fn joins_and_runs_echo(orch: &Orch, nats: &NatsServer, extra: &[&str], text: &str) {
    let mut args = vec!["--nats", nats.url.as_str()];
    args.extend_from_slice(extra);
    let host = HostProc::start_with(orch, &args);
    until_serving(&host, "echo", 1);
    let id = host.submit("echo", text);
    assert_eq!(host.wait(&id)["result"], text);
}

#[test]
fn a_token_protected_server_needs_the_token() {
    let nats = NatsServer::start_with(&["--auth", "s3cret-token"]);
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    let err = refused_join(&orch, &nats, &[]);
    assert!(err.contains("authorization violation"), "{err}");
    joins_and_runs_echo(
        &orch,
        &nats,
        &["--nats-token", "s3cret-token"],
        "with a token",
    );
}

#[test]
fn a_tls_server_is_trusted_through_the_given_ca_only() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new(dir.path(), "orch-test");
    let other_ca = TestCa::new(dir.path(), "other");
    let nats = NatsServer::start_with(&[
        "--tls",
        "--tlscert",
        &server_ca.cert.display().to_string(),
        "--tlskey",
        &server_ca.key.display().to_string(),
    ]);
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    // Trusting another CA: the server's certificate is refused.
    let other = other_ca.ca.display().to_string();
    let err = refused_join(&orch, &nats, &["--nats-tls-ca", &other]);
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Trusting the CA that signed it: joined over TLS, and tasks run.
    let ca = server_ca.ca.display().to_string();
    joins_and_runs_echo(&orch, &nats, &["--nats-tls-ca", &ca], "over TLS");
}

#[test]
fn a_server_in_operator_mode_admits_a_host_with_user_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let auth = TestOperator::new(dir.path());
    let nats = NatsServer::start_with(&["-c", &auth.config.display().to_string()]);
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    // Without credentials: refused.
    let err = refused_join(&orch, &nats, &[]);
    assert!(err.contains("authorization violation"), "{err}");
    // A credentials file that is not there: the error names it.
    let missing = dir.path().join("nobody.creds").display().to_string();
    let err = refused_join(&orch, &nats, &["--nats-creds", &missing]);
    assert!(err.contains(&missing), "{err}");
    // With the user's credentials: joined, and tasks run.
    let creds = auth.creds.display().to_string();
    joins_and_runs_echo(&orch, &nats, &["--nats-creds", &creds], "with credentials");
}

/// Publishes a task message with `headers` on `orch.v1.task.<capability>`
/// as a plain JetStream client would.
fn publish_raw(nats: &NatsServer, capability: &str, headers: &[(&str, &str)], body: &[u8]) {
    let rt = crate::common::runtime();
    rt.block_on(async {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut map = async_nats::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, *v);
        }
        js.publish_with_headers(
            format!("orch.v1.task.{capability}"),
            map,
            body.to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    });
}

fn cluster_counter(h: &HostProc, name: &str) -> u64 {
    let (_, status) = h.get("/v1/status");
    status["cluster"][name].as_u64().unwrap()
}

#[test]
fn a_message_that_cannot_be_a_task_is_ended_not_redelivered() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "echo", 1);
    publish_raw(&nats, "echo", &[("Nats-Msg-Id", "m1")], b"no id");
    publish_raw(
        &nats,
        "echo",
        &[("Nats-Msg-Id", "m2"), ("Orch-Task-Id", "not an id!")],
        b"bad id",
    );
    ha.until("both messages terminated", |h| {
        cluster_counter(h, "terminated") == 2
    });
    // A valid task behind them runs, and nothing is delivered again: the
    // host has seen each message once.
    publish_raw(
        &nats,
        "echo",
        &[("Nats-Msg-Id", "m3"), ("Orch-Task-Id", "fine-1")],
        b"ok",
    );
    assert_eq!(ha.wait("fine-1")["result"], "ok");
    // Nothing comes back after the ack wait (2 s): an absence, so it can
    // only be checked by waiting past it.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(cluster_counter(&ha, "redelivered"), 0);
    assert_eq!(cluster_counter(&ha, "terminated"), 2);
}

#[test]
fn a_second_message_for_a_task_id_does_not_run_the_agent_again() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("counter")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "counter", 1);
    publish_raw(
        &nats,
        "counter",
        &[("Nats-Msg-Id", "first"), ("Orch-Task-Id", "job-7")],
        b"",
    );
    assert_eq!(ha.wait("job-7")["result"], "1");
    // The same task id under another message id (or after the duplicate
    // window): the stream takes it, the host does not run it.
    publish_raw(
        &nats,
        "counter",
        &[("Nats-Msg-Id", "second"), ("Orch-Task-Id", "job-7")],
        b"",
    );
    ha.until("the second message is acked as a duplicate", |h| {
        cluster_counter(h, "duplicates") == 1
    });
    assert_eq!(ha.wait("job-7")["result"], "1");
    let id = ha.submit("counter", "");
    assert_eq!(ha.wait(&id)["result"], "2", "counter ran once for job-7");
}

#[test]
fn a_result_larger_than_a_nats_message_reaches_the_submitter_whole() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "echo", 1);
    // 800 KiB fits a NATS message (1 MiB); its result in base64 does not,
    // so it goes through the object store. 2 MiB fits neither way.
    for size in [800 << 10, 2 << 20] {
        let input = "x".repeat(size);
        let id = ha.submit("echo", &input);
        let task = ha.wait(&id);
        assert_eq!(task["status"], "completed", "{}", task["error"]);
        assert_eq!(task["result"].as_str().map(str::len), Some(size));
        assert!(task["result"] == input.as_str());
        assert_eq!(task["attempts"], 1);
        assert_eq!(task["payload_bytes"], size);
    }
    assert_eq!(cluster_counter(&ha, "redelivered"), 0);
}

#[test]
fn a_task_whose_payload_object_is_gone_fails_once_with_the_reason() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "echo", 1);
    publish_raw(
        &nats,
        "echo",
        &[
            ("Nats-Msg-Id", "big-1"),
            ("Orch-Task-Id", "big-1"),
            ("Orch-Payload-Object", "payload/big-1"),
        ],
        b"",
    );
    let task = ha.wait("big-1");
    assert_eq!(task["status"], "failed", "{task}");
    assert_eq!(task["error"]["kind"], "unavailable", "{task}");
    let message = task["error"]["message"].as_str().unwrap();
    assert!(message.contains("payload/big-1"), "{message}");
    assert!(message.contains("not in the object store"), "{message}");
    // Ended, not redelivered: the next task runs and nothing came back.
    let id = ha.submit("echo", "after");
    assert_eq!(ha.wait(&id)["result"], "after");
    assert_eq!(cluster_counter(&ha, "redelivered"), 0);
}

#[test]
fn status_counts_the_clusters_tasks() {
    let nats = NatsServer::start();
    let a = Orch::new();
    a.config("[host]\ninstances = 1\n");
    install_sleep(&a);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "test.sleep", 1);
    let ids: Vec<String> = (0..3).map(|_| ha.submit("test.sleep", "1500")).collect();
    let tasks = |h: &HostProc| h.get("/v1/status").1["cluster"]["tasks"].clone();
    // One runs (reported by heartbeat), all three are on the stream.
    ha.until("one running, three on the stream", |h| {
        let t = tasks(h);
        t["running"] == 1 && t["on_stream"] == 3
    });
    for id in &ids {
        assert_eq!(ha.wait(id)["status"], "completed");
    }
    ha.until("nothing left", |h| {
        let t = tasks(h);
        t["running"] == 0 && t["on_stream"] == 0
    });
}

#[test]
fn a_remote_callees_limit_reaches_the_caller_as_the_same_typed_error() {
    let nats = NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    a.ok(&["plugin", "install", "-y", &p("caller")]);
    install_fixture(&b, "hog", "test.hog", "\n[limits]\nmemory = \"8MiB\"\n");
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let _hb = HostProc::start_with(&b, &args);
    until_serving(&ha, "test.hog", 1);
    // hog on B asks for more than its 8 MiB: a memory limit, typed as a
    // limit for the caller on A, as it would be on one host (it used to
    // arrive as the callee's own `failed` answer, rebuilt from text).
    let (code, task) = ha.post(
        "/v1/tasks?wait=30s",
        &serde_json::json!({ "capability": "test.call", "input": "test.hog\n" }),
    );
    assert_eq!(code, 201, "{task}");
    let answer = task["result"].as_str().unwrap();
    assert!(
        answer.starts_with("call-error limit: memory limit: the agent asked for"),
        "{task}"
    );
    assert!(
        answer.ends_with("past the limit of 8388608 bytes"),
        "{answer}"
    );
}

/// A nats-server with its monitoring port on, and that port.
fn monitored_nats() -> (NatsServer, u16) {
    let nats = NatsServer::start_with(&["-m", "-1"]);
    let port = nats
        .monitor_port
        .expect("the server names its monitoring port");
    (nats, port)
}

fn monitor(port: u16, path: &str) -> Value {
    let body = ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

/// The subjects each orch host's connection subscribes to, by host id.
fn host_subscriptions(port: u16) -> Vec<(String, Vec<String>)> {
    monitor(port, "/connz?subs=1")["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| {
            let host = c["name"].as_str()?.strip_prefix("orch-host-")?;
            let subs = c["subscriptions_list"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            Some((host.to_string(), subs))
        })
        .collect()
}

/// The retention (`max_age`, in seconds) of the streams behind the
/// results, the queued records, the objects and the calls, and of the
/// deadline schedules, and the results' duplicate window.
fn retentions(nats: &NatsServer) -> ([u64; 5], u64) {
    let rt = crate::common::runtime();
    rt.block_on(async {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut ages = [0; 5];
        let mut window = 0;
        for (i, name) in [
            "KV_ORCH_RESULTS",
            "KV_ORCH_QUEUED",
            "OBJ_ORCH_OBJECTS",
            "KV_ORCH_CALLS",
            "ORCH_DEADLINES",
        ]
        .iter()
        .enumerate()
        {
            let config = js
                .get_stream(*name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .clone();
            ages[i] = config.max_age.as_secs();
            if i == 0 {
                window = config.duplicate_window.as_secs();
            }
        }
        (ages, window)
    })
}

/// `[host] retention` in a cluster: a host that asks for more than the
/// cluster keeps lengthens it for every host; one that asks for less keeps
/// the cluster's and says so, unless started with `--shorten-retention`
/// (then also below the 2 min duplicate window, which shortens with it).
#[test]
fn a_host_lengthens_the_clusters_retention_and_shortens_it_only_when_asked() {
    let nats = NatsServer::start();
    // ORCH_DEADLINES as hosts made it before it had a retention: no
    // max_age, which a host sets to the cluster's.
    crate::common::runtime().block_on(async {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        async_nats::jetstream::new(client)
            .create_stream(async_nats::jetstream::stream::Config {
                name: "ORCH_DEADLINES".into(),
                subjects: vec![
                    "orch.v1.deadline.at.>".into(),
                    "orch.v1.deadline.due.>".into(),
                ],
                retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
                allow_message_schedules: true,
                ..Default::default()
            })
            .await
            .unwrap();
    });
    let args = ["--nats", nats.url.as_str()];
    let a = Orch::new();
    a.config("[host]\nretention = \"1h\"\n");
    let _ha = HostProc::start_with(&a, &args);
    assert_eq!(retentions(&nats), ([3600; 5], 120));

    let b = Orch::new();
    b.config("[host]\nretention = \"90s\"\n");
    let hb = HostProc::start_with(&b, &args);
    assert_eq!(retentions(&nats), ([3600; 5], 120));
    let log = std::fs::read_to_string(b.work.path().join("host.log")).unwrap();
    assert!(
        log.contains(
            "this host's [host] retention is 90s; the cluster keeps finished tasks for 3600s"
        ) && log.contains("--shorten-retention"),
        "{log}"
    );
    hb.kill9();
    let _hb = HostProc::start_with(&b, &[args[0], args[1], "--shorten-retention"]);
    assert_eq!(retentions(&nats), ([90; 5], 90));

    let c = Orch::new();
    c.config("[host]\nretention = \"3h\"\n");
    let _hc = HostProc::start_with(&c, &args);
    assert_eq!(retentions(&nats), ([3 * 3600; 5], 120));
}

/// A capability's consumer (`cap_test_nap` for `test.nap`), from the
/// JetStream API: (delivered and not acked, not delivered).
fn consumer_counts(nats: &NatsServer, consumer: &str) -> (u64, u64) {
    let rt = crate::common::runtime();
    rt.block_on(async {
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let info = async_nats::jetstream::new(client)
            .get_stream("ORCH_TASKS")
            .await
            .unwrap()
            .consumer_info(consumer)
            .await
            .unwrap();
        (info.num_ack_pending as u64, info.num_pending)
    })
}

fn nap_consumer(nats: &NatsServer) -> (u64, u64) {
    consumer_counts(nats, "cap_test_nap")
}

#[test]
fn a_host_takes_as_many_tasks_as_its_slots_and_the_rest_wait_on_the_stream() {
    let nats = NatsServer::start();
    let orch = Orch::new();
    orch.config("[host]\ninstances = 2\n");
    orch.ok(&["plugin", "install", "-y", &p("nap")]);
    let h = HostProc::start_with(&orch, &["--nats", nats.url.as_str()]);
    until_serving(&h, "test.nap", 1);
    // Tasks that wait in a host call: the host's runtime stays free to
    // answer while they run.
    let ids: Vec<String> = (0..5).map(|_| h.submit("test.nap", "1000")).collect();
    // Two slots: two tasks taken, three left on the stream for any host,
    // for as long as the first two run.
    h.until("two tasks taken", |_| nap_consumer(&nats) == (2, 3));
    // Each sample is kept only if neither running task had ended after it
    // was taken: the counts first, then the statuses.
    let ended = |id: &String| h.get(&format!("/v1/tasks/{id}")).1["status"] == "completed";
    let mut seen = Vec::new();
    loop {
        let counts = nap_consumer(&nats);
        if ended(&ids[0]) || ended(&ids[1]) {
            break;
        }
        seen.push(counts);
        std::thread::sleep(Duration::from_millis(50));
    }
    // (3, 2) only in the moment between the first task's end, which frees
    // its slot, and its ack, which follows its stored result.
    assert!(
        seen.iter().filter(|s| **s == (2, 3)).count() > 3,
        "{seen:?}"
    );
    assert!(
        seen.iter().all(|s| *s == (2, 3) || *s == (3, 2)),
        "{seen:?}"
    );
    for id in &ids {
        assert_eq!(h.wait(id)["status"], "completed");
    }
    h.until("every task acked", |_| nap_consumer(&nats) == (0, 0));
}

#[test]
fn slots_added_while_tasks_run_take_the_tasks_waiting_on_the_stream() {
    let nats = NatsServer::start();
    let orch = Orch::new();
    // One slot per plugin, and fuel for spinning until the deadline.
    orch.config("[host]\ninstances = 1\n[limits]\nmax_fuel = 1000000000000\n");
    let install = |plugin: &str| {
        let shipped = std::fs::read_to_string(p(plugin).replace(".wasm", ".toml")).unwrap();
        let wasm = orch.work.path().join(format!("{plugin}.wasm"));
        std::fs::copy(p(plugin), &wasm).unwrap();
        std::fs::write(
            wasm.with_extension("toml"),
            format!("{shipped}\n[limits]\nfuel = 1000000000000\n"),
        )
        .unwrap();
        orch.ok(&["plugin", "install", "-y", wasm.to_str().unwrap()]);
    };
    install("fixture-js");
    let h = HostProc::start_with(&orch, &["--nats", nats.url.as_str()]);
    until_serving(&h, "test.spin", 1);
    let events = crate::workflow::Events::open(&h, "capability=test.spin");
    // `test.spin` loops until its deadline.
    let spin = || {
        let (code, task) = h.post(
            "/v1/tasks",
            &json!({ "capability": "test.spin", "deadline": "8s" }),
        );
        assert_eq!(code, 201, "{task}");
        task["id"].as_str().unwrap().to_string()
    };
    let first = spin();
    assert_eq!(events.next("started")["task"], first.as_str());
    // One slot, which the first holds: the second waits on the stream.
    let second = spin();
    h.until("the second waits on the stream", |_| {
        consumer_counts(&nats, "cap_test_spin") == (1, 1)
    });
    // A second agent for the capability: one more slot. The second task
    // starts on it while the first still runs.
    install("fixture-c");
    let started = events.next_of(&["started", "failed"]);
    assert_eq!(
        (started["kind"].as_str(), started["task"].as_str()),
        (Some("started"), Some(second.as_str())),
        "{started}"
    );
    assert_eq!(started["agent"], "fixture-c@0.1.0", "{started}");
    for id in [&first, &second] {
        let (code, _) = h.post(&format!("/v1/tasks/{id}/cancel"), &json!({}));
        assert_eq!(code, 200);
    }
}

#[test]
fn a_host_subscribes_to_the_results_it_waits_for_and_to_no_others() {
    let (nats, port) = monitored_nats();
    let (a, b) = (Orch::new(), Orch::new());
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    install_sleep(&b);
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let hb = HostProc::start_with(&b, &args);
    until_serving(&ha, "test.sleep", 1);
    let (ida, idb) = (host_id(&a), host_id(&b));
    let results_subs = |host: &str| -> Vec<String> {
        host_subscriptions(port)
            .into_iter()
            .filter(|(h, _)| h == host)
            .flat_map(|(_, subs)| subs)
            .filter(|s| s.starts_with("orch.v1.results"))
            .collect()
    };
    // Submitted through A, run by B: A hears of its result, B does not.
    let id = ha.submit("test.sleep", "1000");
    ha.until("B runs the task", |h| {
        h.get(&format!("/v1/tasks/{id}")).1["status"] == "running"
    });
    assert_eq!(results_subs(&ida), vec![format!("orch.v1.results.{id}")]);
    assert_eq!(results_subs(&idb), Vec::<String>::new());
    let task = ha.wait(&id);
    assert_eq!(
        (task["status"].as_str(), task["host"].as_str()),
        (Some("completed"), Some(idb.as_str()))
    );
    // Ended: the subscription goes, so none stays per task.
    ha.until("A unsubscribes", |_| results_subs(&ida).is_empty());
    // A wait on a host that did not submit the task subscribes for as long
    // as it waits.
    let id = ha.submit("test.sleep", "200");
    let task = hb.wait(&id);
    assert_eq!(task["status"], "completed");
    hb.until("B unsubscribes", |_| results_subs(&idb).is_empty());
    ha.until("A unsubscribes", |_| results_subs(&ida).is_empty());
}

#[test]
fn past_its_limit_of_result_subscriptions_a_host_hears_every_result_until_the_tasks_end() {
    let (nats, port) = monitored_nats();
    let (a, b) = (Orch::new(), Orch::new());
    // The per-task subscriptions are bounded by max_waits (and 4,096).
    a.config("[host]\nmax_waits = 8\n");
    a.ok(&["plugin", "install", "-y", &p("echo")]);
    b.ok(&["plugin", "install", "-y", &p("nap")]);
    let args = ["--nats", nats.url.as_str()];
    let ha = HostProc::start_with(&a, &args);
    let _hb = HostProc::start_with(&b, &args);
    until_serving(&ha, "test.nap", 1);
    let ida = host_id(&a);
    let results_subs = || -> Vec<String> {
        let mut subs: Vec<String> = host_subscriptions(port)
            .into_iter()
            .filter(|(h, _)| *h == ida)
            .flat_map(|(_, subs)| subs)
            .filter(|s| s.starts_with("orch.v1.results"))
            .collect();
        subs.sort();
        subs
    };
    // Inside the limit: one subscription per task.
    let subjects = |ids: &[String]| -> Vec<String> {
        let mut subs: Vec<String> = ids
            .iter()
            .map(|id| format!("orch.v1.results.{id}"))
            .collect();
        subs.sort();
        subs
    };
    let short: Vec<String> = (0..5).map(|_| ha.submit("test.nap", "1500")).collect();
    let long: Vec<String> = (0..3).map(|_| ha.submit("test.nap", "5000")).collect();
    let all: Vec<String> = short.iter().chain(&long).cloned().collect();
    assert_eq!(results_subs(), subjects(&all));
    // Past it: one subscription to every result.
    let one_more = ha.submit("test.nap", "1500");
    assert!(
        results_subs().contains(&"orch.v1.results.>".to_string()),
        "{:?}",
        results_subs()
    );
    for id in short.iter().chain([&one_more]) {
        assert_eq!(ha.wait(id)["status"], "completed");
    }
    // Three left, under half the limit: a subscription each again, and
    // none to every result.
    ha.until("A subscribes per task again", |_| {
        results_subs() == subjects(&long)
    });
    for id in &long {
        assert_eq!(ha.wait(id)["status"], "completed");
    }
    // Ended: back to none at all.
    ha.until("A subscribes to no results", |_| results_subs().is_empty());
}

/// Submits a task for `key` under `fence` straight to a host's store, as a
/// workflow driver's step does.
async fn submit_under(
    store: &dyn orch::service::TaskStore,
    key: &str,
    fence: &orch::service::Fence,
) -> Result<orch::daemon::Accepted, orch::daemon::HostError> {
    let record = orch::daemon::TaskRecord {
        idempotency_key: Some(key.to_string()),
        ..orch::daemon::TaskRecord::queued(
            store.new_id(Some(key)),
            "nobody.serves".into(),
            orch::daemon::now_ms(),
            1,
        )
    };
    store
        .accept(record, b"x".to_vec(), &|_| {}, true, Some(fence))
        .await
}

/// A workflow run's tasks are stored under its fence: once another driver
/// raises it (a takeover), the replaced driver's submissions are refused
/// by the server in the same write and leave no record; the new driver's
/// are taken. A fence raised again stays one message.
#[test]
fn a_submission_under_a_replaced_fence_is_refused_and_leaves_nothing() {
    use orch::service::Fence;
    let nats = NatsServer::start();
    let home = tempfile::tempdir().unwrap();
    let rt = crate::common::runtime();
    rt.block_on(async {
        let options = orch::node::NodeOptions {
            nats: Some(orch::cluster::NatsOptions {
                url: nats.url.clone(),
                ..Default::default()
            }),
            api: None,
        };
        let engine = orch::Engine::new(orch::EngineConfig::default()).unwrap();
        let node = orch::node::Node::start(
            home.path(),
            orch::config::HostConfig::default(),
            engine,
            options,
        )
        .await
        .unwrap();
        let store = node.tasks().store();
        let fence = |name: &str, sequence| Fence {
            name: name.into(),
            sequence,
        };
        // A new run's driver: no fence raised yet.
        let old = fence("r1", 0);
        let first = submit_under(store, "wf/r1/a/1", &old).await;
        assert!(
            matches!(first, Ok(orch::daemon::Accepted::New)),
            "{first:?}"
        );
        // Another driver takes the run over.
        let raised = store.raise_fence("r1").await.unwrap().unwrap();
        let new = fence("r1", raised);
        // The replaced driver's next step is refused, and leaves no record.
        let stale = submit_under(store, "wf/r1/b/1", &old).await;
        assert!(
            matches!(&stale, Err(orch::daemon::HostError::Fenced(_))),
            "{stale:?}"
        );
        assert_eq!(store.find_key("wf/r1/b/1").await.unwrap(), None);
        assert!(!store.key_used("wf/r1/b/1", "nobody.serves").await.unwrap());
        // What it submitted before the fence went up is found, by the id
        // in its subject in the tasks' stream.
        assert!(store.key_used("wf/r1/a/1", "nobody.serves").await.unwrap());
        // The new driver's submission of the same step is taken.
        let taken = submit_under(store, "wf/r1/b/1", &new).await;
        assert!(
            matches!(taken, Ok(orch::daemon::Accepted::New)),
            "{taken:?}"
        );
        assert!(store.find_key("wf/r1/b/1").await.unwrap().is_some());
        assert!(store.key_used("wf/r1/b/1", "nobody.serves").await.unwrap());
        // A fence raised again stays one message, and still refuses the
        // first driver; so does the second now.
        let again = store.raise_fence("r1").await.unwrap().unwrap();
        assert!(again > raised);
        let client = async_nats::connect(nats.url.as_str()).await.unwrap();
        let tasks = async_nats::jetstream::new(client)
            .get_stream("ORCH_TASKS")
            .await
            .unwrap();
        let mut fences = tasks.info_with_subjects("orch.v1.fence.r1").await.unwrap();
        let mut kept = 0;
        while let Some(subject) = fences.next().await {
            kept += subject.unwrap().1;
        }
        assert_eq!(kept, 1, "messages on the fence's subject");
        for stale in [&old, &new] {
            let refused = submit_under(store, "wf/r1/c/1", stale).await;
            assert!(
                matches!(&refused, Err(orch::daemon::HostError::Fenced(_))),
                "{refused:?}"
            );
        }
        // Another run's fence is another fence.
        let free = submit_under(store, "wf/r2/a/1", &fence("r2", 0)).await;
        assert!(matches!(free, Ok(orch::daemon::Accepted::New)), "{free:?}");
        // The status counts the three tasks on the stream, not the fence;
        // a run's fence goes with its record.
        let router = node.router().unwrap();
        assert_eq!(router.on_stream().await.unwrap(), 3);
        store.drop_fence("r1").await.unwrap();
        let mut fences = tasks.info_with_subjects("orch.v1.fence.r1").await.unwrap();
        assert!(fences.next().await.is_none(), "the fence is gone");
        // A task that has left the stream is found by its result (a host
        // acks a task after storing it), and only then. Here the messages
        // go by a purge, as an ack takes them.
        let ended = store.find_key("wf/r1/b/1").await.unwrap().unwrap();
        store.cancel(&ended).await.unwrap();
        let unended = store.find_key("wf/r2/a/1").await.unwrap().unwrap();
        for id in [&ended, &unended] {
            tasks
                .purge()
                .filter(format!("orch.v1.task-id.{id}.nobody.serves"))
                .await
                .unwrap();
        }
        assert!(store.key_used("wf/r1/b/1", "nobody.serves").await.unwrap());
        assert!(!store.key_used("wf/r2/a/1", "nobody.serves").await.unwrap());
        node.shutdown(Duration::from_secs(5)).await;
    });
}

/// Hosts A (no agents) and B (one `test.nap` slot) on one server, and the
/// id of a 30 s nap that holds B's slot: a task for `test.nap` submitted
/// now waits on the stream.
struct BusySlot {
    nats: NatsServer,
    ha: HostProc,
    hb: HostProc,
    holder: String,
    _homes: (Orch, Orch),
}

fn busy_slot() -> BusySlot {
    let nats = NatsServer::start();
    let a = Orch::new();
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    let b = Orch::new();
    install_fixture(
        &b,
        "nap",
        "test.nap",
        "[limits]\nmax_instances = 1\ntimeout = \"60s\"\n",
    );
    let hb = HostProc::start_with(&b, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "test.nap", 1);
    let holder = ha.submit("test.nap", "30000");
    ha.until("the nap holds B's slot", |h| {
        h.get(&format!("/v1/tasks/{holder}")).1["status"] == "running"
    });
    BusySlot {
        nats,
        ha,
        hb,
        holder,
        _homes: (a, b),
    }
}

/// A task waiting on the stream fails at its deadline when the host it was
/// submitted through is gone by then (killed here before the deadline):
/// the server's schedule of the deadline brings it to another host. A task
/// whose deadline is still ahead keeps waiting.
#[test]
fn a_queued_task_fails_at_its_deadline_after_the_host_it_was_submitted_through_is_killed() {
    let BusySlot {
        nats: _nats,
        ha,
        hb,
        holder,
        _homes,
    } = busy_slot();
    let submit = |deadline: &str| {
        let (code, task) = ha.post(
            "/v1/tasks",
            &json!({ "capability": "test.nap", "input": "10", "deadline": deadline }),
        );
        assert_eq!(code, 201, "{task}");
        task["id"].as_str().unwrap().to_string()
    };
    let soon = submit("1s");
    let later = submit("60s");
    ha.kill9();
    let task = hb.wait(&soon);
    assert_eq!(task["status"], "failed", "{task}");
    assert_eq!(task["error"]["kind"], "deadline-exceeded", "{task}");
    assert_eq!(task["attempts"], 0, "{task}");
    // B never took it: its slot is still held.
    let (_, held) = hb.get(&format!("/v1/tasks/{holder}"));
    assert_eq!(held["status"], "running", "{held}");
    let (_, waiting) = hb.get(&format!("/v1/tasks/{later}"));
    assert_eq!(waiting["status"], "queued", "{waiting}");
    let (_, status) = hb.get("/v1/status");
    assert_eq!(status["cluster"]["fenced"], 0, "{status}");
    let (code, _) = hb.post(&format!("/v1/tasks/{holder}/cancel"), &json!({}));
    assert_eq!(code, 200);
}

/// The same while the submitting host is frozen (SIGSTOP: its connection
/// stays open and its pull requests stay at the server until they
/// expire): each task fails within about 3 s past the 1.25 s the
/// schedule is due, not only when that host wakes (before the requests
/// expired within a second, schedules handed to it came back in steps of
/// the ack wait: 6-16 s late).
#[test]
fn a_queued_task_fails_at_its_deadline_while_the_host_it_was_submitted_through_is_frozen() {
    let s = busy_slot();
    let ids: Vec<String> = (1..=5)
        .map(|secs| {
            let (code, task) = s.ha.post(
                "/v1/tasks",
                &json!({ "capability": "test.nap", "input": "10", "deadline": format!("{secs}s") }),
            );
            assert_eq!(code, 201, "{task}");
            task["id"].as_str().unwrap().to_string()
        })
        .collect();
    s.ha.signal("-STOP");
    for id in &ids {
        let task = s.hb.wait(id);
        assert_eq!(task["status"], "failed", "{task}");
        assert_eq!(task["error"]["kind"], "deadline-exceeded", "{task}");
        assert_eq!(task["attempts"], 0, "{task}");
        let late = task["finished_at_ms"].as_u64().unwrap() - task["deadline_ms"].as_u64().unwrap();
        assert!(late < 4500, "{late} ms past its deadline: {task}");
    }
    s.ha.signal("-CONT");
    let (code, _) =
        s.hb.post(&format!("/v1/tasks/{}/cancel", s.holder), &json!({}));
    assert_eq!(code, 200);
}

/// Deadline schedules that are not what a host writes fail no task and do
/// not stay: one whose body says the deadline passed while the task's own
/// record says it is a minute ahead, one whose body is not a deadline, one
/// for a task that does not exist, one for a running task. The hosts take
/// and drop them all, and the waiting task runs once a slot frees.
#[test]
fn forged_or_malformed_deadline_schedules_fail_no_task_and_are_dropped() {
    let s = busy_slot();
    let (code, task) = s.ha.post(
        "/v1/tasks",
        &json!({ "capability": "test.nap", "input": "10", "deadline": "60s" }),
    );
    assert_eq!(code, 201, "{task}");
    let later = task["id"].as_str().unwrap().to_string();
    crate::common::runtime().block_on(async {
        let client = async_nats::connect(s.nats.url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let forged = [
            (later.as_str(), "1"),
            (later.as_str(), "not a deadline"),
            ("no-such-task", "1"),
            (s.holder.as_str(), "1"),
        ];
        for (id, body) in forged {
            js.publish(
                format!("orch.v1.deadline.due.{id}"),
                body.to_string().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        // The stream keeps a schedule until a host acks it (work-queue
        // retention), so an empty subject means all four were handled.
        let stream = js.get_stream("ORCH_DEADLINES").await.unwrap();
        let started = Instant::now();
        loop {
            let mut left = stream
                .info_with_subjects("orch.v1.deadline.due.>")
                .await
                .unwrap();
            let mut waiting = Vec::new();
            while let Some(subject) = left.next().await {
                waiting.push(subject.unwrap());
            }
            if waiting.is_empty() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "forged schedules still on the stream: {waiting:?}"
            );
            // The hosts take them within a pull request's second.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    for h in [&s.ha, &s.hb] {
        let (_, waiting) = h.get(&format!("/v1/tasks/{later}"));
        assert_eq!(waiting["status"], "queued", "{waiting}");
        let (_, held) = h.get(&format!("/v1/tasks/{}", s.holder));
        assert_eq!(held["status"], "running", "{held}");
    }
    let (code, _) =
        s.hb.post(&format!("/v1/tasks/{}/cancel", s.holder), &json!({}));
    assert_eq!(code, 200);
    let task = s.ha.wait(&later);
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["attempts"], 1, "{task}");
}

/// A cancelled task still waiting on the stream is taken off it: a host
/// that was not there to hear the cancel (it starts after it) never runs
/// it. (Without that, such a host ran the task and only its outcome was
/// fenced.) B's one slot is held meanwhile, so that B, which heard the
/// cancel, does not take the task first; C's later task shows that C has
/// taken everything before it.
#[test]
fn a_cancelled_task_waiting_on_the_stream_is_not_run_by_a_host_that_missed_the_cancel() {
    let BusySlot {
        nats,
        ha,
        hb,
        holder,
        _homes,
    } = busy_slot();
    let waiting = ha.submit("test.nap", "10");
    let (code, cancelled) = ha.post(&format!("/v1/tasks/{waiting}/cancel"), &json!({}));
    assert_eq!(code, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    let c = Orch::new();
    install_fixture(&c, "nap", "test.nap", "");
    let hc = HostProc::start_with(&c, &["--nats", nats.url.as_str()]);
    until_serving(&ha, "test.nap", 2);
    let after = ha.submit("test.nap", "10");
    let after = ha.wait(&after);
    assert_eq!(after["status"], "completed", "{after}");
    assert_eq!(after["host"], host_id(&c), "{after}");
    let (_, status) = hc.get("/v1/status");
    assert_eq!(status["cluster"]["fenced"], 0, "{status}");
    let task = ha.wait(&waiting);
    assert_eq!(task["status"], "cancelled", "{task}");
    assert_eq!(task["attempts"], 0, "{task}");
    let (code, _) = ha.post(&format!("/v1/tasks/{holder}/cancel"), &json!({}));
    assert_eq!(code, 200);
    drop(hb);
}
