//! Test harness for the command API's contract tests: an in-memory fake of the event log, an app
//! built with `command_api::router` and driven with `oneshot`, and assertions on problem+json.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use rdkafka::message::{Headers, OwnedHeaders};
use serde_json::Value;
use tower::ServiceExt;

use command_api::idempotency::IdempotencyCache;
use command_api::log::{Apply, EventLog, LogError, Undecodable};
use command_api::writer::WriterConfig;
use command_api::AppState;
use domain::current::TaskView;
use domain::TaskEvent;
use platform::codec::{self, DecodeError, EncodedEvent, EncodedState, Envelope};
use platform::keys::{Keks, KeyRing};
use platform::position::Position;
use test_support::{eventually, Tokens};

pub const PARTITIONS: i32 = 12;

/// The data keys every fake log of this test binary shares (in Kafka: the keys topic).
pub static KEYS: std::sync::LazyLock<Arc<KeyRing>> = std::sync::LazyLock::new(|| KeyRing::in_memory(Keks::dev()));
pub const ALICE: &str = "alice";
pub const BOB: &str = "bob";

/// One record as the fake log holds it (what Kafka would hold: key, headers, value, position).
#[derive(Clone)]
pub struct LogRecord {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
    pub position: Position,
}

impl LogRecord {
    /// The record's headers as a map (a header set twice keeps its last value, as the codec reads it).
    pub fn header_map(&self) -> BTreeMap<String, String> {
        self.headers.iter().map(|h| (h.key.to_owned(), h.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())).collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.header_map().remove(name)
    }

    pub fn decode(&self) -> Result<Envelope<TaskEvent>, DecodeError> {
        codec::decode(Some(self.key.as_bytes()), Some(&self.headers), Some(&self.payload), &**KEYS)
    }
}

/// One record of the fake `task-updates` topic (`payload` `None`: a tombstone).
#[derive(Clone)]
pub struct UpdateRecord {
    pub key: String,
    pub payload: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
    pub position: Position,
}

impl UpdateRecord {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().filter(|h| h.key == name).last().map(|h| h.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default())
    }

    /// The task's state, `None` for a tombstone; panics on a value that is not a `TaskView`.
    pub fn view(&self) -> Option<TaskView> {
        let mut value: Value = serde_json::from_slice(self.payload.as_ref()?).expect("a task-updates value is JSON");
        if let Some(key) = self.header(platform::keys::DATA_KEY_HEADER) {
            let key = platform::keys::DataKeys::data_key(&**KEYS, &key.parse().expect("ce_datakey is a UUID")).expect("the data key is known");
            key.open_fields(&mut value, domain::personal::personal_fields(TaskView::TYPE)).expect("the sealed fields open");
        }
        Some(serde_json::from_value(value).expect("a task-updates value is a TaskView"))
    }
}

#[derive(Default)]
struct LogData {
    records: Vec<LogRecord>,
    /// The `task-updates` topic, written in the same appends as `records`.
    updates: Vec<UpdateRecord>,
    updates_next_offset: BTreeMap<i32, i64>,
    next_offset: BTreeMap<i32, i64>,
    snapshots: BTreeMap<i32, Vec<u8>>,
    /// Partitions whose next successful append loses its commit markers.
    lose_markers: std::collections::BTreeSet<i32>,
    /// Per partition, the first offset of a transaction the broker left open (its commit markers
    /// were lost): the next append joins it, and takes it along when it commits or fails.
    open: BTreeMap<i32, i64>,
}

/// In-memory stand-in for the Kafka topic. Clones share the same records, so a test can inspect
/// them and a "restarted" app can be built over them. `set_down(true)` makes `connect`, `append`
/// and `read_from` fail with `LogError::Unavailable`, like a broker that is gone.
#[derive(Clone, Default)]
pub struct FakeLog {
    /// The partition of the writer this clone serves (`EventLog::bind`).
    partition: Option<i32>,
    data: Arc<Mutex<LogData>>,
    down: Arc<AtomicBool>,
    failed_appends: Arc<AtomicUsize>,
    /// Milliseconds every append waits before it is durable (a slow broker).
    append_delay_ms: Arc<AtomicUsize>,
    /// Appends in flight now, and the most seen at once (over every partition's writer).
    appends_in_flight: Arc<AtomicUsize>,
    most_appends_in_flight: Arc<AtomicUsize>,
}

/// The partition Kafka (librdkafka's default partitioner) puts a key in.
pub fn partition_for(key: &str) -> i32 {
    command_api::partition::partition_of(key, PARTITIONS)
}

impl FakeLog {
    fn lock(&self) -> MutexGuard<'_, LogData> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn records(&self) -> Vec<LogRecord> {
        self.lock().records.clone()
    }

    pub fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Every record of the fake `task-updates`, in the order appended.
    pub fn updates(&self) -> Vec<UpdateRecord> {
        self.lock().updates.clone()
    }

    /// The `task-updates` records of one task, in order.
    pub fn updates_of(&self, task_id: &str) -> Vec<UpdateRecord> {
        self.updates().into_iter().filter(|r| r.key == task_id).collect()
    }

    /// Every record decoded; panics on a record the codec cannot read (the log must never hold one).
    pub fn envelopes(&self) -> Vec<Envelope<TaskEvent>> {
        self.records().iter().map(|r| r.decode().expect("every appended record decodes")).collect()
    }

    /// The records whose key is `task_id`, in log order.
    pub fn records_of(&self, task_id: &str) -> Vec<LogRecord> {
        self.records().into_iter().filter(|r| r.key == task_id).collect()
    }

    /// Appends a record as it is (e.g. one the codec cannot read) at the end of its key's partition.
    pub fn push_raw(&self, key: &str, payload: &[u8], headers: OwnedHeaders) -> Position {
        let mut data = self.lock();
        let partition = partition_for(key);
        let next = data.next_offset.entry(partition).or_insert(0);
        let position = Position { partition, offset: *next };
        *next += 1;
        data.records.push(LogRecord { key: key.to_owned(), payload: payload.to_vec(), headers, position });
        position
    }

    /// The snapshots recorded, as written.
    pub fn snapshot_bytes(&self) -> Vec<Vec<u8>> {
        self.lock().snapshots.values().cloned().collect()
    }

    /// Partitions with a snapshot recorded.
    pub fn snapshot_partitions(&self) -> Vec<i32> {
        self.lock().snapshots.keys().copied().collect()
    }

    /// Forgets every record a snapshot covers (as if the log's start were compacted away), so
    /// only the snapshots can restore them; returns how many were dropped.
    pub fn drop_records_covered_by_snapshots(&self) -> usize {
        let mut data = self.lock();
        let covered: BTreeMap<i32, i64> =
            data.snapshots.iter().map(|(p, s)| (*p, serde_json::from_slice::<Value>(s).ok().and_then(|v| v["next_offset"].as_i64()).unwrap_or(0))).collect();
        let before = data.records.len();
        data.records.retain(|r| r.position.offset >= covered.get(&r.position.partition).copied().unwrap_or(0));
        before - data.records.len()
    }

    /// Makes every append take `ms` milliseconds (0: at once).
    pub fn set_append_delay_ms(&self, ms: usize) {
        self.append_delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The appends (transactions) in flight now.
    pub fn appends_in_flight(&self) -> usize {
        self.appends_in_flight.load(Ordering::SeqCst)
    }

    /// The most appends (transactions) that were in flight at the same time.
    pub fn most_appends_in_flight(&self) -> usize {
        self.most_appends_in_flight.load(Ordering::SeqCst)
    }

    /// What a broker that restarts right after a commit can do (its transaction coordinator skips the
    /// commit markers of partitions whose leader it cannot find while it loads, seen with Kafka 4.4
    /// in `./dev chaos`): the next successful append of `partition` stays open in the log although
    /// its commit is acknowledged. The partition's next append joins it: if that one fails, the
    /// abort takes the acknowledged records along; a writer that reconnects and reads the
    /// partition closes it as committed (its barrier).
    pub fn lose_next_commit_markers(&self, partition: i32) {
        self.lock().lose_markers.insert(partition);
    }

    pub fn failed_appends(&self) -> usize {
        self.failed_appends.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), LogError> {
        if self.down.load(Ordering::SeqCst) {
            Err(LogError::Unavailable("broker unreachable (test fake is down)".into()))
        } else {
            Ok(())
        }
    }
}

impl EventLog for FakeLog {
    fn bind(&mut self, partition: i32) {
        self.partition = Some(partition);
    }

    async fn write_snapshot(&mut self, snapshot: Vec<u8>) -> Result<(), LogError> {
        self.check()?;
        let p = self.partition.expect("bound to a partition");
        self.lock().snapshots.insert(p, snapshot);
        Ok(())
    }

    async fn read_snapshot(&mut self) -> Result<Option<Vec<u8>>, LogError> {
        self.check()?;
        let p = self.partition.expect("bound to a partition");
        Ok(self.lock().snapshots.get(&p).cloned())
    }

    async fn connect(&mut self) -> Result<(), LogError> {
        self.check()
    }

    async fn settle(&mut self) -> Result<(), LogError> {
        let p = self.partition.expect("bound to a partition");
        match self.lock().open.get(&p) {
            Some(from) => Err(LogError::Unavailable(format!("the transaction from offset {from} is still open (test fake)"))),
            None => Ok(()),
        }
    }

    async fn append(&mut self, records: Vec<EncodedEvent>, states: Vec<EncodedState>) -> Result<Vec<Position>, LogError> {
        let now = self.appends_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_appends_in_flight.fetch_max(now, Ordering::SeqCst);
        let delay = self.append_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay as u64)).await;
        }
        self.appends_in_flight.fetch_sub(1, Ordering::SeqCst);
        let bound = self.partition.expect("bound to a partition");
        if let Err(e) = self.check() {
            self.failed_appends.fetch_add(1, Ordering::SeqCst);
            // The abort covers the transaction the broker left open, which this one joined.
            let mut data = self.lock();
            if let Some(from) = data.open.remove(&bound) {
                data.records.retain(|r| r.position.partition != bound || r.position.offset < from);
                data.next_offset.insert(bound, from);
            }
            return Err(e);
        }
        // All or nothing, like the Kafka transaction it stands in for.
        let mut data = self.lock();
        let first = data.next_offset.get(&bound).copied().unwrap_or(0);
        if data.lose_markers.remove(&bound) {
            data.open.entry(bound).or_insert(first);
        } else {
            data.open.remove(&bound);
        }
        let mut positions = Vec::with_capacity(records.len());
        for EncodedEvent { key, payload, headers, .. } in records {
            let partition = partition_for(&key);
            let next = data.next_offset.entry(partition).or_insert(0);
            let position = Position { partition, offset: *next };
            *next += 1;
            positions.push(position);
            data.records.push(LogRecord { key, payload, headers, position });
        }
        for EncodedState { key, payload, headers } in states {
            let partition = partition_for(&key);
            let next = data.updates_next_offset.entry(partition).or_insert(0);
            let position = Position { partition, offset: *next };
            *next += 1;
            data.updates.push(UpdateRecord { key, payload, headers, position });
        }
        Ok(positions)
    }

    /// Hands every record at or after `from` in its partition to `apply` (the writer keeps those of
    /// its own partition).
    async fn read_from(&mut self, from: i64, mut apply: Apply) -> Result<i64, LogError> {
        self.check()?;
        let mut data = self.lock();
        // A transaction left open is closed as committed (the writer's barrier, after fencing).
        if let Some(p) = self.partition {
            data.open.remove(&p);
        }
        for r in &data.records {
            if Some(r.position.partition) == self.partition && r.position.offset >= from {
                let rec = codec::decode_record(Some(r.key.as_bytes()), Some(&r.headers), Some(&r.payload), &**KEYS)
                    .map_err(|error| Undecodable { key: Some(r.key.clone()), error });
                apply(r.position, rec);
            }
        }
        Ok(from)
    }
}

pub struct TestApp {
    pub router: axum::Router,
    pub log: FakeLog,
    pub tokens: Tokens,
}

/// An app over `log` without waiting for it to become ready.
pub fn build_app(log: FakeLog) -> TestApp {
    build_app_with(log, WriterConfig { max_batch: 100, ..WriterConfig::default() })
}

/// An app over `log` whose partition writers run with `config` (snapshots, released records).
pub fn build_app_with(log: FakeLog, config: WriterConfig) -> TestApp {
    let config = WriterConfig { keys: KEYS.clone(), ..config };
    let tokens = Tokens::default();
    let state = AppState::with_config(log.clone(), tokens.auth(), config, IdempotencyCache::new(1000, Duration::from_secs(60)));
    TestApp { router: command_api::router(state, Duration::from_secs(10)), log, tokens }
}

/// An app over `log` (e.g. the records of a previous app: a restart), once `/readyz` says 200.
pub async fn spawn_app_over(log: FakeLog) -> TestApp {
    let app = build_app(log);
    app.wait_ready().await;
    app
}

pub async fn spawn_app() -> TestApp {
    spawn_app_over(FakeLog::default()).await
}

/// What the router answered.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn task_id(&self) -> String {
        self.body["task_id"].as_str().unwrap_or_else(|| panic!("no task_id in {}", self.text)).to_owned()
    }

    pub fn version(&self) -> u64 {
        self.body["version"].as_u64().unwrap_or_else(|| panic!("no version in {}", self.text))
    }
}

impl TestApp {
    pub fn token(&self, user: &str) -> String {
        self.tokens.user(user)
    }

    pub async fn wait_ready(&self) {
        eventually("GET /readyz to answer 200", Duration::from_secs(10), || async { (self.get("/readyz").await.status == StatusCode::OK).then_some(()) })
            .await
            .unwrap();
    }

    /// Sends `command` until it is answered 200 while the writer recovers (503 meanwhile, as a client
    /// retries after `Retry-After`); any other status fails the test.
    pub async fn until_ok<F, Fut>(&self, what: &str, command: F) -> Resp
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Resp>,
    {
        eventually(what, Duration::from_secs(20), || async {
            let r = command().await;
            match r.status {
                StatusCode::OK => Some(r),
                StatusCode::SERVICE_UNAVAILABLE => None,
                other => panic!("unexpected {other} while recovering: {}", r.text),
            }
        })
        .await
        .unwrap()
    }

    pub async fn raw(&self, req: Request<Body>) -> Resp {
        let res = self.router.clone().oneshot(req).await.expect("the router is infallible");
        let status = res.status();
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Resp { status, headers, text, body }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.raw(Request::get(path).body(Body::empty()).unwrap()).await
    }

    /// `method path` as `user` (None: no Authorization header), with an optional JSON body and
    /// extra headers.
    pub async fn send(&self, user: Option<&str>, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(u) = user {
            req = req.header("authorization", format!("Bearer {}", self.token(u)));
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.raw(req.body(body).unwrap()).await
    }

    /// A request as `user` with a raw body and content type (for malformed input).
    pub async fn send_raw(&self, user: &str, method: &str, path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Resp {
        let mut req = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", self.token(user)));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        self.raw(req.body(body.into()).unwrap()).await
    }

    pub async fn create(&self, user: &str, body: Value) -> Resp {
        let r = self.send(Some(user), "POST", "/v1/tasks", Some(&body), &[]).await;
        assert_eq!(r.status, StatusCode::CREATED, "create {body}: {}", r.text);
        r
    }

    pub async fn create_task(&self, user: &str, title: &str) -> String {
        self.create(user, serde_json::json!({ "title": title })).await.task_id()
    }

    pub async fn patch(&self, user: &str, id: &str, body: Value, headers: &[(&str, &str)]) -> Resp {
        self.send(Some(user), "PATCH", &format!("/v1/tasks/{id}"), Some(&body), headers).await
    }

    pub async fn complete(&self, user: &str, id: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Some(user), "POST", &format!("/v1/tasks/{id}/complete"), None, headers).await
    }

    pub async fn reopen(&self, user: &str, id: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Some(user), "POST", &format!("/v1/tasks/{id}/reopen"), None, headers).await
    }

    pub async fn delete(&self, user: &str, id: &str, headers: &[(&str, &str)]) -> Resp {
        self.send(Some(user), "DELETE", &format!("/v1/tasks/{id}"), None, headers).await
    }
}

/// Asserts an RFC 9457 problem answer with `status` and returns its body. A 422 must carry a
/// non-empty `errors` list of `{field, message}`; other statuses must not carry one.
#[track_caller]
pub fn assert_problem(r: &Resp, status: u16) -> &Value {
    assert_eq!(r.status.as_u16(), status, "unexpected status; body: {}", r.text);
    assert_eq!(r.header("content-type"), Some("application/problem+json"), "content type of {}", r.text);
    let b = &r.body;
    assert!(b.is_object(), "problem body is not a JSON object: {}", r.text);
    for f in ["type", "title", "detail"] {
        assert!(b[f].as_str().is_some_and(|s| !s.is_empty()), "`{f}` missing or empty in {}", r.text);
    }
    assert_eq!(b["status"].as_u64(), Some(u64::from(status)), "`status` in {}", r.text);
    assert_eq!(b["title"].as_str(), StatusCode::from_u16(status).unwrap().canonical_reason(), "`title` in {}", r.text);
    if status == 422 {
        let errors = b["errors"].as_array().unwrap_or_else(|| panic!("422 without `errors`: {}", r.text));
        assert!(!errors.is_empty(), "empty `errors`: {}", r.text);
        for e in errors {
            assert!(e["field"].is_string(), "`field` missing in {e}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "`message` missing in {e}");
        }
    } else {
        assert!(b.get("errors").is_none(), "`errors` on a {status}: {}", r.text);
    }
    b
}

/// Asserts a 422 whose `errors` name `field`.
#[track_caller]
pub fn assert_field_error(r: &Resp, field: &str) {
    let b = assert_problem(r, 422);
    let fields: Vec<&str> = b["errors"].as_array().unwrap().iter().filter_map(|e| e["field"].as_str()).collect();
    assert!(fields.contains(&field), "expected an error on `{field}`, got {fields:?}: {}", r.text);
}

/// The `type` of a problem answer (empty when there is none).
pub fn problem_type(r: &Resp) -> &str {
    r.body["type"].as_str().unwrap_or_default()
}
