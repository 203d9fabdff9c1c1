//! Hosts joined through a real nats-server (started by the test on a free
//! loopback port): membership by heartbeat, a killed host reported dead, a
//! stopped host reported as left, a restarted host back under its id, and
//! hosts reconnecting after the server restarts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{p, HostProc, NatsServer, Orch};
use serde_json::Value;

fn hosts(h: &HostProc) -> Vec<Value> {
    let (_, status) = h.get("/v1/status");
    status["cluster"]["hosts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

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
    hc.kill9();
    let killed = Instant::now();
    ha.until("the killed host is reported dead", |h| {
        state_of(h, &idc).as_deref() == Some("dead")
    });
    let detected = killed.elapsed();
    // Heartbeats every 250 ms, dead after 1 s of silence.
    assert!(detected >= Duration::from_millis(700), "{detected:?}");
    assert!(detected < Duration::from_secs(3), "{detected:?}");
    eprintln!("dead host detected after {detected:?}");

    // A restarted host comes back under the same id, with no manual step.
    let hc = HostProc::start_with(&c, &args);
    ha.until("the restarted host is alive", |h| {
        state_of(h, &idc).as_deref() == Some("alive")
    });

    // SIGTERM: the host says goodbye and is shown as left at once.
    hb.signal("-TERM");
    ha.until("the stopped host is reported as left", |h| {
        state_of(h, &idb).as_deref() == Some("left")
    });
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
fn a_host_without_a_reachable_server_says_so() {
    let orch = Orch::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let out = orch.run(&["host", "start", "--listen", "127.0.0.1:0", "--nats", &url]);
    assert_eq!(out.status.code(), Some(1));
    let err = common::stderr(&out);
    assert!(
        err.contains(&format!("cannot connect to NATS at {url}")),
        "{err}"
    );
}
