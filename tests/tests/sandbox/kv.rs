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
        let store = orch::plugin::PluginStore::new(h.dir.path());
        let (counter, _) =
            orch::plugin::load_file(&engine, kv, &Default::default(), &plugin("counter"))
                .await
                .unwrap()
                .into_parts(&store)
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

#[tokio::test]
async fn a_kv_key_of_1_kib_is_accepted_and_one_byte_more_refused() {
    let h = Harness::new();
    let kvtool = h.load("kvtool").await;
    let inside = "k".repeat(1024);
    let set = format!("set {inside} v");
    assert_eq!(
        run_ok(&kvtool, set.as_bytes(), &Limits::default()).await,
        "ok"
    );
    let past = "k".repeat(1025);
    let err = run(
        &kvtool,
        format!("set {past} v").as_bytes(),
        &Limits::default(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("kv key of 1025 bytes is longer than the limit of 1024 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn a_namespace_past_its_quota_refuses_writes_and_keeps_its_data() {
    let h = Harness::new();
    let limits = orch::kv::KvLimits {
        max_bytes: 3 << 20,
        max_keys: 1000,
    };
    let kv = Arc::new(KvStore::with_limits(
        h.dir.path().join("quota.redb"),
        limits,
    ));
    let store = orch::plugin::PluginStore::new(h.dir.path());
    let (kvtool, _) = orch::plugin::load_file(
        &h.engine,
        kv.clone(),
        &Default::default(),
        &plugin("kvtool"),
    )
    .await
    .unwrap()
    .into_parts(&store)
    .unwrap();
    // Three values of 1 MiB minus their key fit exactly; a fourth byte does not.
    let value = (1 << 20) - 2;
    for k in ["k1", "k2", "k3"] {
        let command = format!("fill {k} {value}");
        assert_eq!(
            run_ok(&kvtool, command.as_bytes(), &Limits::default()).await,
            "ok"
        );
    }
    let err = run(&kvtool, b"fill k4 1", &Limits::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "kv quota: namespace kvtool would hold {} bytes, past its limit of {} bytes",
            (3 << 20) + 3,
            3 << 20
        )),
        "{err}"
    );
    assert_eq!(kv.usage("kvtool").unwrap(), (3 << 20, 3));
    // Freeing space makes room again.
    assert_eq!(
        run_ok(&kvtool, b"delete k1", &Limits::default()).await,
        "ok"
    );
    assert_eq!(
        run_ok(&kvtool, b"fill k4 1", &Limits::default()).await,
        "ok"
    );
}
