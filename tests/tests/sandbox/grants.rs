//! Grants, tested as a matrix with the `fsprobe` fixture (a wasip1 agent
//! that uses std::fs and std::env): nothing without a grant, reads but no
//! writes with a read-only grant, no way out of a granted directory through
//! `..` or a symlink, only granted environment variables.

use std::path::Path;

use orch::{Agent, Limits, TaskError};
use orch_tests::{plugin, run, Harness};

/// A copy of fsprobe in `dir` with the manifest's `[grants]` section set to `grants`.
async fn probe(h: &Harness, dir: &Path, grants: &str) -> Agent {
    let wasm = dir.join("fsprobe.wasm");
    std::fs::copy(plugin("fsprobe"), &wasm).unwrap();
    let manifest = format!(
        "[plugin]\nname = \"fsprobe\"\nversion = \"0.1.0\"\ncapabilities = [\"test.fs\"]\n\n[grants]\n{grants}\n"
    );
    std::fs::write(dir.join("fsprobe.toml"), manifest).unwrap();
    h.try_load(&wasm)
        .await
        .unwrap_or_else(|e| panic!("loading fsprobe: {e}"))
}

async fn ask(agent: &Agent, command: &str) -> Result<String, String> {
    match run(agent, command.as_bytes(), &Limits::default()).await {
        Ok(out) => Ok(String::from_utf8_lossy(&out.result).into_owned()),
        Err(TaskError::Failed(msg)) => Err(msg),
        Err(other) => panic!("{command}: unexpected {other}"),
    }
}

/// A host layout: `root/data/note.txt` (granted), `root/secret.txt` (not).
fn layout() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("data")).unwrap();
    std::fs::write(root.path().join("data/note.txt"), "inside").unwrap();
    std::fs::write(root.path().join("secret.txt"), "outside").unwrap();
    root
}

#[tokio::test]
async fn without_a_directory_grant_no_host_file_is_readable() {
    let h = Harness::new();
    let host = layout();
    let agent = probe(&h, h.dir.path(), "").await;
    let data = host.path().join("data/note.txt");
    assert!(ask(&agent, &format!("read {}", data.display()))
        .await
        .is_err());
    assert!(ask(&agent, "read /etc/hostname").await.is_err());
    assert!(ask(&agent, "list /").await.is_err());
}

#[tokio::test]
async fn read_only_grant_reads_but_does_not_write() {
    let h = Harness::new();
    let host = layout();
    let grant = format!(
        "dirs = [{{ host = {:?}, guest = \"/data\" }}]",
        host.path().join("data")
    );
    let agent = probe(&h, h.dir.path(), &grant).await;
    assert_eq!(
        ask(&agent, "read /data/note.txt").await,
        Ok("inside".into())
    );
    assert_eq!(ask(&agent, "list /data").await, Ok("note.txt".into()));
    let err = ask(&agent, "write /data/new.txt hello").await.unwrap_err();
    assert!(
        !host.path().join("data/new.txt").exists(),
        "write went through: {err}"
    );
    let err = ask(&agent, "write /data/note.txt changed")
        .await
        .unwrap_err();
    assert_eq!(
        std::fs::read_to_string(host.path().join("data/note.txt")).unwrap(),
        "inside",
        "{err}"
    );
}

#[tokio::test]
async fn read_write_grant_writes_inside_the_directory() {
    let h = Harness::new();
    let host = layout();
    let grant = format!(
        "dirs = [{{ host = {:?}, guest = \"/data\", mode = \"rw\" }}]",
        host.path().join("data")
    );
    let agent = probe(&h, h.dir.path(), &grant).await;
    assert_eq!(
        ask(&agent, "write /data/new.txt hello").await,
        Ok("ok".into())
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("data/new.txt")).unwrap(),
        "hello"
    );
}

#[tokio::test]
async fn dot_dot_and_symlinks_do_not_escape_a_granted_directory() {
    let h = Harness::new();
    let host = layout();
    std::os::unix::fs::symlink(
        host.path().join("secret.txt"),
        host.path().join("data/link"),
    )
    .unwrap();
    std::os::unix::fs::symlink("../secret.txt", host.path().join("data/rel-link")).unwrap();
    let grant = format!(
        "dirs = [{{ host = {:?}, guest = \"/data\", mode = \"rw\" }}]",
        host.path().join("data")
    );
    let agent = probe(&h, h.dir.path(), &grant).await;
    for path in [
        "/data/../secret.txt",
        "/data/link",
        "/data/rel-link",
        "/data/../../etc/hostname",
    ] {
        let result = ask(&agent, &format!("read {path}")).await;
        assert!(result.is_err(), "{path} was readable: {result:?}");
    }
    let result = ask(&agent, "write /data/../escaped.txt x").await;
    assert!(
        result.is_err() && !host.path().join("escaped.txt").exists(),
        "{result:?}"
    );
    let result = ask(&agent, "write /data/link overwritten").await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(
        std::fs::read_to_string(host.path().join("secret.txt")).unwrap(),
        "outside"
    );
}

#[tokio::test]
async fn only_granted_environment_variables_are_visible() {
    let h = Harness::new();
    let home = std::env::var("HOME").expect("HOME is set for the tests");
    let agent = probe(&h, h.dir.path(), "env = [\"HOME\"]").await;
    assert_eq!(ask(&agent, "env HOME").await, Ok(home));
    assert!(
        ask(&agent, "env PATH").await.is_err(),
        "PATH was not granted"
    );
    assert_eq!(ask(&agent, "envall").await, Ok("HOME".into()));

    let dir = tempfile::tempdir().unwrap();
    let nothing = probe(&h, dir.path(), "").await;
    assert_eq!(ask(&nothing, "envall").await, Ok(String::new()));
}

#[tokio::test]
async fn kv_without_a_grant_is_refused() {
    let h = Harness::new();
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("kvtool.wasm");
    std::fs::copy(plugin("kvtool"), &wasm).unwrap();
    std::fs::write(
        dir.path().join("kvtool.toml"),
        "[plugin]\nname = \"kvtool\"\nversion = \"0.1.0\"\ncapabilities = [\"test.kv\"]\n",
    )
    .unwrap();
    let agent = h.try_load(&wasm).await.unwrap();
    match run(&agent, b"set k v", &Limits::default()).await {
        Err(TaskError::Failed(msg)) => assert!(
            msg.contains("no kv namespace is granted to kvtool"),
            "{msg}"
        ),
        other => panic!("expected the write to be refused, got {other:?}"),
    }
    // With the grant, the same component stores the value.
    let granted = h.load("kvtool").await;
    assert_eq!(
        String::from_utf8(
            run(&granted, b"set k v", &Limits::default())
                .await
                .unwrap()
                .result
        )
        .unwrap(),
        "ok"
    );
}
