//! `orch plugin` and `orch key` as operators use them: real processes, real
//! components from plugins/, a fresh ORCH_HOME per test. Error messages are
//! checked against golden files in tests/golden/ (ORCH_UPDATE_GOLDEN=1
//! rewrites them after a deliberate change).
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::common::{built, p, stderr, HostProc, Orch};

fn same(x: String) -> String {
    x
}

/// The command line of `orch plugin install PATH --yes`.
fn install(path: &str) -> Vec<String> {
    ["plugin", "install", path, "--yes"]
        .map(String::from)
        .to_vec()
}

#[test]
fn install_run_upgrade_rollback_remove() {
    let orch = Orch::new();
    let v1 = orch.stage("counter", "counter", same);
    let v2 = orch.stage("counter-next", "counter-next", same);

    assert!(orch
        .ok(&["plugin", "install", &v1, "--yes"])
        .contains("installed counter 0.1.0"));
    let list = orch.json(&["plugin", "list", "--output", "json"]);
    assert_eq!(list[0]["name"], "counter");
    assert_eq!(list[0]["active"], "0.1.0");
    assert_eq!(list[0]["capabilities"][0], "counter");
    assert_eq!(orch.ok(&["run", "counter"]), "1");

    assert!(orch
        .ok(&["plugin", "upgrade", "counter", &v2, "--yes"])
        .contains("installed counter 0.2.0"));
    let out = orch.json(&["run", "counter", "--output", "json"]);
    assert_eq!(
        (out["version"].as_str(), out["result"].as_str()),
        (Some("0.2.0"), Some("2"))
    );

    assert_eq!(
        orch.ok(&["plugin", "rollback", "counter"]).trim(),
        "counter: 0.2.0 -> 0.1.0"
    );
    let out = orch.json(&["run", "counter", "--output", "json"]);
    assert_eq!(
        (out["version"].as_str(), out["result"].as_str()),
        (Some("0.1.0"), Some("3"))
    );

    let info = orch.json(&["plugin", "inspect", "counter", "--output", "json"]);
    assert_eq!(info["active"], "0.1.0");
    let versions: Vec<&str> = info["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["0.1.0", "0.2.0"]);
    assert_eq!(info["manifest"]["grants"]["kv"], "counter");
    let blob = PathBuf::from(info["blob"].as_str().unwrap());
    assert!(blob.exists());

    // Nothing is left to roll back to now.
    let out = orch.run(&["plugin", "rollback", "counter"]);
    assert_eq!(out.status.code(), Some(3));

    // The kept 0.2.0 becomes active again by an upgrade with the same
    // component and manifest, as often as the operator switches; the
    // history keeps each version once.
    for _ in 0..3 {
        let switched = orch.ok(&["plugin", "upgrade", "counter", &v2, "--yes"]);
        assert!(
            switched.contains("counter: 0.1.0 -> 0.2.0 (a kept version, active again"),
            "{switched}"
        );
        let out = orch.json(&["run", "counter", "--output", "json"]);
        assert_eq!(out["version"], "0.2.0");
        assert_eq!(
            orch.ok(&["plugin", "rollback", "counter"]).trim(),
            "counter: 0.2.0 -> 0.1.0"
        );
    }
    // Forward to 0.2.0 and back to 0.1.0 by upgrades: 0.1.0 moves to the
    // end of the history rather than appearing twice.
    orch.ok(&["plugin", "upgrade", "counter", &v2, "--yes"]);
    let back = orch.ok(&["plugin", "upgrade", "counter", &v1, "--yes"]);
    assert!(
        back.contains("counter: 0.2.0 -> 0.1.0 (a kept version"),
        "{back}"
    );
    let info = orch.json(&["plugin", "inspect", "counter", "--output", "json"]);
    assert_eq!(info["history"], serde_json::json!(["0.2.0", "0.1.0"]));
    assert_eq!(info["versions"].as_array().unwrap().len(), 2);
    // Other contents under a kept version's number are refused.
    let other = orch.stage("counter-next", "counter-other", |m| {
        format!("{m}\n# another manifest, the same version\n")
    });
    let out = orch.run(&["plugin", "upgrade", "counter", &other, "--yes"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains(
            "plugin counter 0.2.0 is already installed; a new version needs a new version number"
        ),
        "{}",
        stderr(&out)
    );
    let info = orch.json(&["plugin", "inspect", "counter", "--output", "json"]);
    assert_eq!(info["active"], "0.1.0");

    assert!(orch
        .ok(&["plugin", "remove", "counter"])
        .contains("removed counter (0.1.0, 0.2.0)"));
    assert_eq!(
        orch.json(&["plugin", "list", "--output", "json"]),
        serde_json::json!([])
    );
    assert!(!blob.exists(), "the blob of a removed plugin is deleted");
    let out = orch.run(&["run", "counter"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("no plugin named counter is installed"));
}

/// A host.json left by a host that died is no error of an install: the
/// plugin is installed, and a note says the change applies when a host
/// starts.
#[test]
fn an_install_beside_a_stale_host_address_succeeds_with_a_note() {
    let orch = Orch::new();
    let port = crate::common::unused_port();
    std::fs::write(
        orch.home.path().join("host.json"),
        format!("{{\"api\": \"http://127.0.0.1:{port}\"}}"),
    )
    .unwrap();
    let out = orch.run(&["plugin", "install", "-y", &p("echo")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(!err.contains("error"), "{err}");
    assert!(
        err.contains("no host answered at") && err.contains("the change applies when one starts"),
        "{err}"
    );
    let list = orch.json(&["plugin", "list", "--output", "json"]);
    assert!(list.to_string().contains("echo"), "{list}");
}

#[test]
fn install_asks_before_granting() {
    let orch = Orch::new();
    let wasm = orch.stage("counter", "counter", same);
    let out = orch.run_stdin(&["plugin", "install", &wasm], b"n\n");
    assert_eq!(out.status.code(), Some(3));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("kv namespace: counter"),
        "the grants are shown: {shown}"
    );
    assert_eq!(
        orch.json(&["plugin", "list", "--output", "json"]),
        serde_json::json!([])
    );

    let out = orch.run(&["plugin", "install", &wasm]);
    assert_eq!(out.status.code(), Some(3), "no answer means no");
    assert!(stderr(&out).contains("pass --yes"));

    let out = orch.run_stdin(&["plugin", "install", &wasm], b"y\n");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(orch.ok(&["run", "counter"]), "1");
}

#[test]
fn embedded_manifest_makes_a_one_file_plugin() {
    let orch = Orch::new();
    let loose = orch.stage("counter", "counter", same);
    let packed = orch.work.path().join("packed").join("counter.wasm");
    std::fs::create_dir(packed.parent().unwrap()).unwrap();
    orch.ok(&["plugin", "pack", &loose, "-o", packed.to_str().unwrap()]);
    assert!(!packed.with_extension("toml").exists());
    assert_eq!(orch.ok(&["run", packed.to_str().unwrap(), "--yes"]), "1");
    orch.ok(&["plugin", "install", packed.to_str().unwrap(), "--yes"]);
    assert_eq!(orch.ok(&["run", "counter"]), "2");
}

#[test]
fn signed_plugins_install_when_required() {
    let orch = Orch::new();
    let public = orch.require_signed("k.nk");
    assert!(public.starts_with('U') && public.len() == 56, "{public}");
    let wasm = orch.stage("counter", "counter", same);
    orch.ok(&["plugin", "sign", &wasm, "--key", "k.nk"]);
    assert!(orch
        .ok(&["plugin", "install", &wasm, "--yes"])
        .contains(&format!("signed by:    {public}")));
    let info = orch.json(&["plugin", "inspect", "counter", "--output", "json"]);
    assert_eq!(info["versions"][0]["signed_by"], public.as_str());
    assert_eq!(orch.ok(&["run", "counter"]), "1");
}

/// Serves the files of `dir` over HTTP/1.1 on a free loopback port until the
/// returned sender is dropped. Missing files are 404.
fn serve(dir: PathBuf) -> (u16, std::sync::mpsc::Sender<()>) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || loop {
        if let Err(std::sync::mpsc::TryRecvError::Disconnected) = stopped.try_recv() {
            return;
        }
        let Ok((stream, _)) = listener.accept() else {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        };
        stream.set_nonblocking(false).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap() == 0 || header == "\r\n" {
                break;
            }
        }
        let name = request
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .trim_start_matches('/')
            .to_string();
        let mut stream = stream;
        match std::fs::read(dir.join(&name)) {
            Ok(body) => {
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .unwrap();
                stream.write_all(&body).unwrap();
            }
            Err(_) => {
                write!(
                    stream,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
            }
        }
    });
    (port, stop)
}

#[test]
fn install_from_a_url_fetches_the_manifest_and_signature_too() {
    let orch = Orch::new();
    let public = orch.require_signed("k.nk");
    let wasm = orch.stage("counter", "counter", same);
    orch.ok(&["plugin", "sign", &wasm, "--key", "k.nk"]);
    let (port, _stop) = serve(orch.work.path().to_path_buf());

    let url = format!("http://127.0.0.1:{port}/counter.wasm");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&wasm).unwrap()))
    };
    let out = orch.run(&[
        "plugin",
        "install",
        &url,
        "--sha256",
        &"f".repeat(64),
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("was expected"));

    let text = orch.ok(&["plugin", "install", &url, "--sha256", &sha, "--yes"]);
    assert!(text.contains(&format!("signed by:    {public}")), "{text}");
    assert_eq!(orch.ok(&["run", "counter"]), "1");
    let downloads = orch.home.path().join("plugins/downloads");
    assert_eq!(
        std::fs::read_dir(&downloads)
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "downloads are cleaned up"
    );

    let out = orch.run(&[
        "plugin",
        "install",
        &format!("http://127.0.0.1:{port}/missing.wasm"),
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("not found (404)"));
}

/// Replaces what changes from run to run (temporary paths, hashes, keys)
/// with stable placeholders.
fn normalize(text: &str, orch: &Orch) -> String {
    let mut s = text
        .replace(&orch.work.path().display().to_string(), "$WORK")
        .replace(&orch.home.path().display().to_string(), "$HOME");
    let words: Vec<String> = s
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            (w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
                || (w.len() == 56
                    && w.starts_with('U')
                    && w.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()))
        })
        .map(str::to_string)
        .collect();
    for w in words {
        let placeholder = if w.len() == 64 { "<sha256>" } else { "<key>" };
        s = s.replace(&w, placeholder);
    }
    s
}

/// One bad input per case: what to set up, the command, and the exit code.
/// The message must match tests/golden/NAME.err.
#[test]
fn every_bad_input_gets_its_own_message() {
    type Setup = fn(&Orch) -> Vec<String>;
    let cases: Vec<(&str, Setup, i32)> = vec![
        (
            "not_a_file",
            |o| {
                std::fs::create_dir(o.work.path().join("dir.wasm")).unwrap();
                install("dir.wasm")
            },
            3,
        ),
        ("missing_file", |_| install("nothing.wasm"), 3),
        (
            "not_wasm",
            |o| {
                std::fs::write(o.work.path().join("text.wasm"), "hello").unwrap();
                install("text.wasm")
            },
            3,
        ),
        (
            "core_module",
            |o| {
                std::fs::copy(built("core/echo.wasm"), o.work.path().join("core.wasm")).unwrap();
                std::fs::copy(built("echo.toml"), o.work.path().join("core.toml")).unwrap();
                install("core.wasm")
            },
            3,
        ),
        (
            "wrong_world",
            |o| {
                std::fs::copy(built("other-world.wasm"), o.work.path().join("other.wasm")).unwrap();
                std::fs::write(
                    o.work.path().join("other.toml"),
                    "[plugin]\nname = \"other\"\nversion = \"0.1.0\"\ncapabilities = [\"add\"]\n",
                )
                .unwrap();
                install("other.wasm")
            },
            3,
        ),
        (
            "missing_manifest",
            |o| {
                std::fs::copy(built("counter.wasm"), o.work.path().join("lonely.wasm")).unwrap();
                install("lonely.wasm")
            },
            3,
        ),
        (
            "manifest_missing_field",
            |o| {
                o.stage("counter", "counter", |m| {
                    m.replace("version = \"0.1.0\"\n", "")
                });
                install("counter.wasm")
            },
            3,
        ),
        (
            "manifest_invalid_field",
            |o| {
                o.stage("counter", "counter", |m| {
                    m.replace("version = \"0.1.0\"", "version = \"one\"")
                });
                install("counter.wasm")
            },
            3,
        ),
        (
            "manifest_unknown_field",
            |o| {
                o.stage("counter", "counter", |m| {
                    m.replace("[grants]", "[grants]\nnetwork = true")
                });
                install("counter.wasm")
            },
            3,
        ),
        (
            "manifest_relative_dir",
            |o| {
                o.stage("counter", "counter", |m| {
                    m + "dirs = [{ host = \"data\", guest = \"/data\" }]\n"
                });
                install("counter.wasm")
            },
            3,
        ),
        (
            "capability_mismatch",
            |o| {
                o.stage("counter", "counter", |m| {
                    m.replace("[\"counter\"]", "[\"counter\", \"counter.reset\"]")
                });
                install("counter.wasm")
            },
            3,
        ),
        (
            "limit_above_maximum",
            |o| {
                o.stage("counter", "counter", |m| {
                    m + "\n[limits]\nfuel = 20000000000\n"
                });
                install("counter.wasm")
            },
            3,
        ),
        (
            "sha256_mismatch",
            |o| {
                o.stage("counter", "counter", same);
                vec![
                    "plugin".into(),
                    "install".into(),
                    "counter.wasm".into(),
                    "--yes".into(),
                    "--sha256".into(),
                    "0".repeat(64),
                ]
            },
            3,
        ),
        (
            "already_installed",
            |o| {
                let w = o.stage("counter", "counter", same);
                o.ok(&["plugin", "install", &w, "--yes"]);
                install(&w)
            },
            3,
        ),
        (
            "duplicate_version",
            |o| {
                let w = o.stage("counter", "counter", same);
                o.ok(&["plugin", "install", &w, "--yes"]);
                vec![
                    "plugin".into(),
                    "upgrade".into(),
                    "counter".into(),
                    w,
                    "--yes".into(),
                ]
            },
            3,
        ),
        (
            "upgrade_not_installed",
            |o| {
                let w = o.stage("counter", "counter", same);
                vec![
                    "plugin".into(),
                    "upgrade".into(),
                    "counter".into(),
                    w,
                    "--yes".into(),
                ]
            },
            3,
        ),
        (
            "kv_namespace_taken",
            |o| {
                let w = o.stage("counter", "counter", same);
                o.ok(&["plugin", "install", &w, "--yes"]);
                let k = o.stage("kvtool", "kvtool", |m| {
                    m.replace("kv = \"kvtool\"", "kv = \"counter\"")
                });
                install(&k)
            },
            3,
        ),
        (
            "unsigned",
            |o| {
                o.require_signed("k.nk");
                o.stage("counter", "counter", same);
                install("counter.wasm")
            },
            3,
        ),
        (
            "tampered_component",
            |o| {
                o.require_signed("k.nk");
                let w = o.stage("counter", "counter", same);
                o.ok(&["plugin", "sign", &w, "--key", "k.nk"]);
                let mut bytes = std::fs::read(&w).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
                std::fs::write(&w, bytes).unwrap();
                install(&w)
            },
            3,
        ),
        (
            "tampered_manifest",
            |o| {
                o.require_signed("k.nk");
                let w = o.stage("counter", "counter", same);
                o.ok(&["plugin", "sign", &w, "--key", "k.nk"]);
                let toml = o.work.path().join("counter.toml");
                let m = std::fs::read_to_string(&toml).unwrap();
                std::fs::write(&toml, m + "env = [\"HOME\"]\n").unwrap();
                install(&w)
            },
            3,
        ),
        (
            "wrong_key",
            |o| {
                let trusted = o.key("trusted.nk");
                o.key("other.nk");
                o.config(&format!(
                    "[plugins]\nrequire_signed = true\ntrusted_keys = [\"{trusted}\"]\n"
                ));
                let w = o.stage("counter", "counter", same);
                o.ok(&["plugin", "sign", &w, "--key", "other.nk"]);
                install(&w)
            },
            3,
        ),
        (
            "signature_checked_before_compiling",
            |o| {
                // A broken component: the signature error comes first, so an
                // unsigned file is never compiled.
                o.require_signed("k.nk");
                let w = o.stage("counter", "counter", same);
                let bytes = std::fs::read(&w).unwrap();
                std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
                install(&w)
            },
            3,
        ),
        (
            "store_write_fails",
            |o| {
                // The blob directory cannot be created (a file is in its place):
                // the install fails and leaves no registry entry behind.
                std::fs::create_dir_all(o.home.path().join("plugins")).unwrap();
                std::fs::write(o.home.path().join("plugins/blobs"), "in the way").unwrap();
                let w = o.stage("counter", "counter", same);
                install(&w)
            },
            1,
        ),
        (
            "plain_http_url",
            |_| install("http://example.com/a.wasm"),
            3,
        ),
    ];

    let update = std::env::var_os("ORCH_UPDATE_GOLDEN").is_some();
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut failures = Vec::new();
    for (name, setup, code) in cases {
        let orch = Orch::new();
        let args = setup(&orch);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = orch.run(&args);
        let stderr = normalize(&stderr(&out), &orch);
        let file = golden_dir.join(format!("{name}.err"));
        if update {
            std::fs::write(&file, &stderr).unwrap();
        }
        let want = std::fs::read_to_string(&file)
            .unwrap_or_else(|_| format!("<no golden file {}>", file.display()));
        if stderr != want || out.status.code() != Some(code) {
            failures.push(format!(
                "{name}: exit {:?} (want {code})\n--- got\n{stderr}--- want\n{want}",
                out.status.code()
            ));
        }
        // A refused install never leaves a plugin behind.
        if name != "already_installed"
            && name != "duplicate_version"
            && name != "kv_namespace_taken"
        {
            let list = orch.run(&["plugin", "list", "--output", "json"]);
            assert_eq!(
                String::from_utf8_lossy(&list.stdout).trim(),
                "[]",
                "{name} left a plugin installed"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The kvtool plugin staged as the file `file`.wasm with its manifest's kv
/// namespace set to `ns`.
fn kvtool_as(orch: &Orch, file: &str, ns: &str) -> String {
    orch.stage("kvtool", file, |m| {
        m.replace("kv = \"kvtool\"", &format!("kv = \"{ns}\""))
    })
}

#[test]
fn a_file_run_gets_no_kv_namespace_of_another_plugin() {
    let orch = Orch::new();
    let counter = orch.stage("counter", "counter", same);
    orch.ok(&["plugin", "install", &counter, "--yes"]);
    assert_eq!(orch.ok(&["run", "counter"]), "1");

    // Another plugin's file asking for counter's namespace: refused, as at
    // install; only its `describe` ran, with no grants.
    let evil = kvtool_as(&orch, "evil", "counter");
    let out = orch.run(&["run", &evil, "--yes", "-i", "-"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("kv namespace counter is already granted to plugin counter"),
        "{}",
        stderr(&out)
    );
    // A file that calls itself counter but is not an installed version.
    let next = orch.work.path().join("next");
    std::fs::create_dir(&next).unwrap();
    let impersonator = next.join("counter.wasm");
    std::fs::copy(built("counter-next.wasm"), &impersonator).unwrap();
    std::fs::copy(built("counter-next.toml"), next.join("counter.toml")).unwrap();
    let out = orch.run(&["run", impersonator.to_str().unwrap(), "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("belongs to the installed plugin counter, and this file is not an installed version of it"),
        "{}",
        stderr(&out)
    );
    // The installed file itself may use its own namespace.
    assert_eq!(orch.ok(&["run", &counter, "--yes"]), "2");
    assert_eq!(orch.ok(&["run", "counter"]), "3");
}

#[test]
fn a_file_run_with_grants_asks_first() {
    let orch = Orch::new();
    let tool = kvtool_as(&orch, "tool", "tool");
    let out = orch.run(&["run", &tool, "-i", "-"]);
    assert_eq!(out.status.code(), Some(3), "no answer means no");
    assert!(stderr(&out).contains("pass --yes"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("kv namespace: tool"),
        "the grants are shown on stderr (stdout is the result): {}",
        stderr(&out)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let out = orch.run_stdin(&["run", &tool, "-i", "-"], b"n\n");
    assert_eq!(out.status.code(), Some(3));
    assert!(stderr(&out).contains("not run"), "{}", stderr(&out));
    // A declined run claimed nothing: another plugin may take the namespace.
    let counter = orch.stage("counter", "counter", |m| {
        m.replace("kv = \"counter\"", "kv = \"tool\"")
    });
    orch.ok(&["plugin", "install", &counter, "--yes"]);
    let out = orch.run_stdin(&["run", &tool, "--yes", "-i", "-"], b"set k v");
    assert_eq!(out.status.code(), Some(3), "now it is counter's");
    let mine = kvtool_as(&orch, "mine", "mine");
    let out = orch.run_stdin(&["run", &mine, "--yes", "-i", "-"], b"set k v");
    assert!(out.status.success(), "{}", stderr(&out));
    // `inspect` only describes a file: it claims nothing either.
    let theirs = kvtool_as(&orch, "theirs", "theirs");
    orch.ok(&["inspect", &theirs]);
    let other = orch.stage("echo", "echo", |m| {
        format!("{m}\n[grants]\nkv = \"theirs\"\n")
    });
    orch.ok(&["plugin", "install", &other, "--yes"]);
    // A file without grants runs without asking.
    let echo = built("echo.wasm");
    let plain = orch.work.path().join("plain.wasm");
    std::fs::copy(echo, &plain).unwrap();
    assert_eq!(
        String::from_utf8_lossy(
            &orch
                .run_stdin(&["run", plain.to_str().unwrap(), "-i", "-"], b"hi")
                .stdout
        ),
        "hi"
    );
    // A bare name is an installed plugin, never a file of that name.
    std::fs::copy(built("wordcount.wasm"), orch.work.path().join("wordcount")).unwrap();
    let out = orch.run(&["run", "wordcount"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("no plugin named wordcount is installed (see `orch plugin list`); for the file of that name, write ./wordcount"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_removed_plugins_kv_namespace_stays_its_own_until_purged() {
    let orch = Orch::new();
    let counter = orch.stage("counter", "counter", same);
    orch.ok(&["plugin", "install", &counter, "--yes"]);
    assert_eq!(orch.ok(&["run", "counter"]), "1");
    orch.ok(&["plugin", "remove", "counter"]);

    // Another plugin cannot claim the namespace, at install or by a run.
    let thief = kvtool_as(&orch, "thief", "counter");
    let out = orch.run(&["plugin", "install", &thief, "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let reserved = "kv namespace counter is reserved for plugin counter (not installed now), whose data it may hold; `orch plugin remove counter --purge` deletes the data and frees the name";
    assert!(stderr(&out).contains(reserved), "{}", stderr(&out));
    let out = orch.run_stdin(&["run", &thief, "--yes", "-i", "-"], b"get counter");
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains(reserved), "{}", stderr(&out));

    // Installed again, the plugin has its data back.
    orch.ok(&["plugin", "install", &counter, "--yes"]);
    assert_eq!(orch.ok(&["run", "counter"]), "2");

    // Purged: the data goes, and then the name is free.
    let out = orch.ok(&["plugin", "remove", "counter", "--purge"]);
    assert!(out.contains("removed counter (0.1.0)"), "{out}");
    assert!(
        out.contains("deleted kv namespace counter (1 keys)"),
        "{out}"
    );
    orch.ok(&["plugin", "install", &thief, "--yes"]);
    let out = orch.run_stdin(&["run", "kvtool", "-i", "-"], b"get counter");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("no value for counter"),
        "{}",
        stderr(&out)
    );
    // Nothing left to purge.
    let out = orch.run(&["plugin", "remove", "counter", "--purge"]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn install_shows_the_instances_in_force() {
    let orch = Orch::new();
    let echo = orch.stage("echo", "echo", same);
    let out = orch.ok(&["plugin", "install", &echo, "--yes"]);
    assert!(out.contains("instances 16 (the host's default)"), "{out}");
    orch.config("[host]\ninstances = 3\n");
    let counter = orch.stage("counter", "counter", same);
    let out = orch.ok(&["plugin", "install", &counter, "--yes"]);
    assert!(out.contains("instances 3 (the host's default)"), "{out}");
    let capped = orch.stage("kvtool", "kvtool", |m| {
        format!("{m}\n[limits]\nmax_instances = 2\n")
    });
    let out = orch.ok(&["plugin", "install", &capped, "--yes"]);
    assert!(out.contains("instances 2\n"), "{out}");
}

#[test]
fn control_characters_in_a_manifest_are_refused() {
    let orch = Orch::new();
    for (field, edit) in [
        (
            "plugin.description",
            "description = \"fine\\u001b[1A\\u001b[2K\\rgrants: none\"",
        ),
        ("plugin.version", "version = \"0.1.0-\\u001b[2K\""),
    ] {
        let wasm = orch.stage("counter", "counter", |m| {
            let key = edit.split(' ').next().unwrap();
            let mut out = String::new();
            for line in m.lines() {
                if line.starts_with(key) {
                    out.push_str(edit);
                } else {
                    out.push_str(line);
                }
                out.push('\n');
            }
            if !out.contains(edit) {
                out = out.replace("[plugin]\n", &format!("[plugin]\n{edit}\n"));
            }
            out
        });
        let out = orch.run(&["plugin", "install", &wasm, "--yes"]);
        assert_eq!(out.status.code(), Some(3), "{field}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("field `{field}`")), "{err}");
        assert!(err.contains("control character"), "{err}");
        assert!(
            !err.contains('\u{1b}'),
            "the escape is not printed raw: {err:?}"
        );
    }
}

#[test]
fn a_dirs_grant_is_shown_resolved_and_a_guest_path_granted_once() {
    let orch = Orch::new();
    let data = orch.work.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let given = format!("{}/../data", data.display());
    let wasm = orch.stage("counter", "counter", |m| {
        format!("{m}dirs = [{{ host = \"{given}\", guest = \"/data\" }}]\n")
    });
    let out = orch.ok(&["plugin", "install", &wasm, "--yes"]);
    let real = std::fs::canonicalize(&data).unwrap();
    assert!(
        out.contains(&format!(
            "directory:    {} (given as {given}) as /data (read-only)",
            real.display()
        )),
        "{out}"
    );
    let twice = orch.stage("echo", "echo", |m| {
        format!(
            "{m}\n[grants]\ndirs = [{{ host = \"{0}\", guest = \"/d\" }}, {{ host = \"{0}\", guest = \"/d\", mode = \"rw\" }}]\n",
            data.display()
        )
    });
    let out = orch.run(&["plugin", "install", &twice, "--yes"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains(
            "field `grants.dirs[1].guest`: /d is already the guest path of grants.dirs[0]"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn install_and_run_refuse_files_that_are_not_regular() {
    let orch = Orch::new();
    let fifo = orch.work.path().join("pipe.wasm");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for path in [
        "/dev/zero",
        fifo.to_str().unwrap(),
        orch.work.path().to_str().unwrap(),
    ] {
        for args in [vec!["plugin", "install", path, "--yes"], vec!["run", path]] {
            // Would read forever (/dev/zero) or block (a FIFO without a
            // writer) without the check.
            let out = orch.run(&args);
            assert_eq!(out.status.code(), Some(3), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("is not a regular file"),
                "{args:?}: {}",
                stderr(&out)
            );
        }
    }
}

/// `orch run` of a kv agent while a host on the same home holds the kv
/// store: the task fails with a host error that names the store and why,
/// instead of its `kv.get` reading as a missing key, and the count stays.
#[test]
fn a_kv_read_the_store_cannot_serve_fails_the_task_and_names_why() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", &p("counter"), "--yes"]);
    assert_eq!(orch.ok(&["run", "counter"]), "1");
    let _host = HostProc::start(&orch);
    // Through the host: it opens the kv store, and holds it from then on.
    let through_host = |expected: &str| {
        let out = orch.ok(&["task", "submit", "--capability", "counter", "--wait"]);
        assert_eq!(out, expected);
    };
    through_host("2");

    let out = orch.run(&["run", "counter"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("host error: kv get failed: kv store at")
            && stderr(&out).contains("another process has it open"),
        "{}",
        stderr(&out)
    );
    // Nothing was counted by the run that failed.
    through_host("3");
}
