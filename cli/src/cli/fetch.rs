//! Downloading a plugin for `orch plugin install URL`: the component, and if
//! the server has them, its manifest (`NAME.toml`) and signature
//! (`NAME.wasm.sig`) from the same place. They land in a temporary directory
//! under the data directory and are then checked like local files. HTTPS
//! only, except plain HTTP to a loopback address (local mirrors, tests).

use std::path::{Path, PathBuf};
use std::time::Duration;

const MAX_COMPONENT: u64 = 256 << 20;
const MAX_SIDE_FILE: u64 = 1 << 20;

/// A download directory, removed when dropped.
pub struct Downloaded {
    dir: PathBuf,
    pub component: PathBuf,
}

impl Drop for Downloaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn is_url(s: &str) -> bool {
    s.starts_with("https://") || s.starts_with("http://")
}

fn check_url(url: &str) -> Result<&str, String> {
    let rest = if let Some(rest) = url.strip_prefix("https://") {
        rest
    } else if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split('/').next().unwrap_or_default();
        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Err(format!(
                "{url}: plain http is allowed only to a loopback address; use https"
            ));
        }
        rest
    } else {
        return Err(format!("{url}: only https:// URLs are supported"));
    };
    let file = rest.rsplit('/').next().unwrap_or_default();
    let file = file.split(['?', '#']).next().unwrap_or_default();
    if !file.ends_with(".wasm") || file.len() <= ".wasm".len() || file.contains("..") {
        return Err(format!("{url}: the URL must end in a file name NAME.wasm"));
    }
    Ok(file)
}

/// `Ok(None)` for a 404, so optional side files can be absent.
fn get(agent: &ureq::Agent, url: &str, limit: u64) -> Result<Option<Vec<u8>>, String> {
    match agent.get(url).call() {
        Ok(mut response) => response
            .body_mut()
            .with_config()
            .limit(limit)
            .read_to_vec()
            .map(Some)
            .map_err(|e| format!("{url}: {e} (at most {limit} bytes are accepted)")),
        Err(ureq::Error::StatusCode(404)) => Ok(None),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

pub fn fetch(home: &Path, url: &str) -> Result<Downloaded, String> {
    let file = check_url(url)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let component =
        get(&agent, url, MAX_COMPONENT)?.ok_or_else(|| format!("{url}: not found (404)"))?;
    let base = url.split(['?', '#']).next().unwrap_or(url);
    let manifest_url = format!("{}.toml", base.trim_end_matches(".wasm"));
    let manifest = get(&agent, &manifest_url, MAX_SIDE_FILE)?;
    let signature = get(&agent, &format!("{base}.sig"), MAX_SIDE_FILE)?;

    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = home
        .join("plugins/downloads")
        .join(format!("{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let downloaded = Downloaded {
        component: dir.join(file),
        dir,
    };
    let write = |path: &Path, bytes: &[u8]| {
        std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&downloaded.component, &component)?;
    if let Some(m) = manifest {
        write(&downloaded.component.with_extension("toml"), &m)?;
    }
    if let Some(s) = signature {
        write(
            &orch::plugin::signature::path_for(&downloaded.component),
            &s,
        )?;
    }
    Ok(downloaded)
}

#[cfg(test)]
mod tests {
    use super::check_url;

    #[test]
    fn urls() {
        assert_eq!(
            check_url("https://example.com/p/counter.wasm"),
            Ok("counter.wasm")
        );
        assert_eq!(
            check_url("http://127.0.0.1:8080/counter.wasm?x=1"),
            Ok("counter.wasm")
        );
        assert!(check_url("http://example.com/counter.wasm").is_err());
        assert!(check_url("https://example.com/counter").is_err());
        assert!(check_url("ftp://example.com/counter.wasm").is_err());
    }
}
