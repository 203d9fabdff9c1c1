//! Log output and, for `orch host start`, the export of task traces by
//! OTLP (HTTP, protobuf) when an endpoint is configured: `[telemetry]
//! otlp_endpoint` in config.toml, or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! (`OTEL_SDK_DISABLED=true` turns it off). The library makes the spans
//! (target `orch::trace`); this installs the layer that records them, and
//! sets which tasks are traced: every task whose submitter's trace is
//! sampled, and of the others those that `OTEL_TRACES_SAMPLER` takes (all
//! by default), at most `[telemetry] max_traces_per_second`.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Where and as whom a host exports its traces.
pub struct Export {
    /// From config.toml; `None` leaves it to the OTEL_* variables.
    pub endpoint: Option<String>,
    pub host_id: String,
    /// 0: no cap.
    pub max_traces_per_second: u32,
}

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether traces are exported: an endpoint from the config or the
/// environment, and the SDK not disabled.
pub fn wanted(config_endpoint: Option<&str>) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && (config_endpoint.is_some()
            || set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Installs the log output (`ORCH_LOG`, default warn) and, with `export`,
/// the trace exporter. A trace exporter that cannot be built is reported
/// and left out; the host runs without it.
pub fn init(json: bool, export: Option<Export>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ORCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        // One object per line, the event's fields at the top level.
        fmt.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed()
    };
    let mut problem = None;
    let traces = export.and_then(|e| match provider(e) {
        Ok((provider, sampling)) => {
            orch::trace::set_sampling(sampling);
            let tracer = provider.tracer("orch");
            opentelemetry::global::set_tracer_provider(provider.clone());
            let _ = PROVIDER.set(provider);
            // Only the spans of task traces: the host's own logs stay logs.
            let only = tracing_subscriber::filter::Targets::new()
                .with_target(orch::trace::TARGET, tracing::Level::INFO);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(only),
            )
        }
        Err(e) => {
            problem = Some(e);
            None
        }
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(traces)
        .init();
    if let Some(e) = problem {
        tracing::error!(error = %e, "traces are not exported: the OTLP exporter could not be built");
    }
}

fn provider(
    export: Export,
) -> Result<(SdkTracerProvider, orch::trace::Sampling), opentelemetry_otlp::ExporterBuildError> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(endpoint) = export.endpoint {
        // The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is: the traces path
        // goes after it.
        builder = builder.with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')));
    }
    let exporter = builder.build()?;
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "orch".to_string());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .with_attributes([
            KeyValue::new("service.instance.id", export.host_id.clone()),
            KeyValue::new("orch.host", export.host_id),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    // The library decides before a task's first span (the SDK's sampler
    // from the OTEL_TRACES_SAMPLER variables, then the cap); the provider
    // records what it was given.
    let sampling = orch::trace::Sampling {
        sampler: opentelemetry_sdk::trace::Config::default().sampler,
        per_second: std::num::NonZeroU32::new(export.max_traces_per_second),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .build();
    Ok((provider, sampling))
}

/// Sends the spans not yet exported (at the end of `orch host start`).
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}
