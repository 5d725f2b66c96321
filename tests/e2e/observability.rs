//! Observability end to end: Prometheus metrics on every service, and a command's W3C trace reaching the projector's apply span, the reaction it
//! calls for, and the reaction's own command, exported over OTLP (HTTP/JSON) to a receiver here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use reqwest::Method;
use serde_json::{json, Value};

use e2e::{Stack, StackOptions};
use test_support::eventually;

/// Every span the services exported: (service, span).
type Spans = Arc<Mutex<Vec<(String, Value)>>>;

async fn otlp_receiver() -> anyhow::Result<(u16, Spans)> {
    let spans: Spans = Arc::default();
    let store = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                        let service = rs["resource"]["attributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|a| a["key"] == "service.name")
                            .and_then(|a| a["value"]["stringValue"].as_str())
                            .unwrap_or_default()
                            .to_owned();
                        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                            for span in ss["spans"].as_array().into_iter().flatten() {
                                store.lock().unwrap().push((service.clone(), span.clone()));
                            }
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((port, spans))
}

/// The `traceparent` header of the log record of `task` with type `ce_type`.
async fn record_traceparent(stack: &Stack, task: &str, ce_type: &str) -> anyhow::Result<Option<String>> {
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", format!("e2e-trace-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[&stack.topic])?;
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), consumer.recv()).await {
        let header =
            |name: &str| m.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned()));
        if header("ce_subject").as_deref() == Some(task) && header("ce_type").as_deref() == Some(ce_type) {
            return Ok(header("traceparent"));
        }
    }
    Ok(None)
}

fn trace_of(tp: &str) -> String {
    tp.split('-').nth(1).unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commands_trace_reaches_the_projector_and_the_reactions_command() -> anyhow::Result<()> {
    let (port, spans) = otlp_receiver().await?;
    let stack = Stack::start_with(StackOptions {
        extra_env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), format!("http://127.0.0.1:{port}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL".into(), "http/json".into()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ],
        ..Default::default()
    })
    .await?;
    let due = chrono::Utc::now() + chrono::Duration::days(1);
    let t = stack.create("ann", json!({"title": "stand-up", "due_at": due, "recurrence": "FREQ=DAILY"})).await?;
    let id = t["task_id"].as_str().unwrap().to_owned();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{caller_span}-01");
    let (s, _, b) =
        stack.command("ann", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &[("traceparent", &tp), ("X-Correlation-Id", "corr-trace")]).await?;
    assert_eq!(s, 200, "{b}");
    let next = domain::ids::next_occurrence_id(domain::TaskId::from_uuid(id.parse()?), 2).to_string();
    eventually("the next occurrence", Duration::from_secs(30), || async {
        let d = stack.query("ann", "query($id: ID!) { task(id: $id) { id } }", json!({"id": next}), None).await.ok()?;
        (!d["task"].is_null()).then_some(())
    })
    .await?;

    // The log: the complete event carries the command span (same trace, its own span id), and so
    // does the reaction's command event, with the same correlation id.
    let completed = record_traceparent(&stack, &id, "task.completed").await?.expect("a traceparent on task.completed");
    assert_eq!(trace_of(&completed), trace);
    assert!(!completed.contains(caller_span), "the command's own span, a child of the caller's");
    let spawned = record_traceparent(&stack, &next, "task.created").await?.expect("a traceparent on the occurrence's task.created");
    assert_eq!(trace_of(&spawned), trace, "the reaction's command continues the trace");
    // Without a traceparent, a command starts a trace of its own.
    let first = record_traceparent(&stack, &id, "task.created").await?.expect("every command has a trace");
    assert_ne!(trace_of(&first), trace);

    // The exported spans: the command (child of the caller), the projector's apply, the reaction,
    // and the reaction's command, all in the same trace.
    let found = eventually("the spans of the trace", Duration::from_secs(30), || async {
        let spans = spans.lock().unwrap().clone();
        let in_trace = |service: &str, name: &str| {
            spans.iter().find(|(s, span)| {
                s == service
                    && span["name"] == name
                    && (span["traceId"] == trace || span["links"].as_array().is_some_and(|l| l.iter().any(|l| l["traceId"] == trace)))
            })
        };
        let command = in_trace("command-api", "command").filter(|(_, s)| s["parentSpanId"] == caller_span)?.1.clone();
        let apply = in_trace("projector", "apply")?.1.clone();
        let reaction = in_trace("projector", "reaction")?.1.clone();
        let reaction_command =
            spans.iter().find(|(s, span)| s == "command-api" && span["name"] == "command" && span["parentSpanId"] == reaction["spanId"])?.1.clone();
        Some((command, apply, reaction, reaction_command))
    })
    .await?;
    let (_, apply, reaction, reaction_command) = found;
    assert!(apply["traceId"] == trace || apply["links"].as_array().is_some_and(|l| !l.is_empty()));
    assert_eq!(reaction["traceId"], trace);
    assert_eq!(reaction_command["traceId"], trace);
    stack.cleanup().await
}

/// The value of the first sample of `metric` whose labels contain every one of `labels`.
fn sample(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(metric))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exports_its_metrics() -> anyhow::Result<()> {
    use e2e::Svc;
    let stack = Stack::start().await?;
    let t = stack.create("ann", json!({"title": "measured", "due_at": chrono::Utc::now() + chrono::Duration::seconds(2), "remind_before": "PT1S"})).await?;
    let (s, _, _) = stack.command("ann", Method::POST, "/v1/tasks/00000000-0000-0000-0000-000000000000/complete", None, &[]).await?;
    assert_eq!(s, 404);
    stack.query("ann", "{ stats { total } }", json!({}), t["position"].as_str()).await?;
    let metrics = |svc: Svc| {
        let url = stack.url(svc, "/metrics");
        let http = stack.http.clone();
        async move { http.get(url).send().await.ok()?.text().await.ok() }
    };
    // The reminder fires (scheduler delay) and the projector applies it; the lag export runs every few seconds.
    let projector = eventually("the projector's metrics", Duration::from_secs(30), || async {
        let text = metrics(Svc::Projector).await?;
        let ok = sample(&text, "projector_events_consumed_total", &["projection=\"tasks\"", "type=\"task.reminder_due\""]).is_some_and(|v| v >= 1.0)
            && sample(&text, "reminder_scheduler_delay_seconds_count", &[]).is_some_and(|v| v >= 1.0)
            && sample(&text, "projection_lag", &["projection=\"task_history\"", "partition=\"0\""]).is_some()
            && sample(&text, "projector_dead_letters", &[]) == Some(0.0);
        ok.then_some(text)
    })
    .await?;
    assert!(sample(&projector, "projector_batch_apply_seconds_bucket", &["le=\"0.1\""]).is_some(), "batch apply latency is a histogram");
    assert!(sample(&projector, "projector_events_applied_total", &[]).is_some_and(|v| v >= 2.0));

    let command = metrics(Svc::CommandApi).await.expect("command-api /metrics");
    assert_eq!(sample(&command, "commands_total", &["command=\"CreateTask\"", "result=\"accepted\""]), Some(1.0));
    assert_eq!(sample(&command, "commands_total", &["command=\"CompleteTask\"", "result=\"rejected\""]), Some(1.0));
    assert!(sample(&command, "command_duration_seconds_bucket", &["command=\"CreateTask\"", "le=\"+Inf\""]).is_some_and(|v| v >= 1.0));
    assert!(sample(&command, "events_published_total", &["type=\"task.created\""]).is_some_and(|v| v >= 1.0));
    assert!(sample(&command, "command_api_append_seconds_count", &[]).is_some_and(|v| v >= 1.0));

    let query = metrics(Svc::QueryApi).await.expect("query-api /metrics");
    assert!(sample(&query, "graphql_requests_total", &[]).is_some_and(|v| v >= 1.0));
    assert!(sample(&query, "graphql_request_duration_seconds_bucket", &["le=\"+Inf\""]).is_some_and(|v| v >= 1.0));
    stack.cleanup().await
}
