//! `[limits] reuse`: one instance serves up to N tasks in a row, and is
//! dropped on any trap, limit or error. The `tally` fixture answers with how
//! many tasks its instance has served, which only a kept instance can make
//! more than 1.

use std::time::Duration;

use orch::{EngineConfig, Limits, TaskError};
use orch_tests::{run, run_ok, Harness};

const MIB: u64 = 1 << 20;

/// Whether an error is the one a case expects.
type Expected = fn(&TaskError) -> bool;

fn reuse(n: u32) -> Limits {
    Limits {
        reuse: n,
        ..Limits::default()
    }
}

async fn counts(agent: &orch::Agent, tasks: usize, limits: &Limits) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..tasks {
        seen.push(run_ok(agent, b"count", limits).await);
    }
    seen
}

#[tokio::test]
async fn an_instance_serves_up_to_reuse_tasks_in_a_row_then_a_fresh_one_starts() {
    let h = Harness::new();
    let tally = h.load("tally").await;
    assert_eq!(
        counts(&tally, 7, &reuse(3)).await,
        ["1", "2", "3", "1", "2", "3", "1"]
    );
    // Without reuse (the default, and 1) every task has a fresh instance.
    assert_eq!(counts(&tally, 3, &Limits::default()).await, ["1", "1", "1"]);
    assert_eq!(counts(&tally, 3, &reuse(1)).await, ["1", "1", "1"]);
}

/// With one engine slot every task's instance is made in pool slots the
/// ones before used and freed: each still starts from the module's initial
/// memory, after a task that wrote a few bytes and after one that wrote
/// 2 MiB.
#[tokio::test]
async fn a_fresh_instance_in_a_reused_slot_starts_from_the_initial_memory() {
    let h = Harness::with_config(EngineConfig {
        instance_slots: 1,
        ..EngineConfig::default()
    });
    let tally = h.load("tally").await;
    for payload in ["count", "count", "leak 2", "count", "leak 2", "count"] {
        assert_eq!(
            run_ok(&tally, payload.as_bytes(), &Limits::default()).await,
            "1"
        );
    }
}

#[tokio::test]
async fn a_trap_an_error_or_a_limit_drops_the_kept_instance() {
    let h = Harness::new();
    let tally = h.load("tally").await;
    let limits = reuse(100);
    let fuel_cut = Limits {
        fuel: 20_000_000,
        ..reuse(100)
    };
    let deadline_cut = Limits {
        timeout: Duration::from_millis(50),
        fuel: u64::MAX / 2,
        ..reuse(100)
    };
    let memory_cut = Limits {
        memory: 16 * MIB,
        ..reuse(100)
    };
    let cases: [(&[u8], &Limits, Expected); 5] = [
        (b"trap", &limits, |e| matches!(e, TaskError::Trap { .. })),
        (b"fail", &limits, |e| matches!(e, TaskError::Failed(_))),
        (b"spin", &fuel_cut, |e| {
            matches!(e, TaskError::FuelExhausted { .. })
        }),
        (b"spin", &deadline_cut, |e| {
            matches!(e, TaskError::DeadlineExceeded { .. })
        }),
        (b"leak 64", &memory_cut, |e| {
            matches!(e, TaskError::MemoryLimit { .. })
        }),
    ];
    for (payload, cut, expected) in cases {
        // Two tasks on one instance: it is kept.
        assert_eq!(counts(&tally, 2, &limits).await, ["1", "2"]);
        assert_eq!(h.engine.parked_instances(), 1);
        let err = run(&tally, payload, cut).await.unwrap_err();
        assert!(
            expected(&err),
            "{}: {err}",
            String::from_utf8_lossy(payload)
        );
        assert_eq!(h.engine.parked_instances(), 0, "{err}");
        // The next task starts on a fresh instance.
        assert_eq!(run_ok(&tally, b"count", &limits).await, "1", "after {err}");
        // Dropped again, so the next case starts fresh.
        let _ = run(&tally, b"fail", &limits).await;
    }
}

/// Fuel is the task's, not the instance's: tasks that each fit the budget
/// all pass on one instance, though together they use many times it; one
/// task past it fails.
#[tokio::test]
async fn fuel_stays_per_task_on_a_kept_instance() {
    let h = Harness::new();
    let tally = h.load("tally").await;
    let limits = reuse(1000);
    run_ok(&tally, b"count", &limits).await;
    // A task on the kept instance: no instantiation in it.
    let used = run(&tally, b"count", &limits).await.unwrap().fuel_used;
    let tight = Limits {
        fuel: used * 2,
        ..reuse(1000)
    };
    let served: Vec<String> = counts(&tally, 20, &tight).await;
    assert_eq!(served.first().map(String::as_str), Some("3"));
    assert_eq!(served.last().map(String::as_str), Some("22"));
    let past = Limits {
        fuel: used / 4,
        ..reuse(1000)
    };
    assert!(matches!(
        run(&tally, b"count", &past).await.unwrap_err(),
        TaskError::FuelExhausted { .. }
    ));
}

/// The memory limit covers the instance's life, and an instance past half
/// of it is not kept: tasks that each keep 3 MiB never hit a 16 MiB limit,
/// because the instance is replaced before they add up. One task that asks
/// for more than the limit on its own still fails with it.
#[tokio::test]
async fn memory_kept_across_tasks_is_bounded_by_the_limit() {
    let h = Harness::new();
    let tally = h.load("tally").await;
    let limits = Limits {
        memory: 16 * MIB,
        ..reuse(1000)
    };
    let mut served = Vec::new();
    for _ in 0..12 {
        let out = run(&tally, b"leak 3", &limits).await.unwrap();
        served.push(String::from_utf8(out.result).unwrap());
    }
    let most: u32 = served
        .iter()
        .map(|s| s.parse::<u32>().unwrap())
        .max()
        .unwrap();
    assert!(most >= 2, "never kept: {served:?}");
    assert!(most <= 3, "kept past half the limit: {served:?}");
    match run(&tally, b"leak 20", &limits).await.unwrap_err() {
        TaskError::MemoryLimit { limit, .. } => assert_eq!(limit, 16 * MIB),
        other => panic!("expected a memory limit, got {other}"),
    }
}

/// A kept instance holds an engine slot, but never makes anyone wait for
/// one: a task that finds every slot held by kept instances takes one.
#[tokio::test]
async fn kept_instances_give_their_slots_to_tasks_that_need_them() {
    let h = Harness::with_config(EngineConfig {
        instance_slots: 2,
        ..EngineConfig::default()
    });
    let nap = h.load("nap").await;
    let tally = h.load("tally").await;
    let echo = h.load("echo").await;
    // Two tasks at once (each waits 50 ms in a host call): two instances
    // kept, every slot held.
    let (kept, fresh) = (reuse(10), Limits::default());
    let (a, b) = tokio::join!(run(&nap, b"50", &kept), run(&nap, b"50", &kept));
    assert!(a.is_ok() && b.is_ok(), "{a:?} {b:?}");
    assert_eq!(h.engine.parked_instances(), 2);
    assert_eq!(h.engine.free_instances(), 2);
    // One task with every slot held by a kept instance takes one.
    assert!(run(&echo, b"x", &fresh).await.is_ok());
    assert_eq!(h.engine.parked_instances(), 1);
    // Two tasks at once, without reuse, need both slots: none is kept.
    let (x, y) = tokio::join!(run(&nap, b"20", &fresh), run(&nap, b"20", &fresh));
    assert!(x.is_ok() && y.is_ok(), "{x:?} {y:?}");
    assert_eq!(h.engine.parked_instances(), 0);
    assert_eq!(run_ok(&tally, b"count", &kept).await, "1");
    // Unloading the agent drops what it kept.
    assert_eq!(h.engine.parked_instances(), 1);
    drop(tally);
    assert_eq!(h.engine.parked_instances(), 0);
    assert_eq!(h.engine.free_instances(), 2);
}

/// A task waiting for a slot when a task ends gets that slot: the ended
/// task's instance is not kept while anyone waits.
#[tokio::test]
async fn an_instance_is_not_kept_while_a_task_waits_for_its_slot() {
    let h = Harness::with_config(EngineConfig {
        instance_slots: 1,
        ..EngineConfig::default()
    });
    let nap = h.load("nap").await;
    let echo = h.load("echo").await;
    let waiter = Limits {
        timeout: Duration::from_secs(5),
        ..Limits::default()
    };
    let kept = reuse(10);
    // The nap holds the only slot for 100 ms; echo waits for it.
    let (napped, echoed) = tokio::join!(run(&nap, b"100", &kept), async {
        tokio::task::yield_now().await;
        run(&echo, b"x", &waiter).await
    });
    assert!(napped.is_ok(), "{napped:?}");
    assert_eq!(echoed.map(|o| o.result), Ok(b"x".to_vec()));
    assert_eq!(h.engine.parked_instances(), 0);
    // With no one waiting, the nap's instance is kept.
    assert!(run(&nap, b"1", &kept).await.is_ok());
    assert_eq!(h.engine.parked_instances(), 1);
}

/// An instance that was refused memory is not kept, even when the task
/// went on without it and ended well; one that got what it asked for is.
#[tokio::test]
async fn an_instance_refused_memory_is_not_kept() {
    let h = Harness::new();
    let tally = h.load("tally").await;
    let limits = Limits {
        memory: 16 * MIB,
        ..reuse(100)
    };
    assert_eq!(run_ok(&tally, b"probe 2", &limits).await, "1 got");
    assert_eq!(h.engine.parked_instances(), 1);
    assert_eq!(run_ok(&tally, b"probe 64", &limits).await, "2 refused");
    assert_eq!(h.engine.parked_instances(), 0);
    assert_eq!(run_ok(&tally, b"count", &limits).await, "1");
}

/// The deadline is the task's: naps that each fit it all pass on one kept
/// instance, though together they last longer; one past it fails.
#[tokio::test]
async fn the_deadline_stays_per_task_on_a_kept_instance() {
    let h = Harness::new();
    let nap = h.load("nap").await;
    let limits = Limits {
        timeout: Duration::from_millis(200),
        ..reuse(100)
    };
    for _ in 0..5 {
        assert!(run(&nap, b"60", &limits).await.is_ok());
        assert_eq!(h.engine.parked_instances(), 1);
    }
    assert_eq!(
        run(&nap, b"400", &limits).await.unwrap_err(),
        TaskError::DeadlineExceeded { ms: 200 }
    );
}

/// A kept instance that waits `keep_idle` for its next task is dropped; one
/// whose next task comes sooner serves it.
#[tokio::test]
async fn a_kept_instance_idle_past_keep_idle_is_dropped() {
    let h = Harness::with_config(EngineConfig {
        instance_slots: 4,
        keep_idle: Duration::from_millis(300),
        ..EngineConfig::default()
    });
    let tally = h.load("tally").await;
    let limits = reuse(100);
    // Taken before the instance is parked, so its idle time surely starts
    // after it.
    let waited = std::time::Instant::now();
    assert_eq!(counts(&tally, 2, &limits).await, ["1", "2"]);
    assert_eq!(h.engine.parked_instances(), 1);
    // Gone within a few ticks of 300 ms; the test gives it 10 s.
    while h.engine.parked_instances() > 0 {
        assert!(waited.elapsed() < Duration::from_secs(10), "still kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        waited.elapsed() >= Duration::from_millis(250),
        "{:?}",
        waited.elapsed()
    );
    assert_eq!(h.engine.free_instances(), 4);
    assert_eq!(run_ok(&tally, b"count", &limits).await, "1");
}
