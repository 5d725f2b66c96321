//! `GET /v1/me/export` end to end: through the command API, which relays it to the query API (found
//! through `QUERY_API_ADDR`, which the stack gives every service), over the read models the
//! projector built from the log.

use std::time::Duration;

use chrono::Utc;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::{json, Value};

use e2e::{Stack, Svc};
use test_support::eventually;

fn id_of(v: &Value) -> String {
    v["task_id"].as_str().expect("task_id").to_owned()
}

/// `GET /v1/me/export` on the command API as `user` (`None`: no token), as of `consistency`.
async fn export(stack: &Stack, user: Option<&str>, consistency: Option<&str>) -> anyhow::Result<(u16, HeaderMap, Value)> {
    let mut req = stack.http.get(stack.url(Svc::CommandApi, "/v1/me/export"));
    if let Some(u) = user {
        req = req.bearer_auth(stack.token(u));
    }
    if let Some(t) = consistency {
        req = req.header("X-Consistency-Token", t);
    }
    let res = req.send().await?;
    let (status, headers) = (res.status().as_u16(), res.headers().clone());
    let text = res.text().await?;
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("export answered {status} with a body that is not JSON ({e}): {text}"));
    Ok((status, headers, body))
}

/// Waits until the read models hold every command answered with `positions` (each names one
/// partition's position, so each is waited for), then exports as `user`.
async fn export_as_of(stack: &Stack, user: &str, positions: &[String]) -> anyhow::Result<(HeaderMap, Value)> {
    let mut last = None;
    for p in positions {
        let (status, headers, body) = export(stack, Some(user), Some(p)).await?;
        anyhow::ensure!(status == 200, "export as of {p} answered {status}: {body}");
        last = Some((headers, body));
    }
    last.ok_or_else(|| anyhow::anyhow!("no position to wait for"))
}

/// Every key of every object in `v`, at any depth.
fn all_keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                all_keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| all_keys(v, out)),
        _ => {}
    }
}

fn sorted_keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_exports_all_of_their_data_and_nothing_else() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let mut positions = Vec::new();
    let mut answered = |v: &Value| positions.push(v["position"].as_str().expect("position").to_owned());

    // A reminder a moment from now, for a notification.
    let due = Utc::now() + chrono::Duration::seconds(3);
    let reminded = stack.create("alice", json!({"title": "renew passport", "due_at": due, "remind_before": "PT2S", "tags": ["admin"]})).await?;
    answered(&reminded);
    let open = stack.create("alice", json!({"title": "water the plants", "description": "the ferns too", "priority": "low"})).await?;
    answered(&open);
    let done = stack.create("alice", json!({"title": "file taxes", "priority": "urgent"})).await?;
    answered(&done);
    let gone = stack.create("alice", json!({"title": "cancelled trip"})).await?;
    answered(&gone);
    let (s, _, completed) = stack.command_retrying("alice", Method::POST, &format!("/v1/tasks/{}/complete", id_of(&done)), None).await?;
    assert_eq!(s, 200, "{completed}");
    answered(&completed);
    let (s, _, deleted) = stack.command_retrying("alice", Method::DELETE, &format!("/v1/tasks/{}", id_of(&gone)), None).await?;
    assert_eq!(s, 200, "{deleted}");
    answered(&deleted);
    let bobs = stack.create("bob", json!({"title": "bob's private task"})).await?;

    // The reminder's notification (the projector fires it; nothing to wait for but the row).
    let notifications = eventually("alice's reminder notification in her export", Duration::from_secs(60), || async {
        let (status, _, body) = export(&stack, Some("alice"), None).await.ok()?;
        let n = body["notifications"].as_array().filter(|n| status == 200 && !n.is_empty())?.clone();
        Some(n)
    })
    .await?;
    assert_eq!(notifications.len(), 1, "{notifications:?}");
    assert_eq!((notifications[0]["task_id"].as_str(), notifications[0]["kind"].as_str()), (Some(id_of(&reminded).as_str()), Some("reminder")));
    assert!(notifications[0]["message"].as_str().unwrap().contains("renew passport"));

    // The webhook, registered once the reminder has fired (so nothing is sent to it; the address
    // only has to be a public one).
    let (s, _, hook) = stack.command_retrying("alice", Method::PUT, "/v1/webhook", Some(json!({"url": "https://93.184.216.34/alice-hooks"}))).await?;
    assert_eq!(s, 200, "{hook}");
    assert!(hook["secret"].is_string(), "a generated secret is returned once: {hook}");
    answered(&hook);

    let (headers, doc) = export_as_of(&stack, "alice", &positions).await?;
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["content-disposition"], "attachment; filename=\"taskstream-export-alice.json\"");
    assert_eq!(doc["user_id"], "alice");
    assert!(chrono::DateTime::parse_from_rfc3339(doc["exported_at"].as_str().unwrap_or_default()).is_ok(), "{doc}");

    // Tasks: the three that exist, with their titles and states; the deleted one only in history.
    let tasks: Vec<(String, String, String)> = doc["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_owned(), t["title"].as_str().unwrap().to_owned(), t["status"].as_str().unwrap().to_owned()))
        .collect();
    let mut want = vec![
        (id_of(&reminded), "renew passport".to_owned(), "open".to_owned()),
        (id_of(&open), "water the plants".to_owned(), "open".to_owned()),
        (id_of(&done), "file taxes".to_owned(), "completed".to_owned()),
    ];
    let mut got = tasks.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{doc}");
    let plants = doc["tasks"].as_array().unwrap().iter().find(|t| t["id"] == id_of(&open)).unwrap();
    assert_eq!((plants["description"].as_str(), plants["priority"].as_str(), plants["version"].as_i64()), (Some("the ferns too"), Some("low"), Some(1)));
    let taxes = doc["tasks"].as_array().unwrap().iter().find(|t| t["id"] == id_of(&done)).unwrap();
    assert!(taxes["completed_at"].is_string() && taxes["version"] == 2, "{taxes}");

    // History: every event of every task of hers, the deleted task's included.
    let history = doc["history"].as_array().unwrap();
    let events_of = |task: &str| -> Vec<(i64, String)> {
        history.iter().filter(|e| e["task_id"] == task).map(|e| (e["version"].as_i64().unwrap(), e["type"].as_str().unwrap().to_owned())).collect()
    };
    assert_eq!(events_of(&id_of(&open)), [(1, "task.created".to_owned())]);
    assert_eq!(events_of(&id_of(&done)), [(1, "task.created".to_owned()), (2, "task.completed".to_owned())]);
    assert_eq!(events_of(&id_of(&gone)), [(1, "task.created".to_owned()), (2, "task.deleted".to_owned())]);
    assert!(events_of(&id_of(&reminded)).starts_with(&[(1, "task.created".to_owned()), (2, "task.reminder_due".to_owned())]), "{history:?}");
    let created = history.iter().find(|e| e["task_id"] == id_of(&gone) && e["version"] == 1).unwrap();
    assert_eq!(created["data"]["title"], "cancelled trip", "the deleted task's data is in its history: {created}");
    assert!(created["event_id"].is_string() && created["occurred_at"].is_string() && created.get("correlation_id").is_some(), "{created}");

    // The webhook, never its secret.
    assert_eq!(doc["webhook"]["url"], "https://93.184.216.34/alice-hooks");
    assert!(doc["webhook"]["updated_at"].is_string());
    let mut keys = Vec::new();
    all_keys(&doc, &mut keys);
    assert!(!keys.iter().any(|k| k.contains("secret")), "no secret anywhere: {keys:?}");
    let text = doc.to_string();
    assert!(!text.contains(hook["secret"].as_str().unwrap()), "the webhook's secret never leaves");
    assert!(!text.contains("bob"), "nothing of bob's: {text}");

    // The document is what the command API's OpenAPI description says it is.
    let openapi: Value = stack.http.get(stack.url(Svc::CommandApi, "/v1/openapi.json")).send().await?.json().await?;
    let schemas = &openapi["components"]["schemas"];
    for (schema, sample) in [
        ("Export", &doc),
        ("ExportedTask", &doc["tasks"][0]),
        ("ExportedEvent", &history[0]),
        ("ExportedNotification", &doc["notifications"][0]),
        ("ExportedWebhook", &doc["webhook"]),
    ] {
        assert_eq!(sorted_keys(&schemas[schema]["properties"]), sorted_keys(sample), "{schema} as documented and as exported");
    }

    // bob sees his own data only.
    let (bob_headers, bob) = export_as_of(&stack, "bob", &[bobs["position"].as_str().unwrap().to_owned()]).await?;
    assert_eq!(bob_headers["content-disposition"], "attachment; filename=\"taskstream-export-bob.json\"");
    let bob_tasks: Vec<&str> = bob["tasks"].as_array().unwrap().iter().map(|t| t["title"].as_str().unwrap()).collect();
    assert_eq!(bob_tasks, ["bob's private task"]);
    assert_eq!(bob["history"].as_array().unwrap().len(), 1);
    assert_eq!((bob["notifications"].clone(), bob["webhook"].clone()), (json!([]), Value::Null));
    let bob_text = bob.to_string();
    for alices in ["alice", "renew passport", "water the plants", "file taxes", "cancelled trip", "93.184.216.34"] {
        assert!(!bob_text.contains(alices), "bob's export holds {alices:?}: {bob_text}");
    }

    // No token, or a bad one: 401 problem+json, from the command API itself.
    for token in [None, Some("not-a-jwt")] {
        let mut req = stack.http.get(stack.url(Svc::CommandApi, "/v1/me/export"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        assert_eq!(res.status().as_u16(), 401);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let problem: Value = res.json().await?;
        assert_eq!(problem["status"], 401, "{problem}");
    }
    stack.cleanup().await
}
