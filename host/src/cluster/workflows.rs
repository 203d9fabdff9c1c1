//! The workflow store of a cluster: definitions in the KV bucket
//! `ORCH_WORKFLOWS` (key `def.<name>.v<version>`, written with `create`, so
//! a version is stored once; `latest.<name>` holds a name's highest
//! version, raised with compare-and-set) and runs in `ORCH_RUNS` (key: the run id; each
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

fn def_key(name: &str, version: u32) -> String {
    format!("def.{name}.v{version}")
}

/// A run id is a ulid; anything else is no key of `ORCH_RUNS`.
fn is_run_key(id: &str) -> bool {
    !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric())
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
            let (name, version) = (&def.definition.name, def.definition.version);
            let value = serde_json::to_vec(def).map_err(|e| store_error(DEFINITIONS, e))?;
            let created = match self
                .definitions
                .create(def_key(name, version), value.into())
                .await
            {
                Ok(_) => true,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                Err(e) => return Err(store_error(DEFINITIONS, e)),
            };
            // Raise `latest.<name>` unless a higher version is there (also
            // for a version that existed: a registration cut off between
            // the two writes is repaired by the next one). Two hosts
            // registering at once retry on each other's revision.
            let key = format!("latest.{name}");
            let latest = version.to_string();
            for attempt in 0..10u32 {
                if attempt > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20 << attempt.min(6)))
                        .await;
                }
                let entry = self
                    .definitions
                    .entry(&key)
                    .await
                    .map_err(|e| store_error(DEFINITIONS, e))?;
                let written = match entry.filter(|e| e.operation == kv::Operation::Put) {
                    Some(e) => {
                        let current: u32 = std::str::from_utf8(&e.value)
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        if current >= version {
                            return Ok(created);
                        }
                        self.definitions
                            .update(&key, latest.clone().into(), e.revision)
                            .await
                            .is_ok()
                    }
                    None => self
                        .definitions
                        .create(&key, latest.clone().into())
                        .await
                        .is_ok(),
                };
                if written {
                    return Ok(created);
                }
            }
            Err(store_error(
                DEFINITIONS,
                std::io::Error::other(format!("could not raise {key} to version {version}")),
            ))
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
            for key in keys.iter().filter(|k| k.starts_with("def.")) {
                if let Some(v) = self
                    .definitions
                    .get(key.as_str())
                    .await
                    .map_err(|e| store_error(DEFINITIONS, e))?
                {
                    out.push(decode(DEFINITIONS, &v)?);
                }
            }
            Ok(out)
        })
    }

    fn definition<'a>(
        &'a self,
        name: &'a str,
        version: u32,
    ) -> BoxFuture<'a, Result<Option<Registered>, WorkflowError>> {
        Box::pin(async move {
            match self
                .definitions
                .get(def_key(name, version))
                .await
                .map_err(|e| store_error(DEFINITIONS, e))?
            {
                Some(v) => Ok(Some(decode(DEFINITIONS, &v)?)),
                None => Ok(None),
            }
        })
    }

    fn latest_version<'a>(
        &'a self,
        name: &'a str,
    ) -> BoxFuture<'a, Result<Option<u32>, WorkflowError>> {
        Box::pin(async move {
            let v = self
                .definitions
                .get(format!("latest.{name}"))
                .await
                .map_err(|e| store_error(DEFINITIONS, e))?;
            Ok(v.and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok()))
        })
    }

    fn create_run<'a>(
        &'a self,
        run: &'a RunRecord,
    ) -> BoxFuture<'a, Result<Option<u64>, WorkflowError>> {
        Box::pin(async move {
            let value = serde_json::to_vec(run).map_err(|e| store_error(RUNS, e))?;
            match self.runs.create(&run.id, value.into()).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(store_error(RUNS, e)),
            }
        })
    }

    fn run<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(RunRecord, u64)>, WorkflowError>> {
        Box::pin(async move {
            if !is_run_key(id) {
                return Ok(None);
            }
            match self
                .runs
                .entry(id)
                .await
                .map_err(|e| store_error(RUNS, e))?
            {
                Some(e) if e.operation == kv::Operation::Put => Ok(Some((
                    decode(&format!("{RUNS} key {id}"), &e.value)?,
                    e.revision,
                ))),
                _ => Ok(None),
            }
        })
    }

    /// From the stream's leader, not a direct get, which a replica that
    /// lags could answer: a driver decides by it whether it still owns the
    /// run (`run::Fencing`).
    fn run_latest<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<(RunRecord, u64)>, WorkflowError>> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        Box::pin(async move {
            if !is_run_key(id) {
                return Ok(None);
            }
            match self
                .runs
                .stream
                .get_last_raw_message_by_subject(&format!("$KV.{RUNS}.{id}"))
                .await
            {
                // A delete or purge marker.
                Ok(m) if m.headers.get("KV-Operation").is_some() => Ok(None),
                Ok(m) => Ok(Some((
                    decode(&format!("{RUNS} key {id}"), &m.payload)?,
                    m.sequence,
                ))),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(store_error(RUNS, e)),
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
                // One damaged record must not hide the others.
                match self.run(&key).await {
                    Ok(Some(found)) => out.push(found),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(run = %key, error = %e, "skipping a workflow run record that does not decode")
                    }
                }
            }
            Ok(out)
        })
    }

    fn delete_run<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), WorkflowError>> {
        Box::pin(async move { self.runs.purge(id).await.map_err(|e| store_error(RUNS, e)) })
    }
}
