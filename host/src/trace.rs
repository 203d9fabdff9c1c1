//! Traces of tasks (`docs/operations.md#traces`). A task's trace context is
//! a W3C `traceparent` kept in its record (`TaskRecord::trace`) and sent in
//! the `traceparent` header of its NATS messages, so that every span of a
//! task, on any host, joins one trace: each host makes its spans as
//! `tracing` spans of target [`TARGET`], parented on the stored context.
//!
//! The library only makes spans; whoever installs the subscriber decides
//! whether they go anywhere (`orch host start` exports them by OTLP when
//! an endpoint is configured). Without a subscriber that records them, the
//! spans are disabled at their call site, and the incoming `traceparent`
//! (if any) is kept and passed on unchanged.
//!
//! Whether a task is traced is decided before its first span
//! ([`decide`]), so that a task not traced makes no span at all: a task
//! follows its submitter's sampled flag, and any other task is traced as
//! the sampling set with [`set_sampling`] says (all, without one).

use std::num::NonZeroU32;
use std::sync::{LazyLock, OnceLock};
use std::time::SystemTime;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanKind, TraceContextExt, TraceFlags, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SamplingDecision, ShouldSample};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span of a task's trace (subscribers filter on it).
pub const TARGET: &str = crate::sandbox::TRACE_TARGET;

/// The W3C trace context header, in HTTP and in NATS messages.
pub const HEADER: &str = "traceparent";

static PROPAGATOR: LazyLock<TraceContextPropagator> = LazyLock::new(TraceContextPropagator::new);

/// One `traceparent` to read (no map or copy to make for each task).
struct Header<'a>(&'a str);

impl Extractor for Header<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == HEADER).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![HEADER]
    }
}

/// Where one `traceparent` is written.
#[derive(Default)]
struct Slot(Option<String>);

impl Injector for Slot {
    fn set(&mut self, key: &str, value: String) {
        if key == HEADER {
            self.0 = Some(value);
        }
    }
}

/// The context a `traceparent` stands for (a remote parent); empty when
/// there is none or it does not parse.
pub fn context(traceparent: Option<&str>) -> Context {
    let Some(value) = traceparent else {
        return Context::new();
    };
    PROPAGATOR.extract(&Header(value))
}

/// The `traceparent` of a context's span, if it has a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = Slot::default();
    PROPAGATOR.inject_context(cx, &mut carrier);
    carrier.0
}

/// Which tasks without a sampled parent get a trace: those `sampler`
/// takes (the OpenTelemetry SDK's, e.g. from `OTEL_TRACES_SAMPLER`), at
/// most `per_second` of them a second (`None`: no cap).
pub struct Sampling {
    pub sampler: Box<dyn ShouldSample>,
    pub per_second: Option<NonZeroU32>,
}

struct Sampler {
    sampler: Box<dyn ShouldSample>,
    cap: Option<governor::DefaultDirectRateLimiter>,
}

static SAMPLING: OnceLock<Sampler> = OnceLock::new();

/// Sets how tasks are sampled, once per process (whoever installs the
/// trace exporter); a second call changes nothing. Without it every task
/// is traced, as far as the subscriber records spans.
pub fn set_sampling(sampling: Sampling) {
    let cap = sampling
        .per_second
        .map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n)));
    let _ = SAMPLING.set(Sampler {
        sampler: sampling.sampler,
        cap,
    });
}

/// Whether a task's spans are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Make them: the submitter's trace is sampled, or the sampling took
    /// this task.
    Record,
    /// Make none; the task carries this `traceparent` on, unchanged (the
    /// submitter's, or a new one marked not sampled, so that the tasks and
    /// messages it starts are not traced either).
    Skip(Option<String>),
}

/// Decides whether the spans of a task submitted with `parent` (its
/// submitter's `traceparent`) are made, before any is.
pub fn decide(parent: Option<&str>) -> Decision {
    let Some(sampling) = SAMPLING.get() else {
        return Decision::Record;
    };
    let cx = context(parent);
    let remote = cx.span().span_context().clone();
    if remote.is_valid() {
        return if remote.is_sampled() {
            Decision::Record
        } else {
            Decision::Skip(parent.map(String::from))
        };
    }
    let trace_id = RandomIdGenerator::default().new_trace_id();
    let decision = sampling
        .sampler
        .should_sample(None, trace_id, "task", &SpanKind::Server, &[], &[])
        .decision;
    let taken = decision == SamplingDecision::RecordAndSample
        && sampling.cap.as_ref().is_none_or(|cap| cap.check().is_ok());
    if taken {
        return Decision::Record;
    }
    let span = SpanContext::new(
        trace_id,
        RandomIdGenerator::default().new_span_id(),
        TraceFlags::default(),
        false,
        TraceState::default(),
    );
    Decision::Skip(traceparent(&Context::new().with_remote_span_context(span)))
}

/// Whether `value` is a valid `traceparent`.
pub fn is_valid(value: &str) -> bool {
    context(Some(value)).span().span_context().is_valid()
}

/// Whether a `traceparent` says its trace is sampled (flags bit 0): only
/// then are spans made under it.
pub fn sampled(traceparent: Option<&str>) -> bool {
    // The fourth field: later versions may add fields after it.
    traceparent
        .and_then(|t| t.split('-').nth(3))
        .and_then(|flags| u8::from_str_radix(flags, 16).ok())
        .is_some_and(|flags| flags & 1 == 1)
}

/// A span of a task's trace under `parent`, made only when `parent` is
/// sampled (`make` builds it); `Span::none()` otherwise.
pub fn under(parent: Option<&str>, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if !sampled(parent) {
        return tracing::Span::none();
    }
    let span = make();
    adopt(&span, parent);
    span
}

/// The trace id (32 hex digits) of a `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}

/// Makes `span` a child of `parent` (a `traceparent`); nothing when the
/// span is not recorded or there is no parent.
pub fn adopt(span: &tracing::Span, parent: Option<&str>) {
    if span.is_disabled() || parent.is_none() {
        return;
    }
    // Only fails for a span already started, which a new one is not.
    let _ = span.set_parent(context(parent));
}

/// The `traceparent` of `span` for what it starts (a sub-task, a message),
/// or `fallback` when the span is not recorded.
pub fn of(span: &tracing::Span, fallback: Option<&str>) -> Option<String> {
    if span.is_disabled() {
        return fallback.map(String::from);
    }
    traceparent(&span.context()).or_else(|| fallback.map(String::from))
}

/// [`of`] the current span.
pub fn current(fallback: Option<&str>) -> Option<String> {
    of(&tracing::Span::current(), fallback)
}

/// A span that has already ended (the time a task waited in a queue),
/// with its times given, as a child of `parent`. Recorded only when a
/// tracer provider is installed and the parent is sampled.
pub fn ended(
    name: &'static str,
    parent: Option<&str>,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) {
    let Some(parent) = parent else { return };
    let cx = context(Some(parent));
    if !cx.span().span_context().is_sampled() {
        return;
    }
    let tracer = opentelemetry::global::tracer("orch");
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &cx);
    opentelemetry::trace::Span::end_with_timestamp(&mut span, end);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_a_bad_one_is_no_context() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_valid(tp));
        assert_eq!(traceparent(&context(Some(tp))).as_deref(), Some(tp));
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert!(sampled(Some(tp)));
        assert!(!sampled(Some(&tp.replace("-01", "-00"))));
        assert!(!sampled(None));
        for bad in [
            "",
            "00-xyz",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(!is_valid(bad), "{bad}");
            assert_eq!(traceparent(&context(Some(bad))), None);
        }
    }
}
