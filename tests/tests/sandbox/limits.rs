//! Every per-task limit, tested as a pair: one case inside the limit passes,
//! one past it fails with the typed error that names the limit.

use std::time::{Duration, Instant};

use orch::{Limits, TaskError};
use orch_tests::{run, run_ok, Harness};

const MIB: u64 = 1 << 20;

/// Fuel is deterministic, so the measured use of a task is exactly enough for
/// the same task again. wasmtime checks fuel at function entries and loop
/// headers only, so the failing case is well short of the measured use
/// rather than one unit short.
#[tokio::test]
async fn fuel_exactly_enough_passes_half_fails() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    let used = run(&echo, b"hi", &Limits::default())
        .await
        .unwrap()
        .fuel_used;
    let exact = Limits {
        fuel: used,
        ..Limits::default()
    };
    let out = run(&echo, b"hi", &exact).await.unwrap();
    assert_eq!((out.result.as_slice(), out.fuel_used), (&b"hi"[..], used));
    let short = Limits {
        fuel: used / 2,
        ..Limits::default()
    };
    assert_eq!(
        run(&echo, b"hi", &short).await.unwrap_err(),
        TaskError::FuelExhausted { limit: used / 2 }
    );
}

#[tokio::test]
async fn an_endless_loop_is_cut_off_by_fuel() {
    let h = Harness::new();
    let spin = h.load("spin").await;
    let limits = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    let err = run(&spin, b"", &limits).await.unwrap_err();
    assert_eq!(err, TaskError::FuelExhausted { limit: 5_000_000 });
    assert!(err.to_string().contains("5000000 fuel"), "{err}");
}

#[tokio::test]
async fn memory_inside_the_cap_passes_past_it_fails() {
    let h = Harness::new();
    let hog = h.load("hog").await;
    let limits = Limits {
        memory: 16 * MIB,
        ..Limits::default()
    };
    assert_eq!(run_ok(&hog, b"4", &limits).await, "4");
    match run(&hog, b"64", &limits).await.unwrap_err() {
        TaskError::MemoryLimit { limit, requested } => {
            assert_eq!(limit, 16 * MIB);
            assert!(requested > limit, "requested {requested}");
        }
        other => panic!("expected a memory limit error, got {other}"),
    }
}

#[tokio::test]
async fn unbounded_allocation_stops_at_the_cap() {
    let h = Harness::new();
    let hog = h.load("hog").await;
    let limits = Limits {
        memory: 32 * MIB,
        ..Limits::default()
    };
    let err = run(&hog, b"forever", &limits).await.unwrap_err();
    assert!(
        matches!(err, TaskError::MemoryLimit { limit, .. } if limit == 32 * MIB),
        "{err}"
    );
    assert!(err.to_string().contains(&(32 * MIB).to_string()), "{err}");
}

#[tokio::test]
async fn instantiation_over_the_memory_cap_is_refused() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    // Smaller than the initial memory of any Rust guest.
    let limits = Limits {
        memory: 64 << 10,
        ..Limits::default()
    };
    let err = run(&echo, b"x", &limits).await.unwrap_err();
    assert!(
        matches!(err, TaskError::MemoryLimit { limit, .. } if limit == 64 << 10),
        "{err}"
    );
}

/// `fixture` (which takes N ms, given as text) ends with its result inside
/// a 5 s deadline when asked for 20 ms, and is stopped by a 100 ms deadline
/// when asked for 10 s.
async fn ends_within_the_deadline_and_is_stopped_past_it(fixture: &str) {
    let h = Harness::new();
    let agent = h.load(fixture).await;
    let generous = Limits {
        timeout: Duration::from_secs(5),
        ..Limits::default()
    };
    let slept: u64 = run_ok(&agent, b"20", &generous).await.parse().unwrap();
    assert!(slept >= 20, "slept {slept} ms");

    let tight = Limits {
        timeout: Duration::from_millis(100),
        fuel: u64::MAX,
        ..Limits::default()
    };
    let started = Instant::now();
    let err = run(&agent, b"10000", &tight).await.unwrap_err();
    assert_eq!(err, TaskError::DeadlineExceeded { ms: 100 });
    // Tolerant bound: the point is that the guest was stopped, not waited for.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// `sleep` spins on the clock: the deadline stops running guest code.
#[tokio::test]
async fn work_within_the_deadline_passes_past_it_fails() {
    ends_within_the_deadline_and_is_stopped_past_it("sleep").await;
}

/// A task waiting in a host call (`nap-lean` blocks on a WASI monotonic
/// clock pollable, with no guest code running to reach an epoch check).
#[tokio::test]
async fn a_wait_in_a_host_call_ends_within_the_deadline_and_is_stopped_past_it() {
    ends_within_the_deadline_and_is_stopped_past_it("nap-lean").await;
}

/// Unlimited fuel and a 50 ms deadline.
fn fuel_unlimited_50_ms() -> Limits {
    Limits {
        fuel: u64::MAX,
        timeout: Duration::from_millis(50),
        ..Limits::default()
    }
}

/// `spin` under [`fuel_unlimited_50_ms`] ends with the deadline.
async fn assert_spin_stopped_at_50_ms(h: &Harness) {
    let spin = h.load("spin").await;
    assert_eq!(
        run(&spin, b"", &fuel_unlimited_50_ms()).await.unwrap_err(),
        TaskError::DeadlineExceeded { ms: 50 }
    );
}

#[tokio::test]
async fn an_endless_loop_with_unlimited_fuel_is_cut_off_by_the_deadline() {
    assert_spin_stopped_at_50_ms(&Harness::new()).await;
}

/// The epoch advances at a task's deadline, not only at its ticks: with a
/// tick of an hour, a looping guest is still stopped at its deadline, and a
/// guest inside its deadline is not (the pair: a task that ends in time).
#[tokio::test]
async fn a_deadline_stops_a_looping_guest_without_waiting_for_a_tick() {
    let h = Harness::with_config(orch::EngineConfig {
        epoch_tick: Duration::from_secs(3600),
        ..Default::default()
    });
    assert_spin_stopped_at_50_ms(&h).await;
    let echo = h.load("echo").await;
    assert_eq!(
        run_ok(&echo, b"in time", &fuel_unlimited_50_ms()).await,
        "in time"
    );
}

/// A 1 ms deadline, many times over: the deadline is armed before the guest
/// starts, so no run can slip past it and hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_deadlines_never_hang() {
    let h = Harness::new();
    let spin = h.load("spin").await;
    let limits = Limits {
        fuel: u64::MAX,
        timeout: Duration::from_millis(1),
        ..Limits::default()
    };
    for _ in 0..300 {
        assert_eq!(
            run(&spin, b"", &limits).await.unwrap_err(),
            TaskError::DeadlineExceeded { ms: 1 }
        );
    }
}

#[tokio::test]
async fn payload_at_the_limit_passes_one_byte_more_fails() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    let limits = Limits {
        max_payload: 1024,
        ..Limits::default()
    };
    let ok = vec![b'a'; 1024];
    assert_eq!(run(&echo, &ok, &limits).await.unwrap().result, ok);
    assert_eq!(
        run(&echo, &[b'a'; 1025], &limits).await.unwrap_err(),
        TaskError::PayloadTooLarge {
            size: 1025,
            limit: 1024
        }
    );
}

#[tokio::test]
async fn result_at_the_limit_passes_one_byte_more_fails() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    let limits = Limits {
        max_result: 1024,
        ..Limits::default()
    };
    assert_eq!(
        run(&echo, &[b'r'; 1024], &limits)
            .await
            .unwrap()
            .result
            .len(),
        1024
    );
    assert_eq!(
        run(&echo, &[b'r'; 1025], &limits).await.unwrap_err(),
        TaskError::ResultTooLarge {
            size: 1025,
            limit: 1024
        }
    );
}

/// The panic fixture sends its message (which contains the payload) through
/// `log`, one host call: a large payload makes that one call too large.
#[tokio::test]
async fn host_call_data_inside_the_cap_passes_past_it_fails() {
    let h = Harness::new();
    let panic = h.load("panic").await;
    // The budget also covers lifting the result, so it is at least
    // max_result plus framing; keep max_result small to make 64 KiB the cap.
    let limits = Limits {
        max_hostcall_data: 128 << 10,
        max_result: 1024,
        ..Limits::default()
    };
    assert_eq!(limits.hostcall_budget(), 128 << 10);
    let small = run(&panic, &[b's'; 100 << 10], &limits).await.unwrap_err();
    assert!(
        matches!(small, TaskError::Trap { guest: Some(_), .. }),
        "{small}"
    );
    assert_eq!(
        run(&panic, &vec![b'b'; 256 << 10], &limits)
            .await
            .unwrap_err(),
        TaskError::HostCallDataLimit { limit: 128 << 10 }
    );
}

/// The result is bounded by max_result, not by the host-call data cap, even
/// when the result is larger than that cap.
#[tokio::test]
async fn result_larger_than_the_host_call_cap_is_bounded_by_max_result() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    let limits = Limits {
        max_hostcall_data: 64 << 10,
        max_result: 1 << 20,
        ..Limits::default()
    };
    let big = vec![b'e'; 1 << 20];
    assert_eq!(
        run(&echo, &big, &limits).await.unwrap().result.len(),
        1 << 20
    );
}

#[tokio::test]
async fn kv_value_at_the_limit_is_stored_one_byte_more_is_refused() {
    let h = Harness::new();
    let kv = h.load("kvtool").await;
    let limits = Limits {
        max_kv_value: 4096,
        ..Limits::default()
    };
    assert_eq!(run_ok(&kv, b"fill big 4096", &limits).await, "ok");
    assert_eq!(run_ok(&kv, b"get big", &limits).await.len(), 4096);
    match run(&kv, b"fill big 4097", &limits).await.unwrap_err() {
        TaskError::Failed(msg) => {
            assert!(
                msg.contains("4097 bytes") && msg.contains("4096 bytes"),
                "{msg}"
            )
        }
        other => panic!("expected the agent to report the refused write, got {other}"),
    }
    // The refused write left the old value in place.
    assert_eq!(run_ok(&kv, b"get big", &limits).await.len(), 4096);
}

/// `max_instances` from the manifest: with one slot, a second task waits for
/// it and runs out of time; with two slots the same task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_instances_inside_the_limit_runs_past_it_waits() {
    for (slots, second_completes) in [(2u32, true), (1, false)] {
        let h = Harness::new();
        let wasm = h.dir.path().join("sleep.wasm");
        std::fs::copy(orch_tests::plugin("sleep"), &wasm).unwrap();
        std::fs::write(
            h.dir.path().join("sleep.toml"),
            format!("[plugin]\nname = \"sleep\"\nversion = \"0.1.0\"\ncapabilities = [\"test.sleep\"]\n[limits]\nmax_instances = {slots}\n"),
        )
        .unwrap();
        let agent = std::sync::Arc::new(h.try_load(&wasm).await.unwrap());
        let first = {
            let agent = agent.clone();
            tokio::spawn(async move {
                // Busy-waiting burns fuel quickly: give it enough.
                let limits = Limits {
                    timeout: Duration::from_secs(5),
                    fuel: u64::MAX,
                    ..Limits::default()
                };
                run(&agent, b"1500", &limits).await
            })
        };
        // Wait until the first task holds its slot (polled every ms, so as
        // not to compete with it; bounded at a generous 30 s).
        let started = Instant::now();
        while agent.instances_in_use() != Some(1) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the first task never started"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let tight = Limits {
            timeout: Duration::from_millis(300),
            ..Limits::default()
        };
        let second = run(&agent, b"1", &tight).await;
        if second_completes {
            assert!(second.is_ok(), "{slots} slots: {second:?}");
        } else {
            assert_eq!(
                second.unwrap_err(),
                TaskError::DeadlineExceeded { ms: 300 },
                "{slots} slot"
            );
        }
        let first = first.await.unwrap();
        assert!(first.is_ok(), "{first:?}");
    }
}

/// A result too large even to read (past the host-call data budget) is
/// reported as a result too large with both figures, not as a host call.
#[tokio::test]
async fn a_result_past_what_the_host_reads_is_reported_as_too_large() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    let limits = Limits {
        max_hostcall_data: 128 << 10,
        max_result: 1024,
        ..Limits::default()
    };
    assert_eq!(
        run(&echo, &vec![b'r'; 100 << 10], &limits)
            .await
            .unwrap_err(),
        TaskError::ResultTooLarge {
            size: 100 << 10,
            limit: 1024
        }
    );
    let err = run(&echo, &vec![b'r'; 256 << 10], &limits)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        TaskError::ResultTooLargeToRead {
            read: 128 << 10,
            limit: 1024
        }
    );
    assert_eq!(
        err.to_string(),
        "result too large: the agent returned more than 131072 bytes, past the limit of 1024 bytes"
    );
}

/// The panic text reaches the host through one `log` line; a line is kept
/// whole up to 16 KiB and cut past it. Control characters are escaped first
/// (the SDK's message has a newline), so the limit is on the escaped text.
#[tokio::test]
async fn a_log_line_of_16_kib_is_kept_and_a_longer_one_cut() {
    let h = Harness::new();
    let panic = h.load("panic").await;
    let guest = |err: TaskError| match err {
        TaskError::Trap { guest: Some(g), .. } => g,
        other => panic!("expected a trap with the panic text: {other}"),
    };
    let short = guest(run(&panic, b"x", &Limits::default()).await.unwrap_err());
    assert!(!short.contains('\n'), "escaped: {short:?}");
    // The guest text is "panicked at FILE:LINE:COL:\nagent gave up: x".
    let overhead = short.len() - 1;
    let inside = vec![b'i'; 16384 - overhead];
    let text = guest(run(&panic, &inside, &Limits::default()).await.unwrap_err());
    assert_eq!(text.len(), 16384);
    assert!(!text.ends_with("[truncated]"));
    let past = vec![b'p'; 16385 - overhead];
    let text = guest(run(&panic, &past, &Limits::default()).await.unwrap_err());
    assert!(
        text.ends_with("pp [truncated]"),
        "{}",
        &text[text.len() - 40..]
    );
    assert_eq!(text.len(), 16384 + " [truncated]".len());
}

/// A guest's log line with a newline stays one line: the newline and any
/// terminal escape are written as escapes.
#[tokio::test]
async fn guest_text_cannot_start_a_new_log_line() {
    let h = Harness::new();
    let panic = h.load("panic").await;
    let forged = b"x\n2026-11-29T10:00:00Z ERROR orch::host: forged\x1b[2K\r";
    let err = run(&panic, forged, &Limits::default()).await.unwrap_err();
    let TaskError::Trap {
        guest: Some(text), ..
    } = &err
    else {
        panic!("{err}");
    };
    assert!(
        text.ends_with(
            "agent gave up: x\\n2026-11-29T10:00:00Z ERROR orch::host: forged\\u{1b}[2K\\r"
        ),
        "{text}"
    );
    assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
}

/// A message of 1 MiB passes the size check (and then finds no bus under a
/// lone agent); one byte more is refused by size.
#[tokio::test]
async fn a_message_of_1_mib_is_accepted_and_one_byte_more_refused() {
    let h = Harness::new();
    let messenger = h.load("messenger").await;
    let publish = |n: usize| {
        let mut payload = b"ping.hello\n".to_vec();
        payload.extend(std::iter::repeat_n(b'm', n));
        payload
    };
    let out = orch_tests::run_capability(
        &messenger,
        "test.publish",
        &publish(MIB as usize),
        &Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.result),
        "error: messaging is not available here: it needs a host (`orch host start`)"
    );
    let out = orch_tests::run_capability(
        &messenger,
        "test.publish",
        &publish(MIB as usize + 1),
        &Limits::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.result),
        format!(
            "error: message of {} bytes is larger than the limit of {MIB} bytes",
            MIB + 1
        )
    );
}

/// Every instance slot of the engine busy: one task more waits for a slot
/// within its deadline instead of failing for lack of one, and never starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_past_the_engine_slots_waits_for_one() {
    let h = Harness::new();
    let slots = h.engine.free_instances();
    assert_eq!(slots, 16);
    let spin = std::sync::Arc::new(h.load("spin").await);
    // Loaded first: loading calls `describe`, which needs a slot too.
    let echo = h.load("echo").await;
    let long = Limits {
        fuel: u64::MAX,
        timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let mut running = tokio::task::JoinSet::new();
    for _ in 0..slots {
        let (spin, long) = (spin.clone(), long.clone());
        running.spawn(async move { run(&spin, b"", &long).await });
    }
    // All 16 take a slot: that is inside the limit.
    while h.engine.free_instances() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let short = Limits {
        timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let task = orch::TaskRequest {
        id: "17th".into(),
        capability: "echo".into(),
        payload: b"hi".to_vec(),
        ..Default::default()
    };
    let started = Instant::now();
    let outcome = echo.run(task, &short, None).await;
    assert_eq!(
        outcome.result.unwrap_err(),
        TaskError::DeadlineExceeded { ms: 200 }
    );
    assert_eq!(outcome.fuel_used, 0, "it never started");
    assert!(started.elapsed() >= Duration::from_millis(200));
    while let Some(done) = running.join_next().await {
        assert!(matches!(
            done.unwrap(),
            Err(TaskError::DeadlineExceeded { ms: 3000 })
        ));
    }
    assert_eq!(h.engine.free_instances(), slots);
    assert_eq!(run_ok(&echo, b"hi", &Limits::default()).await, "hi");
}

/// A table may grow to the engine's 100,000 elements: at the limit the grow
/// succeeds, one past it stops the task with a table limit naming both
/// figures, and so does a huge request (4 billion elements asked in one
/// `table.grow` used to be charged as fuel first, and reported as fuel
/// exhausted).
#[tokio::test]
async fn a_table_may_grow_to_its_limit_and_a_grow_past_it_is_a_table_limit() {
    let h = Harness::new();
    let agent = h.load("tablegrow").await;
    let limits = Limits::default();
    // The fixture's table starts with 5 elements (its function table).
    let old = run_ok(&agent, b"99995", &limits).await;
    assert_eq!(old, "5");
    for (ask, to) in [(99_996u64, 100_001u64), (1_000_000_000, 1_000_000_005)] {
        let err = run(&agent, ask.to_string().as_bytes(), &limits)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            TaskError::TableLimit {
                limit: 100_000,
                requested: to
            }
        );
        assert_eq!(err.kind(), "table-limit");
        assert!(err.is_limit());
    }
}

/// Every instance slot holds a whole Python component (14 core modules, so
/// 14 core instances): as many Python tasks as slots run at once, each to
/// its own deadline, and none is refused for want of pool space while a
/// slot is free. (With 8 core instances a slot, the pool ran out at 2 of 4.)
#[tokio::test]
async fn as_many_python_instances_as_slots_run_at_once() {
    const SLOTS: usize = 4;
    let h = Harness::with_config(orch::EngineConfig {
        instance_slots: SLOTS as u32,
        cache_dir: Some(orch_tests::repo_root().join("target/test-cache/components")),
        ..Default::default()
    });
    let py = h.load("fixture-py").await;
    let limits = Limits {
        fuel: u64::MAX / 2,
        timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    // A spinning guest yields at every epoch tick, so the tasks overlap.
    let spin = || orch_tests::run_capability(&py, "test.spin", b"", &limits);
    let (a, b, c, d) = tokio::join!(spin(), spin(), spin(), spin());
    for result in [a, b, c, d] {
        assert_eq!(result.unwrap_err(), TaskError::DeadlineExceeded { ms: 300 });
    }
}
