//! The `orch` binary as a user runs it: real processes, real components from
//! plugins/ (built by `plugins/build.sh`), a temporary ORCH_HOME each.
use crate::common::{p, stderr, stdout, HostProc, Orch};

#[test]
fn run_prints_the_result_bytes() {
    let orch = Orch::new();
    let out = orch.run_stdin(
        &["run", &p("wordcount"), "--input", "-"],
        b"one two three\nfour\n",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), r#"{"words":4,"lines":2,"bytes":19}"#);

    let file = orch.work.path().join("input.txt");
    std::fs::write(&file, "from a file").unwrap();
    let out = orch.run(&["run", &p("echo"), "--input", file.to_str().unwrap()]);
    assert_eq!(stdout(&out), "from a file");
}

#[test]
fn run_json_output_has_result_and_figures() {
    let orch = Orch::new();
    let out = orch.run_stdin(&["run", &p("echo"), "-i", "-", "--output", "json"], b"hi");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "completed");
    assert_eq!(v["result"], "hi");
    assert_eq!(v["agent"], "echo");
    assert!(v["fuel_used"].as_u64().unwrap() > 0);

    let out = orch.run(&["run", &p("spin"), "--fuel", "10000", "--output", "json"]);
    assert_eq!(out.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["kind"], "fuel-exhausted");
}

#[test]
fn counter_survives_a_process_restart() {
    let orch = Orch::new();
    for expected in ["1", "2", "3"] {
        let out = orch.run(&["run", &p("counter"), "--yes"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), expected);
    }
}

#[test]
fn exit_codes_tell_bad_input_from_limits_from_agent_failures() {
    let orch = Orch::new();
    let text = orch.work.path().join("text.wasm");
    std::fs::write(&text, "hello").unwrap();

    let out = orch.run(&["run", text.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a WebAssembly file"),
        "{}",
        stderr(&out)
    );

    let out = orch.run(&["run", &p("other-world")]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("does not implement the world orch:agent/agent@0.1.0"),
        "{}",
        stderr(&out)
    );

    let out = orch.run_stdin(&["run", &p("wordcount"), "-i", "-"], &[0xff, 0xfe]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("invalid input: payload is not UTF-8"),
        "{}",
        stderr(&out)
    );

    // No fuel is a usage error, as no time is; one unit runs out at once.
    let out = orch.run(&["run", &p("echo"), "--fuel", "0"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("--fuel must be greater than zero"),
        "{}",
        stderr(&out)
    );
    let out = orch.run(&["run", &p("echo"), "--fuel", "1"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));

    let out = orch.run(&["run", &p("spin"), "--fuel", "1000000"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("fuel exhausted: the task used all of its 1000000 fuel"),
        "{}",
        stderr(&out)
    );

    let out = orch.run(&[
        "run",
        &p("spin"),
        "--fuel",
        "10000000000",
        "--timeout",
        "100ms",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out)
            .contains("deadline exceeded: the task did not end within its deadline of 100 ms"),
        "{}",
        stderr(&out)
    );

    let out = orch.run(&["run", &p("hog"), "--memory", "8MiB"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        stderr(&out).contains("past the limit of 8388608 bytes"),
        "{}",
        stderr(&out)
    );

    let out = orch.run_stdin(&["run", &p("panic"), "-i", "-"], b"oh no");
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("agent gave up: oh no"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn oversized_input_is_refused_before_loading() {
    let orch = Orch::new();
    let big = vec![b'a'; (16 << 20) + 1];
    let out = orch.run_stdin(&["run", &p("echo"), "-i", "-"], &big);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("payload too large"),
        "{}",
        stderr(&out)
    );
    let ok = vec![b'a'; 16 << 20];
    let out = orch.run_stdin(&["run", &p("echo"), "-i", "-"], &ok);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 16 << 20);
}

#[test]
fn limit_flags_within_the_host_maximum_pass_above_it_are_refused() {
    let orch = Orch::new();
    let out = orch.run_stdin(
        &["run", &p("echo"), "-i", "-", "--fuel", "10000000000"],
        b"at max",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = orch.run_stdin(
        &["run", &p("echo"), "-i", "-", "--fuel", "10000000001"],
        b"over",
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("--fuel is above this host's maximum of 10000000000"),
        "{}",
        stderr(&out)
    );

    // The operator lowers the maximum in config.toml.
    std::fs::write(
        orch.home.path().join("config.toml"),
        "[limits]\nmax_memory = \"64MiB\"\n",
    )
    .unwrap();
    let out = orch.run_stdin(&["run", &p("echo"), "-i", "-", "--memory", "64MiB"], b"ok");
    assert!(out.status.success(), "{}", stderr(&out));
    let out = orch.run_stdin(&["run", &p("echo"), "-i", "-", "--memory", "65MiB"], b"no");
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("--memory is above this host's maximum of 64MiB"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn unknown_capability_is_refused() {
    let orch = Orch::new();
    let out = orch.run(&["run", &p("echo"), "--capability", "text.wordcount"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("does not provide capability text.wordcount; it provides: echo"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn inspect_shows_descriptor_imports_exports_and_size() {
    let orch = Orch::new();
    let out = orch.run(&["inspect", &p("counter")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "counter 0.1.0",
        "counter 1.0.0: increments",
        "orch:agent/kv@0.1.0",
        "handle",
        "describe",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }

    let out = orch.run(&["inspect", &p("counter"), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["descriptor"]["name"], "counter");
    assert_eq!(v["descriptor"]["capabilities"][0]["name"], "counter");
    assert_eq!(
        v["size"].as_u64().unwrap(),
        std::fs::metadata(crate::common::built("counter.wasm"))
            .unwrap()
            .len()
    );
    let imports: Vec<&str> = v["imports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert!(imports.contains(&"orch:agent/kv@0.1.0"), "{imports:?}");
    assert!(
        imports.iter().all(|i| !i.starts_with("wasi:")),
        "a wasm32-unknown-unknown agent imports no WASI: {imports:?}"
    );
    let exports = v["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2, "{exports:?}");
}

#[test]
fn second_run_uses_the_compiled_cache() {
    let orch = Orch::new();
    let out = orch.run(&["inspect", &p("wordcount"), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["compiled"], "fresh");
    let out = orch.run(&["inspect", &p("wordcount"), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["compiled"], "cache");
}

#[test]
fn output_to_a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let orch = Orch::new();
    // The reader is gone before the command writes, as after `| head -1`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orch"))
        .args(["inspect", &p("counter")])
        .env("ORCH_HOME", orch.home.path())
        .env_remove("RUST_BACKTRACE")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    // Ended by SIGPIPE (13), as `cat` would be; not a panic's exit code.
    assert_eq!(out.status.signal(), Some(13), "{:?}: {err}", out.status);
}

#[test]
fn names_and_ids_reach_the_api_as_one_path_segment_each() {
    let orch = Orch::new();
    let host = HostProc::start(&orch);
    for name in ["a/b", "../runs", "order?x=1", "x y", ".."] {
        let out = orch.run(&["workflow", "inspect", name, "--api", &host.url]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{name}: {err}");
        assert!(
            err.contains(&format!("workflow named {name}")),
            "{name}: {err}"
        );
    }
    for id in ["a/b", "../tasks", "bad id!", "t1?wait=1s"] {
        let out = orch.run(&["task", "get", id, "--api", &host.url]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "{id}: {err}");
        assert!(!err.contains("cannot reach"), "{id}: {err}");
    }
}
