//! Agent messages over NATS: core NATS subjects `orch.v1.msg.<subject>`.
//! Every host subscribes, in the queue group `orch`, to the subjects its
//! agents subscribe to, so one message reaches one subscribing agent in the
//! cluster; a request's reply is the agent's result, or an `Orch-Error`
//! header with the error. Core NATS is at most once: a message published
//! while no host subscribes is dropped, as on a lone host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{subjects, Cluster};
use crate::daemon::Host;
use crate::sandbox::{Bus, BusError, BusFuture};
use crate::scheduler::Submit;

const QUEUE_GROUP: &str = "orch";
const HEADER_ERROR: &str = "Orch-Error";

/// The sending span's trace context, for the task the message becomes on
/// the receiving host.
fn trace_headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(t) = crate::trace::current(None) {
        headers.insert(crate::trace::HEADER, t.as_str());
    }
    headers
}

pub struct NatsBus {
    client: async_nats::Client,
    audit: crate::audit::Audit,
}

impl Bus for NatsBus {
    fn publish(&self, subject: String, payload: Vec<u8>) -> BusFuture<()> {
        let client = self.client.clone();
        let headers = trace_headers();
        Box::pin(async move {
            let payload = bytes::Bytes::from(payload);
            client
                .publish_with_headers(subjects::message(&subject), headers, payload.clone())
                .await
                .map_err(|e| BusError::Transport {
                    what: "publish",
                    subject: subject.clone(),
                    source: Box::new(e),
                })?;
            // The copy for the workflow triggers; the message itself went.
            if let Err(e) = client.publish(subjects::published(&subject), payload).await {
                tracing::warn!(subject, error = %e, "the copy of a message for workflow triggers was not sent");
            }
            Ok(())
        })
    }

    fn published(&self, agent: &str, task: &str, subject: &str, bytes: usize) {
        crate::daemon::audit_message(&self.audit, agent, task, subject, bytes);
    }

    fn request(&self, subject: String, payload: Vec<u8>, timeout: Duration) -> BusFuture<Vec<u8>> {
        let client = self.client.clone();
        let headers = trace_headers();
        Box::pin(async move {
            let asked =
                client.request_with_headers(subjects::message(&subject), headers, payload.into());
            let reply = match tokio::time::timeout(timeout, asked).await {
                Err(_) => {
                    return Err(BusError::Timeout {
                        subject,
                        ms: timeout.as_millis() as u64,
                    })
                }
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    return Err(BusError::NoSubscriber { subject })
                }
                Ok(Err(e)) => {
                    return Err(BusError::Transport {
                        what: "request",
                        subject,
                        source: Box::new(e),
                    })
                }
                Ok(Ok(reply)) => reply,
            };
            if let Some(error) = reply.headers.as_ref().and_then(|h| h.get(HEADER_ERROR)) {
                return Err(BusError::Failed {
                    message: error.to_string(),
                });
            }
            Ok(reply.payload.to_vec())
        })
    }
}

/// Routes agents' messages through NATS and keeps this host's subscriptions
/// in line with its agents'.
pub fn start(cluster: &Cluster, host: Host) {
    let client = cluster.client.clone();
    host.scheduler().set_bus(Arc::new(NatsBus {
        client: client.clone(),
        audit: host.audit().clone(),
    }));
    let subscribed: Arc<Mutex<HashMap<String, tokio::task::JoinHandle<()>>>> =
        Arc::new(Mutex::new(HashMap::new()));
    tokio::spawn(async move {
        loop {
            let want = host.scheduler().subscriptions();
            let missing: Vec<String> = {
                let mut current = subscribed.lock().unwrap_or_else(|p| p.into_inner());
                current.retain(|s, handle| {
                    let keep = want.contains(s);
                    if !keep {
                        handle.abort();
                    }
                    keep
                });
                want.iter()
                    .filter(|s| !current.contains_key(*s))
                    .cloned()
                    .collect()
            };
            for subject in missing {
                match client
                    .queue_subscribe(subjects::message(&subject), QUEUE_GROUP.into())
                    .await
                {
                    Ok(sub) => {
                        let handle = tokio::spawn(deliver(
                            client.clone(),
                            host.clone(),
                            subject.clone(),
                            sub,
                        ));
                        subscribed
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(subject, handle);
                    }
                    Err(e) => tracing::warn!(subject = %subject, error = %e, "cannot subscribe"),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

/// Every agent message published in the cluster (not requests; their
/// copies on `orch.v1.published.>`), each to one host (queue group
/// `orch-workflows`), for the workflow triggers by subject. The channel is bounded: a message that finds it full is
/// dropped with a warning, as core NATS drops what nobody takes.
pub async fn tap(
    cluster: &Cluster,
) -> Result<mpsc::Receiver<(String, Vec<u8>)>, super::ClusterError> {
    let (tx, rx) = mpsc::channel(TAP_CAPACITY);
    let prefix = subjects::published("");
    let mut sub = cluster
        .client
        .queue_subscribe(subjects::published(">"), "orch-workflows".into())
        .await
        .map_err(|e| {
            super::ClusterError::new(
                &cluster.url,
                super::ClusterErrorKind::Request,
                "subscribe to agents' messages",
                e,
            )
        })?;
    let handle = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Some(subject) = msg.subject.as_str().strip_prefix(&prefix) else {
                continue;
            };
            match tx.try_send((subject.to_string(), msg.payload.to_vec())) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        subject,
                        "workflow triggers are behind: a message was dropped"
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    });
    cluster
        .tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(handle);
    Ok(rx)
}

/// Messages the workflow triggers may fall behind by.
pub const TAP_CAPACITY: usize = 1024;

/// Hands each message to a subscribing agent as a task; answers requests.
async fn deliver(
    client: async_nats::Client,
    host: Host,
    subject: String,
    mut sub: async_nats::Subscriber,
) {
    while let Some(message) = sub.next().await {
        let trace = message
            .headers
            .as_ref()
            .and_then(|h| h.get(crate::trace::HEADER))
            .map(|t| t.as_str())
            .filter(|t| crate::trace::is_valid(t))
            .map(String::from);
        let submit = Submit {
            id: host.new_message_id(),
            payload: message.payload.to_vec(),
            trace,
            ..Submit::default()
        };
        let handle = host.scheduler().submit_message(&subject, submit);
        let client = client.clone();
        tokio::spawn(async move {
            let outcome = match handle {
                Ok(h) => h
                    .wait()
                    .await
                    .map(|c| c.output.result)
                    .map_err(|f| f.error.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let Some(reply) = message.reply else { return };
            let sent = match outcome {
                Ok(result) => client.publish(reply, result.into()).await,
                Err(error) => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert(HEADER_ERROR, error.replace(['\r', '\n'], " ").as_str());
                    client
                        .publish_with_headers(reply, headers, bytes::Bytes::new())
                        .await
                }
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "cannot send a reply");
            }
        });
    }
}
