//! The `orch` binary as a test drives it: a fresh ORCH_HOME and working
//! directory per test, real components from target/plugins.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A file built by `plugins/build.sh` (component or manifest).
pub fn built(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `bash plugins/build.sh`",
        path.display()
    );
    path
}

/// Path of a built component, as a string for command lines.
pub fn p(name: &str) -> String {
    built(&format!("{name}.wasm")).display().to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub struct Orch {
    pub home: tempfile::TempDir,
    pub work: tempfile::TempDir,
}

impl Orch {
    pub fn new() -> Orch {
        Orch {
            home: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    pub fn run_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_orch"))
            .args(args)
            .env("ORCH_HOME", self.home.path())
            .env_remove("ORCH_LOG")
            .env_remove("RUST_BACKTRACE")
            .current_dir(self.work.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, b"")
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "orch {args:?} failed: {}",
            stderr(&out)
        );
        stdout(&out)
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// Copies a built plugin (component and manifest) into the work dir as
    /// `as_name`, with the manifest passed through `edit`.
    pub fn stage(&self, plugin: &str, as_name: &str, edit: impl Fn(String) -> String) -> String {
        let wasm = self.work.path().join(format!("{as_name}.wasm"));
        std::fs::copy(built(&format!("{plugin}.wasm")), &wasm).unwrap();
        let manifest = std::fs::read_to_string(built(&format!("{plugin}.toml"))).unwrap();
        std::fs::write(
            self.work.path().join(format!("{as_name}.toml")),
            edit(manifest),
        )
        .unwrap();
        wasm.display().to_string()
    }

    pub fn config(&self, text: &str) {
        std::fs::write(self.home.path().join("config.toml"), text).unwrap();
    }

    /// A new signing key written to `file` in the work dir; returns its public key.
    pub fn key(&self, file: &str) -> String {
        self.ok(&["key", "generate", "--out", file])
            .trim()
            .to_string()
    }

    /// Makes this host require signatures by a new key written to `file`;
    /// returns the public key.
    pub fn require_signed(&self, file: &str) -> String {
        let public = self.key(file);
        self.config(&format!(
            "[plugins]\nrequire_signed = true\ntrusted_keys = [\"{public}\"]\n"
        ));
        public
    }
}
