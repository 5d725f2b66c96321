//! Notifications, webhooks and subscriptions end to end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;

use e2e::{Stack, StackOptions, Svc};
use test_support::eventually;

/// A request the webhook receiver got: its headers and body.
type Request = (HeaderMap, Vec<u8>);

#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<Request>>>,
    failures_left: Arc<Mutex<u32>>,
}

/// A local webhook receiver: `/hook` fails the first `failures` requests with 500, `/hang` never answers.
async fn start_receiver(failures: u32) -> anyhow::Result<(String, Receiver)> {
    let r = Receiver { failures_left: Arc::new(Mutex::new(failures)), ..Default::default() };
    let state = r.clone();
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    state.requests.lock().unwrap().push((headers, body.to_vec()));
                    let mut left = state.failures_left.lock().unwrap();
                    if *left > 0 {
                        *left -= 1;
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        )
        .route("/hang", axum::routing::post(std::future::pending::<StatusCode>));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), r))
}

fn verify_signature(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_owned()),
            Some(("v1", x)) => v1 = Some(x.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&hex::decode(v1).unwrap_or_default()).is_ok()
}

const NOTIFICATIONS: &str = "query($unread: Boolean) { notifications(unreadOnly: $unread) { edges { node { id taskId kind message readAt
  webhookDeliveries { status attempts { attempt statusCode error } } } } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reminder_notifies_in_app_and_through_a_signed_retried_webhook() -> anyhow::Result<()> {
    let stack = Stack::start_with(StackOptions { extra_env: vec![("WEBHOOK_ALLOW_PRIVATE".into(), "true".into())], ..Default::default() }).await?;
    let (base, receiver) = start_receiver(2).await?;
    let (s, _, hook) = stack.command("alice", Method::PUT, "/v1/webhook", Some(json!({"url": format!("{base}/hook")})), &[]).await?;
    assert_eq!(s, 200, "{hook}");
    let secret = hook["secret"].as_str().expect("a generated secret is returned").to_owned();
    assert!(hook["webhook_id"].is_string());
    // Bob's receiver hangs: it must not hold up Alice's delivery.
    let (s, _, _) =
        stack.command("bob", Method::PUT, "/v1/webhook", Some(json!({"url": format!("{base}/hang"), "secret": "bob-secret-0123456789"})), &[]).await?;
    assert_eq!(s, 200);
    let due = Utc::now() + chrono::Duration::seconds(3);
    let task = stack.create("alice", json!({"title": "renew passport", "due_at": due, "remind_before": "PT2S"})).await?;
    stack.create("bob", json!({"title": "bob's", "due_at": due, "remind_before": "PT2S"})).await?;
    let task_id = task["task_id"].as_str().unwrap().to_owned();

    // In-app: one notification.
    let notification = eventually("the notification", Duration::from_secs(30), || async {
        let d = stack.query("alice", NOTIFICATIONS, json!({}), None).await.ok()?;
        d["notifications"]["edges"].as_array().filter(|e| e.len() == 1).map(|e| e[0]["node"].clone())
    })
    .await?;
    assert_eq!((notification["taskId"].as_str(), notification["kind"].as_str()), (Some(task_id.as_str()), Some("reminder")));
    assert!(notification["message"].as_str().unwrap().contains("renew passport"));
    assert!(notification["readAt"].is_null());
    let nid = notification["id"].as_str().unwrap().to_owned();

    // Webhook: two 500s, then delivered; every attempt recorded; signed with the secret.
    let delivery = eventually("the webhook delivery", Duration::from_secs(60), || async {
        let d = stack.query("alice", NOTIFICATIONS, json!({}), None).await.ok()?;
        let del = d["notifications"]["edges"][0]["node"]["webhookDeliveries"][0].clone();
        (del["status"] == "delivered").then_some(del)
    })
    .await?;
    let codes: Vec<i64> = delivery["attempts"].as_array().unwrap().iter().map(|a| a["statusCode"].as_i64().unwrap()).collect();
    assert_eq!(codes, vec![500, 500, 204]);
    let requests = receiver.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3, "one request per attempt");
    for (headers, body) in &requests {
        let sig = headers.get("taskstream-signature").unwrap().to_str().unwrap();
        assert!(verify_signature(&secret, sig, body), "signature must verify");
        assert!(!verify_signature("wrong-secret-000000", sig, body));
        let payload: Value = serde_json::from_slice(body)?;
        assert_eq!(payload["notification"]["id"], nid.as_str());
        assert_eq!(payload["type"], "notification.created");
    }
    // Bob's hanging receiver was still being tried while Alice's delivery went through.
    let bob = stack.query("bob", NOTIFICATIONS, json!({}), None).await?;
    let bob_status = bob["notifications"]["edges"][0]["node"]["webhookDeliveries"][0]["status"].clone();
    assert_eq!(bob_status, "pending", "{bob}");

    // Mark read: a command; visible with the consistency token; twice is a conflict; not Bob's.
    let (s, _, read) = stack.command("alice", Method::POST, &format!("/v1/notifications/{nid}/read"), None, &[]).await?;
    assert_eq!((s, read["notification_id"].as_str()), (200, Some(nid.as_str())), "{read}");
    let d = stack.query("alice", NOTIFICATIONS, json!({}), read["position"].as_str()).await?;
    assert!(d["notifications"]["edges"][0]["node"]["readAt"].is_string());
    let unread = stack.query("alice", NOTIFICATIONS, json!({"unread": true}), read["position"].as_str()).await?;
    assert_eq!(unread["notifications"]["edges"], json!([]));
    assert_eq!(stack.command("alice", Method::POST, &format!("/v1/notifications/{nid}/read"), None, &[]).await?.0, 409);
    assert_eq!(stack.command("bob", Method::POST, &format!("/v1/notifications/{nid}/read"), None, &[]).await?.0, 404);
    // Removing the webhook is a command too.
    assert_eq!(stack.command("alice", Method::DELETE, "/v1/webhook", None, &[]).await?.0, 200);
    assert_eq!(stack.command("alice", Method::DELETE, "/v1/webhook", None, &[]).await?.0, 404);
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_are_checked_against_ssrf() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    for url in ["http://127.0.0.1:9/x", "http://localhost/x", "http://169.254.169.254/latest", "http://10.0.0.1/", "ftp://example.com/", "not a url"] {
        let (s, _, body) = stack.command("alice", Method::PUT, "/v1/webhook", Some(json!({"url": url})), &[]).await?;
        assert_eq!(s, 422, "{url}: {body}");
        assert_eq!(body["errors"][0]["field"], "url");
    }
    let (s, _, _) = stack.command("alice", Method::PUT, "/v1/webhook", Some(json!({"url": "https://93.184.216.34/hook", "secret": "short"})), &[]).await?;
    assert_eq!(s, 422);
    stack.cleanup().await
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn subscribe(stack: &Stack, user: &str, query: &str) -> anyhow::Result<Ws> {
    let url = stack.url(Svc::QueryApi, "/graphql/ws").replace("http://", "ws://");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let init = json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {}", stack.token(user))}});
    ws.send(Message::Text(init.to_string().into())).await?;
    let ack = next_json(&mut ws).await?;
    anyhow::ensure!(ack["type"] == "connection_ack", "expected connection_ack, got {ack}");
    ws.send(Message::Text(json!({"id": "1", "type": "subscribe", "payload": {"query": query}}).to_string().into())).await?;
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next()).await?.ok_or_else(|| anyhow::anyhow!("closed"))??;
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t)?;
                if v["type"] == "ping" {
                    ws.send(Message::Text(json!({"type": "pong"}).to_string().into())).await?;
                    continue;
                }
                return Ok(v);
            }
            Message::Close(c) => anyhow::bail!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// The next pushed change that is not about a probe task.
async fn next_change(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        let m = next_json(ws).await?;
        if m["payload"]["data"]["taskChanged"]["task"]["title"] != "probe" {
            return Ok(m);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_push_committed_changes_to_their_owner_only() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let q = "subscription { taskChanged { kind task { id title version } } }";
    let mut alice = subscribe(&stack, "alice", q).await?;
    let mut bob = subscribe(&stack, "bob", q).await?;
    // The server registers a subscription asynchronously: send probes until one arrives for each.
    for (user, ws) in [("alice", &mut alice), ("bob", &mut bob)] {
        let mut arrived = false;
        for _ in 0..20 {
            let probe = stack.create(user, json!({"title": "probe"})).await?;
            if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(1), next_json(ws)).await {
                assert_eq!(m["payload"]["data"]["taskChanged"]["kind"], "created");
                assert_eq!(m["payload"]["data"]["taskChanged"]["task"]["title"], "probe");
                let _ = probe;
                arrived = true;
                break;
            }
        }
        anyhow::ensure!(arrived, "the subscription of {user} never delivered");
    }

    let bobs = stack.create("bob", json!({"title": "bob's task"})).await?;
    let a2 = stack.create("alice", json!({"title": "alice's task"})).await?;
    let id = a2["task_id"].as_str().unwrap().to_owned();
    let (s, _, done) = stack.command("alice", Method::POST, &format!("/v1/tasks/{id}/complete"), None, &[]).await?;
    assert_eq!(s, 200);
    // Alice sees her own two changes, in order, and never Bob's (late probes are skipped).
    let m1 = next_change(&mut alice).await?;
    let m2 = next_change(&mut alice).await?;
    assert_eq!(m1["payload"]["data"]["taskChanged"]["task"]["id"], id.as_str(), "{m1}");
    assert_eq!(m2["payload"]["data"]["taskChanged"]["kind"], "completed", "{m2}");
    assert_eq!(m2["payload"]["data"]["taskChanged"]["task"]["version"], done["version"]);
    // Pushed after commit: a re-query right away sees it.
    let t = stack.query("alice", "query($id: ID!) { task(id: $id) { version } }", json!({"id": id}), None).await?;
    assert_eq!(t["task"]["version"], 2);
    // Bob sees only his.
    let b1 = next_change(&mut bob).await?;
    assert_eq!(b1["payload"]["data"]["taskChanged"]["task"]["id"], bobs["task_id"], "{b1}");
    // A deleted task is announced with task = null.
    let (s, _, _) = stack.command("alice", Method::DELETE, &format!("/v1/tasks/{id}"), None, &[]).await?;
    assert_eq!(s, 200);
    let m3 = next_change(&mut alice).await?;
    assert_eq!(m3["payload"]["data"]["taskChanged"], json!({"kind": "deleted", "task": null}));
    stack.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_need_a_valid_token() -> anyhow::Result<()> {
    let stack = Stack::start().await?;
    let url = stack.url(Svc::QueryApi, "/graphql/ws").replace("http://", "ws://");
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    ws.send(Message::Text(json!({"type": "connection_init", "payload": {"Authorization": "Bearer nope"}}).to_string().into())).await?;
    let err = next_json(&mut ws).await;
    assert!(err.is_err() || err.as_ref().is_ok_and(|v| v["type"] != "connection_ack"), "{err:?}");
    stack.cleanup().await
}
