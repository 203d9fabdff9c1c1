//! `[host] log_format = "json"`: one JSON object per log line, with the
//! agent, task and trace id of an agent's own log lines.
use serde_json::Value;

use crate::common::{install_fixture, HostProc, Orch};

#[test]
fn json_logs_are_one_object_per_line_with_the_agent_task_and_trace_of_guest_lines() {
    let orch = Orch::new();
    orch.config("[host]\nlog_format = \"json\"\nmax_attempts = 1\n");
    install_fixture(&orch, "panic", "test.panic", "");
    let host = HostProc::start(&orch);
    // In the caller's trace (the host exports none: no endpoint).
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut r = HostProc::agent()
        .post(&format!("{}/v1/tasks", host.url))
        .header("content-type", "application/json")
        .header("traceparent", &format!("00-{trace}-00f067aa0ba902b7-01"))
        .send(r#"{"capability": "test.panic"}"#)
        .unwrap();
    let task: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    let id = task["id"].as_str().unwrap().to_string();
    // A trap is retryable: with one attempt, the task is a dead letter.
    assert_eq!(host.wait(&id)["status"], "dead");
    // The host logs the guest's panic line as it happens, before the
    // task's end is stored: it is in the file by now.
    let log = std::fs::read_to_string(orch.work.path().join("host.log")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let guest = lines
        .iter()
        .find(|l| l["target"] == "orch::guest")
        .unwrap_or_else(|| panic!("no guest line in {log}"));
    assert_eq!(guest["level"], "ERROR", "{guest}");
    assert_eq!(guest["agent"], "panic", "{guest}");
    assert_eq!(guest["task"], id.as_str(), "{guest}");
    assert_eq!(guest["trace_id"], trace, "{guest}");
    assert!(
        guest["message"]
            .as_str()
            .unwrap()
            .starts_with("panicked at"),
        "{guest}"
    );
    assert!(
        guest["timestamp"].as_str().unwrap().ends_with('Z'),
        "{guest}"
    );
    // The flag wins over the config: text again.
    drop(host);
    let host = HostProc::start_with(&orch, &["--log-format", "text"]);
    let id = host.submit("test.panic", "");
    host.wait(&id);
    let log = std::fs::read_to_string(orch.work.path().join("host.log")).unwrap();
    assert!(log.lines().all(|l| !l.starts_with('{')), "{log}");
    assert!(
        log.contains(&format!("task={id}")) || log.contains(&id),
        "{log}"
    );
}
