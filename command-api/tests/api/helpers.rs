//! The command API's router over an in-memory event log (a fake of the Kafka adapter), driven with
//! `oneshot`. The end-to-end tests cover the same paths against the real broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use command_api::idempotency::IdempotencyCache;
use command_api::log::{EventLog, LogError, Offsets};
use command_api::AppState;
use platform::auth::JwtAuth;
use platform::codec::{self, DecodeError, EncodedEvent, EventEnvelope};
use platform::position::Position;
use platform::secret::Secret;

pub struct Stored {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: rdkafka::message::OwnedHeaders,
    pub position: Position,
}

#[derive(Clone, Default)]
pub struct MemoryLog {
    pub records: Arc<Mutex<Vec<Stored>>>,
    pub down: Arc<AtomicBool>,
}

impl MemoryLog {
    pub fn envelopes(&self) -> Vec<EventEnvelope> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .map(|r| codec::decode(Some(r.key.as_bytes()), Some(&r.headers), Some(&r.payload)).unwrap())
            .collect()
    }
    pub fn len(&self) -> usize {
        self.records.lock().unwrap().len()
    }
    fn check(&self) -> Result<(), LogError> {
        if self.down.load(Ordering::SeqCst) {
            Err(LogError::Unavailable("broker down (test)".into()))
        } else {
            Ok(())
        }
    }
}

impl EventLog for MemoryLog {
    async fn connect(&mut self) -> Result<(), LogError> {
        self.check()
    }

    async fn append(&mut self, records: Vec<EncodedEvent>) -> Result<Vec<Position>, LogError> {
        self.check()?;
        let mut all = self.records.lock().unwrap();
        let mut out = Vec::new();
        for r in records {
            let partition = (r.key.bytes().map(u32::from).sum::<u32>() % 12) as i32;
            let offset = all.iter().filter(|s| s.position.partition == partition).count() as i64;
            let position = Position { partition, offset };
            out.push(position);
            all.push(Stored { key: r.key, payload: r.payload, headers: r.headers, position });
        }
        Ok(out)
    }

    async fn read_from(
        &mut self,
        from: Offsets,
        mut apply: Box<dyn FnMut(Position, Result<EventEnvelope, DecodeError>) + Send>,
    ) -> Result<Offsets, LogError> {
        self.check()?;
        let all = self.records.lock().unwrap();
        let mut next = from;
        for r in all.iter() {
            let n = next.entry(r.position.partition).or_insert(0);
            if r.position.offset >= *n {
                *n = r.position.offset + 1;
                apply(r.position, codec::decode(Some(r.key.as_bytes()), Some(&r.headers), Some(&r.payload)));
            }
        }
        Ok(next)
    }
}

pub struct TestApp {
    pub router: axum::Router,
    pub log: MemoryLog,
    pub auth: JwtAuth,
}

pub async fn spawn_app_over(log: MemoryLog) -> TestApp {
    let auth = JwtAuth::new(&Secret::new("test-secret"));
    let state = AppState::new(log.clone(), auth.clone(), 100, IdempotencyCache::new(1000, Duration::from_secs(60)));
    let router = command_api::router(state, Duration::from_secs(10));
    let app = TestApp { router, log, auth };
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "not ready");
        tokio::task::yield_now().await;
    }
    app
}

pub async fn spawn_app() -> TestApp {
    spawn_app_over(MemoryLog::default()).await
}

pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl TestApp {
    pub fn token(&self, user: &str) -> String {
        self.auth.issue(user, 60)
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        let res = self.router.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends a request as `user` (None: without a token) with a JSON body.
    pub async fn send(&self, user: Option<&str>, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(u) = user {
            req = req.header("authorization", format!("Bearer {}", self.token(u)));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_else(Body::empty);
        self.raw(req.body(body).unwrap()).await
    }

    pub async fn raw(&self, req: Request<Body>) -> Answer {
        let res = self.router.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer { status, headers, body }
    }
}
