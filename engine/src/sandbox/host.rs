//! Implementations of the host imports for one task's store.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::{CallReport, HostFault, StoreData, SubCall};
use crate::engine::bindings::orch::agent::{kv, log, messaging, tasks, types};
use crate::error::TaskError;

/// Longest log message kept; longer ones are cut so that a guest cannot
/// flood the host's log.
const MAX_LOG_MESSAGE: usize = 16 << 10;
/// Longest kv key accepted.
const MAX_KV_KEY: usize = 1 << 10;

impl types::Host for StoreData {}

impl log::Host for StoreData {
    fn log(&mut self, level: log::Level, message: String) {
        // One guest line is one host line: a newline or a terminal escape
        // in it could otherwise forge host log lines. Cut, then escaped.
        let message = crate::text::escape_capped(&message, MAX_LOG_MESSAGE);
        // The SDKs report panics with this prefix just before the trap; keep
        // the text so the trap error can carry it.
        if matches!(level, log::Level::Error) && message.starts_with("panicked at ") {
            self.panic = Some(message.clone());
        }
        let (agent, task) = (&*self.agent, &*self.task);
        let trace_id = self.calls.as_ref().and_then(|c| c.ctx.trace_id.as_deref());
        match level {
            log::Level::Trace => {
                tracing::trace!(target: "orch::guest", agent, task, trace_id, "{message}")
            }
            log::Level::Debug => {
                tracing::debug!(target: "orch::guest", agent, task, trace_id, "{message}")
            }
            log::Level::Info => {
                tracing::info!(target: "orch::guest", agent, task, trace_id, "{message}")
            }
            log::Level::Warn => {
                tracing::warn!(target: "orch::guest", agent, task, trace_id, "{message}")
            }
            log::Level::Error => {
                tracing::error!(target: "orch::guest", agent, task, trace_id, "{message}")
            }
        }
    }
}

impl StoreData {
    fn kv_access(&self, key: &str) -> Result<&super::KvAccess, String> {
        let access = match &self.kv {
            super::KvState::Granted(access) => access,
            super::KvState::Describe => return Err("kv is not available during describe".into()),
            super::KvState::NotGranted => {
                return Err(format!(
                    "no kv namespace is granted to {} (the manifest needs [grants] kv = \"...\")",
                    self.agent
                ))
            }
        };
        if key.len() > MAX_KV_KEY {
            return Err(format!(
                "kv key of {} bytes is longer than the limit of {MAX_KV_KEY} bytes",
                key.len()
            ));
        }
        Ok(access)
    }
}

/// Runs a blocking kv operation off the async executor (redb commits fsync).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::kv::KvError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("kv operation failed: {e}")),
    }
}

impl kv::Host for StoreData {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        let Ok(access) = self.kv_access(&key) else {
            return Ok(None);
        };
        let (store, ns) = (access.store.clone(), access.namespace.clone());
        let span = crate::trace_span!("host.kv.get");
        match blocking(move || store.get(&ns, &key))
            .instrument(span)
            .await
        {
            Ok(value) => Ok(value),
            Err(error) => {
                tracing::warn!(agent = &*self.agent, %error, "kv get failed");
                Err(wasmtime::Error::new(HostFault(format!(
                    "kv get failed: {error}"
                ))))
            }
        }
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        let access = match self.kv_access(&key) {
            Ok(a) => a,
            Err(e) => return Err(e),
        };
        if value.len() as u64 > access.max_value {
            return Err(format!(
                "kv value of {} bytes is larger than the limit of {} bytes",
                value.len(),
                access.max_value
            ));
        }
        let (store, ns) = (access.store.clone(), access.namespace.clone());
        let span = crate::trace_span!("host.kv.set");
        blocking(move || store.set(&ns, &key, &value))
            .instrument(span)
            .await
    }

    async fn delete(&mut self, key: String) -> Result<(), String> {
        let access = match self.kv_access(&key) {
            Ok(a) => a,
            Err(e) => return Err(e),
        };
        let (store, ns) = (access.store.clone(), access.namespace.clone());
        let span = crate::trace_span!("host.kv.delete");
        blocking(move || store.delete(&ns, &key))
            .instrument(span)
            .await
    }
}

type CallResult = Result<Vec<u8>, tasks::CallError>;

impl tasks::Host for StoreData {
    async fn call(
        &mut self,
        capability: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, tasks::CallError> {
        let request = tasks::CallRequest {
            capability,
            payload,
            timeout_ms,
        };
        self.sub_tasks(vec![request])
            .await
            .pop()
            .unwrap_or_else(|| Err(tasks::CallError::Refused("no result".into())))
    }

    async fn call_all(&mut self, requests: Vec<tasks::CallRequest>) -> Vec<CallResult> {
        self.sub_tasks(requests).await
    }
}

impl StoreData {
    /// Starts every request as a sub-task at once and waits for all of them,
    /// in a span of the task's trace (the sub-tasks' are under it).
    async fn sub_tasks(&mut self, requests: Vec<tasks::CallRequest>) -> Vec<CallResult> {
        let span = crate::trace_span!(
            "host.tasks.call",
            calls = requests.len(),
            capability = requests.first().map_or("", |r| r.capability.as_str()),
        );
        self.start_sub_tasks(requests).instrument(span).await
    }

    async fn start_sub_tasks(&mut self, requests: Vec<tasks::CallRequest>) -> Vec<CallResult> {
        let n = requests.len() as u32;
        let refuse = |message: String| -> Vec<CallResult> {
            (0..n)
                .map(|_| Err(tasks::CallError::Refused(message.clone())))
                .collect()
        };
        let Some(state) = self.calls.as_mut() else {
            return refuse(format!(
                "tasks.call is not available to {}: it needs a host with a scheduler (`orch host start`)",
                self.agent
            ));
        };
        let depth = state.ctx.depth + 1;
        if depth > state.max_depth {
            return refuse(format!(
                "call depth {depth} is past the limit of {} (tasks.call from task {})",
                state.max_depth, state.task_id
            ));
        }
        if state.started.saturating_add(n) > state.max_subtasks {
            return refuse(format!(
                "fan-out limit: task {} has started {} sub-tasks and asked for {n} more, past the limit of {}",
                state.task_id, state.started, state.max_subtasks
            ));
        }
        state.started += n;
        let now = Instant::now();
        // Calls made together share what the caller has left.
        let share = (state.fuel_left / u64::from(n.max(1))).max(1);
        let mut running = tokio::task::JoinSet::new();
        for (i, request) in requests.into_iter().enumerate() {
            let deadline = match request.timeout_ms {
                0 => state.deadline,
                ms => state
                    .deadline
                    .min(now + Duration::from_millis(u64::from(ms))),
            };
            let capability = request.capability.clone();
            let given_ms = deadline.saturating_duration_since(now).as_millis() as u64;
            let call = state.ctx.tasks.call(SubCall {
                parent: state.task_id.clone(),
                capability: request.capability,
                payload: request.payload,
                deadline,
                fuel: share,
                depth,
            });
            running.spawn(
                async move { (i, capability, given_ms, call.await) }
                    .instrument(tracing::Span::current()),
            );
        }
        let mut results: Vec<CallResult> = (0..n)
            .map(|_| {
                Err(tasks::CallError::Unavailable(
                    "the sub-task did not report".into(),
                ))
            })
            .collect();
        while let Some(joined) = running.join_next().await {
            let Ok((i, capability, deadline_ms, outcome)) = joined else {
                continue;
            };
            let kind = match &outcome.result {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            // Every outcome costs what the callee used, so failing on purpose
            // cannot multiply a caller's budget; never more than its share.
            let charge = match &outcome.result {
                Err(TaskError::FuelExhausted { .. }) => share,
                _ => outcome.fuel_used.min(share),
            };
            let result = outcome.result.map(|o| o.result).map_err(call_error);
            state.charge += charge;
            state.charged += charge;
            state.fuel_left = state.fuel_left.saturating_sub(charge);
            state.reports.push(CallReport {
                capability,
                deadline_ms,
                fuel_limit: share,
                fuel_used: charge,
                outcome: kind.to_string(),
            });
            if let Some(slot) = results.get_mut(i) {
                *slot = result;
            }
        }
        results
    }
}

fn call_error(e: TaskError) -> tasks::CallError {
    use tasks::CallError as C;
    match e {
        TaskError::InvalidInput(m) => C::Task(types::TaskError::InvalidInput(m)),
        TaskError::Failed(m) => C::Task(types::TaskError::Failed(m)),
        TaskError::Retryable(m) => C::Task(types::TaskError::Retryable(m)),
        TaskError::Trap { .. } => C::Trapped(e.to_string()),
        TaskError::DeadlineExceeded { .. } => C::DeadlineExceeded,
        TaskError::FuelExhausted { .. }
        | TaskError::MemoryLimit { .. }
        | TaskError::TableLimit { .. }
        | TaskError::PayloadTooLarge { .. }
        | TaskError::ResultTooLarge { .. }
        | TaskError::ResultTooLargeToRead { .. }
        | TaskError::HostCallDataLimit { .. } => C::Limit(e.to_string()),
        TaskError::Unavailable(m) => C::Unavailable(m),
        TaskError::NoCapacity { .. } | TaskError::Host(_) | TaskError::Cancelled => {
            C::Unavailable(e.to_string())
        }
        // The host fails the caller itself once it returns.
        TaskError::NonDeterministic(_) => C::Refused(e.to_string()),
    }
}

/// Longest message payload an agent may send.
const MAX_MESSAGE: usize = 1 << 20;
/// Longest a request may wait for its reply.
const MAX_REQUEST_WAIT: Duration = Duration::from_secs(60);

impl StoreData {
    /// The bus, once the subject is checked against the grants.
    fn bus_for(
        &self,
        subject: &str,
        payload: &[u8],
    ) -> Result<std::sync::Arc<dyn super::Bus>, String> {
        if !super::subject::is_subject(subject) {
            return Err(format!(
                "{subject:?} is not a subject: dot-separated tokens of letters, digits, '-' and '_'"
            ));
        }
        if !self
            .grants
            .messaging
            .iter()
            .any(|p| super::subject::matches(p, subject))
        {
            return Err(format!(
                "subject {subject} is not granted to {} (the manifest's [grants] messaging lists {:?})",
                self.agent, self.grants.messaging
            ));
        }
        if payload.len() > MAX_MESSAGE {
            return Err(format!(
                "message of {} bytes is larger than the limit of {MAX_MESSAGE} bytes",
                payload.len()
            ));
        }
        self.bus.clone().ok_or_else(|| {
            "messaging is not available here: it needs a host (`orch host start`)".to_string()
        })
    }
}

impl messaging::Host for StoreData {
    async fn publish(&mut self, subject: String, payload: Vec<u8>) -> Result<(), String> {
        let bus = self.bus_for(&subject, &payload)?;
        let bytes = payload.len();
        let span = crate::trace_span!("host.messaging.publish", subject = %subject);
        // Created in the span: the bus reads its trace context for the message.
        let sent = span.in_scope(|| bus.publish(subject.clone(), payload));
        sent.instrument(span).await.map_err(|e| e.to_string())?;
        bus.published(&self.agent, &self.task, &subject, bytes);
        Ok(())
    }

    async fn request(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, String> {
        let bus = self.bus_for(&subject, &payload)?;
        let mut wait = Duration::from_millis(u64::from(timeout_ms)).min(MAX_REQUEST_WAIT);
        // Never past the task's own deadline.
        if let Some(calls) = &self.calls {
            wait = wait.min(calls.deadline.saturating_duration_since(Instant::now()));
        }
        let span = crate::trace_span!("host.messaging.request", subject = %subject);
        let asked = span.in_scope(|| bus.request(subject, payload, wait));
        asked.instrument(span).await.map_err(|e| e.to_string())
    }
}
