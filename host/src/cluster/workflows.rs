//! The workflow store of a cluster: definitions in the KV bucket
//! `ORCH_WORKFLOWS` (key `<name>.v<version>`, written with `create`, so a
//! version is stored once) and runs in `ORCH_RUNS` (key: the run id; each
//! checkpoint is an `update` on the revision the driver read, which is what
//! fences a driver that lost its lease).

use async_nats::jetstream::{self, kv, stream};
use futures_util::TryStreamExt;

use super::{Cluster, ClusterError, ClusterErrorKind};
use crate::service::BoxFuture;
use crate::workflow::{Registered, RunRecord, WorkflowError, WorkflowStore};

const DEFINITIONS: &str = "ORCH_WORKFLOWS";
const RUNS: &str = "ORCH_RUNS";

pub struct KvStore {
    definitions: kv::Store,
    runs: kv::Store,
}

impl KvStore {
    /// Opens the two buckets, creating them if this host is the first.
    pub async fn open(cluster: &Cluster) -> Result<KvStore, ClusterError> {
        let js = jetstream::new(cluster.client.clone());
        let url = cluster.url.clone();
        let open = |name: &'static str| {
            let js = js.clone();
            let url = url.clone();
            async move {
                match js.get_key_value(name).await {
                    Ok(b) => Ok(b),
                    Err(_) => js
                        .create_key_value(kv::Config {
                            bucket: name.to_string(),
                            history: 1,
                            storage: stream::StorageType::File,
                            // Room for the largest run record.
                            max_value_size: 1 << 20,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| {
                            ClusterError::new(
                                &url,
                                ClusterErrorKind::Request,
                                format!("bucket {name}"),
                                e,
                            )
                        }),
                }
            }
        };
        Ok(KvStore {
            definitions: open(DEFINITIONS).await?,
            runs: open(RUNS).await?,
        })
    }
}

fn store_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> WorkflowError {
    WorkflowError::store(format!("NATS bucket {what}"), e)
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, WorkflowError> {
    serde_json::from_slice(bytes).map_err(|e| store_error(what, e))
}

impl WorkflowStore for KvStore {
    fn exclusive(&self) -> bool {
        false
    }

    fn register<'a>(&'a self, def: &'a Registered) -> BoxFuture<'a, Result<bool, WorkflowError>> {
        Box::pin(async move {
            let key = format!("{}.v{}", def.definition.name, def.definition.version);
            let value = serde_json::to_vec(def).map_err(|e| store_error(DEFINITIONS, e))?;
            match self.definitions.create(&key, value.into()).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(store_error(DEFINITIONS, e)),
            }
        })
    }

    fn definitions(&self) -> BoxFuture<'_, Result<Vec<Registered>, WorkflowError>> {
        Box::pin(async move {
            let keys: Vec<String> = match self.definitions.keys().await {
                Ok(keys) => keys
                    .try_collect()
                    .await
                    .map_err(|e| store_error(DEFINITIONS, e))?,
                Err(e) => return Err(store_error(DEFINITIONS, e)),
            };
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some(v) = self
                    .definitions
                    .get(&key)
                    .await
                    .map_err(|e| store_error(DEFINITIONS, e))?
                {
                    out.push(decode(DEFINITIONS, &v)?);
                }
            }
            Ok(out)
        })
    }

    fn create_run<'a>(&'a self, run: &'a RunRecord) -> BoxFuture<'a, Result<u64, WorkflowError>> {
        Box::pin(async move {
            let value = serde_json::to_vec(run).map_err(|e| store_error(RUNS, e))?;
            self.runs
                .create(&run.id, value.into())
                .await
                .map_err(|e| store_error(RUNS, e))
        })
    }

    fn run<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(RunRecord, u64)>, WorkflowError>> {
        Box::pin(async move {
            // A run id is a ulid; anything else is no key of this bucket.
            if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Ok(None);
            }
            match self
                .runs
                .entry(id)
                .await
                .map_err(|e| store_error(RUNS, e))?
            {
                Some(e) if e.operation == kv::Operation::Put => {
                    Ok(Some((decode(RUNS, &e.value)?, e.revision)))
                }
                _ => Ok(None),
            }
        })
    }

    fn update_run<'a>(
        &'a self,
        run: &'a RunRecord,
        rev: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, WorkflowError>> {
        Box::pin(async move {
            let value = serde_json::to_vec(run).map_err(|e| store_error(RUNS, e))?;
            match self.runs.update(&run.id, value.into(), rev).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(store_error(RUNS, e)),
            }
        })
    }

    fn runs(&self) -> BoxFuture<'_, Result<Vec<(RunRecord, u64)>, WorkflowError>> {
        Box::pin(async move {
            let keys: Vec<String> = match self.runs.keys().await {
                Ok(keys) => keys.try_collect().await.map_err(|e| store_error(RUNS, e))?,
                Err(e) => return Err(store_error(RUNS, e)),
            };
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                if let Some(found) = self.run(&key).await? {
                    out.push(found);
                }
            }
            Ok(out)
        })
    }

    fn delete_run<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), WorkflowError>> {
        Box::pin(async move { self.runs.purge(id).await.map_err(|e| store_error(RUNS, e)) })
    }
}
