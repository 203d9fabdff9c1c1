//! The dashboard (`GET /`) in a real browser: Debian's headless Chromium
//! (which `plugins/build.sh` installs), driven over the Chrome DevTools
//! Protocol, against a running host with finished tasks, a dead letter and
//! a workflow run. A screenshot is saved as `target/screenshots/dashboard.png`.
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::common::{install_fixture, p, HostProc, Orch};

/// A headless Chromium and a DevTools connection to its one page.
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                // As root (CI), Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1280,1100",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the chromium binary (plugins/build.sh installs Debian's chromium)");
        // Chromium prints where DevTools listens once it does: the event to
        // wait for.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut port = None;
        let mut seen = String::new();
        for _ in 0..200 {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                break;
            }
            seen.push_str(&line);
            if let Some(rest) = line
                .trim()
                .strip_prefix("DevTools listening on ws://127.0.0.1:")
            {
                port = Some(rest.split('/').next().unwrap().to_string());
                break;
            }
        }
        let port = port.unwrap_or_else(|| panic!("chromium did not start DevTools:\n{seen}"));
        // Keep draining its stderr so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in stderr.lines() {});
        let mut list = ureq::get(&format!("http://127.0.0.1:{port}/json/list"))
            .call()
            .unwrap();
        let targets: Value =
            serde_json::from_str(&list.body_mut().read_to_string().unwrap()).unwrap();
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target");
        let (ws, _) = tungstenite::connect(page["webSocketDebuggerUrl"].as_str().unwrap()).unwrap();
        // A browser that stops answering fails the test instead of hanging it.
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
                .unwrap();
        }
        Browser {
            child,
            ws,
            next: 0,
            _profile: profile,
        }
    }

    /// Calls a DevTools method and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let message = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(tungstenite::Message::text(message.to_string()))
            .unwrap();
        loop {
            let reply = self.ws.read().unwrap();
            let Ok(text) = reply.to_text() else { continue };
            let reply: Value = serde_json::from_str(text).unwrap();
            if reply["id"] == id {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns
    /// its value.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
        );
        assert!(
            result["exceptionDetails"].is_null(),
            "{expression}: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Waits until the page's `condition` (a JS expression) is truthy and
    /// returns it: checked on each change of the page (a MutationObserver,
    /// so the page's own updates are the events), bounded at 30 s.
    fn until(&mut self, condition: &str) -> Value {
        let expression = format!(
            "new Promise((resolve, reject) => {{
               const check = () => {{ try {{ const v = ({condition}); if (v) {{ observer.disconnect(); resolve(v); }} }} catch (e) {{}} }};
               const observer = new MutationObserver(check);
               observer.observe(document, {{ subtree: true, childList: true, characterData: true, attributes: true }});
               check();
               setTimeout(() => {{ observer.disconnect(); reject(new Error('timed out: ' + {condition:?} + '\\n' + document.body.innerText)); }}, 30000);
             }})"
        );
        self.eval(&expression)
    }

    fn text(&mut self, selector: &str) -> String {
        self.eval(&format!("document.querySelector({selector:?}).innerText"))
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_dashboard_shows_agents_counts_and_a_dead_task_and_follows_new_tasks() {
    let orch = Orch::new();
    orch.config("[host]\nmax_attempts = 2\n[limits]\nmax_fuel = 1000000000000\n");
    for plugin in ["echo", "flaky"] {
        orch.ok(&["plugin", "install", "-y", &p(plugin)]);
    }
    install_fixture(
        &orch,
        "sleep",
        "test.sleep",
        "[limits]\nfuel = 1000000000000\ntimeout = \"20s\"\n",
    );
    let host = HostProc::start(&orch);
    for i in 0..3 {
        let id = host.submit("echo", &format!("hello {i}"));
        assert_eq!(host.wait(&id)["status"], "completed");
    }
    let dead = host.submit("test.flaky", "fail");
    assert_eq!(host.wait(&dead)["status"], "dead");
    let (code, answer) = crate::workflow::register(
        &host,
        "name = \"diamond\"\nversion = 1\n\
             [[steps]]\nid = \"split\"\ncapability = \"echo\"\n\
             [[steps]]\nid = \"left\"\ncapability = \"echo\"\nafter = [\"split\"]\n\
             [[steps]]\nid = \"right\"\ncapability = \"echo\"\nafter = [\"split\"]\n\
             [[steps]]\nid = \"join\"\ncapability = \"echo\"\nafter = [\"left\", \"right\"]\n",
    );
    assert_eq!(code, 201, "{answer}");
    let (code, run) = host.post(
        "/v1/workflows/diamond/runs?wait=60s",
        &json!({ "input": "x" }),
    );
    assert_eq!(code, 201, "{run}");
    assert_eq!(run["status"], "completed", "{run}");

    let mut browser = Browser::start();
    browser.call("Page.enable", json!({}));
    browser.call("Page.navigate", json!({ "url": format!("{}/", host.url) }));
    // The agents, with their capabilities and slots.
    browser.until("document.querySelector('#agents tr[data-agent^=\"flaky\"]')");
    let agents = browser.text("#agents");
    for name in ["echo", "flaky", "sleep", "test.flaky", "test.sleep"] {
        assert!(agents.contains(name), "{agents}");
    }
    // The counts: the workflow's 4 steps are tasks too.
    browser.until("document.querySelector('#count-completed')?.firstChild?.textContent === '7'");
    assert_eq!(browser.text("#count-dead").lines().next(), Some("1"));
    // The dead task, with its error, in the list and in its detail.
    let row = format!("#tasks tr[data-id=\"{dead}\"]");
    let dead_row = browser.text(&row);
    assert!(dead_row.contains("dead"), "{dead_row}");
    assert!(
        dead_row.contains("retryable: retryable failure: asked to fail"),
        "{dead_row}"
    );
    browser.eval(&format!("document.querySelector({row:?}).click()"));
    browser.until("document.querySelector('#detail-attempts')");
    let detail = browser.text("#task-detail");
    assert!(
        detail.to_lowercase().contains(&dead.to_lowercase()),
        "{detail}"
    );
    assert_eq!(detail.matches("asked to fail").count(), 3, "{detail}");
    // The workflow run, each step drawn with its status.
    let steps = browser.until(
        "document.querySelectorAll('#runs g.node[data-status=\"completed\"]').length === 4 && \
         [...document.querySelectorAll('#runs g.node')].map(n => n.dataset.step).sort().join()",
    );
    assert_eq!(steps, "join,left,right,split");
    // The hosts, and the chart of the last minutes.
    assert!(browser.text("#hosts").contains("alive"));
    browser.until("document.querySelector('#chart polyline')");

    // Live: a task that completes now shows up without a reload (the
    // marker set on this page survives).
    browser.eval("window.marker = 42");
    let id = host.submit("echo", "later");
    host.wait(&id);
    browser.until(&format!(
        "document.querySelector('#tasks tr[data-id=\"{id}\"][data-status=\"completed\"]')"
    ));
    browser.until("document.querySelector('#count-completed').firstChild.textContent === '8'");
    assert_eq!(browser.eval("window.marker"), 42);
    // And a task in flight is seen running.
    let slow = host.submit("test.sleep", "3000");
    browser.until(&format!(
        "document.querySelector('#tasks tr[data-id=\"{slow}\"][data-status=\"running\"]')"
    ));
    host.wait(&slow);

    let shot = browser.call(
        "Page.captureScreenshot",
        json!({ "format": "png", "captureBeyondViewport": true }),
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), png).unwrap();
}

#[test]
fn the_dashboard_is_one_self_contained_page() {
    let orch = Orch::new();
    let host = HostProc::start(&orch);
    let mut r = HostProc::agent()
        .get(&format!("{}/", host.url))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let page = r.body_mut().read_to_string().unwrap();
    // Nothing fetched from elsewhere: no external script, style or font.
    assert!(!page.contains("src=\"http"), "an external source");
    assert!(!page.contains("href=\"http"), "an external link");
    assert!(page.contains("<script>"));
}

#[test]
fn the_dashboard_lists_every_host_of_a_cluster() {
    let nats = crate::common::NatsServer::start();
    let (a, b) = (Orch::new(), Orch::new());
    b.ok(&["plugin", "install", "-y", &p("echo")]);
    let hb = HostProc::start_with(&b, &["--nats", nats.url.as_str()]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    crate::common::until_serving(&ha, "echo", 1);
    let id = ha.submit("echo", "across");
    assert_eq!(ha.wait(&id)["status"], "completed");
    let host_id = |h: &HostProc| h.get("/v1/status").1["host"].as_str().unwrap().to_string();
    let (ida, idb) = (host_id(&ha), host_id(&hb));

    let mut browser = Browser::start();
    browser.call("Page.navigate", json!({ "url": format!("{}/", ha.url) }));
    browser.until(&format!(
        "document.querySelector('#hosts tr[data-host=\"{ida}\"]') && document.querySelector('#hosts tr[data-host=\"{idb}\"]')"
    ));
    let hosts = browser.text("#hosts");
    assert_eq!(hosts.matches("alive").count(), 2, "{hosts}");
    assert!(hosts.contains(&format!("{ida} (this)")), "{hosts}");
    // The task ran on B, and the list is the cluster's.
    browser.until(&format!(
        "document.querySelector('#tasks tr[data-id=\"{id}\"][data-status=\"completed\"]')"
    ));
    assert!(browser.text("#host").contains("cluster of 2"));
}
