//! The WebSocket transport of subscriptions (`graphql-transport-ws`, or the older `graphql-ws`),
//! with the limits a public endpoint needs. async-graphql runs the protocol; this module stands
//! between it and the socket:
//!
//! - `connection_init` must arrive within `init_timeout` (else close 4408), and its token must be
//!   valid (else close 4403, the protocol's Forbidden);
//! - at most `max_connections_per_user` open connections per user (the next is closed with 4429);
//! - at most `max_subscriptions` running subscriptions per connection (a further `subscribe` is
//!   answered with an `error` message, code `TOO_MANY_SUBSCRIPTIONS`, and not started);
//! - a message larger than `max_message_bytes` closes the connection (1009, message too big);
//! - when the token expires the connection is closed with 4403, and nothing is pushed after.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_graphql::http::{WebSocket as GqlWebSocket, WebSocketProtocols, WsMessage};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use base64::Engine as _;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

use domain::UserId;
use platform::auth::JwtAuth;

/// Limits of live connections.
#[derive(Debug, Clone, Copy)]
pub struct LiveLimits {
    pub init_timeout: Duration,
    pub max_subscriptions: usize,
    pub max_connections_per_user: usize,
    pub max_message_bytes: usize,
}

impl Default for LiveLimits {
    fn default() -> Self {
        Self { init_timeout: Duration::from_secs(10), max_subscriptions: 20, max_connections_per_user: 10, max_message_bytes: 64 * 1024 }
    }
}

/// Open connections per user, shared by every connection of the process.
#[derive(Clone, Default)]
pub struct Connections(Arc<Mutex<HashMap<String, usize>>>);

/// One counted connection; uncounted when dropped.
struct Registered {
    connections: Connections,
    user: String,
}

impl Connections {
    fn register(&self, user: &UserId, max: usize) -> Option<Registered> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(user.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Registered { connections: self.clone(), user: user.to_string() })
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut open = self.connections.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.user);
            }
        }
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}

/// The bearer header of a `connection_init` payload: `{"Authorization": "Bearer <token>"}` or
/// `{"token": "<token>"}`.
fn bearer_of(payload: &Value) -> Option<String> {
    payload
        .get("Authorization")
        .or_else(|| payload.get("authorization"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| payload.get("token").and_then(Value::as_str).map(|t| format!("Bearer {t}")))
}

/// `exp` of a token that has been verified already (so its payload is ours).
fn expiry_of(bearer: &str) -> Option<i64> {
    let token = bearer.strip_prefix("Bearer ")?;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?.get("exp")?.as_i64()
}

fn text_of(message: Message) -> Option<Result<String, Message>> {
    match message {
        Message::Text(t) => Some(Ok(t.as_str().to_owned())),
        Message::Binary(b) => Some(Ok(String::from_utf8_lossy(&b).into_owned())),
        Message::Close(_) => Some(Err(Message::Close(None))),
        Message::Ping(_) | Message::Pong(_) => None,
    }
}

/// Serves one upgraded connection until either side ends it.
pub async fn serve<E: async_graphql::Executor>(mut socket: WebSocket, schema: E, auth: JwtAuth, limits: LiveLimits, connections: Connections) {
    let protocol = match socket.protocol().and_then(|p| p.to_str().ok()) {
        Some("graphql-ws") => WebSocketProtocols::SubscriptionsTransportWS,
        _ => WebSocketProtocols::GraphQLWS,
    };
    // connection_init, within the timeout.
    let init = tokio::time::timeout(limits.init_timeout, async {
        loop {
            match socket.recv().await {
                Some(Ok(m)) => match text_of(m) {
                    Some(Ok(text)) => return Some(text),
                    Some(Err(_)) => return None,
                    None => continue,
                },
                _ => return None,
            }
        }
    })
    .await;
    let init = match init {
        Err(_) => return close(&mut socket, 4408, "Connection initialisation timeout").await,
        Ok(None) => return,
        Ok(Some(text)) if text.len() > limits.max_message_bytes => return close(&mut socket, 1009, "message too big").await,
        Ok(Some(text)) => text,
    };
    let message: Value = serde_json::from_str(&init).unwrap_or(Value::Null);
    if message["type"] != "connection_init" {
        return close(&mut socket, 4401, "Unauthorized").await;
    }
    let bearer = bearer_of(&message["payload"]);
    let user = match auth.authenticate(bearer.as_deref()) {
        Ok(user) => user,
        Err(e) => return close(&mut socket, 4403, &format!("Forbidden: {e}")).await,
    };
    let Some(_registered) = connections.register(&user, limits.max_connections_per_user) else {
        return close(&mut socket, 4429, "too many connections for this user").await;
    };
    let expires = expiry_of(bearer.as_deref().unwrap_or_default()).unwrap_or(i64::MAX);
    let left = Duration::from_secs(u64::try_from(expires.saturating_sub(chrono::Utc::now().timestamp())).unwrap_or(0));
    let deadline = Instant::now().checked_add(left).unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));

    let (to_graphql, incoming) = futures::channel::mpsc::unbounded::<String>();
    let _ = to_graphql.unbounded_send(init);
    let mut data = async_graphql::Data::default();
    data.insert(user);
    let mut outgoing = GqlWebSocket::new(schema, incoming, protocol).on_connection_init(move |_| async move { Ok(data) });
    let mut running: HashSet<String> = HashSet::new();
    let expiry = tokio::time::sleep_until(deadline);
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            biased;
            _ = &mut expiry => return close(&mut socket, 4403, "Forbidden: the token has expired").await,
            received = socket.recv() => {
                let Some(Ok(m)) = received else { return };
                let text = match text_of(m) {
                    Some(Ok(text)) => text,
                    Some(Err(_)) => return,
                    None => continue,
                };
                if text.len() > limits.max_message_bytes {
                    return close(&mut socket, 1009, "message too big").await;
                }
                let m: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let id = m["id"].as_str().map(str::to_owned);
                match (m["type"].as_str(), id) {
                    (Some("subscribe" | "start"), Some(id)) if !running.contains(&id) && running.len() >= limits.max_subscriptions => {
                        let error = json!({"id": id, "type": "error", "payload": [{
                            "message": format!("at most {} subscriptions may run on one connection", limits.max_subscriptions),
                            "extensions": {"code": "TOO_MANY_SUBSCRIPTIONS"}}]});
                        if socket.send(Message::Text(error.to_string().into())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    (Some("subscribe" | "start"), Some(id)) => { running.insert(id); }
                    (Some("complete" | "stop"), Some(id)) => { running.remove(&id); }
                    _ => {}
                }
                if to_graphql.unbounded_send(text).is_err() {
                    return;
                }
            }
            out = outgoing.next() => match out {
                Some(WsMessage::Text(text)) => {
                    if Instant::now() >= deadline {
                        return close(&mut socket, 4403, "Forbidden: the token has expired").await;
                    }
                    let m: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    if let (Some("complete" | "error"), Some(id)) = (m["type"].as_str(), m["id"].as_str()) {
                        running.remove(id);
                    }
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Some(WsMessage::Close(code, reason)) => return close(&mut socket, code, &reason).await,
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_is_read_from_a_token() {
        let auth = JwtAuth::new(&platform::secret::Secret::new("s".repeat(32)));
        let token = auth.issue("alice", 60);
        let exp = expiry_of(&format!("Bearer {token}")).unwrap();
        assert!((exp - chrono::Utc::now().timestamp() - 60).abs() <= 2, "{exp}");
        assert_eq!(bearer_of(&json!({"token": "t"})), Some("Bearer t".to_owned()));
    }
}
