//! One conformance suite for every guest language: the wordcount agents in
//! Rust, JavaScript, Python and C get identical inputs and must give
//! identical outputs, and each language's fixture is held to the same limits.

use std::time::Duration;

use orch::{Agent, Limits, TaskError};
use orch_tests::{run, run_capability, Harness};

/// (language, wordcount plugin, limit fixture plugin or None for Rust, which
/// has a fixture per case).
const LANGUAGES: &[(&str, &str, Option<&str>)] = &[
    ("rust", "wordcount", None),
    ("javascript", "wordcount-js", Some("fixture-js")),
    ("python", "wordcount-py", Some("fixture-py")),
    ("c", "wordcount-c", Some("fixture-c")),
];

fn wc(words: u64, lines: u64, bytes: u64) -> String {
    format!(r#"{{"words":{words},"lines":{lines},"bytes":{bytes}}}"#)
}

/// Inputs and the exact output every wordcount must give. Whitespace is
/// Unicode White_Space: NEL (U+0085), NO-BREAK SPACE and IDEOGRAPHIC SPACE
/// separate words; ZERO WIDTH NO-BREAK SPACE (U+FEFF) and the C0 separators
/// U+001C..U+001F do not, whatever the language's own notion of space is.
fn valid_cases() -> Vec<(Vec<u8>, String)> {
    let long: String = (0..10_000).map(|i| format!("w{i} ")).collect();
    vec![
        (b"".to_vec(), wc(0, 0, 0)),
        (b"one".to_vec(), wc(1, 0, 3)),
        (b"hello big world\n".to_vec(), wc(3, 1, 16)),
        (b"  a\tb\n\nc  d\n".to_vec(), wc(4, 3, 12)),
        (b"line one\r\nline two\r\n".to_vec(), wc(4, 2, 20)),
        (b"\n\n\n".to_vec(), wc(0, 3, 3)),
        ("grüße, 世界\n".as_bytes().to_vec(), wc(2, 1, 16)),
        ("a\u{85}b\u{a0}c\u{3000}d".as_bytes().to_vec(), wc(4, 0, 11)),
        ("a\u{feff}b\u{1c}c".as_bytes().to_vec(), wc(1, 0, 7)),
        ("emoji 🦀 crab".as_bytes().to_vec(), wc(3, 0, 15)),
        (b"\x0b\x0cx\x0dy".to_vec(), wc(2, 0, 5)),
        (long.clone().into_bytes(), wc(10_000, 0, long.len() as u64)),
    ]
}

/// Byte strings that are not UTF-8: a stray byte, a cut-off sequence, an
/// overlong encoding, an encoded surrogate, and a code point past U+10FFFF.
const INVALID: &[&[u8]] = &[
    b"\xff",
    b"ok \xe4\xb8",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
];

/// The start of an input, for assertion messages.
fn preview(input: &[u8]) -> String {
    let text = String::from_utf8_lossy(input);
    text.chars().take(40).collect()
}

async fn load_all(
    h: &Harness,
    names: impl Iterator<Item = &'static str>,
) -> Vec<(&'static str, Agent)> {
    let mut agents = Vec::new();
    for name in names {
        agents.push((name, h.load(name).await));
    }
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_wordcount_gives_identical_output() {
    let h = Harness::new();
    let agents = load_all(&h, LANGUAGES.iter().map(|l| l.1)).await;
    let limits = Limits::default();
    for (name, agent) in &agents {
        assert_eq!(
            agent.descriptor().capabilities[0].name,
            "text.wordcount",
            "{name}"
        );
        for (input, expected) in valid_cases() {
            let out = run(agent, &input, &limits)
                .await
                .unwrap_or_else(|e| panic!("{name} on {:?}: {e}", preview(&input)));
            assert_eq!(
                String::from_utf8_lossy(&out.result),
                expected,
                "{name} on {:?}",
                preview(&input)
            );
        }
        for input in INVALID {
            match run(agent, input, &limits).await {
                Err(TaskError::InvalidInput(msg)) => {
                    assert!(msg.contains("UTF-8"), "{name}: {msg}")
                }
                other => panic!("{name} on {input:?}: expected invalid-input, got {other:?}"),
            }
        }
    }
}

/// The JS, Python and C wordcounts count their calls in kv and log each one,
/// so the host's imports are used from every language.
#[tokio::test]
async fn every_language_uses_kv() {
    let h = Harness::new();
    for &(_, name, fixture) in LANGUAGES {
        if fixture.is_none() {
            continue;
        }
        let agent = h.load(name).await;
        for _ in 0..3 {
            run(&agent, b"some words", &Limits::default())
                .await
                .unwrap();
        }
        // Invalid input is refused before the agent counts the call.
        run(&agent, b"\xff", &Limits::default()).await.unwrap_err();
        assert_eq!(
            h.kv.get(name, "calls").unwrap().as_deref(),
            Some(&b"3"[..]),
            "{name}"
        );
    }
}

/// The plugin and capability that misbehave in a given way, per language.
fn fixture(lang_fixture: Option<&'static str>, case: &str) -> (&'static str, String) {
    match lang_fixture {
        Some(f) => (f, format!("test.{case}")),
        None => {
            let plugin = match case {
                "spin" => "spin",
                "hog" => "hog",
                "throw" => "panic",
                "echo" => "echo",
                other => panic!("no Rust fixture for {other}"),
            };
            (plugin, String::new())
        }
    }
}

async fn run_case(
    h: &Harness,
    lang_fixture: Option<&'static str>,
    case: &str,
    payload: &[u8],
    limits: &Limits,
) -> Result<String, TaskError> {
    let (plugin, capability) = fixture(lang_fixture, case);
    let agent = h.load(plugin).await;
    let capability = if capability.is_empty() {
        agent.descriptor().capabilities[0].name.clone()
    } else {
        capability
    };
    run_capability(&agent, &capability, payload, limits)
        .await
        .map(|o| String::from_utf8_lossy(&o.result).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_language_is_held_to_the_limits_and_the_host_keeps_serving() {
    let h = Harness::new();
    let fuel = Limits {
        fuel: 50_000_000,
        ..Limits::default()
    };
    let deadline = Limits {
        fuel: u64::MAX,
        timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let memory = Limits {
        memory: 64 << 20,
        ..Limits::default()
    };
    for &(lang, wordcount, fx) in LANGUAGES {
        let wc_agent = h.load(wordcount).await;
        let still_serving = || async {
            let out = run(&wc_agent, b"still here", &Limits::default()).await;
            assert_eq!(
                out.map(|o| o.result).ok(),
                Some(wc(2, 0, 10).into_bytes()),
                "{lang} after a failure"
            );
        };

        // Inside the limits the fixtures work.
        assert_eq!(
            run_case(&h, fx, "echo", b"ping", &Limits::default())
                .await
                .unwrap(),
            "ping",
            "{lang}"
        );
        assert_eq!(
            run_case(&h, fx, "hog", b"3", &memory).await.unwrap(),
            "3",
            "{lang}"
        );

        let e = run_case(&h, fx, "spin", b"", &fuel).await.unwrap_err();
        assert_eq!(e, TaskError::FuelExhausted { limit: 50_000_000 }, "{lang}");
        still_serving().await;

        let e = run_case(&h, fx, "spin", b"", &deadline).await.unwrap_err();
        assert_eq!(e, TaskError::DeadlineExceeded { ms: 200 }, "{lang}");
        still_serving().await;

        let e = run_case(&h, fx, "hog", b"forever", &memory)
            .await
            .unwrap_err();
        assert!(
            matches!(e, TaskError::MemoryLimit { limit, .. } if limit == 64 << 20),
            "{lang}: {e}"
        );
        still_serving().await;

        let e = run_case(&h, fx, "throw", b"the disk is on fire", &Limits::default())
            .await
            .unwrap_err();
        match &e {
            TaskError::Trap {
                guest: Some(text), ..
            } => {
                assert!(text.contains("the disk is on fire"), "{lang}: {text}")
            }
            other => panic!("{lang}: expected a trap with the guest's message, got {other}"),
        }
        still_serving().await;

        if fx.is_some() {
            let e = run_case(&h, fx, "fail", b"no can do", &Limits::default())
                .await
                .unwrap_err();
            assert_eq!(e, TaskError::Failed("no can do".into()), "{lang}");
        }
    }
}
