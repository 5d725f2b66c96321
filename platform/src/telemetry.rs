//! Logging and tracing set-up, one style for every binary: `RUST_LOG` filters; `LOG_FORMAT=json`
//! (default) or `pretty`. Every span has a W3C trace context (OpenTelemetry SDK); with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are exported over OTLP/HTTP (protobuf, or JSON with
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/json`). Spans that carry a trace across services record
//! `trace_id` (and `correlation_id`) as fields, so the JSON logs carry them without an exporter.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// The spans traced when `OTEL_TRACES_FILTER` is not set: taskstream's own.
pub const DEFAULT_TRACES_FILTER: &str = "warn,command_api=info,projector=info,query_api=info,platform=info";

/// Flushes the exporter when dropped (keep it for the life of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

pub fn init(service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let pretty = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("pretty"));
    let fmt_layer = if pretty {
        fmt::layer().with_writer(std::io::stderr).compact().boxed()
    } else {
        fmt::layer().with_writer(std::io::stderr).json().flatten_event(true).with_current_span(true).with_span_list(false).boxed()
    };
    let (provider, export_error) = tracer_provider(service);
    // Spans carry the trace context across services whatever RUST_LOG says about logs: the
    // OpenTelemetry layer has its own filter (`OTEL_TRACES_FILTER`). By default only taskstream's
    // own spans are traced: library spans cost ~5% of the query API's CPU in a perf profile.
    let otel_filter =
        std::env::var("OTEL_TRACES_FILTER").ok().and_then(|f| EnvFilter::try_new(f).ok()).unwrap_or_else(|| EnvFilter::new(DEFAULT_TRACES_FILTER));
    // Without busy/idle times (the `busy_ns`/`idle_ns` attributes): keeping them reads the clock
    // and updates the span's data on every entry and exit, ~4% of the query API's CPU (perf).
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(service.to_owned())).with_tracked_inactivity(false).with_filter(otel_filter);
    let result = tracing_subscriber::registry().with(fmt_layer.with_filter(filter)).with(otel).try_init();
    if result.is_err() {
        return Telemetry { provider: None };
    }
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    tracing::info!(service, version = env!("CARGO_PKG_VERSION"), otlp = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok(), "starting");
    if let Some(e) = export_error {
        tracing::warn!(error.message = %e, "OTLP export is off: the exporter could not be built");
    }
    Telemetry { provider: Some(provider) }
}

/// Always a provider (so every span has a trace context); an OTLP exporter only when configured.
fn tracer_provider(service: &str) -> (SdkTracerProvider, Option<String>) {
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").map_or(true, |e| e.trim().is_empty()) {
        return (builder.build(), None);
    }
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        _ => Protocol::HttpBinary,
    };
    match opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(protocol).build() {
        Ok(exporter) => (builder.with_batch_exporter(exporter).build(), None),
        Err(e) => (builder.build(), Some(e.to_string())),
    }
}

/// Continues the trace of a W3C `traceparent` (when there is a valid one) in `span`, and records
/// the span's trace id in its `trace_id` field (declare it with `trace_id = tracing::field::Empty`).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let carrier = HashMap::from([("traceparent".to_owned(), tp.to_owned())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
    record_trace_id(span);
}

/// Adds a link from `span` to the trace of each `traceparent` (a batch that serves many traces).
pub fn link_traces<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    for tp in traceparents {
        if let Some(cx) = span_context(tp) {
            span.add_link(cx);
        }
    }
}

/// The W3C `traceparent` of `span` (None when tracing is not set up).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

/// The trace id (32 hex digits) in a `traceparent`.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (_version, id) = (parts.next()?, parts.next()?);
    (id.len() == 32).then_some(id)
}

fn span_context(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

fn record_trace_id(span: &tracing::Span) {
    let sc = span.context().span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn trace_ids_are_read_from_traceparents() {
        assert_eq!(super::trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(super::trace_id_of("garbage"), None);
    }
}
