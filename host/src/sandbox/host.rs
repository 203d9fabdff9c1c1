//! Implementations of the host imports for one task's store.

use super::bindings::orch::agent::{kv, log, types};
use super::StoreData;

/// Longest log message kept; longer ones are cut so that a guest cannot
/// flood the host's log.
const MAX_LOG_MESSAGE: usize = 16 << 10;
/// Longest kv key accepted.
const MAX_KV_KEY: usize = 1 << 10;

impl types::Host for StoreData {}

impl log::Host for StoreData {
    fn log(&mut self, level: log::Level, message: String) {
        let mut message = message;
        if message.len() > MAX_LOG_MESSAGE {
            let mut cut = MAX_LOG_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        // The SDKs report panics with this prefix just before the trap; keep
        // the text so the trap error can carry it.
        if matches!(level, log::Level::Error) && message.starts_with("panicked at ") {
            self.panic = Some(message.clone());
        }
        let agent = &*self.agent;
        match level {
            log::Level::Trace => tracing::trace!(target: "orch::guest", agent, "{message}"),
            log::Level::Debug => tracing::debug!(target: "orch::guest", agent, "{message}"),
            log::Level::Info => tracing::info!(target: "orch::guest", agent, "{message}"),
            log::Level::Warn => tracing::warn!(target: "orch::guest", agent, "{message}"),
            log::Level::Error => tracing::error!(target: "orch::guest", agent, "{message}"),
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
    async fn get(&mut self, key: String) -> Option<Vec<u8>> {
        let Ok(access) = self.kv_access(&key) else {
            return None;
        };
        let (store, ns) = (access.store.clone(), access.namespace.clone());
        match blocking(move || store.get(&ns, &key)).await {
            Ok(value) => value,
            Err(error) => {
                // `get` has no error case in the WIT; a storage failure reads
                // as a missing key, and the operator sees it in the log.
                tracing::warn!(agent = &*self.agent, %error, "kv get failed");
                None
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
        blocking(move || store.set(&ns, &key, &value)).await
    }

    async fn delete(&mut self, key: String) -> Result<(), String> {
        let access = match self.kv_access(&key) {
            Ok(a) => a,
            Err(e) => return Err(e),
        };
        let (store, ns) = (access.store.clone(), access.namespace.clone());
        blocking(move || store.delete(&ns, &key)).await
    }
}
