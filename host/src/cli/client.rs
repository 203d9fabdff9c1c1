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
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("POST", Some(body)) => self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(body.to_string()),
            ("POST", None) => self.agent.post(&url).send_empty(),
            _ => self.agent.get(&url).call(),
        };
        let mut response = response.map_err(|e| {
            eprintln!(
                "error: cannot reach the orch host API at {}: {e}\n\
                 (start one with `orch host start`, or point --api / ORCH_API at it)",
                self.base
            );
            Failed(exit::ERROR)
        })?;
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
            let code = match kind {
                "not-found" | "unknown-capability" | "invalid-request" | "payload-too-large" => {
                    exit::BAD_INPUT
                }
                "unavailable" | "shutting-down" | "no-capacity" => exit::UNAVAILABLE,
                _ => exit::ERROR,
            };
            return Err(Failed(code));
        }
        Ok((status, value))
    }
}

/// The exit code for a task's error kind, the same as `orch run` uses.
pub fn exit_for_kind(kind: &str) -> u8 {
    match kind {
        "invalid-input" | "payload-too-large" => exit::BAD_INPUT,
        "fuel-exhausted"
        | "memory-limit"
        | "deadline-exceeded"
        | "result-too-large"
        | "host-call-data-limit" => exit::LIMIT,
        "host" | "no-capacity" | "unavailable" => exit::ERROR,
        _ => exit::AGENT_FAILED,
    }
}
