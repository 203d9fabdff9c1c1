//! Task traces exported by OTLP/HTTP to a receiver in this test that
//! decodes the real OTLP protobuf (`opentelemetry-proto`): no OpenTelemetry
//! Collector or Jaeger binary installs from Debian, PyPI or npm here. A
//! planner task submitted on host A, run on host B, whose `tasks.call`
//! sub-tasks run on A again, is one trace with the parent/child structure
//! `docs/operations.md#traces` describes.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use prost::Message;
use serde_json::Value;

use crate::common::{p, HostProc, NatsServer, Orch};

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: String,
    id: String,
    parent: String,
    /// `orch.host` of the resource: the host that made it.
    host: String,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP receiver on a free port: every span it is sent.
struct Receiver {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Any::StringValue(s)) => s.clone(),
        Some(Any::IntValue(i)) => i.to_string(),
        Some(Any::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Receiver {
    fn start() -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let kept = spans.clone();
        std::thread::spawn(move || {
            let rt = crate::common::runtime();
            rt.block_on(async move {
                let export = move |body: axum::body::Bytes| {
                    let kept = kept.clone();
                    async move {
                        let request = ExportTraceServiceRequest::decode(body).unwrap();
                        let mut out = kept.lock().unwrap();
                        for resource in request.resource_spans {
                            let host = resource
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .find(|a| a.key == "orch.host")
                                .map(|a| text(&a.value))
                                .unwrap_or_default();
                            for scope in resource.scope_spans {
                                for s in scope.spans {
                                    out.push(Span {
                                        name: s.name,
                                        trace: hex::encode(s.trace_id),
                                        id: hex::encode(s.span_id),
                                        parent: hex::encode(s.parent_span_id),
                                        host: host.clone(),
                                        attributes: s
                                            .attributes
                                            .iter()
                                            .map(|a| (a.key.clone(), text(&a.value)))
                                            .collect(),
                                    });
                                }
                            }
                        }
                        (
                            [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )
                    }
                };
                let app = axum::Router::new().route("/v1/traces", axum::routing::post(export));
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        Receiver { url, spans }
    }

    fn spans(&self, trace: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == trace)
            .cloned()
            .collect()
    }
}

/// Stops a host with SIGTERM and waits for it to exit: it exports its last
/// spans before it does.
fn stop(mut host: HostProc) {
    host.signal("-TERM");
    let status = host.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn a_planner_task_is_one_trace_across_two_hosts() {
    let receiver = Receiver::start();
    let nats = NatsServer::start();
    let config = format!("[telemetry]\notlp_endpoint = \"{}\"\n", receiver.url);
    let (a, b) = (Orch::new(), Orch::new());
    a.config(&config);
    b.config(&config);
    a.ok(&["plugin", "install", "-y", &p("wordcount")]);
    b.ok(&["plugin", "install", "-y", &p("planner")]);
    let hb = HostProc::start_with(&b, &["--nats", nats.url.as_str()]);
    let ha = HostProc::start_with(&a, &["--nats", nats.url.as_str()]);
    crate::common::until_serving(&ha, "text.report", 1);
    crate::common::until_serving(&hb, "text.wordcount", 1);
    let host_id = |h: &HostProc| h.get("/v1/status").1["host"].as_str().unwrap().to_string();
    let (ida, idb) = (host_id(&ha), host_id(&hb));

    // The caller's own trace, continued.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let mut r = HostProc::agent()
        .post(&format!("{}/v1/tasks?wait=60s", ha.url))
        .header("content-type", "application/json")
        .header("traceparent", &format!("00-{trace}-{caller}-01"))
        .send(
            serde_json::json!({ "capability": "text.report", "input": "# one\na b c\n# two\nd e\n" })
                .to_string(),
        )
        .unwrap();
    let task: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["trace_id"], trace, "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    // `orch task get` shows it too.
    let shown = a.ok(&["task", "get", &id, "--api", &ha.url]);
    assert!(shown.contains(&format!("trace:      {trace}")), "{shown}");
    stop(ha);
    stop(hb);

    let spans = receiver.spans(trace);
    let find = |name: &str, task: &str| -> Span {
        spans
            .iter()
            .find(|s| {
                s.name == name && s.attributes.get("task.id").map(String::as_str) == Some(task)
            })
            .unwrap_or_else(|| panic!("no {name} of {task} in {spans:#?}"))
            .clone()
    };
    let child = |name: &str, parent: &Span| -> Span {
        spans
            .iter()
            .find(|s| s.name == name && s.parent == parent.id)
            .unwrap_or_else(|| panic!("no {name} under {} in {spans:#?}", parent.name))
            .clone()
    };
    // Host A accepts it under the caller's span.
    let submit = find("task.submit", &id);
    assert_eq!(
        (submit.parent.as_str(), submit.host.as_str()),
        (caller, ida.as_str())
    );
    child("task.accept", &submit);
    // Host B waits, runs it and writes its result, all under the submission.
    let queue = find("task.queue", &id);
    let attempt = find("task.attempt", &id);
    let result = child("task.result", &submit);
    for s in [&queue, &attempt, &result] {
        assert_eq!(
            (s.parent.as_str(), s.host.as_str()),
            (submit.id.as_str(), idb.as_str()),
            "{s:?}"
        );
    }
    assert_eq!(queue.attributes["orch.agent"], "planner@0.1.0");
    child("wasm.instantiate", &attempt);
    let handle = child("guest.handle", &attempt);
    // Its two sections are counted by sub-tasks on host A, under the call.
    let call = child("host.tasks.call", &handle);
    assert_eq!(call.attributes["calls"], "2");
    for n in 1..=2 {
        let sub = format!("{id}.{n}");
        // Sent on the stream by host B with the call's context in its
        // `traceparent` header.
        for name in ["task.queue", "task.attempt"] {
            let s = find(name, &sub);
            assert_eq!(
                (s.parent.as_str(), s.host.as_str()),
                (call.id.as_str(), ida.as_str()),
                "{s:?}"
            );
        }
        child("guest.handle", &find("task.attempt", &sub));
    }
    // Nothing of it outside the one trace.
    let all = receiver.spans.lock().unwrap().clone();
    assert!(
        all.iter()
            .filter(|s| s
                .attributes
                .get("task.id")
                .is_some_and(|t| t.starts_with(&id)))
            .all(|s| s.trace == trace),
        "{all:#?}"
    );
}

#[test]
fn without_an_endpoint_a_given_trace_id_is_kept_and_a_malformed_one_ignored() {
    let orch = Orch::new();
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    let host = HostProc::start(&orch);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut r = HostProc::agent()
        .post(&format!("{}/v1/tasks?wait=60s", host.url))
        .header("content-type", "application/json")
        .header("traceparent", &format!("00-{trace}-b7ad6b7169203331-01"))
        .send(serde_json::json!({ "capability": "echo", "input": "x" }).to_string())
        .unwrap();
    let task: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(task["trace_id"], trace, "{task}");
    // A malformed traceparent is ignored, as W3C says, not refused.
    let mut r = HostProc::agent()
        .post(&format!("{}/v1/tasks?wait=60s", host.url))
        .header("content-type", "application/json")
        .header("traceparent", "00-not-a-trace-01")
        .send(serde_json::json!({ "capability": "echo", "input": "x" }).to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let task: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(task["trace_id"], Value::Null, "{task}");
}

#[test]
fn workflow_steps_and_agent_messages_are_in_their_parents_trace() {
    let receiver = Receiver::start();
    let orch = Orch::new();
    orch.config(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\n",
        receiver.url
    ));
    for plugin in ["echo", "messenger"] {
        orch.ok(&["plugin", "install", "-y", &p(plugin)]);
    }
    let host = HostProc::start(&orch);
    // A run of two steps: one trace, under the run's first span.
    let (code, answer) = crate::workflow::register(
        &host,
        "name = \"two\"\nversion = 1\n[[steps]]\nid = \"a\"\ncapability = \"echo\"\n\
         [[steps]]\nid = \"b\"\ncapability = \"echo\"\nafter = [\"a\"]\n",
    );
    assert_eq!(code, 201, "{answer}");
    let run = crate::workflow::start(&host, "two", serde_json::json!({ "input": "x" }), true);
    assert_eq!(run["status"], "completed", "{run}");
    let step_tasks: Vec<String> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["task_id"].as_str().unwrap().to_string())
        .collect();
    // A message an agent publishes: its task is under the publish.
    let delivered = crate::workflow::Events::open(&host, "capability=ping.hello");
    let publisher = host.submit("test.publish", "ping.hello\nhello");
    let publisher_task = host.wait(&publisher);
    assert_eq!(publisher_task["result"], "sent");
    let trace = publisher_task["trace_id"].as_str().unwrap().to_string();
    // The subscriber started it (a message is no stored task: it has no
    // end event); the graceful stop lets it end.
    delivered.next("started");
    stop(host);

    let all = receiver.spans.lock().unwrap().clone();
    let start = all
        .iter()
        .find(|s| s.name == "workflow.start")
        .unwrap_or_else(|| panic!("no workflow.start in {all:#?}"));
    for id in &step_tasks {
        let submit = all
            .iter()
            .find(|s| s.name == "task.submit" && s.attributes.get("task.id") == Some(id))
            .unwrap_or_else(|| panic!("no task.submit of step task {id} in {all:#?}"));
        assert_eq!(
            (&submit.trace, &submit.parent),
            (&start.trace, &start.id),
            "{submit:?}"
        );
    }
    let spans = receiver.spans(&trace);
    let publish = spans
        .iter()
        .find(|s| s.name == "host.messaging.publish")
        .unwrap_or_else(|| panic!("no host.messaging.publish in {spans:#?}"));
    assert_eq!(publish.attributes["subject"], "ping.hello");
    // The subscriber's task: its attempt is a child of the publish.
    let delivered = spans
        .iter()
        .find(|s| s.name == "task.attempt" && s.parent == publish.id)
        .unwrap_or_else(|| panic!("no message task under the publish in {spans:#?}"));
    assert_eq!(delivered.attributes["task.capability"], "ping.hello");
}

/// `[telemetry] max_traces_per_second`, as a pair: the first tasks of a
/// burst, up to the cap, are traced; the rest run untraced (each with a
/// trace id marked not sampled, passed on to what it starts). A task whose
/// submitter's trace is sampled is traced past the cap, and one whose
/// submitter's trace is not sampled is not traced.
#[test]
fn new_traces_stop_at_the_cap_and_a_sampled_submitter_is_traced_past_it() {
    const CAP: usize = 3;
    const BURST: usize = 30;
    let receiver = Receiver::start();
    let orch = Orch::new();
    orch.config(&format!(
        "[telemetry]\notlp_endpoint = \"{}\"\nmax_traces_per_second = {CAP}\n",
        receiver.url
    ));
    orch.ok(&["plugin", "install", "-y", &p("echo")]);
    let host = HostProc::start(&orch);
    let lines: Vec<Value> = (0..BURST)
        .map(|i| serde_json::json!({ "capability": "echo", "input": i.to_string() }))
        .collect();
    let started = std::time::Instant::now();
    let burst = host.batch(&lines);
    let took = started.elapsed().as_secs_f64();
    let with_trace = |trace: &str, flags: &str| {
        let mut r = HostProc::agent()
            .post(&format!("{}/v1/tasks?wait=60s", host.url))
            .header("content-type", "application/json")
            .header(
                "traceparent",
                &format!("00-{trace}-b7ad6b7169203331-{flags}"),
            )
            .send(serde_json::json!({ "capability": "echo", "input": "x" }).to_string())
            .unwrap();
        let task: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(task["status"], "completed", "{task}");
        task
    };
    // Straight after the burst: more tasks of sampled callers than the
    // bucket can hold or refill meanwhile, each traced all the same.
    let started = std::time::Instant::now();
    let sampled: Vec<Value> = (0..BURST)
        .map(|i| with_trace(&format!("5bf92f3577b34da6a3ce929d0e0e{i:04x}"), "01"))
        .collect();
    let sampled_took = started.elapsed().as_secs_f64();
    assert!(
        BURST > CAP + (sampled_took * CAP as f64).ceil() as usize,
        "the sampled tasks took {sampled_took:.2}s: the bucket may have held them"
    );
    let unsampled = with_trace("6bf92f3577b34da6a3ce929d0e0e4736", "00");
    stop(host);

    let all = receiver.spans.lock().unwrap().clone();
    // Any span of the task, of any name.
    let traced = |task: &Value| {
        let id = task["id"].as_str().unwrap();
        all.iter()
            .any(|s| s.attributes.get("task.id").map(String::as_str) == Some(id))
    };
    for task in &burst {
        assert_eq!(task["status"], "completed", "{task}");
        // Traced or not, each has a trace id of its own.
        assert_eq!(task["trace_id"].as_str().map(str::len), Some(32), "{task}");
    }
    let n = burst.iter().filter(|t| traced(t)).count();
    // The bucket starts full (CAP) and refills at CAP a second.
    let most = CAP + (took * CAP as f64).ceil() as usize;
    assert!(
        (CAP..=most).contains(&n),
        "{n} of {BURST} tasks traced in {took:.2}s with a cap of {CAP}/s"
    );
    assert!(n < BURST, "every task of the burst was traced");
    // An untraced task's trace id makes no span anywhere.
    let untraced = burst.iter().find(|t| !traced(t)).unwrap();
    let trace = untraced["trace_id"].as_str().unwrap();
    assert!(receiver.spans(trace).is_empty(), "{trace}");
    for (i, task) in sampled.iter().enumerate() {
        assert!(traced(task), "{task}");
        assert_eq!(
            task["trace_id"],
            format!("5bf92f3577b34da6a3ce929d0e0e{i:04x}")
        );
    }
    assert!(!traced(&unsampled), "{unsampled}");
    assert_eq!(unsampled["trace_id"], "6bf92f3577b34da6a3ce929d0e0e4736");
}
