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
async fn call_depth_is_bounded_and_recursion_does_not_deadlock() {
    let h = Harness::new();
    // One slot: every level of the recursion waits for the next one on the
    // same agent, which only works because a waiting caller lends its slot.
    let s = team(&h, &[("caller", 1, Limits::default())]).await;
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
        ],
    )
    .await;
    // Within the caller's fuel: a cheap callee.
    let done = submit(&s, "test.call", "echo\nhi").await.unwrap();
    assert_eq!(text(&done), "hi");
    assert!(done.output.subtask_fuel > 0 && done.output.fuel_used < 5_000_000);
    // Past it: spin may use only what the caller has left, and using it up
    // leaves the caller without fuel, although spin's own limit is unbounded.
    let failure = submit(&s, "test.call", "test.spin\n").await.unwrap_err();
    assert_eq!(failure.error, TaskError::FuelExhausted { limit: 5_000_000 });
}
