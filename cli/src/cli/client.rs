//! The CLI's side of the control API: finds the host's address and makes
//! JSON requests to it.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::exit;

/// Where the API is: `--api`/`ORCH_API`, else the address a host running on
/// this data directory published in `host.json`, else the default.
pub fn api_url(home: &Path, api: Option<String>) -> String {
    let url = api
        .or_else(|| orch::daemon::read_address(home))
        .unwrap_or_else(|| format!("http://{}", orch::config::DEFAULT_LISTEN));
    url.trim_end_matches('/').to_string()
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

/// A failed request, already printed; carries the exit code.
pub struct Failed(pub u8);

impl Client {
    pub fn new(base: String, timeout: Duration) -> Client {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        Client { base, agent }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GET or POST (with a JSON body) `path`; returns the status and the
    /// parsed body. Connection failures and API errors are printed here.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), Failed> {
        let body = body.map(|b| ("application/json", b.to_string().into_bytes()));
        self.send(method, path, body)
    }

    /// Whether a host answers at all (an HTTP answer of any status), asked
    /// before a request whose caller prints its own note when none does.
    pub fn answers(&self) -> bool {
        self.agent
            .get(&format!("{}/v1/status", self.base))
            .call()
            .is_ok()
    }

    /// POSTs `body` with its content type; the answer as for `request`.
    pub fn post_text(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Value), Failed> {
        self.send("POST", path, Some((content_type, body)))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<(u16, Value), Failed> {
        let url = format!("{}{path}", self.base);
        let size = body.as_ref().map_or(0, |(_, b)| b.len());
        let response = match (method, body) {
            ("POST", Some((content_type, body))) => self
                .agent
                .post(&url)
                .header("content-type", content_type)
                .send(&body[..]),
            ("POST", None) => self.agent.post(&url).send_empty(),
            _ => self.agent.get(&url).call(),
        };
        let mut response = response.map_err(|e| self.unsent(e, size))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| {
                eprintln!("error: {url}: cannot read the response: {e}");
                Failed(exit::ERROR)
            })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            eprintln!("error: {url}: the response is not JSON ({e}): {text}");
            Failed(exit::ERROR)
        })?;
        if status >= 400 {
            let kind = value["error"]["kind"].as_str().unwrap_or("error");
            let message = value["error"]["message"].as_str().unwrap_or(&text);
            eprintln!("error: {message}");
            return Err(Failed(exit_for_refusal(kind)));
        }
        Ok((status, value))
    }

    /// A request that got no answer, printed. A host refuses a body past
    /// its limit (413) before reading all of it and closes the connection,
    /// so such a body can end in a broken pipe before the answer is read:
    /// if the body was past the limit and the host still answers, that is
    /// what happened. Any other request cut off may or may not have been
    /// taken, and the message says so.
    fn unsent(&self, e: ureq::Error, size: usize) -> Failed {
        use std::io::ErrorKind;
        let cut = matches!(&e, ureq::Error::Io(io)
            if matches!(io.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset));
        let limit = orch::api::body_limit(orch::Limits::default().max_payload);
        let status = format!("{}/v1/status", self.base);
        if cut && size > limit && self.agent.get(&status).call().is_ok() {
            eprintln!(
                "error: the host at {} closed the connection while this request's {size} bytes were sent: \
                 it refuses a request body past its limit of {limit} bytes before reading all of it \
                 (a 16 MiB payload, base64-encoded, and room for the rest: docs/api.md)",
                self.base
            );
            return Failed(exit_for_refusal("payload-too-large"));
        }
        if cut {
            eprintln!(
                "error: the host at {} closed the connection before it answered ({e}): \
                 the request may or may not have been taken; look before sending it again",
                self.base
            );
            return Failed(exit::ERROR);
        }
        eprintln!(
            "error: cannot reach the orch host API at {}: {e}\n\
             (start one with `orch host start`, or point --api / ORCH_API at it)",
            self.base
        );
        Failed(exit::ERROR)
    }

    /// POSTs `body` as JSON lines to `path` and calls `each` with every
    /// line of the answer as it arrives.
    pub fn post_lines(
        &self,
        path: &str,
        body: Vec<u8>,
        mut each: impl FnMut(&str),
    ) -> Result<(), Failed> {
        use std::io::BufRead;
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .post(&url)
            .header("content-type", "application/x-ndjson")
            .send(&body[..]);
        let mut response = response.map_err(|e| self.unsent(e, body.len()))?;
        if response.status().as_u16() >= 400 {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            let kind = value["error"]["kind"].as_str().unwrap_or("error");
            eprintln!(
                "error: {}",
                value["error"]["message"].as_str().unwrap_or(&text)
            );
            return Err(Failed(exit_for_refusal(kind)));
        }
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let line = line.map_err(|e| {
                eprintln!("error: {url}: the answer stopped: {e}");
                Failed(exit::ERROR)
            })?;
            each(&line);
        }
        Ok(())
    }
}

/// The exit code for a request the API refused, by the error's kind.
pub fn exit_for_refusal(kind: &str) -> u8 {
    match kind {
        "not-found" | "unknown-capability" | "invalid-request" | "payload-too-large"
        | "invalid-workflow" | "already-exists" => exit::BAD_INPUT,
        "unavailable" | "shutting-down" | "no-capacity" => exit::UNAVAILABLE,
        _ => exit::ERROR,
    }
}

/// A name or id as one path segment of an API URL: every byte but letters,
/// digits, `-` and `_` escaped, so that `a/b`, `..` or `x?y` cannot reach
/// another endpoint or lose a part.
pub fn segment(s: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_');
    percent_encoding::utf8_percent_encode(s, KEEP).to_string()
}

/// The exit code for a task's error kind, the same as `orch run` uses.
pub fn exit_for_kind(kind: &str) -> u8 {
    match kind {
        "invalid-input" | "payload-too-large" => exit::BAD_INPUT,
        "fuel-exhausted"
        | "memory-limit"
        | "table-limit"
        | "deadline-exceeded"
        | "result-too-large"
        | "host-call-data-limit" => exit::LIMIT,
        "host" | "no-capacity" | "unavailable" | "cancelled" => exit::ERROR,
        _ => exit::AGENT_FAILED,
    }
}

/// Follows `/v1/events` and prints each event's JSON on its own line. With
/// `task`, returns once that task has ended (its final event printed).
pub fn watch(base: &str, task: Option<&str>, capability: Option<&str>) -> u8 {
    use std::io::{BufRead, Write};
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent.get(&format!("{base}/v1/events"));
    if let Some(t) = task {
        request = request.query("task", t);
    }
    if let Some(c) = capability {
        request = request.query("capability", c);
    }
    let mut response = match request.call() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot reach the orch host API at {base}: {e}");
            return exit::ERROR;
        }
    };
    if response.status().as_u16() >= 400 {
        let text = response.body_mut().read_to_string().unwrap_or_default();
        eprintln!("error: {text}");
        return exit::BAD_INPUT;
    }
    // The stream's lines, and the task's end as read from its record, meet
    // in one channel: the task's ending event is on the host that ran it,
    // which in a cluster may be another, and it may have ended before the
    // stream opened.
    enum Seen {
        Line(String),
        /// The stream ended: cut (true), or closed by the host.
        Closed(bool),
        Ended(Value),
        Failed(u8),
    }
    // Bounded: a slow reader of stdout holds the stream back, and the
    // host then reports what it missed (`lagged`).
    let (tx, rx) = std::sync::mpsc::sync_channel::<Seen>(1024);
    if let Some(t) = task {
        let (base, t, tx) = (base.to_string(), t.to_string(), tx.clone());
        std::thread::spawn(move || {
            let client = Client::new(base, Duration::from_secs(330));
            loop {
                match client.request("GET", &format!("/v1/tasks/{}?wait=300s", segment(&t)), None) {
                    Ok((_, task)) if is_final(&task["status"]) => {
                        let _ = tx.send(Seen::Ended(task));
                        return;
                    }
                    Ok(_) => {}
                    Err(Failed(code)) => {
                        let _ = tx.send(Seen::Failed(code));
                        return;
                    }
                }
            }
        });
    }
    std::thread::spawn(move || {
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        for line in reader.lines() {
            let Ok(line) = line else {
                let _ = tx.send(Seen::Closed(true));
                return;
            };
            if let Some(data) = line.strip_prefix("data:") {
                if tx.send(Seen::Line(data.trim_start().to_string())).is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Seen::Closed(false));
    });
    let mut out = std::io::stdout().lock();
    // Once the record says the task ended, its event gets this long to come.
    let mut ended: Option<(Value, std::time::Instant)> = None;
    loop {
        let seen = match &ended {
            None => rx.recv().unwrap_or(Seen::Closed(false)),
            Some((_, at)) => {
                let left = Duration::from_millis(500).saturating_sub(at.elapsed());
                match rx.recv_timeout(left) {
                    Ok(seen) => seen,
                    Err(_) => Seen::Closed(false),
                }
            }
        };
        match seen {
            Seen::Line(data) => {
                if writeln!(out, "{data}").and_then(|_| out.flush()).is_err() {
                    return 0;
                }
                if let Some(t) = task {
                    let end = serde_json::from_str::<Value>(&data)
                        .is_ok_and(|e| e["task"] == t && is_final(&e["kind"]));
                    if end {
                        return 0;
                    }
                }
            }
            Seen::Ended(record) => ended = Some((record, std::time::Instant::now())),
            Seen::Failed(code) => return code,
            Seen::Closed(cut) => {
                return match ended {
                    // Not on this host's stream: the end from the record,
                    // with the event's fields.
                    Some((record, _)) => {
                        let _ = writeln!(out, "{}", end_event(&record));
                        0
                    }
                    None if cut => {
                        eprintln!("error: the host closed the event stream");
                        exit::ERROR
                    }
                    None => 0,
                };
            }
        }
    }
}

/// A task's ending event built from its record, for a watch whose stream
/// did not carry it.
fn end_event(task: &Value) -> Value {
    let mut event = serde_json::json!({
        "kind": task["status"],
        "task": task["id"],
        "capability": task["capability"],
        "host": task["host"],
        "agent": task["agent"],
        "attempt": task["attempts"],
        "at_ms": task["finished_at_ms"],
        "submitted_at_ms": task["submitted_at_ms"],
        "fuel_used": task["fuel_used"],
    });
    if let (Some(end), Some(start)) = (
        task["finished_at_ms"].as_u64(),
        task["submitted_at_ms"].as_u64(),
    ) {
        event["took_ms"] = end.saturating_sub(start).into();
    }
    if let Some(kind) = task["error"]["kind"].as_str() {
        event["error"] = kind.into();
    }
    event
}

/// Whether a status or an event kind ends a task.
fn is_final(kind: &Value) -> bool {
    matches!(
        kind.as_str(),
        Some("completed" | "failed" | "dead" | "cancelled")
    )
}
