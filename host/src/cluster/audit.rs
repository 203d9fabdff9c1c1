//! The audit trail of a cluster: the JetStream stream `ORCH_AUDIT`, where
//! each host appends its own chain on `orch.v1.audit.<host>` (one chain per
//! writer, so hosts never wait for each other). The stream keeps entries
//! for `[audit] retention` (its `max_age`).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{subjects, Cluster, ClusterError, ClusterErrorKind};
use crate::audit::{AuditError, AuditStore, Entry, Raw};
use crate::service::BoxFuture;

pub const STREAM: &str = "ORCH_AUDIT";

fn subject(host: &str) -> String {
    format!("{}.audit.{host}", subjects::PREFIX)
}

pub struct StreamAudit {
    js: jetstream::Context,
    stream: stream::Stream,
}

impl StreamAudit {
    /// Opens the stream, creating it if this host is the first, and sets
    /// its retention to `retention` (the last host to start decides).
    pub async fn open(
        cluster: &Cluster,
        retention: Duration,
        max_entries: u64,
    ) -> Result<StreamAudit, ClusterError> {
        let js = jetstream::new(cluster.client.clone());
        let config = stream::Config {
            name: STREAM.to_string(),
            subjects: vec![format!("{}.audit.*", subjects::PREFIX)],
            storage: stream::StorageType::File,
            max_age: retention,
            max_messages: i64::try_from(max_entries).unwrap_or(i64::MAX),
            // A batch published again after a failure repeats message ids
            // (host, seq, hash): the server drops what it already has. The
            // window may not exceed max_age.
            duplicate_window: retention.min(Duration::from_secs(120)),
            ..Default::default()
        };
        let err = |e: Box<dyn std::error::Error + Send + Sync>| {
            ClusterError::new(
                &cluster.url,
                ClusterErrorKind::Request,
                format!("stream {STREAM}"),
                e,
            )
        };
        let stream = match js.get_stream(STREAM).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| err(e.into()))?;
                if info.config.max_age != retention
                    || info.config.max_messages != config.max_messages
                {
                    js.update_stream(config).await.map_err(|e| err(e.into()))?;
                }
                s
            }
            Err(_) => js
                .get_or_create_stream(config)
                .await
                .map_err(|e| err(e.into()))?,
        };
        Ok(StreamAudit { js, stream })
    }
}

fn err(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> AuditError {
    AuditError::new(format!("stream {STREAM}: {what}"), e)
}

impl AuditStore for StreamAudit {
    fn head<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Option<Entry>, AuditError>> {
        Box::pin(async move {
            use async_nats::jetstream::stream::LastRawMessageErrorKind;
            match self
                .stream
                .get_last_raw_message_by_subject(&subject(host))
                .await
            {
                Ok(m) => serde_json::from_slice(&m.payload).map(Some).map_err(|e| {
                    AuditError::damaged(format!("stream {STREAM}: the last entry"), e)
                }),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(err("reading the last entry", e)),
            }
        })
    }

    fn append(&self, entries: Vec<Entry>) -> BoxFuture<'_, Result<(), AuditError>> {
        Box::pin(async move {
            // All published before any ack is awaited: one round trip per
            // batch, and the stream keeps their order (one connection).
            let mut acks = Vec::with_capacity(entries.len());
            for entry in &entries {
                let bytes = serde_json::to_vec(entry).map_err(|e| err("encoding", e))?;
                let mut headers = async_nats::HeaderMap::new();
                let id = format!(
                    "{}-{}-{}",
                    entry.host,
                    entry.seq,
                    &entry.hash[..16.min(entry.hash.len())]
                );
                headers.insert("Nats-Msg-Id", id.as_str());
                let ack = self
                    .js
                    .publish_with_headers(subject(&entry.host), headers, bytes.into())
                    .await
                    .map_err(|e| err("publishing", e))?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(|e| err("publishing", e))?;
            }
            Ok(())
        })
    }

    fn scan(&self, since_ms: u64) -> mpsc::Receiver<Result<Raw, AuditError>> {
        let (tx, rx) = mpsc::channel(256);
        let stream = self.stream.clone();
        tokio::spawn(async move {
            let read = async {
                let deliver_policy = if since_ms == 0 {
                    consumer::DeliverPolicy::All
                } else {
                    let at = async_nats::datetime::from_nanos(i128::from(since_ms) * 1_000_000)
                        .map_err(|e| err("since", e))?;
                    consumer::DeliverPolicy::ByStartTime { start_time: at }
                };
                let mut consumer = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        deliver_policy,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| err("reading", e))?;
                // What is there now; entries appended meanwhile are left
                // for the next read.
                let mut left = consumer
                    .info()
                    .await
                    .map_err(|e| err("reading", e))?
                    .num_pending;
                if left == 0 {
                    return Ok(());
                }
                let mut messages = consumer.messages().await.map_err(|e| err("reading", e))?;
                while left > 0 {
                    let Some(m) = messages.next().await else {
                        break;
                    };
                    let m = m.map_err(|e| err("reading", e))?;
                    let position = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                    left -= 1;
                    let raw = Raw {
                        position,
                        bytes: m.payload.to_vec(),
                    };
                    if tx.send(Ok(raw)).await.is_err() {
                        break;
                    }
                }
                Ok::<(), AuditError>(())
            };
            if let Err(e) = read.await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    fn prune(&self, _cutoff_ms: u64) -> BoxFuture<'_, Result<u64, AuditError>> {
        // The stream's max_age does it.
        Box::pin(async { Ok(0) })
    }
}
