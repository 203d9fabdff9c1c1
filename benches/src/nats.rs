//! The NATS side of the cluster benches: a nats-server of their own and the
//! raw baselines every cluster figure is compared with, measured in the
//! same run against the same server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;

/// Round trips per latency figure.
pub const SAMPLES: usize = 2_000;

/// The nats-server of the tests, shared: one way to start one.
pub use orch_testkit::NatsServer;

/// CPU time (user + system) a process has used so far, from /proc.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // The kernel's USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Prints CPU time per task and the share of the machine's two cores it
/// took over `elapsed`.
pub fn print_cpu(what: &str, cpu: Duration, tasks: u64, elapsed: Duration) {
    println!(
        "  CPU {what}: {:.0} µs per task, {:.0}% of 2 cores",
        cpu.as_secs_f64() * 1e6 / tasks as f64,
        cpu.as_secs_f64() / elapsed.as_secs_f64() / 2.0 * 100.0
    );
}

/// p50 of each baseline, and the durable pipeline's throughput.
pub struct Baselines {
    pub core: Duration,
    pub raw: Duration,
    pub stored: Duration,
    pub pipeline_per_s: f64,
}

/// Runs and prints the baselines: core request/reply, the raw JetStream
/// task round trip, the same with the result stored, and that pipeline's
/// throughput with 64 in flight.
pub async fn baselines(server: &NatsServer) -> Baselines {
    let url = server.url.clone();
    // Baseline 1: core request/reply.
    let responder = async_nats::connect(&url).await.unwrap();
    let mut sub = responder.subscribe("bench.echo").await.unwrap();
    let replier = responder.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            if let Some(reply) = m.reply {
                replier.publish(reply, m.payload).await.unwrap();
            }
        }
    });
    let requester = async_nats::connect(&url).await.unwrap();
    responder.flush().await.unwrap();
    let mut lat = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        requester
            .request("bench.echo", "hello, orch".into())
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    let core = report("core NATS request/reply", lat);

    // Baseline 2: a raw JetStream task round trip.
    let worker = async_nats::connect(&url).await.unwrap();
    let wjs = jetstream::new(worker.clone());
    let c = work_queue(&wjs, "BENCH", "bench.task.>", "bench").await;
    tokio::spawn(async move {
        let mut messages = c.messages().await.unwrap();
        while let Some(Ok(m)) = messages.next().await {
            let reply = reply_to(&m);
            m.ack().await.unwrap();
            worker.publish(reply, m.payload.clone()).await.unwrap();
        }
    });
    let submitter = async_nats::connect(&url).await.unwrap();
    let sjs = jetstream::new(submitter.clone());
    let inbox = submitter.new_inbox();
    let mut replies = submitter.subscribe(inbox.clone()).await.unwrap();
    let lat = js_round_trips(&sjs, "bench.task.echo", &inbox, &mut replies).await;
    let raw_js = report("raw JetStream task round trip", lat);

    // Baseline 3: the same, but the worker stores each result with a KV
    // `create` before it replies: the floor for a path whose results
    // are durable and fenced.
    let worker = async_nats::connect(&url).await.unwrap();
    let wjs = jetstream::new(worker.clone());
    let results = results_bucket(&wjs, "BENCH_RESULTS").await;
    let c = work_queue(&wjs, "BENCH_STORED", "bench.stored.>", "stored").await;
    tokio::spawn(async move {
        let mut messages = c.messages().await.unwrap();
        let mut n = 0u64;
        while let Some(Ok(m)) = messages.next().await {
            let reply = reply_to(&m);
            n += 1;
            results
                .create(format!("t{n}"), m.payload.clone())
                .await
                .unwrap();
            m.ack().await.unwrap();
            worker.publish(reply, m.payload.clone()).await.unwrap();
        }
    });
    let lat = js_round_trips(&sjs, "bench.stored.echo", &inbox, &mut replies).await;
    let raw_stored = report("raw JetStream task round trip, result stored", lat);

    // Baseline 4, throughput: the same durable pipeline with 64 tasks in
    // flight and no sandbox. Submitters publish with ack; the worker
    // handles every delivered message at once (create the result, ack)
    // and counts; done when every result is stored.
    let pipe_tasks: u64 = 8_000;
    let c = work_queue(&wjs, "BENCH_PIPE", "bench.pipe.>", "pipe").await;
    let stored = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let all_stored = Arc::new(tokio::sync::Notify::new());
    let pipe_results = results_bucket(&wjs, "BENCH_PIPE_RESULTS").await;
    {
        let (stored, all_stored) = (stored.clone(), all_stored.clone());
        tokio::spawn(async move {
            let mut messages = c.messages().await.unwrap();
            let mut n = 0u64;
            while let Some(Ok(m)) = messages.next().await {
                n += 1;
                let (results, stored, all_stored) =
                    (pipe_results.clone(), stored.clone(), all_stored.clone());
                tokio::spawn(async move {
                    results
                        .create(format!("t{n}"), m.payload.clone())
                        .await
                        .unwrap();
                    m.ack().await.unwrap();
                    if stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == pipe_tasks {
                        all_stored.notify_one();
                    }
                });
            }
        });
    }
    let cpu_before = cpu_time(server.pid()) + cpu_time(std::process::id());
    let t = Instant::now();
    let done = all_stored.notified();
    for _ in 0..64 {
        let sjs = sjs.clone();
        tokio::spawn(async move {
            for _ in 0..pipe_tasks / 64 {
                sjs.publish("bench.pipe.echo", "hello, orch".into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        });
    }
    done.await;
    let elapsed = t.elapsed();
    let cpu = cpu_time(server.pid()) + cpu_time(std::process::id()) - cpu_before;
    print_cpu("of the server and this process", cpu, pipe_tasks, elapsed);
    println!(
        "raw JetStream pipeline with stored results, 64 in flight: {:.0} tasks/s ({pipe_tasks} in {elapsed:?})",
        pipe_tasks as f64 / elapsed.as_secs_f64()
    );

    Baselines {
        core,
        raw: raw_js,
        stored: raw_stored,
        pipeline_per_s: pipe_tasks as f64 / elapsed.as_secs_f64(),
    }
}

/// A work-queue stream (file storage) and a durable pull consumer on it.
pub async fn work_queue(
    js: &jetstream::Context,
    stream_name: &str,
    subject: &str,
    consumer_name: &str,
) -> consumer::PullConsumer {
    js.get_or_create_stream(stream::Config {
        name: stream_name.into(),
        subjects: vec![subject.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap()
    .get_or_create_consumer(
        consumer_name,
        consumer::pull::Config {
            durable_name: Some(consumer_name.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// SAMPLES tasks one at a time: publish with ack, carrying `inbox` in a
/// `Reply-To` header, then wait for the worker's reply.
async fn js_round_trips(
    js: &jetstream::Context,
    subject: &'static str,
    inbox: &str,
    replies: &mut async_nats::Subscriber,
) -> Vec<Duration> {
    let mut lat = Vec::new();
    for _ in 0..SAMPLES {
        let t = Instant::now();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Reply-To", inbox);
        js.publish_with_headers(subject, headers, "hello, orch".into())
            .await
            .unwrap()
            .await
            .unwrap();
        replies.next().await.unwrap();
        lat.push(t.elapsed());
    }
    lat
}

/// A KV bucket (file storage) for a baseline's results.
async fn results_bucket(js: &jetstream::Context, name: &str) -> jetstream::kv::Store {
    js.create_key_value(jetstream::kv::Config {
        bucket: name.into(),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The `Reply-To` header a baseline's submitter sets.
fn reply_to(m: &jetstream::Message) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Reply-To"))
        .map(|v| v.to_string())
        .unwrap()
}

pub fn report(name: &str, mut lat: Vec<Duration>) -> Duration {
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{name}: p50 {:?}, p99 {:?} ({} round trips)",
        pct(0.5),
        pct(0.99),
        lat.len()
    );
    pct(0.5)
}
