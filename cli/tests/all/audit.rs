//! The audit trail (`docs/operations.md#audit-trail`) on a lone host (in
//! `audit.redb`) and on a 2-host cluster (in the stream `ORCH_AUDIT`), with
//! the same assertions: every kind of entry appears, `orch audit verify`
//! finds an edited and a deleted entry, and old entries age out.
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{p, stderr, HostProc, NatsServer, Orch};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Lone,
    Cluster,
}

struct Setup {
    nats: Option<NatsServer>,
    /// The API host's home first; in a cluster the runner's second.
    homes: Vec<Orch>,
    hosts: Vec<HostProc>,
}

impl Setup {
    /// A lone host serving echo and messenger; or host A (no plugins, where
    /// requests go) and host B (the plugins) over a real nats-server.
    fn start(mode: Mode, config: &str) -> Setup {
        let install = |orch: &Orch| {
            orch.config(config);
            for plugin in ["echo", "messenger"] {
                orch.ok(&["plugin", "install", "-y", &p(plugin)]);
            }
        };
        match mode {
            Mode::Lone => {
                let a = Orch::new();
                install(&a);
                let ha = HostProc::start(&a);
                Setup {
                    nats: None,
                    homes: vec![a],
                    hosts: vec![ha],
                }
            }
            Mode::Cluster => {
                let nats = NatsServer::start();
                let (a, b) = (Orch::new(), Orch::new());
                a.config(config);
                install(&b);
                let hb = HostProc::start_with(&b, &["--nats", nats.url.as_str()]);
                let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
                crate::common::until_serving(&ha, "test.publish", 1);
                Setup {
                    nats: Some(nats),
                    homes: vec![a, b],
                    hosts: vec![ha, hb],
                }
            }
        }
    }

    fn api(&self) -> &HostProc {
        &self.hosts[0]
    }

    /// The home whose plugins run (and change).
    fn runner_home(&self) -> &Orch {
        self.homes.last().unwrap()
    }

    /// `orch audit ...` against the API host.
    fn audit(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["audit"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--api", &self.api().url]);
        self.homes[0].run(&all)
    }

    fn entries(&self, query: &str) -> Vec<Value> {
        let (code, answer) = self.api().get(&format!("/v1/audit?limit=10000{query}"));
        assert_eq!(code, 200, "{answer}");
        answer["entries"].as_array().unwrap().clone()
    }

    /// Waits until the entries (written in batches, a moment after what
    /// they record) satisfy `done`, asking every 100 ms.
    fn until(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let entries = self.entries("");
            if done(&entries) {
                return entries;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "timed out: {what}: {entries:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn kinds(entries: &[Value]) -> BTreeSet<String> {
    entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

fn sha256_of(path: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn lone() {
                let case: fn(Mode) = $body;
                case(Mode::Lone);
            }
            #[test]
            fn cluster() {
                let case: fn(Mode) = $body;
                case(Mode::Cluster);
            }
        }
    };
}

const ALL_KINDS: [&str; 12] = [
    "plugin.install",
    "plugin.upgrade",
    "plugin.rollback",
    "plugin.remove",
    "host.start",
    "task.submit",
    "task.cancel",
    "workflow.register",
    "workflow.start",
    "workflow.cancel",
    "request.refused",
    "message.publish",
];

both!(every_kind_of_entry_appears_with_who_asked, |mode| {
    let s = Setup::start(mode, "");
    let api = s.api();
    // Plugin changes made with the CLI while the host runs.
    let home = s.runner_home();
    let v1 = home.stage("counter", "counter", |m| m);
    let v2 = home.stage("counter-next", "counter-next", |m| m);
    home.ok(&["plugin", "install", "-y", &v1]);
    home.ok(&["plugin", "upgrade", "counter", &v2, "-y"]);
    home.ok(&["plugin", "rollback", "counter"]);
    home.ok(&["plugin", "remove", "counter"]);
    // Tasks, a refused request, a message, a workflow.
    let task = api.submit("echo", "hi");
    api.wait(&task);
    let (code, _) = api.post(&format!("/v1/tasks/{task}/cancel"), &json!({}));
    assert_eq!(code, 200);
    let (code, _) = api.post("/v1/tasks", &json!({ "capability": "no.such" }));
    assert_eq!(code, 400);
    let publisher = api.submit("test.publish", "ping.audit\nhello");
    assert_eq!(api.wait(&publisher)["result"], "sent");
    let (code, answer) = crate::workflow::register(
        api,
        "name = \"one\"\nversion = 1\n[[steps]]\nid = \"a\"\ncapability = \"echo\"\n",
    );
    assert_eq!(code, 201, "{answer}");
    let (code, run) = api.post("/v1/workflows/one/runs?wait=60s", &json!({ "input": "x" }));
    assert_eq!(code, 201, "{run}");
    let id = run["id"].as_str().unwrap();
    let (code, _) = api.post(&format!("/v1/runs/{id}/cancel"), &json!({}));
    assert_eq!(code, 200);

    let entries = s.until("every kind recorded", |e| kinds(e).len() == ALL_KINDS.len());
    assert_eq!(
        kinds(&entries),
        ALL_KINDS.iter().map(|k| k.to_string()).collect()
    );
    let one = |kind: &str, check: &dyn Fn(&Value) -> bool| {
        entries
            .iter()
            .find(|e| e["kind"] == kind && check(e))
            .unwrap_or_else(|| panic!("no matching {kind} in {entries:#?}"))
            .clone()
    };
    // Plugin changes name the version, its sha256 and who made them.
    let upgrade = one("plugin.upgrade", &|_| true);
    assert_eq!(upgrade["detail"]["plugin"], "counter");
    assert_eq!(upgrade["detail"]["version"], "0.2.0");
    assert_eq!(upgrade["detail"]["sha256"], sha256_of(&v2));
    assert!(
        upgrade["by"].as_str().unwrap().starts_with("uid:"),
        "{upgrade}"
    );
    let rollback = one("plugin.rollback", &|_| true);
    assert_eq!(rollback["detail"]["version"], "0.1.0");
    assert_eq!(rollback["detail"]["sha256"], sha256_of(&v1));
    // Requests name the task and the client's address.
    let submit = one("task.submit", &|e| e["detail"]["task"] == task);
    assert_eq!(submit["detail"]["capability"], "echo");
    assert!(
        submit["by"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{submit}"
    );
    one("task.cancel", &|e| e["detail"]["task"] == task);
    let refused = one("request.refused", &|_| true);
    assert_eq!(refused["detail"]["status"], 400);
    assert_eq!(refused["detail"]["error"], "unknown-capability");
    assert_eq!(refused["detail"]["path"], "/v1/tasks");
    one("workflow.register", &|e| e["detail"]["workflow"] == "one");
    one("workflow.start", &|e| e["detail"]["run"] == id);
    one("workflow.cancel", &|e| e["detail"]["run"] == id);
    // Messages name the subject, size, agent and task.
    let message = one("message.publish", &|_| true);
    assert_eq!(
        message["detail"],
        json!({ "subject": "ping.audit", "bytes": 5, "agent": "messenger", "task": publisher })
    );
    let start = one("host.start", &|_| true);
    assert!(start["detail"]["config_sha256"].is_string(), "{start}");
    // In a cluster, every host's entries are in the one stream.
    let hosts: BTreeSet<&str> = entries
        .iter()
        .map(|e| e["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts.len(), s.hosts.len(), "{hosts:?}");

    // The CLI: filters, JSON, and an intact trail.
    let out = s.audit(&["list", "--kind", "plugin", "--output", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed["entries"].as_array().unwrap();
    assert_eq!(
        kinds(listed),
        [
            "plugin.install",
            "plugin.remove",
            "plugin.rollback",
            "plugin.upgrade"
        ]
        .iter()
        .map(|k| k.to_string())
        .collect()
    );
    let out = s.audit(&[
        "list",
        "--since",
        "2099-01-01T00:00:00Z",
        "--output",
        "json",
    ]);
    let later: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(later["entries"], json!([]));
    let out = s.audit(&["list", "--since", "1h", "--limit", "3", "--output", "json"]);
    let last: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(last["entries"].as_array().unwrap().len(), 3);
    let out = s.audit(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(crate::common::stdout(&out).starts_with("ok: "));
});

/// Changes one stored entry (`edit`) or removes it, behind the host's back:
/// in `audit.redb` with the host stopped, or in the stream.
fn tamper(s: &mut Setup, mode: Mode, seq: u64, edit: bool) {
    let host = s.api().get("/v1/status").1["host"]
        .as_str()
        .unwrap()
        .to_string();
    match mode {
        Mode::Lone => {
            let old = s.hosts.remove(0);
            old.kill9();
            let db = redb::Database::open(s.homes[0].home.path().join("audit.redb")).unwrap();
            let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("entries");
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(table).unwrap();
                if edit {
                    use redb::ReadableTable;
                    let mut entry: Value =
                        serde_json::from_slice(t.get(seq).unwrap().unwrap().value()).unwrap();
                    entry["by"] = json!("someone else");
                    t.insert(seq, serde_json::to_vec(&entry).unwrap().as_slice())
                        .unwrap();
                } else {
                    t.remove(seq).unwrap();
                }
            }
            txn.commit().unwrap();
            drop(db);
            s.hosts.insert(0, HostProc::start(&s.homes[0]));
        }
        Mode::Cluster => {
            let url = s.nats.as_ref().unwrap().url.clone();
            let rt = crate::common::runtime();
            rt.block_on(async {
                let client = async_nats::connect(url.as_str()).await.unwrap();
                let js = async_nats::jetstream::new(client);
                let mut stream = js.get_stream("ORCH_AUDIT").await.unwrap();
                // Where entry `seq` of this host's chain is stored.
                let subject = format!("orch.v1.audit.{host}");
                let last = stream.info().await.unwrap().state.last_sequence;
                let mut found = None;
                for position in 1..=last {
                    let Ok(m) = stream.get_raw_message(position).await else {
                        continue;
                    };
                    let entry: Value = serde_json::from_slice(&m.payload).unwrap();
                    if m.subject.as_str() == subject && entry["seq"] == seq {
                        found = Some((position, entry));
                    }
                }
                let (position, mut entry) = found.expect("the entry is in the stream");
                assert!(stream.delete_message(position).await.unwrap());
                if edit {
                    // A stream cannot be edited in place: the altered copy
                    // is appended where the entry was last.
                    entry["by"] = json!("someone else");
                    js.publish(subject, entry.to_string().into())
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                }
            });
        }
    }
}

both!(verify_finds_an_edited_and_a_deleted_entry, |mode| {
    let mut s = Setup::start(mode, "");
    let api_host = s.api().get("/v1/status").1["host"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 0..4 {
        let id = s.api().submit("echo", &format!("{i}"));
        s.api().wait(&id);
    }
    let mine = |e: &[Value]| e.iter().filter(|e| e["host"] == api_host.as_str()).count();
    let entries = s.until("the submissions recorded", |e| {
        e.iter().filter(|e| e["kind"] == "task.submit").count() == 4
    });
    let last = entries
        .iter()
        .filter(|e| e["host"] == api_host.as_str())
        .map(|e| e["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(mine(&entries) >= 5, "{entries:#?}");
    assert_eq!(s.audit(&["verify"]).status.code(), Some(0));

    // The last entry of the API host's chain, edited: its hash no longer
    // matches (in a stream the copy is where the original was: last).
    tamper(&mut s, mode, last, true);
    let out = s.audit(&["verify"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(stderr(&out).contains("altered"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("seq {last}")),
        "{}",
        stderr(&out)
    );
    let out = s.audit(&["verify", "--output", "json"]);
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["ok"], false);
    assert_eq!(verdict["bad"]["entry"]["by"], "someone else");

    // An entry in the middle, deleted: the next one names the gap.
    let middle = last - 2;
    tamper(&mut s, mode, middle, false);
    let out = s.audit(&["verify", "--output", "json"]);
    assert_eq!(out.status.code(), Some(7));
    let verdict: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["bad"]["seq"], middle + 1, "{verdict}");
    assert!(
        verdict["bad"]["reason"]
            .as_str()
            .unwrap()
            .contains(&format!("entries {middle} to {middle}")),
        "{verdict}"
    );
});

both!(entries_older_than_the_retention_are_dropped, |mode| {
    let s = Setup::start(mode, "[audit]\nretention = \"3s\"\n");
    let id = s.api().submit("echo", "kept for a while");
    let submitted = |e: &[Value]| {
        e.iter()
            .any(|e| e["kind"] == "task.submit" && e["detail"]["task"] == id.as_str())
    };
    // Inside the retention: listed.
    s.until("the submission recorded", |e| submitted(e));
    // Past it: gone, while a newer entry stays and the trail still
    // verifies from its oldest kept entry.
    s.until("the submission aged out", |e| !submitted(e));
    let newer = s.api().submit("echo", "new");
    let entries = s.until("the new submission recorded", |e| {
        e.iter().any(|e| e["detail"]["task"] == newer.as_str())
    });
    assert!(!submitted(&entries));
    let out = s.audit(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
});

// `[audit] max_entries`, as a pair: inside it every entry is kept; past it
// the oldest go (on a lone host at the next prune, a quarter of the
// retention, here 10 s; in a cluster the stream drops them as it stores),
// and the trail still verifies from its oldest kept entry.
both!(entries_past_max_entries_drop_the_oldest, |mode| {
    const MAX: usize = 12;
    let s = Setup::start(
        mode,
        &format!("[audit]\nretention = \"40s\"\nmax_entries = {MAX}\n"),
    );
    let first = s.api().submit("echo", "first");
    let has = |e: &[Value], id: &str| {
        e.iter()
            .any(|e| e["kind"] == "task.submit" && e["detail"]["task"] == id)
    };
    let entries = s.until("the first submission recorded", |e| has(e, &first));
    assert!(entries.len() <= MAX, "{entries:#?}");
    let ids: Vec<String> = (0..MAX)
        .map(|i| s.api().submit("echo", &format!("more {i}")))
        .collect();
    let last = ids.last().unwrap().clone();
    let entries = s.until("the oldest entries dropped", |e| {
        has(e, &last) && !has(e, &first) && e.len() <= MAX
    });
    assert!(entries.len() <= MAX, "{entries:#?}");
    let out = s.audit(&["verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
});
