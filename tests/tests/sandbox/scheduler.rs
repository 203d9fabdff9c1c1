//! The in-process scheduler with real agents: routing by capability, queue
//! order, retries with backoff, the circuit breaker, dead letters, deadlines
//! and fairness between identical agents.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orch::scheduler::breaker::State;
use orch::scheduler::{Scheduler, SchedulerConfig, Submit, SubmitError};
use orch::{Limits, TaskError};
use orch_tests::Harness;

fn task(capability: &str, payload: &str) -> Submit {
    Submit {
        id: format!("{capability}:{payload}"),
        capability: capability.into(),
        payload: payload.as_bytes().to_vec(),
        ..Submit::default()
    }
}

/// Busy-waiting fixtures need more fuel than the default.
fn generous() -> Limits {
    Limits {
        fuel: u64::MAX,
        ..Limits::default()
    }
}

async fn scheduler_with(
    h: &Harness,
    config: SchedulerConfig,
    agents: &[(&str, &str, u32)],
) -> Scheduler {
    let s = Scheduler::new(config);
    for &(label, plugin, slots) in agents {
        s.add_agent(label, Arc::new(h.load(plugin).await), generous(), slots);
    }
    s
}

/// Waits (bounded) until the agent `label` runs `n` tasks.
async fn until_in_flight(s: &Scheduler, label: &str, n: u32) {
    let started = Instant::now();
    while s
        .stats()
        .iter()
        .find(|a| a.label == label)
        .map(|a| a.in_flight)
        != Some(n)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{label} never had {n} tasks in flight"
        );
        // Polled every ms, so as not to compete with the tasks.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_go_only_to_agents_with_the_capability() {
    let h = Harness::new();
    let s = scheduler_with(
        &h,
        SchedulerConfig::default(),
        &[("echo", "echo", 4), ("wc", "wordcount", 4)],
    )
    .await;
    for _ in 0..20 {
        let done = s
            .submit(task("text.wordcount", "a b c"))
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(done.agent, "wc");
        assert_eq!(done.output.result, br#"{"words":3,"lines":0,"bytes":5}"#);
        let done = s.submit(task("echo", "hi")).unwrap().wait().await.unwrap();
        assert_eq!(
            (done.agent.as_str(), done.output.result.as_slice()),
            ("echo", &b"hi"[..])
        );
    }
    assert_eq!(
        s.submit(task("image.resize", "")).err(),
        Some(SubmitError::UnknownCapability("image.resize".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_order_is_priority_then_deadline_then_arrival() {
    let h = Harness::new();
    let s = scheduler_with(&h, SchedulerConfig::default(), &[("sleep", "sleep", 1)]).await;
    // Occupy the only slot, then queue the rest behind it.
    let blocker = s.submit(task("test.sleep", "300")).unwrap();
    until_in_flight(&s, "sleep", 1).await;
    let soon = Instant::now() + Duration::from_secs(20);
    let later = Instant::now() + Duration::from_secs(30);
    let queued = [
        ("low-first", 0, None),
        ("low-later-deadline", 0, Some(later)),
        ("high", 5, None),
        ("low-second", 0, None),
        ("low-soon-deadline", 0, Some(soon)),
    ];
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut waits = Vec::new();
    for (id, priority, deadline) in queued {
        let handle = s
            .submit(Submit {
                id: id.into(),
                capability: "test.sleep".into(),
                payload: b"1".to_vec(),
                priority,
                deadline,
                max_attempts: None,
                cancel: None,
                attempts_before: 0,
                trace: None,
                submitted_at_ms: None,
            })
            .unwrap();
        let order = order.clone();
        waits.push(tokio::spawn(async move {
            let done = handle.wait().await.unwrap();
            order.lock().unwrap().push((done.started_at, done.id));
        }));
    }
    blocker.wait().await.unwrap();
    for w in waits {
        w.await.unwrap();
    }
    // The only slot runs one task at a time, so start times give the order.
    let mut order = order.lock().unwrap().clone();
    order.sort();
    let ids: Vec<&str> = order.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "high",
            "low-soon-deadline",
            "low-later-deadline",
            "low-first",
            "low-second"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_are_retried_with_backoff() {
    let h = Harness::new();
    let config = SchedulerConfig {
        max_attempts: 3,
        backoff_base: Duration::from_millis(100),
        ..SchedulerConfig::default()
    };
    let s = scheduler_with(&h, config, &[("flaky", "flaky", 4)]).await;
    let started = Instant::now();
    let done = s
        .submit(task("test.flaky", "recover k1 2"))
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(done.output.result, b"3", "the third call succeeded");
    assert_eq!(done.failed_attempts.len(), 2);
    assert!(
        matches!(&done.failed_attempts[0].error, TaskError::Retryable(m) if m == "call 1 of k1 fails")
    );
    // Backoff with jitter in [0.5, 1.5): at least 50 ms + 100 ms before the third call.
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );

    // One attempt fewer than needed: the task fails after max_attempts.
    let failure = s
        .submit(task("test.flaky", "recover k2 3"))
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert_eq!(failure.attempts.len(), 3);
    assert!(failure.dead_letter);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_errors_are_not_retried() {
    let h = Harness::new();
    let s = scheduler_with(&h, SchedulerConfig::default(), &[("wc", "wordcount", 2)]).await;
    let valid = s.submit(task("text.wordcount", "\u{fffd}")).unwrap();
    assert!(valid.wait().await.is_ok());
    let bad = Submit {
        payload: vec![0xff],
        ..task("text.wordcount", "")
    };
    let failure = s.submit(bad).unwrap().wait().await.unwrap_err();
    assert!(matches!(failure.error, TaskError::InvalidInput(_)));
    assert_eq!(failure.attempts.len(), 1);
    assert!(!failure.dead_letter);
    assert!(s.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_probes_and_closes() {
    let h = Harness::new();
    let config = SchedulerConfig {
        max_attempts: 1,
        breaker_threshold: 3,
        breaker_cool_down: Duration::from_millis(300),
        ..SchedulerConfig::default()
    };
    let s = scheduler_with(&h, config, &[("flaky", "flaky", 4)]).await;
    // Taken before the failure that opens the breaker, so the cool-down
    // surely starts after it; a stall before `stats` may let the cool-down
    // pass, so half-open counts as opened too.
    let mut opened = Instant::now();
    for _ in 0..3 {
        opened = Instant::now();
        s.submit(task("test.flaky", "fail"))
            .unwrap()
            .wait()
            .await
            .unwrap_err();
    }
    let shut = |s: &Scheduler| matches!(s.stats()[0].breaker, State::Open | State::HalfOpen);
    assert!(shut(&s), "{:?}", s.stats()[0].breaker);
    // While open, a task waits; after the cool-down it is the half-open
    // probe, and its success closes the breaker.
    let done = s
        .submit(task("test.flaky", "ok"))
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(done.output.result, b"ok");
    assert!(
        opened.elapsed() >= Duration::from_millis(250),
        "ran while open: {:?}",
        opened.elapsed()
    );
    assert_eq!(s.stats()[0].breaker, State::Closed);

    // Open it again; a failed probe keeps it open. `opened` before the
    // failure that opens it, as above.
    for _ in 0..3 {
        opened = Instant::now();
        s.submit(task("test.flaky", "fail"))
            .unwrap()
            .wait()
            .await
            .unwrap_err();
    }
    s.submit(task("test.flaky", "fail"))
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(shut(&s), "{:?}", s.stats()[0].breaker);

    // A probe with bad input says nothing of the agent: it neither closes
    // nor opens the breaker, and the next task is the probe (the agent
    // stayed shut to every task after such a probe). It waited two
    // cool-downs: the failed probe's, and the one that probe opened again.
    let bad = s
        .submit(task("test.flaky", "no such payload"))
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(
        opened.elapsed() >= Duration::from_millis(600),
        "ran {:?} after the breaker opened",
        opened.elapsed()
    );
    assert!(matches!(bad.error, TaskError::InvalidInput(_)), "{bad:?}");
    assert_eq!(s.stats()[0].breaker, State::HalfOpen);
    let next = s.submit(task("test.flaky", "ok")).unwrap().wait();
    let done = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("the next task runs: the breaker let no probe through")
        .unwrap();
    assert_eq!(done.output.result, b"ok");
    assert_eq!(s.stats()[0].breaker, State::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_tasks_become_dead_letters_while_others_flow() {
    let h = Harness::new();
    let config = SchedulerConfig {
        max_attempts: 3,
        backoff_base: Duration::from_millis(10),
        breaker_threshold: 100,
        ..SchedulerConfig::default()
    };
    let s = scheduler_with(&h, config, &[("panic", "panic", 2), ("echo", "echo", 2)]).await;
    let poison = s.submit(task("test.panic", "poison")).unwrap();
    let mut good = Vec::new();
    for i in 0..50 {
        good.push(s.submit(task("echo", &i.to_string())).unwrap());
    }
    for (i, handle) in good.into_iter().enumerate() {
        assert_eq!(
            handle.wait().await.unwrap().output.result,
            i.to_string().into_bytes()
        );
    }
    let failure = poison.wait().await.unwrap_err();
    assert!(failure.dead_letter);
    assert_eq!(failure.attempts.len(), 3);
    for attempt in &failure.attempts {
        assert!(
            matches!(&attempt.error, TaskError::Trap { guest: Some(g), .. } if g.contains("poison"))
        );
    }
    let dead = s.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "test.panic:poison");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_past_their_deadline_fail_without_running() {
    let h = Harness::new();
    let s = scheduler_with(&h, SchedulerConfig::default(), &[("sleep", "sleep", 1)]).await;
    let past = Submit {
        deadline: Some(Instant::now() - Duration::from_millis(1)),
        ..task("test.sleep", "1")
    };
    assert_eq!(s.submit(past).err(), Some(SubmitError::DeadlinePassed));

    let blocker = s.submit(task("test.sleep", "500")).unwrap();
    until_in_flight(&s, "sleep", 1).await;
    let short = Submit {
        deadline: Some(Instant::now() + Duration::from_millis(100)),
        ..task("test.sleep", "1")
    };
    let failure = s.submit(short).unwrap().wait().await.unwrap_err();
    assert!(
        matches!(failure.error, TaskError::DeadlineExceeded { .. }),
        "{:?}",
        failure.error
    );
    assert!(failure.attempts.is_empty(), "it never ran");
    blocker.wait().await.unwrap();
}

/// Gini coefficient of non-negative counts: 0 is perfectly even.
fn gini(counts: &[u64]) -> f64 {
    let n = counts.len() as f64;
    let mean = counts.iter().sum::<u64>() as f64 / n;
    let diffs: f64 = counts
        .iter()
        .flat_map(|a| counts.iter().map(move |b| (*a as f64 - *b as f64).abs()))
        .sum();
    diffs / (2.0 * n * n * mean)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_agents_share_work_evenly() {
    let h = Harness::new();
    let s = scheduler_with(
        &h,
        SchedulerConfig::default(),
        &[
            ("a", "echo", 4),
            ("b", "echo", 4),
            ("c", "echo", 4),
            ("d", "echo", 4),
        ],
    )
    .await;
    let handles: Vec<_> = (0..10_000)
        .map(|i| s.submit(task("echo", &i.to_string())).unwrap())
        .collect();
    for h in handles {
        h.wait().await.unwrap();
    }
    let counts: Vec<u64> = s.stats().iter().map(|a| a.completed).collect();
    assert_eq!(counts.iter().sum::<u64>(), 10_000);
    let g = gini(&counts);
    eprintln!("fairness: Gini {g:.4} over {counts:?}");
    assert!(g <= 0.05, "Gini {g:.4} over {counts:?}");
}

/// A scheduler whose one subscriber (of `ping.hello`) is busy with a first
/// message that never finishes by itself (2 s timeout): later messages wait
/// in the queue, which is empty when this returns.
async fn busy_subscriber(
    h: &Harness,
    config: SchedulerConfig,
    first: Vec<u8>,
) -> (Scheduler, orch::scheduler::TaskHandle) {
    let s = Scheduler::new(config);
    let mut spin = h.load("spin").await;
    spin.set_subscriptions(vec!["ping.hello".into()]);
    let limits = Limits {
        timeout: Duration::from_secs(2),
        ..generous()
    };
    s.add_agent("spin", Arc::new(spin), limits, 1);
    let running = s.submit_message("ping.hello", message(0, first)).unwrap();
    // Wait until it is placed: then the queue is empty.
    let started = Instant::now();
    while s.queued().iter().map(|q| q.1).sum::<usize>() > 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "never placed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (s, running)
}

fn message(i: u32, payload: Vec<u8>) -> Submit {
    Submit {
        id: format!("m{i}"),
        payload,
        ..Submit::default()
    }
}

/// Messages are bounded by `max_queued` (sub-tasks share the bound): a
/// guest publishing in a loop cannot grow the queues. Submitted tasks are bounded by whoever
/// accepts them, so they are not refused here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_messages_are_bounded_as_a_pair() {
    let h = Harness::new();
    let config = SchedulerConfig {
        max_queued: 2,
        ..SchedulerConfig::default()
    };
    let (s, running) = busy_subscriber(&h, config, Vec::new()).await;
    let inside: Vec<_> = (1..=2)
        .map(|i| {
            s.submit_message("ping.hello", message(i, Vec::new()))
                .unwrap()
        })
        .collect();
    assert_eq!(
        s.submit_message("ping.hello", message(3, Vec::new())).err(),
        Some(SubmitError::QueueFull { limit: 2 })
    );
    // A submitted task is not refused by this bound.
    let task = s.submit(task("test.spin", "x")).unwrap();
    for handle in inside.into_iter().chain([running, task]) {
        assert!(handle.wait().await.is_err());
    }
    // Room again.
    assert!(s
        .submit_message("ping.hello", message(4, Vec::new()))
        .is_ok());
}

/// The payload bytes of queued messages are bounded too: a guest publishing
/// large messages in a loop cannot grow host memory past
/// `max_queued_bytes`. At the bound a message is queued, one byte past it
/// is refused, naming both figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_message_bytes_are_bounded_as_a_pair() {
    let h = Harness::new();
    let config = SchedulerConfig {
        max_queued_bytes: 10,
        ..SchedulerConfig::default()
    };
    let (s, running) = busy_subscriber(&h, config, vec![b'x'; 10]).await;
    let inside: Vec<_> = [4, 6]
        .into_iter()
        .enumerate()
        .map(|(i, n)| {
            s.submit_message("ping.hello", message(i as u32 + 1, vec![b'x'; n]))
                .unwrap()
        })
        .collect();
    assert_eq!(
        s.submit_message("ping.hello", message(3, vec![b'x'; 1]))
            .err(),
        Some(SubmitError::QueueBytesFull {
            queued: 10,
            size: 1,
            limit: 10
        })
    );
    for handle in inside.into_iter().chain([running]) {
        assert!(handle.wait().await.is_err());
    }
    // The bytes went with the tasks: room again.
    assert!(s
        .submit_message("ping.hello", message(4, vec![b'x'; 10]))
        .is_ok());
}

/// Dead letters kept in memory are bounded: at the bound all are kept, past
/// it the oldest goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_in_memory_are_bounded_as_a_pair() {
    let h = Harness::new();
    let config = SchedulerConfig {
        max_attempts: 1,
        breaker_threshold: 100,
        max_dead_letters: 2,
        ..SchedulerConfig::default()
    };
    let s = scheduler_with(&h, config, &[("panic", "panic", 1)]).await;
    let ids =
        |s: &Scheduler| -> Vec<String> { s.dead_letters().into_iter().map(|f| f.id).collect() };
    for i in 0..2 {
        let failure = s
            .submit(task("test.panic", &i.to_string()))
            .unwrap()
            .wait()
            .await
            .unwrap_err();
        assert!(failure.dead_letter);
    }
    assert_eq!(ids(&s), ["test.panic:0", "test.panic:1"]);
    let failure = s
        .submit(task("test.panic", "2"))
        .unwrap()
        .wait()
        .await
        .unwrap_err();
    assert!(failure.dead_letter);
    assert_eq!(ids(&s), ["test.panic:1", "test.panic:2"]);
}

/// A removed or replaced agent (a hot upgrade) is freed, compiled code and
/// all, once the tasks it was running end; nothing keeps it alive after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_agent_is_freed_once_its_running_task_ends() {
    let h = Harness::new();
    let s = Scheduler::new(SchedulerConfig::default());
    let spin = Arc::new(h.load("spin").await);
    let weak = Arc::downgrade(&spin);
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..generous()
    };
    s.add_agent("spin", spin, limits, 1);
    let running = s.submit(task("test.spin", "x")).unwrap();
    let started = Instant::now();
    while s.running() == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(s.remove_agent("spin"));
    assert!(weak.upgrade().is_some(), "its running task still holds it");
    assert!(running.wait().await.is_err());
    assert_eq!(s.idle(Duration::from_secs(5)).await, 0);
    assert!(weak.upgrade().is_none(), "freed after its last task");
}

/// Upgrades and removals do not grow the scheduler: a replaced agent's
/// entry stays while a task it runs has not ended (it is listed, busy), and
/// its place goes to the next agent added once that task ends. An agent
/// upgraded 1,000 times leaves one entry. The upgrade that takes the place
/// comes between the old task's end and its bookkeeping (from the attempt
/// hook), and the new agent is not charged with the old one's failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_agent_leaves_no_entry_once_its_tasks_end() {
    let h = Harness::new();
    let echo = Arc::new(h.load("echo").await);
    // Taken by the hook at the spin task's end, to upgrade echo with.
    let upgrade: Arc<Mutex<Option<Scheduler>>> = Arc::default();
    let (hook_upgrade, hook_echo) = (upgrade.clone(), echo.clone());
    let s = Scheduler::with_attempt_hook(
        SchedulerConfig::default(),
        Arc::new(move |event| {
            if let orch::scheduler::AttemptEvent::Ended { agent: "spin", .. } = event {
                if let Some(s) = hook_upgrade.lock().unwrap().take() {
                    s.replace_agent(
                        Some("echo"),
                        Some(("echo", hook_echo.clone(), Limits::default(), 4)),
                    );
                }
            }
        }),
    );
    let limits = Limits {
        timeout: Duration::from_millis(300),
        ..generous()
    };
    s.add_agent("spin", Arc::new(h.load("spin").await), limits, 1);
    let running = s.submit(task("test.spin", "x")).unwrap();
    until_in_flight(&s, "spin", 1).await;
    assert!(s.remove_agent("spin"));
    s.add_agent("echo", echo.clone(), Limits::default(), 4);
    for _ in 0..1_000 {
        s.replace_agent(
            Some("echo"),
            Some(("echo", echo.clone(), Limits::default(), 4)),
        );
    }
    // Inside: the removed agent's task still runs, so its entry stays.
    assert_eq!(s.entries(), 2);
    let busy: Vec<_> = s
        .stats()
        .into_iter()
        .map(|a| (a.label, a.in_flight))
        .collect();
    assert_eq!(busy, [("spin".to_string(), 1), ("echo".to_string(), 0)]);
    *upgrade.lock().unwrap() = Some(s.clone());
    assert!(
        running.wait().await.is_err(),
        "the spin task ends at its timeout"
    );
    // Past: its task ended, so the upgrade made at that moment took its
    // place (and the place it left at the end was dropped).
    assert!(upgrade.lock().unwrap().is_none(), "the hook upgraded echo");
    assert_eq!(s.entries(), 1);
    let stats = s.stats();
    assert_eq!(
        (stats[0].label.as_str(), stats[0].failed, stats.len()),
        ("echo", 0, 1)
    );
    let done = s.submit(task("echo", "after")).unwrap().wait().await;
    assert_eq!(done.unwrap().output.result, b"after");
    assert_eq!(s.stats()[0].completed, 1);
}

/// `Scheduler::backlog` (what the journal asks before it holds results):
/// false with nothing queued, true while a task waits for a slot, false
/// again once the waiting task is cancelled out of its queue, with no
/// placement pass in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backlog_is_set_while_a_task_waits_and_cleared_when_none_does() {
    let h = Harness::new();
    let s = scheduler_with(&h, SchedulerConfig::default(), &[("nap", "nap", 1)]).await;
    let backlog = s.backlog();
    assert!(!backlog());
    let first = s.submit(task("test.nap", "300")).unwrap();
    until_in_flight(&s, "nap", 1).await;
    assert!(!backlog(), "the only task runs: nothing waits");
    let cancel = tokio_util::sync::CancellationToken::new();
    let second = s
        .submit(Submit {
            cancel: Some(cancel.clone()),
            ..task("test.nap", "300")
        })
        .unwrap();
    assert!(backlog(), "the second task waits for the slot");
    cancel.cancel();
    s.forget_cancelled();
    assert!(!backlog(), "the waiting task was cancelled");
    assert!(matches!(
        second.wait().await.unwrap_err().error,
        TaskError::Cancelled
    ));
    first.wait().await.unwrap();
    assert!(!backlog());
}
