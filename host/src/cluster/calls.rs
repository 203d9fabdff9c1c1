//! A cluster's record of durable agents' calls (`scheduler::calls`): the
//! JetStream KV bucket `ORCH_CALLS`, key `<caller task id>/<n>`, kept for
//! `[host] retention`, so a durable task redelivered to another host
//! replays the calls its first host made.

use async_nats::jetstream::{self, kv, stream};

use super::{Cluster, ClusterError, ClusterErrorKind};
use crate::scheduler::calls::{CallLog, CallRecord, LogFuture};

const BUCKET: &str = "ORCH_CALLS";

pub struct KvCallLog {
    bucket: kv::Store,
}

impl KvCallLog {
    pub async fn open(
        cluster: &Cluster,
        retention: std::time::Duration,
    ) -> Result<KvCallLog, ClusterError> {
        let js = jetstream::new(cluster.client.clone());
        let bucket = match js.get_key_value(BUCKET).await {
            Ok(b) => {
                cluster
                    .align_retention(&js, &format!("KV_{BUCKET}"), retention)
                    .await?;
                b
            }
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: BUCKET.to_string(),
                    history: 1,
                    storage: stream::StorageType::File,
                    max_age: retention,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    ClusterError::new(
                        &cluster.url,
                        ClusterErrorKind::Request,
                        format!("bucket {BUCKET}"),
                        e,
                    )
                })?,
        };
        Ok(KvCallLog { bucket })
    }
}

impl CallLog for KvCallLog {
    fn get<'a>(&'a self, key: &'a str) -> LogFuture<'a, Option<CallRecord>> {
        Box::pin(async move {
            match self
                .bucket
                .get(key)
                .await
                .map_err(|e| format!("{BUCKET}: {e}"))?
            {
                Some(v) => serde_json::from_slice(&v)
                    .map(Some)
                    .map_err(|e| format!("{BUCKET} key {key}: {e}")),
                None => Ok(None),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, record: &'a CallRecord) -> LogFuture<'a, ()> {
        Box::pin(async move {
            let value = serde_json::to_vec(record).map_err(|e| e.to_string())?;
            // The first outcome of a call stays.
            match self.bucket.create(key, value.into()).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(format!("{BUCKET}: {e}")),
            }
        })
    }
}
