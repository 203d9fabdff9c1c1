//! The example agents do what their descriptions say.

use orch::{Capability, Descriptor, Limits, TaskError};
use orch_tests::{run, run_ok, Harness};

#[tokio::test]
async fn echo_describes_itself_and_returns_the_payload() {
    let h = Harness::new();
    let echo = h.load("echo").await;
    assert_eq!(
        echo.descriptor(),
        &Descriptor {
            name: "echo".into(),
            version: "0.1.0".into(),
            capabilities: vec![Capability {
                name: "echo".into(),
                version: "1.0.0".into(),
                description: "returns the payload unchanged".into(),
            }],
        }
    );
    let payload: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let out = run(&echo, &payload, &Limits::default()).await.unwrap();
    assert_eq!(out.result, payload);
    assert!(out.fuel_used > 0, "fuel use is measured");
}

#[tokio::test]
async fn wordcount_counts_like_wc() {
    let h = Harness::new();
    let wc = h.load("wordcount").await;
    assert_eq!(wc.descriptor().capabilities[0].name, "text.wordcount");
    let cases: &[(&str, &str)] = &[
        ("", r#"{"words":0,"lines":0,"bytes":0}"#),
        ("one", r#"{"words":1,"lines":0,"bytes":3}"#),
        ("hello big world\n", r#"{"words":3,"lines":1,"bytes":16}"#),
        ("  a\tb\n\nc  d\n", r#"{"words":4,"lines":3,"bytes":12}"#),
        ("grüße, 世界\n", r#"{"words":2,"lines":1,"bytes":16}"#),
    ];
    for (input, expected) in cases {
        assert_eq!(
            run_ok(&wc, input.as_bytes(), &Limits::default()).await,
            *expected,
            "input {input:?}"
        );
    }
}

#[tokio::test]
async fn wordcount_refuses_non_utf8_as_invalid_input() {
    let h = Harness::new();
    let wc = h.load("wordcount").await;
    let err = run(&wc, &[0x66, 0xff, 0xfe], &Limits::default())
        .await
        .unwrap_err();
    match err {
        TaskError::InvalidInput(msg) => assert!(msg.contains("not UTF-8"), "{msg}"),
        other => panic!("expected invalid-input, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_at_once_on_one_agent_each_get_their_own_result() {
    let h = Harness::new();
    let echo = std::sync::Arc::new(h.load("echo").await);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..32u32 {
        let echo = echo.clone();
        set.spawn(async move {
            (
                i,
                run(&echo, i.to_string().as_bytes(), &Limits::default()).await,
            )
        });
    }
    let mut seen = 0;
    while let Some(joined) = set.join_next().await {
        let (i, out) = joined.unwrap();
        assert_eq!(out.unwrap().result, i.to_string().into_bytes());
        seen += 1;
    }
    assert_eq!(seen, 32);
}
