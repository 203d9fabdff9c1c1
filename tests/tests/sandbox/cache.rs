//! Compiled components are cached on disk and reused on the next start.

use orch::{Engine, EngineConfig};
use orch_tests::{plugin, Harness};

fn cached_engine(dir: &std::path::Path) -> Engine {
    Engine::new(EngineConfig {
        instance_slots: 4,
        cache_dir: Some(dir.to_path_buf()),
        ..EngineConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn second_start_loads_from_the_cache() {
    let h = Harness::new();
    let cache = h.dir.path().join("cache");
    let first = cached_engine(&cache)
        .compile_file(&plugin("wordcount"))
        .unwrap();
    assert!(!first.info.from_cache);
    let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(entries.len(), 1, "one cache entry per component");

    // A new engine stands for a new process.
    let second = cached_engine(&cache)
        .compile_file(&plugin("wordcount"))
        .unwrap();
    assert!(second.info.from_cache);
    assert_eq!(first.info.sha256, second.info.sha256);
}

#[tokio::test]
async fn a_corrupt_cache_entry_is_replaced() {
    let h = Harness::new();
    let cache = h.dir.path().join("cache");
    cached_engine(&cache).compile_file(&plugin("echo")).unwrap();
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&entry, b"garbage").unwrap();

    let again = cached_engine(&cache).compile_file(&plugin("echo")).unwrap();
    assert!(!again.info.from_cache, "garbage must not be used");
    let third = cached_engine(&cache).compile_file(&plugin("echo")).unwrap();
    assert!(third.info.from_cache, "the entry was rewritten");
}
