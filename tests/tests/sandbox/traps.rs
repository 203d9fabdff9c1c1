//! After every kind of trap the host keeps serving: other agents, and the
//! same agent with a fresh instance.

use std::time::Duration;

use orch::{Limits, TaskError};
use orch_tests::{run, run_ok, Harness};

#[tokio::test]
async fn panic_message_reaches_the_error() {
    let h = Harness::new();
    let panic = h.load("panic").await;
    let err = run(&panic, b"disk on fire", &Limits::default())
        .await
        .unwrap_err();
    match &err {
        TaskError::Trap {
            message,
            guest: Some(text),
        } => {
            assert!(message.contains("unreachable"), "{message}");
            assert!(text.contains("agent gave up: disk on fire"), "{text}");
            assert!(text.starts_with("panicked at "), "{text}");
        }
        other => panic!("expected a trap with the panic text, got {other}"),
    }
    assert!(
        err.to_string().contains("agent gave up: disk on fire"),
        "{err}"
    );
}

#[tokio::test]
async fn host_keeps_serving_after_each_kind_of_trap() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    let spin = h.load("spin").await;
    let hog = h.load("hog").await;
    let panic = h.load("panic").await;
    let sleep = h.load("sleep").await;

    let fuel = Limits {
        fuel: 1_000_000,
        ..Limits::default()
    };
    let memory = Limits {
        memory: 8 << 20,
        ..Limits::default()
    };
    let deadline = Limits {
        timeout: Duration::from_millis(30),
        fuel: u64::MAX,
        ..Limits::default()
    };
    let normal = Limits::default();

    for round in 0..3 {
        let e = run(&spin, b"", &fuel).await.unwrap_err();
        assert!(
            matches!(e, TaskError::FuelExhausted { .. }),
            "round {round}: {e}"
        );
        assert_eq!(run_ok(&echo, b"after fuel", &normal).await, "after fuel");

        let e = run(&hog, b"forever", &memory).await.unwrap_err();
        assert!(
            matches!(e, TaskError::MemoryLimit { .. }),
            "round {round}: {e}"
        );
        assert_eq!(
            run_ok(&echo, b"after memory", &normal).await,
            "after memory"
        );
        // The same agent gets a fresh instance and works again.
        assert_eq!(run_ok(&hog, b"2", &memory).await, "2");

        let e = run(&panic, b"x", &normal).await.unwrap_err();
        assert!(matches!(e, TaskError::Trap { .. }), "round {round}: {e}");
        assert_eq!(run_ok(&echo, b"after panic", &normal).await, "after panic");

        let e = run(&sleep, b"60000", &deadline).await.unwrap_err();
        assert!(
            matches!(e, TaskError::DeadlineExceeded { .. }),
            "round {round}: {e}"
        );
        assert_eq!(
            run_ok(&echo, b"after deadline", &normal).await,
            "after deadline"
        );
        assert!(!run_ok(&sleep, b"1", &normal).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_task_does_not_hold_up_others() {
    let h = Harness::new();
    let spin = std::sync::Arc::new(h.load("spin").await);
    let echo = h.load("echo").await;
    let looping = {
        let spin = spin.clone();
        tokio::spawn(async move {
            let limits = Limits {
                fuel: u64::MAX,
                timeout: Duration::from_secs(3),
                ..Limits::default()
            };
            run(&spin, b"", &limits).await
        })
    };
    // While the loop runs, other tasks complete.
    for i in 0..20 {
        let text = format!("task {i}");
        assert_eq!(
            run_ok(&echo, text.as_bytes(), &Limits::default()).await,
            text
        );
    }
    assert!(
        !looping.is_finished(),
        "the loop ended before the other tasks ran"
    );
    let err = looping.await.unwrap().unwrap_err();
    assert!(
        matches!(err, TaskError::DeadlineExceeded { ms: 3000 }),
        "{err}"
    );
}

/// A JavaScript stack overflow (and any exception thrown out of `handle`)
/// is a trap that names the exception, not componentize-js's complaint
/// about a task-error variant.
#[tokio::test]
async fn a_javascript_exception_is_a_trap_named_by_the_exception() {
    let h = Harness::new();
    let js = h.load("fixture-js").await;
    for (capability, payload, exception) in [
        (
            "test.recurse",
            &b""[..],
            "InternalError: too much recursion",
        ),
        (
            "test.throw",
            &b"the disk is on fire"[..],
            "Error: the disk is on fire",
        ),
    ] {
        let err = orch_tests::run_capability(&js, capability, payload, &Limits::default())
            .await
            .unwrap_err();
        let TaskError::Trap {
            guest: Some(text), ..
        } = &err
        else {
            panic!("{capability}: expected a trap with the guest's account: {err}");
        };
        assert_eq!(
            text,
            &format!("threw an uncaught exception: {exception}"),
            "{capability}"
        );
    }
    // And the next task runs in a fresh instance.
    let out = orch_tests::run_capability(&js, "test.echo", b"still here", &Limits::default())
        .await
        .unwrap();
    assert_eq!(out.result, b"still here");
}
