//! The kv import persists across tasks, instances and reopening the store,
//! and is private to each agent.

use std::sync::Arc;

use orch::kv::KvStore;
use orch::Limits;
use orch_tests::{plugin, run, run_ok, Harness};

#[tokio::test]
async fn counter_persists_across_tasks_and_instances() {
    let h = Harness::new();
    let counter = h.load("counter").await;
    for expected in 1..=5 {
        assert_eq!(
            run_ok(&counter, b"", &Limits::default()).await,
            expected.to_string()
        );
    }
    // A second load of the same component is a new set of instances over the
    // same namespace.
    let again = h.load("counter").await;
    assert_eq!(run_ok(&again, b"", &Limits::default()).await, "6");
}

#[tokio::test]
async fn counter_persists_when_the_store_is_reopened() {
    let h = Harness::new();
    let path = h.dir.path().join("reopen.redb");
    for expected in ["1", "2"] {
        // A new store handle and a new engine each time, as after a restart.
        let engine = orch::Engine::new(orch::EngineConfig {
            instance_slots: 4,
            ..Default::default()
        })
        .unwrap();
        let kv = Arc::new(KvStore::new(&path));
        let (counter, _) =
            orch::plugin::load_file(&engine, kv, &Default::default(), &plugin("counter"))
                .await
                .unwrap();
        assert_eq!(run_ok(&counter, b"", &Limits::default()).await, expected);
    }
}

#[tokio::test]
async fn agents_cannot_see_each_others_keys() {
    let h = Harness::new();
    let counter = h.load("counter").await;
    let kvtool = h.load("kvtool").await;
    assert_eq!(run_ok(&counter, b"", &Limits::default()).await, "1");
    // counter keeps its value under "count"; kvtool's namespace has no such key.
    let err = run(&kvtool, b"get count", &Limits::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no value for count"), "{err}");
    assert_eq!(
        run_ok(&kvtool, b"set count 99", &Limits::default()).await,
        "ok"
    );
    assert_eq!(run_ok(&counter, b"", &Limits::default()).await, "2");
    assert_eq!(
        run_ok(&kvtool, b"get count", &Limits::default()).await,
        "99"
    );
    assert_eq!(
        run_ok(&kvtool, b"delete count", &Limits::default()).await,
        "ok"
    );
    assert!(run(&kvtool, b"get count", &Limits::default())
        .await
        .is_err());
}
