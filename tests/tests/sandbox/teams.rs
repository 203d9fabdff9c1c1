//! Agent teams: `tasks.call` through the scheduler with real agents. The
//! planner's report, the call depth and fan-out bounds (each as a pair: at
//! the bound and one past it), a callee trap reaching the caller as a typed
//! error, deadlines inherited from the caller, and sub-task fuel charged to
//! the caller.

use std::sync::Arc;
use std::time::Duration;

use orch::scheduler::{Completed, Failure, Scheduler, SchedulerConfig, Submit};
use orch::{Limits, TaskError};
use orch_tests::Harness;

async fn team(h: &Harness, agents: &[(&str, u32, Limits)]) -> Scheduler {
    let s = Scheduler::new(SchedulerConfig::default());
    for (plugin, slots, limits) in agents {
        s.add_agent(
            plugin,
            Arc::new(h.load(plugin).await),
            limits.clone(),
            *slots,
        );
    }
    s
}

async fn submit(s: &Scheduler, capability: &str, payload: &str) -> Result<Completed, Failure> {
    s.submit(Submit {
        id: format!("{capability}:{payload}"),
        capability: capability.into(),
        payload: payload.as_bytes().to_vec(),
        ..Submit::default()
    })
    .unwrap()
    .wait()
    .await
}

fn text(done: &Completed) -> String {
    String::from_utf8_lossy(&done.output.result).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planner_counts_each_section_through_wordcount() {
    let h = Harness::new();
    let s = team(
        &h,
        &[
            ("planner", 2, Limits::default()),
            ("wordcount", 2, Limits::default()),
        ],
    )
    .await;
    let doc = "intro line\n# Alpha\none two three\n# Beta\nfour five\nsix\n";
    let done = submit(&s, "text.report", doc).await.unwrap();
    let report = text(&done);
    assert!(
        report.starts_with(r#"{"sections":[{"title":"preamble","words":2,"lines":1,"bytes":11},{"title":"Alpha","words":5"#),
        "{report}"
    );
    // Sections are cut at line starts, so their counts add up to the whole.
    let total = format!(
        r#""total":{{"words":12,"lines":6,"bytes":{}}}}}"#,
        doc.len()
    );
    assert!(report.ends_with(&total), "{report}");
    assert_eq!(done.output.subtasks, 3);
    assert_eq!(done.output.calls.len(), 3);
    for call in &done.output.calls {
        assert_eq!(
            (call.capability.as_str(), call.outcome.as_str()),
            ("text.wordcount", "ok")
        );
        // Each got the planner's remaining time (under its 10 s) and a
        // third of its remaining fuel.
        assert!(
            call.deadline_ms > 0 && call.deadline_ms <= 10_000,
            "{call:?}"
        );
        assert!(
            call.fuel_used > 0 && call.fuel_used < call.fuel_limit,
            "{call:?}"
        );
        assert!(call.fuel_limit < Limits::default().fuel / 3, "{call:?}");
    }
    let charged: u64 = done.output.calls.iter().map(|c| c.fuel_used).sum();
    assert_eq!(charged, done.output.subtask_fuel);
    // The sub-tasks' fuel is part of the planner's, and reported apart.
    assert!(done.output.subtask_fuel > 0);
    assert!(done.output.fuel_used > done.output.subtask_fuel);
    let wc = s
        .stats()
        .into_iter()
        .find(|a| a.label == "wordcount")
        .unwrap();
    assert_eq!(wc.completed, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_depth_is_bounded() {
    let h = Harness::new();
    // A chain of 4 calls holds 5 instances at once: the top task and one per
    // level, each waiting for the next.
    let s = team(&h, &[("caller", 5, Limits::default())]).await;
    let limit = Limits::default().max_call_depth;
    assert_eq!(limit, 4);
    let done = submit(&s, "test.recurse", "4").await.unwrap();
    assert_eq!(text(&done), "4");
    let failure = submit(&s, "test.recurse", "5").await.unwrap_err();
    let TaskError::Failed(message) = &failure.error else {
        panic!(
            "expected the refusal to surface as a failure: {:?}",
            failure.error
        );
    };
    assert!(
        message.contains("refused: call depth 5 is past the limit of 4"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_every_slot_is_held_by_its_own_callers_fails_at_once() {
    let h = Harness::new();
    // Waiting callers keep their slots: two slots hold a chain of two.
    let s = team(&h, &[("caller", 2, Limits::default())]).await;
    assert_eq!(text(&submit(&s, "test.recurse", "1").await.unwrap()), "1");
    // A third level could only run once one of its own callers ended: it
    // fails when it is called instead of waiting out the 10 s deadline.
    let started = std::time::Instant::now();
    let failure = submit(&s, "test.recurse", "2").await.unwrap_err();
    let message = failure.error.to_string();
    assert!(
        message.contains("capability test.recurse cannot run: every one of its 2 instance slot(s) is held by this task's own callers"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_is_bounded() {
    let h = Harness::new();
    let s = team(
        &h,
        &[
            ("caller", 2, Limits::default()),
            ("echo", 8, Limits::default()),
        ],
    )
    .await;
    let limit = Limits::default().max_subtasks;
    let done = submit(&s, "test.fanout", &limit.to_string()).await.unwrap();
    assert_eq!(text(&done), limit.to_string());
    assert_eq!(done.output.subtasks, limit);
    let failure = submit(&s, "test.fanout", &(limit + 1).to_string())
        .await
        .unwrap_err();
    let message = failure.error.to_string();
    assert!(
        message.contains(&format!("refused: fan-out limit: task test.fanout:33 has started 0 sub-tasks and asked for 33 more, past the limit of {limit}")),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callee_trap_reaches_the_caller_as_a_typed_error() {
    let h = Harness::new();
    let s = team(
        &h,
        &[
            ("caller", 2, Limits::default()),
            ("panic", 2, Limits::default()),
        ],
    )
    .await;
    let done = submit(&s, "test.call", "test.panic\nboom").await.unwrap();
    let answer = text(&done);
    assert!(
        answer.starts_with("call-error trapped: guest trap:"),
        "{answer}"
    );
    assert!(answer.contains("agent gave up: boom"), "{answer}");
    // A sub-task's failure goes back to its caller, not to the dead letters.
    assert!(s.dead_letters().is_empty());
    // Unknown capabilities are typed too.
    let done = submit(&s, "test.call", "image.resize\n").await.unwrap();
    assert_eq!(
        text(&done),
        "call-error unavailable: no agent provides capability image.resize"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_tasks_inherit_the_callers_deadline() {
    let h = Harness::new();
    // spin never returns; its own timeout is long.
    let spin_limits = Limits {
        fuel: u64::MAX,
        timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    // Fuel without bound on both sides, so that time is the only limit.
    let caller_limits = Limits {
        fuel: u64::MAX,
        timeout: Duration::from_millis(400),
        ..Limits::default()
    };
    let s = team(
        &h,
        &[("caller", 2, caller_limits), ("spin", 2, spin_limits)],
    )
    .await;
    // A call timeout shorter than the caller's deadline cuts the sub-task
    // and the caller gets the error.
    let done = submit(&s, "test.call", "test.spin 100\n").await.unwrap();
    assert_eq!(text(&done), "call-error deadline exceeded");
    // The caller's result reports what the sub-task was given.
    let call = &done.output.calls[0];
    assert_eq!(
        (call.capability.as_str(), call.outcome.as_str()),
        ("test.spin", "deadline-exceeded")
    );
    assert!(call.deadline_ms <= 100, "{call:?}");
    // Without one, the sub-task ends with the caller's deadline, not its own
    // minute: the caller fails on its deadline, and after it nothing runs on.
    let failure = submit(&s, "test.call", "test.spin\n").await.unwrap_err();
    assert!(
        matches!(failure.error, TaskError::DeadlineExceeded { .. }),
        "{:?}",
        failure.error
    );
    assert_eq!(s.drain(Duration::from_secs(5)).await, 0);
    let spin = s.stats().into_iter().find(|a| a.label == "spin").unwrap();
    assert_eq!(spin.failed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_task_fuel_is_charged_to_the_caller() {
    let h = Harness::new();
    let caller_limits = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    let spin_limits = Limits {
        fuel: u64::MAX,
        ..Limits::default()
    };
    let s = team(
        &h,
        &[
            ("caller", 2, caller_limits),
            ("spin", 2, spin_limits),
            ("echo", 2, Limits::default()),
            ("burn", 2, Limits::default()),
        ],
    )
    .await;
    // Within the caller's fuel: a cheap callee.
    let done = submit(&s, "test.call", "echo\nhi").await.unwrap();
    assert_eq!(text(&done), "hi");
    assert!(done.output.subtask_fuel > 0 && done.output.fuel_used < 5_000_000);
    // A callee that uses a part of it and returns 1 MiB: lowering the result
    // grows the caller's memory inside the call, which once lost the charge.
    let done = submit(&s, "test.call", "test.burn\n50000 1048576")
        .await
        .unwrap();
    assert_eq!(done.output.result.len(), 1 << 20);
    assert!(
        done.output.subtask_fuel > 1_000_000
            && done.output.fuel_used > done.output.subtask_fuel
            && done.output.fuel_used < 5_000_000,
        "{} used, {} of it by the callee",
        done.output.fuel_used,
        done.output.subtask_fuel
    );
    // Past it: spin may use only what the caller has left, and using it up
    // leaves the caller without fuel, although spin's own limit is unbounded.
    let failure = submit(&s, "test.call", "test.spin\n").await.unwrap_err();
    assert_eq!(failure.error, TaskError::FuelExhausted { limit: 5_000_000 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_trapped_sub_tasks_are_charged_to_the_caller() {
    let h = Harness::new();
    let unbounded = Limits {
        fuel: u64::MAX,
        ..Limits::default()
    };
    // Enough fuel that only the call's 300 ms timeout can stop the spin.
    let caller_limits = Limits {
        fuel: 1 << 50,
        ..Limits::default()
    };
    let s = team(
        &h,
        &[
            ("caller", 2, caller_limits),
            ("panic", 2, Limits::default()),
            ("spin", 2, unbounded),
        ],
    )
    .await;
    // A failure, a trap and a deadline each cost the caller what the callee
    // used (they used to cost nothing, so failing on purpose multiplied a
    // caller's budget).
    for (payload, outcome) in [
        ("test.recurse\nnot a number", "invalid-input"),
        ("test.panic\nboom", "trap"),
        ("test.spin 300\n", "deadline-exceeded"),
    ] {
        let done = submit(&s, "test.call", payload).await.unwrap();
        let call = &done.output.calls[0];
        assert_eq!(call.outcome, outcome, "{call:?}");
        assert!(call.fuel_used > 0, "{call:?}");
        assert!(call.fuel_used <= call.fuel_limit, "{call:?}");
        assert_eq!(done.output.subtask_fuel, call.fuel_used);
        assert!(done.output.fuel_used > call.fuel_used);
    }
}

/// Deterministic pseudo-random numbers for the stress test (xorshift64).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_slots_equal_running_attempts_after_random_cancellations() {
    let h = Harness::new();
    let limits = Limits {
        fuel: u64::MAX,
        ..Limits::default()
    };
    let max = 4;
    let s = team(
        &h,
        &[("caller", max, limits), ("echo", 2, Limits::default())],
    )
    .await;
    let total = h.engine.free_instances();
    let seed: u64 = 0x0005_eed0_f510;
    let mut rng = Rng(seed);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        // Trees up to 8 wide and 3 deep that fan out to their own plugin
        // and all end on a deadline between 5 and 200 ms, at every level.
        let (w, d) = (1 + rng.below(8), rng.below(4));
        let deadline = Duration::from_millis(5 + rng.below(196));
        let handle = s
            .submit(Submit {
                id: format!("tree-{i}"),
                capability: "test.tree".into(),
                payload: format!("{w} {d}").into_bytes(),
                deadline: Some(std::time::Instant::now() + deadline),
                ..Submit::default()
            })
            .unwrap();
        tasks.spawn(async move { handle.wait().await });
    }
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap();
        // A tree ends on its deadline, or just before it when its callees,
        // which share that deadline, failed first.
        if let Err(failure) = outcome {
            assert!(
                matches!(failure.error, TaskError::DeadlineExceeded { .. }),
                "seed {seed:#x}: {:?}",
                failure.error
            );
        }
    }
    // Sub-tasks end on their own deadlines, which are never past their
    // callers'; then no attempt runs (placed ones included), and no slot of
    // either agent or of the engine is held: busy == running == 0.
    assert_eq!(s.idle(Duration::from_secs(10)).await, 0);
    for agent in s.stats() {
        assert_eq!(agent.in_flight, 0, "seed {seed:#x}: {agent:?}");
    }
    assert_eq!(h.engine.free_instances(), total);
    // And the agent takes new work at once.
    let done = submit(&s, "test.fanout", "2").await.unwrap();
    assert_eq!(text(&done), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_plugin_cannot_starve_another_of_instances() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let h = Harness::new();
    let slots = h.engine.free_instances() as u32;
    assert_eq!(slots, 16);
    let limits = Limits {
        fuel: u64::MAX,
        ..Limits::default()
    };
    // Attempts started on caller, counted by the scheduler's hook.
    let started = Arc::new((AtomicU32::new(0), tokio::sync::Notify::new()));
    let hook_started = started.clone();
    let s = Scheduler::with_attempt_hook(
        SchedulerConfig::default(),
        Arc::new(move |event| {
            if let orch::scheduler::AttemptEvent::Started {
                agent: "caller", ..
            } = event
            {
                hook_started.0.fetch_add(1, Ordering::SeqCst);
                hook_started.1.notify_waiters();
            }
        }),
    );
    // caller may have every engine slot by its own limit; echo gets 4, of
    // which one stays free while it is idle.
    s.add_agent("caller", Arc::new(h.load("caller").await), limits, slots);
    s.add_agent("echo", Arc::new(h.load("echo").await), Limits::default(), 4);
    // Cancelled at the end: no deadline to race on a loaded machine.
    let stop = tokio_util::sync::CancellationToken::new();
    let mut trees = Vec::new();
    for i in 0..4 {
        trees.push(
            s.submit(Submit {
                id: format!("tree-{i}"),
                capability: "test.tree".into(),
                payload: b"4 3".to_vec(),
                deadline: Some(std::time::Instant::now() + Duration::from_secs(600)),
                cancel: Some(stop.clone()),
                ..Submit::default()
            })
            .unwrap(),
        );
    }
    // The trees want far more instances than there are, and none of their
    // attempts ends while they wait for more: wait until they hold all they
    // may, every engine slot but the one kept for echo, idle so far.
    let allowed = slots - 1;
    loop {
        let notified = started.1.notified();
        if started.0.load(Ordering::SeqCst) >= allowed {
            break;
        }
        notified.await;
    }
    let held = |s: &Scheduler| {
        s.stats()
            .iter()
            .find(|a| a.label == "caller")
            .unwrap()
            .in_flight
    };
    assert_eq!(held(&s), allowed);
    // echo still gets instances: its tasks run while the trees wait.
    for i in 0..20 {
        let done = submit(&s, "echo", &format!("e{i}")).await.unwrap();
        assert_eq!(text(&done), format!("e{i}"));
    }
    assert_eq!(held(&s), allowed, "the trees are still waiting");
    assert_eq!(started.0.load(Ordering::SeqCst), allowed);
    // Clean-up: each tree ends, cancelled or with its cancelled sub-tasks'
    // errors counted.
    stop.cancel();
    for tree in trees {
        let _ = tree.wait().await;
    }
}

/// A caller's sub-tasks are named after it and its attempt: `ID.N` on the
/// first attempt, `ID.N-A` on attempt A (here a task submitted after one
/// earlier attempt, as a cluster redelivers it), so a retried caller's
/// calls are new sub-tasks and never the old ones' outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_callers_sub_tasks_get_new_ids() {
    use orch::scheduler::AttemptEvent;
    use std::sync::Mutex;
    let h = Harness::new();
    let started = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let seen = started.clone();
    let s = Scheduler::with_attempt_hook(
        SchedulerConfig::default(),
        Arc::new(move |e: AttemptEvent<'_>| {
            if let AttemptEvent::Started { id, attempt, .. } = e {
                seen.lock().unwrap().push((id.to_string(), attempt));
            }
        }),
    );
    s.add_agent(
        "caller",
        Arc::new(h.load("caller").await),
        Limits::default(),
        2,
    );
    s.add_agent("echo", Arc::new(h.load("echo").await), Limits::default(), 2);
    for (id, before) in [("first", 0), ("again", 1)] {
        let done = s
            .submit(Submit {
                id: id.into(),
                capability: "test.call".into(),
                payload: b"echo\nhi".to_vec(),
                attempts_before: before,
                ..Submit::default()
            })
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(text(&done), "hi");
    }
    let mut started = started.lock().unwrap().clone();
    started.sort();
    assert_eq!(
        started,
        [
            ("again".to_string(), 2),
            ("again.1-2".to_string(), 1),
            ("first".to_string(), 1),
            ("first.1".to_string(), 1),
        ]
    );
}

/// A call log in memory, for the durable-call tests.
#[derive(Default)]
struct MemoryLog(
    std::sync::Mutex<std::collections::HashMap<String, orch::scheduler::calls::CallRecord>>,
);

impl orch::scheduler::calls::CallLog for MemoryLog {
    fn get<'a>(
        &'a self,
        key: &'a str,
    ) -> orch::scheduler::calls::LogFuture<'a, Option<orch::scheduler::calls::CallRecord>> {
        let found = self.0.lock().unwrap().get(key).cloned();
        Box::pin(async move { Ok(found) })
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        record: &'a orch::scheduler::calls::CallRecord,
    ) -> orch::scheduler::calls::LogFuture<'a, ()> {
        self.0
            .lock()
            .unwrap()
            .insert(key.to_string(), record.clone());
        Box::pin(async { Ok(()) })
    }
}

/// A durable caller run twice under one task id: the second run gets the
/// recorded outcome (the callee does not run again); a second run that
/// makes another call than the recorded one fails `non-deterministic`,
/// naming the call. A caller that is not durable calls again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_caller_replays_recorded_calls_and_a_different_call_fails_it() {
    let h = Harness::new();
    let durable = Limits {
        durable: true,
        ..Limits::default()
    };
    let s = team(
        &h,
        &[("caller", 2, durable), ("echo", 2, Limits::default())],
    )
    .await;
    let log = Arc::new(MemoryLog::default());
    s.set_call_log(log.clone());
    let run = |payload: &str| {
        s.submit(Submit {
            id: "durable-1".into(),
            capability: "test.call".into(),
            payload: payload.as_bytes().to_vec(),
            ..Submit::default()
        })
        .unwrap()
        .wait()
    };
    let first = run("echo\nhello").await.unwrap();
    assert_eq!(text(&first), "hello");
    let echo_runs = || {
        s.stats()
            .iter()
            .find(|a| a.label == "echo")
            .map(|a| a.completed)
    };
    let echoed = echo_runs();
    assert_eq!(echoed, Some(1));
    assert_eq!(log.0.lock().unwrap().len(), 1);
    // The same task again: replayed, echo does not run.
    let again = run("echo\nhello").await.unwrap();
    assert_eq!(text(&again), "hello");
    assert_eq!(echo_runs(), echoed, "the recorded call ran again");
    // Another payload at the same place: non-deterministic.
    let failed = run("echo\nbye").await.unwrap_err();
    match &failed.error {
        TaskError::NonDeterministic(m) => {
            assert!(m.contains("call 1 asks echo"), "{m}");
        }
        other => panic!("expected non-deterministic, got {other:?}"),
    }
    assert_eq!(failed.error.kind(), "non-deterministic");
    // Another capability at the same place: non-deterministic too.
    let failed = run("test.fanout\n1").await.unwrap_err();
    assert_eq!(
        failed.error.kind(),
        "non-deterministic",
        "{:?}",
        failed.error
    );
    // A caller that is not durable calls again under the same task id.
    let plain = team(
        &h,
        &[
            ("caller", 2, Limits::default()),
            ("echo", 2, Limits::default()),
        ],
    )
    .await;
    plain.set_call_log(log.clone());
    for _ in 0..2 {
        let done = plain
            .submit(Submit {
                id: "plain-1".into(),
                capability: "test.call".into(),
                payload: b"echo\nhello".to_vec(),
                ..Submit::default()
            })
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(text(&done), "hello");
    }
    let echoes = plain
        .stats()
        .iter()
        .find(|a| a.label == "echo")
        .map(|a| a.completed);
    assert_eq!(echoes, Some(2));
}
