//! Bad files get an error that says what the file is and what is wrong, and
//! the engine keeps loading good components afterwards.

use orch::plugin::PluginError;
use orch::LoadError;
use orch_tests::{core_module, plugin, run_ok, Harness};

#[tokio::test]
async fn each_kind_of_bad_file_gets_its_own_error() {
    let h = Harness::new();
    let dir = h.dir.path();

    let text = dir.join("notes.wasm");
    std::fs::write(&text, "this is not wasm").unwrap();
    let err = h.try_load(&text).await.err().expect("text file loads");
    assert!(
        matches!(err, PluginError::Load(LoadError::NotWasm { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("notes.wasm is not a WebAssembly file"),
        "{err}"
    );

    let full = std::fs::read(plugin("echo")).unwrap();
    let truncated = dir.join("truncated.wasm");
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    let err = h
        .try_load(&truncated)
        .await
        .err()
        .expect("truncated file loads");
    assert!(
        matches!(err, PluginError::Load(LoadError::InvalidComponent { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("truncated.wasm is not a valid component"),
        "{err}"
    );

    let err = h
        .try_load(&core_module())
        .await
        .err()
        .expect("core module loads");
    assert!(
        matches!(err, PluginError::Load(LoadError::CoreModule { .. })),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("is a core WebAssembly module, not a component"),
        "{err}"
    );

    let err = h
        .try_load(&plugin("other-world"))
        .await
        .err()
        .expect("other world loads");
    match &err {
        PluginError::Load(LoadError::WrongWorld { details, .. }) => {
            assert!(
                details.contains("missing exports: describe, handle"),
                "{details}"
            );
            assert!(details.contains("test:other/clock@0.1.0"), "{details}");
        }
        other => panic!("expected a wrong-world error, got {other}"),
    }
    assert!(err.to_string().contains("orch:agent/agent@0.1.0"), "{err}");

    let missing = dir.join("missing.wasm");
    let err = h
        .try_load(&missing)
        .await
        .err()
        .expect("missing file loads");
    assert!(
        matches!(err, PluginError::Load(LoadError::Io { .. })),
        "{err}"
    );

    // None of that disturbed the engine.
    let echo = h.load("echo").await;
    assert_eq!(
        run_ok(&echo, b"still here", &Default::default()).await,
        "still here"
    );
}
