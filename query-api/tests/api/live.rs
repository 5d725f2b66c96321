//! Limits of live connections, hit with a real graphql-transport-ws client over a real socket.

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use query_api::ws::LiveLimits;
use query_api::Limits;

use crate::helpers::{spawn_app_with, FakeWatermarks, TestApp};

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn serve(live: LiveLimits) -> (TestApp, String) {
    let app = spawn_app_with(Limits { live, ..Limits::default() }, FakeWatermarks(Some(HashMap::new()))).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/graphql/ws", listener.local_addr().unwrap());
    let router = app.router.clone();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (app, url)
}

async fn connect(url: &str) -> Client {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "graphql-transport-ws".parse().unwrap());
    tokio_tungstenite::connect_async(req).await.expect("connects").0
}

async fn send(c: &mut Client, v: Value) {
    c.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// The next text message, or the close code (0 when closed without one).
async fn next(c: &mut Client) -> Result<Value, u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("an answer within 10 s") {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(frame))) => return Err(frame.map_or(0, |f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            _ => return Err(0),
        }
    }
}

async fn init(c: &mut Client, token: &str) -> Result<Value, u16> {
    send(c, json!({"type": "connection_init", "payload": {"Authorization": token}})).await;
    next(c).await
}

/// Limits small enough to reach in a test. The time allowed for `connection_init` is generous (a
/// client on a loaded box may take a while to send it); the test of that limit shortens it.
fn limits() -> LiveLimits {
    LiveLimits { init_timeout: Duration::from_secs(10), max_subscriptions: 2, max_connections_per_user: 2, max_message_bytes: 4096 }
}

#[tokio::test]
async fn connection_init_must_come_in_time_with_a_valid_token() {
    let (_impatient, url) = serve(LiveLimits { init_timeout: Duration::from_millis(300), ..limits() }).await;
    let mut c = connect(&url).await;
    assert_eq!(next(&mut c).await, Err(4408));
    let (app, url) = serve(limits()).await;
    let mut c = connect(&url).await;
    assert_eq!(init(&mut c, "Bearer nonsense").await, Err(4403));
    let expired = app.tokens.auth().issue("alice", -60);
    let mut c = connect(&url).await;
    assert_eq!(init(&mut c, &format!("Bearer {expired}")).await, Err(4403));
    let mut c = connect(&url).await;
    assert_eq!(init(&mut c, &app.bearer("alice")).await.unwrap()["type"], "connection_ack");
}

#[tokio::test]
async fn subscriptions_connections_and_message_sizes_are_limited() {
    let (app, url) = serve(limits()).await;
    let mut c = connect(&url).await;
    assert_eq!(init(&mut c, &app.bearer("alice")).await.unwrap()["type"], "connection_ack");
    for id in ["1", "2", "3"] {
        send(&mut c, json!({"id": id, "type": "subscribe", "payload": {"query": "subscription { taskChanged { kind } }"}})).await;
    }
    let refused = next(&mut c).await.unwrap();
    assert_eq!((refused["id"].as_str(), refused["type"].as_str()), (Some("3"), Some("error")), "{refused}");
    assert_eq!(refused["payload"][0]["extensions"]["code"], "TOO_MANY_SUBSCRIPTIONS", "{refused}");
    // One more connection of alice is allowed, the third is not; bob is not affected.
    let mut second = connect(&url).await;
    assert_eq!(init(&mut second, &app.bearer("alice")).await.unwrap()["type"], "connection_ack");
    let mut third = connect(&url).await;
    assert_eq!(init(&mut third, &app.bearer("alice")).await, Err(4429));
    let mut bob = connect(&url).await;
    assert_eq!(init(&mut bob, &app.bearer("bob")).await.unwrap()["type"], "connection_ack");
    // A message over the size limit closes the connection.
    send(&mut c, json!({"id": "4", "type": "subscribe", "payload": {"query": format!("subscription {{ taskChanged {{ kind }} }} #{}", "x".repeat(5000))}}))
        .await;
    assert_eq!(next(&mut c).await, Err(1009));
    // Once closed, alice's connection is no longer counted.
    // The server forgets it once its side of the connection has ended, a moment after the close
    // frame: until then a new connection is refused with 4429, then it is acknowledged.
    drop(c);
    let ack = test_support::eventually("alice's closed connection to stop counting", Duration::from_secs(10), || async {
        let mut again = connect(&url).await;
        match init(&mut again, &app.bearer("alice")).await {
            Ok(ack) => Some(ack),
            Err(4429) => None,
            Err(code) => panic!("closed with {code}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(ack["type"], "connection_ack");
}

#[tokio::test]
async fn the_connection_is_closed_with_4403_when_the_token_expires() {
    let (app, url) = serve(limits()).await;
    // Valid for 2 more seconds (the verification allows 5 s of leeway, the connection does not).
    let token = app.tokens.auth().issue("alice", 2);
    let mut c = connect(&url).await;
    assert_eq!(init(&mut c, &format!("Bearer {token}")).await.unwrap()["type"], "connection_ack");
    send(&mut c, json!({"id": "1", "type": "subscribe", "payload": {"query": "subscription { taskChanged { kind } }"}})).await;
    assert_eq!(next(&mut c).await, Err(4403));
}
