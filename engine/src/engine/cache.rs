//! On-disk cache of compiled components. A file is keyed by the component's
//! sha256 and wasmtime's compatibility hash for this engine configuration, so
//! a different wasmtime or setting never loads stale code.

use std::path::Path;

use wasmtime::component::Component;

use super::Engine;
use crate::error::LoadError;

pub(super) fn load_or_compile<T: 'static>(
    engine: &Engine<T>,
    path: &Path,
    bytes: &[u8],
    sha256: &str,
) -> Result<(Component, bool), LoadError> {
    let wasmtime = engine.wasmtime();
    let compile = || {
        Component::new(wasmtime, bytes).map_err(|e| LoadError::InvalidComponent {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        })
    };
    let Some(dir) = engine.config().cache_dir.as_deref() else {
        return Ok((compile()?, false));
    };
    let file = dir.join(format!("{sha256}-{}.cwasm", engine.inner.compat));
    if file.exists() {
        // SAFETY: the file was written by `store` below from
        // `Component::serialize` of this same engine configuration (the
        // compatibility hash is in its name), inside a directory only orch
        // writes to. wasmtime also checks the header before using it.
        match unsafe { Component::deserialize_file(wasmtime, &file) } {
            Ok(component) => return Ok((component, true)),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "discarding unreadable cache entry");
                let _ = std::fs::remove_file(&file);
            }
        }
    }
    let component = compile()?;
    if let Err(e) = store(&component, dir, &file) {
        // A cache that cannot be written costs time on the next start but
        // does not stop this one.
        tracing::warn!(dir = %dir.display(), error = %e, "cannot write the component cache");
    }
    Ok((component, false))
}

fn store(component: &Component, dir: &Path, file: &Path) -> Result<(), LoadError> {
    let err = |reason: String| LoadError::Cache {
        path: file.to_path_buf(),
        reason,
    };
    let bytes = component.serialize().map_err(|e| err(format!("{e:#}")))?;
    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    // Write to a temporary file and rename, so that a crash or a concurrent
    // writer never leaves a half-written entry under the final name.
    let tmp = temp_name(dir);
    std::fs::write(&tmp, &bytes).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, file).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e.to_string())
    })
}

/// A name no other writer uses: the process id and a per-process counter.
fn temp_name(dir: &Path) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!(".tmp-{}-{n}", std::process::id()))
}
