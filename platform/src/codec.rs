//! The event codec: a domain event plus its metadata <-> a Kafka record in CloudEvents 1.0 binary
//! content mode (attributes as `ce_*` headers, the event data as the value, key = the stream id:
//! the task id, or the user id for user-level events). One encoder and one decoder for every aggregate.
//!
//! Personal fields (`domain::personal`) are sealed on the way in with the user's data key, named by
//! the `ce_datakey` header, and opened on the way out (`keys`); a record sealed with a destroyed key
//! decodes to [`DecodeError::Erased`]: its user was erased.

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use uuid::Uuid;

use domain::personal::personal_fields;
use domain::{DomainEvent, EnvelopeError, UserId};

use crate::keys::{DataKey, DataKeys, KeyError, DATA_KEY_HEADER};
// The envelope types, with the codec that writes and reads them.
pub use domain::{Envelope, IdempotencyTag, Metadata, Record};

/// `ce_source` of events appended by the command API.
pub const SOURCE: &str = "/taskstream/command-api";
pub const CONTENT_TYPE: &str = "application/json";
/// Width of `ce_sequence`: the digits of `u64::MAX`, so the stream version never outgrows it.
pub const SEQUENCE_WIDTH: usize = 20;

/// `ce_sequence` as written: zero-padded to [`SEQUENCE_WIDTH`] digits ("00000000000000000010"), so
/// that its string order is its numeric order, as the CloudEvents sequence extension requires
/// (unpadded, "10" sorted before "9").
pub fn format_sequence(sequence: u32) -> String {
    format!("{sequence:0SEQUENCE_WIDTH$}")
}

/// Reads `ce_sequence`: decimal digits only, padded (written since the catalogue) or not (records
/// written before it: "1", "2", ..., "10").
pub fn parse_sequence(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > SEQUENCE_WIDTH || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// What goes to Kafka.
pub struct EncodedEvent {
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
    /// `ce_type`, for metrics.
    pub event_type: &'static str,
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header { key, value: Some(value) }
}

/// Encodes an event of any aggregate: key and `ce_subject` are its stream id. With `key`, the
/// event's personal fields are sealed with it and `ce_datakey` names it.
pub fn encode<E: DomainEvent>(env: &Envelope<E>, key: Option<&DataKey>) -> EncodedEvent {
    let m = &env.meta;
    let subject = env.subject.to_string();
    let event_type = env.event.event_type();
    let id = m.event_id.to_string();
    let time = m.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
    let sequence = format_sequence(m.sequence);
    let dataschema = domain::aggregate::dataschema_uri(event_type, env.event.schema_version());
    let mut h = OwnedHeaders::new_with_capacity(16)
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_id", &id))
        .insert(header("ce_type", event_type))
        .insert(header("ce_source", SOURCE))
        .insert(header("ce_time", &time))
        .insert(header("ce_subject", &subject))
        .insert(header("ce_dataschema", &dataschema))
        .insert(header("content-type", CONTENT_TYPE))
        .insert(header("ce_userid", m.user_id.as_ref()))
        .insert(header("ce_sequence", &sequence));
    h = with_trace_context(h, m);
    if let Some(i) = &m.idempotency {
        h = h.insert(header("ce_idempotencykey", &i.key)).insert(header("ce_requestdigest", &i.request_digest));
    }
    let mut payload = env.event.to_json();
    if let Some(key) = key {
        payload = key.seal_json(payload, personal_fields(event_type));
        h = h.insert(header(DATA_KEY_HEADER, &key.id.to_string()));
    }
    EncodedEvent { key: subject, payload, headers: h, event_type }
}

/// The optional CloudEvents extensions and W3C trace context an event carries (and its
/// `task-updates` record repeats).
fn with_trace_context(mut h: OwnedHeaders, m: &Metadata) -> OwnedHeaders {
    if let Some(c) = &m.correlation_id {
        h = h.insert(header("ce_correlationid", c));
    }
    if let Some(c) = &m.causation_id {
        h = h.insert(header("ce_causationid", c));
    }
    if let Some(t) = &m.traceparent {
        h = h.insert(header("traceparent", t));
    }
    h
}

/// A `task-updates` record: key = task id, the task's state after an event as JSON, or no value
/// (a tombstone) after a deletion.
pub struct EncodedState {
    pub key: String,
    pub payload: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

/// Encodes the state of a task after `env` (its last event in a command) for `task-updates`, as
/// the event catalogue describes it (`task.state` v1): `state` is
/// `TaskView::next(previous, env)`, `None` after a deletion. The CloudEvents attributes are the
/// event's (subject, time, user, sequence = the task's version, correlation and causation), with
/// `ce_type` `task.state` and a `ce_id` derived from the event's id (the same on a retry).
/// With `key` (the task's data key) its personal fields are sealed as the events' are.
pub fn encode_state(env: &Envelope<domain::TaskEvent>, state: Option<&domain::current::TaskView>, key: Option<&DataKey>) -> EncodedState {
    let m = &env.meta;
    let subject = env.subject.to_string();
    let id = Uuid::new_v5(&STATE_ID_NAMESPACE, m.event_id.as_bytes()).to_string();
    let time = m.occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
    let sequence = format_sequence(m.sequence);
    let dataschema = domain::aggregate::dataschema_uri(domain::current::TaskView::TYPE, domain::current::TaskView::VERSION);
    let mut h = OwnedHeaders::new_with_capacity(12)
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_id", &id))
        .insert(header("ce_type", domain::current::TaskView::TYPE))
        .insert(header("ce_source", SOURCE))
        .insert(header("ce_time", &time))
        .insert(header("ce_subject", &subject))
        .insert(header("ce_dataschema", &dataschema))
        .insert(header("ce_userid", m.user_id.as_ref()))
        .insert(header("ce_sequence", &sequence));
    if state.is_some() {
        h = h.insert(header("content-type", CONTENT_TYPE));
    }
    h = with_trace_context(h, m);
    let payload = state.map(|s| match key {
        Some(key) => {
            let mut v = serde_json::to_value(s).expect("a task state always serializes");
            key.seal_fields(&mut v, personal_fields(domain::current::TaskView::TYPE));
            serde_json::to_vec(&v).expect("JSON values serialize")
        }
        None => serde_json::to_vec(s).expect("a task state always serializes"),
    });
    if let (Some(key), Some(_)) = (key, &payload) {
        h = h.insert(header(DATA_KEY_HEADER, &key.id.to_string()));
    }
    EncodedState { key: subject, payload, headers: h }
}

/// `ce_type` of a barrier: a record of `task-events` that is not an event. A partition's writer
/// commits one when, after fencing the partition's previous producer, the partition still holds a
/// transaction that Kafka left open (its commit or abort marker is missing, seen after a broker was
/// killed): the barrier's commit marker closes that transaction, without which no read_committed
/// reader could ever read past it. Every reader skips barriers ([`DecodeError::Barrier`]).
pub const BARRIER_TYPE: &str = "log.barrier";

/// A barrier for `partition` (see [`BARRIER_TYPE`]): no key (it belongs to no stream), CloudEvents
/// attributes without subject or user, and as data where the open transaction began (`open_from`,
/// the partition's last stable offset) and how far the partition was written (`written_to`).
pub fn encode_barrier(partition: i32, open_from: i64, written_to: i64) -> (Vec<u8>, OwnedHeaders) {
    let id = Uuid::now_v7().to_string();
    let time = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
    let headers = OwnedHeaders::new_with_capacity(6)
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_id", &id))
        .insert(header("ce_type", BARRIER_TYPE))
        .insert(header("ce_source", SOURCE))
        .insert(header("ce_time", &time))
        .insert(header("content-type", CONTENT_TYPE));
    let data = serde_json::json!({ "partition": partition, "open_from": open_from, "written_to": written_to });
    (serde_json::to_vec(&data).expect("JSON values serialize"), headers)
}

/// Whether a record of `task-events` is a barrier (not an event; see [`BARRIER_TYPE`]).
pub fn is_barrier<H: Headers>(headers: Option<&H>) -> bool {
    headers.is_some_and(|h| h.iter().any(|x| x.key == "ce_type" && x.value == Some(BARRIER_TYPE.as_bytes())))
}

/// The namespace of the `ce_id`s of `task-updates` records (UUID v5 of the event's id).
const STATE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x3f1c_9a57_2be4_4d08_8c61_d2e7_5a90_b4c3);

/// The CloudEvents attributes of a record, parsed and checked, and its data.
struct Parts<'a> {
    subject: String,
    event_type: String,
    /// The schema version of the data (`ce_dataschema`; 1 when absent).
    version: u32,
    meta: Metadata,
    data: &'a [u8],
}

fn decode_parts<'a, H: Headers>(key: Option<&[u8]>, headers: Option<&H>, payload: Option<&'a [u8]>) -> Result<Parts<'a>, DecodeError> {
    let mut get = HeaderMap::default();
    if let Some(headers) = headers {
        for h in headers.iter() {
            get.set(h.key, h.value);
        }
    }
    let spec = get.required("ce_specversion")?;
    if spec != "1.0" {
        return Err(DecodeError::SpecVersion(spec.to_owned()));
    }
    let invalid = |name: &'static str, message: String| DecodeError::InvalidHeader { name, message };
    let subject = get.required("ce_subject")?;
    if key.is_some_and(|k| k != subject.as_bytes()) {
        return Err(DecodeError::KeyMismatch);
    }
    let meta = Metadata {
        event_id: Uuid::parse_str(get.required("ce_id")?).map_err(|e| invalid("ce_id", e.to_string()))?,
        occurred_at: DateTime::parse_from_rfc3339(get.required("ce_time")?).map_err(|e| invalid("ce_time", e.to_string()))?.with_timezone(&Utc),
        user_id: UserId::parse(get.required("ce_userid")?.to_owned()).map_err(|e| invalid("ce_userid", e.0))?,
        sequence: parse_sequence(get.required("ce_sequence")?).ok_or_else(|| invalid("ce_sequence", "not a decimal number of at most 20 digits".into()))?,
        correlation_id: get.optional("ce_correlationid"),
        causation_id: get.optional("ce_causationid"),
        traceparent: get.optional("traceparent"),
        idempotency: match (get.optional("ce_idempotencykey"), get.optional("ce_requestdigest")) {
            (Some(key), Some(d)) => Some(IdempotencyTag { key, request_digest: d }),
            _ => None,
        },
        data_key: get.optional(DATA_KEY_HEADER).map(|k| Uuid::parse_str(&k).map_err(|e| invalid(DATA_KEY_HEADER, e.to_string()))).transpose()?,
    };
    let event_type = get.required("ce_type")?.to_owned();
    let version = match get.optional("ce_dataschema") {
        None => 1,
        Some(uri) => domain::aggregate::parse_dataschema(&event_type, &uri)
            .ok_or_else(|| invalid("ce_dataschema", format!("{uri:?} is not urn:taskstream:schema:{event_type}:v<N>")))?,
    };
    let data = payload.filter(|p| !p.is_empty()).ok_or(DecodeError::EmptyValue)?;
    Ok(Parts { subject: subject.to_owned(), event_type, version, meta, data })
}

impl From<EnvelopeError> for DecodeError {
    fn from(e: EnvelopeError) -> Self {
        match e {
            EnvelopeError::Subject(message) => DecodeError::InvalidHeader { name: "ce_subject", message },
            EnvelopeError::Owner => DecodeError::KeyMismatch,
            EnvelopeError::Event(e) => DecodeError::Data(e),
        }
    }
}

/// The data with its personal fields opened, when they are sealed.
fn open<'a>(p: &Parts<'a>, keys: &dyn DataKeys) -> Result<std::borrow::Cow<'a, [u8]>, DecodeError> {
    let Some(id) = p.meta.data_key else { return Ok(p.data.into()) };
    let fields = personal_fields(&p.event_type);
    if fields.is_empty() {
        return Ok(p.data.into());
    }
    let key = keys.data_key(&id).map_err(DecodeError::from)?;
    Ok(key.open_json(p.data, fields).map_err(DecodeError::from)?.into())
}

impl From<KeyError> for DecodeError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Erased(id) => DecodeError::Erased(id),
            other => DecodeError::Sealed(other.to_string()),
        }
    }
}

/// Decodes any record of the log (an event of any registered aggregate), opening its personal
/// fields with `keys`.
pub fn decode_record<H: Headers>(key: Option<&[u8]>, headers: Option<&H>, payload: Option<&[u8]>, keys: &dyn DataKeys) -> Result<Record, DecodeError> {
    if is_barrier(headers) {
        return Err(DecodeError::Barrier);
    }
    let p = decode_parts(key, headers, payload)?;
    let data = open(&p, keys)?;
    Ok(Record::from_data(&p.subject, p.meta, &p.event_type, p.version, &data)?)
}

/// Decodes a record that must be an event of `E`'s aggregate.
pub fn decode<E: DomainEvent, H: Headers>(
    key: Option<&[u8]>,
    headers: Option<&H>,
    payload: Option<&[u8]>,
    keys: &dyn DataKeys,
) -> Result<Envelope<E>, DecodeError> {
    if is_barrier(headers) {
        return Err(DecodeError::Barrier);
    }
    let p = decode_parts(key, headers, payload)?;
    let data = open(&p, keys)?;
    Ok(Envelope::from_data(&p.subject, p.meta, &p.event_type, p.version, &data)?)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("invalid header {name}: {message}")]
    InvalidHeader { name: &'static str, message: String },
    #[error("unsupported CloudEvents specversion {0:?}")]
    SpecVersion(String),
    #[error("record key does not match ce_subject")]
    KeyMismatch,
    #[error("empty record value")]
    EmptyValue,
    #[error(transparent)]
    Data(#[from] domain::UnknownEventType),
    /// Sealed with a data key that is destroyed: the record's user was erased.
    #[error("sealed with data key {0}, which is destroyed (its user was erased)")]
    Erased(Uuid),
    /// A barrier ([`BARRIER_TYPE`]): a record that is not an event, to skip.
    #[error("a barrier (a record that closed a transaction Kafka had left open), not an event")]
    Barrier,
    /// Sealed with a key this service cannot use (its KEK is not configured) or damaged.
    #[error("the sealed fields cannot be opened: {0}")]
    Sealed(String),
}

#[derive(Default)]
struct HeaderMap<'a> {
    entries: Vec<(&'a str, Option<&'a [u8]>)>,
}

impl<'a> HeaderMap<'a> {
    fn set(&mut self, key: &'a str, value: Option<&'a [u8]>) {
        self.entries.push((key, value));
    }
    fn get(&self, key: &str) -> Option<&'a [u8]> {
        self.entries.iter().rev().find(|(k, _)| *k == key).and_then(|(_, v)| *v)
    }
    fn required(&self, key: &'static str) -> Result<&'a str, DecodeError> {
        let v = self.get(key).ok_or(DecodeError::MissingHeader(key))?;
        std::str::from_utf8(v).map_err(|_| DecodeError::InvalidHeader { name: key, message: "not UTF-8".into() })
    }
    fn optional(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{Keks, KeyRing, NoKeys};
    use domain::user::{NotificationRead, UserEvent};
    use domain::{NewTask, TaskEvent, TaskId, Title};

    fn meta(sequence: u32) -> Metadata {
        Metadata {
            event_id: Uuid::now_v7(),
            user_id: UserId::parse("alice".into()).unwrap(),
            sequence,
            occurred_at: DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123456Z").unwrap().with_timezone(&Utc),
            correlation_id: Some("corr".into()),
            causation_id: None,
            traceparent: None,
            idempotency: Some(IdempotencyTag { key: "k1".into(), request_digest: "abc".into() }),
            data_key: None,
        }
    }

    fn envelope() -> Envelope<TaskEvent> {
        Envelope { subject: TaskId::new_v7(), meta: meta(1), event: TaskEvent::Created(NewTask::new(Title::parse("t".into()).unwrap())) }
    }

    #[test]
    fn round_trips_through_cloudevents_headers() {
        let env = envelope();
        let enc = encode(&env, None);
        let back = decode(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload), &NoKeys).unwrap();
        assert_eq!(back, env);
        let names: Vec<&str> = enc.headers.iter().map(|h| h.key).collect();
        for required in
            ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "ce_subject", "content-type", "ce_userid", "ce_sequence", "ce_correlationid"]
        {
            assert!(names.contains(&required), "{required} missing");
        }
    }

    #[test]
    fn a_barrier_is_recognised_and_never_decodes_as_an_event() {
        let (payload, headers) = encode_barrier(3, 10, 14);
        assert!(is_barrier(Some(&headers)));
        assert_eq!(decode_record(None, Some(&headers), Some(&payload), &NoKeys).unwrap_err(), DecodeError::Barrier);
        assert_eq!(decode::<TaskEvent, _>(None, Some(&headers), Some(&payload), &NoKeys).unwrap_err(), DecodeError::Barrier);
        let data: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(data, serde_json::json!({"partition": 3, "open_from": 10, "written_to": 14}));
        // An event is not a barrier.
        let enc = encode(&envelope(), None);
        assert!(!is_barrier(Some(&enc.headers)));
    }

    #[test]
    fn sequence_is_zero_padded_so_string_order_is_numeric_order() {
        assert_eq!(format_sequence(1), "00000000000000000001");
        assert_eq!(format_sequence(u32::MAX).len(), SEQUENCE_WIDTH);
        let mut written: Vec<String> = (1..=120).map(format_sequence).collect();
        written.sort();
        assert_eq!(written.iter().map(|s| parse_sequence(s).unwrap()).collect::<Vec<_>>(), (1..=120).collect::<Vec<_>>());
        // Records written before the padding are still read.
        assert_eq!(parse_sequence("10"), Some(10));
        assert_eq!(parse_sequence("9"), Some(9));
        for bad in ["", "-1", "+1", "1.0", "x", "000000000000000000001", "99999999999"] {
            assert_eq!(parse_sequence(bad), None, "{bad:?}");
        }
        let mut env = envelope();
        env.meta.sequence = 10;
        let enc = encode(&env, None);
        let h: Vec<_> = enc.headers.iter().filter(|h| h.key == "ce_sequence").map(|h| h.value.unwrap().to_vec()).collect();
        assert_eq!(h, [b"00000000000000000010".to_vec()]);
        assert_eq!(decode::<TaskEvent, _>(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload), &NoKeys).unwrap().meta.sequence, 10);
    }

    #[test]
    fn a_task_state_record_carries_the_events_attributes_and_a_tombstone_has_no_value() {
        let env = envelope();
        let view = domain::current::TaskView::next(None, &env).unwrap();
        let enc = encode_state(&env, Some(&view), None);
        assert_eq!(enc.key, env.subject.to_string());
        let h: std::collections::HashMap<&str, &[u8]> = enc.headers.iter().map(|h| (h.key, h.value.unwrap())).collect();
        assert_eq!(h["ce_type"], b"task.state");
        assert_eq!(h["ce_sequence"], b"00000000000000000001");
        assert_eq!(h["ce_dataschema"], b"urn:taskstream:schema:task.state:v1");
        assert_eq!(h["ce_subject"], enc.key.as_bytes());
        assert_ne!(h["ce_id"], env.meta.event_id.to_string().as_bytes(), "its own id");
        assert_eq!(h["ce_id"], encode_state(&env, Some(&view), None).headers.iter().find(|h| h.key == "ce_id").unwrap().value.unwrap(), "the same on a retry");
        let back: domain::current::TaskView = serde_json::from_slice(enc.payload.as_deref().unwrap()).unwrap();
        assert_eq!(back, view);
        let tombstone = encode_state(&env, None, None);
        assert!(tombstone.payload.is_none());
        assert!(!tombstone.headers.iter().any(|h| h.key == "content-type"));
    }

    #[test]
    fn records_with_unpadded_sequences_are_still_read() {
        let env = envelope();
        let enc = encode(&env, None);
        let mut old = OwnedHeaders::new();
        for h in enc.headers.iter() {
            let value = if h.key == "ce_sequence" { b"1".as_slice() } else { h.value.unwrap() };
            old = old.insert(Header { key: h.key, value: Some(value) });
        }
        assert_eq!(decode(Some(enc.key.as_bytes()), Some(&old), Some(&enc.payload), &NoKeys), Ok(env));
    }

    #[test]
    fn user_events_round_trip_and_are_told_apart() {
        let mut m = meta(3);
        m.correlation_id = None;
        m.idempotency = None;
        let env = Envelope {
            subject: UserId::parse("alice".into()).unwrap(),
            meta: m,
            event: UserEvent::NotificationRead(NotificationRead { notification_id: Uuid::from_u128(9) }),
        };
        let enc = encode(&env, None);
        assert_eq!(enc.key, "alice");
        assert_eq!(decode_record(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload), &NoKeys), Ok(Record::User(env)));
        let task = envelope();
        let enc = encode(&task, None);
        assert_eq!(decode_record(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload), &NoKeys), Ok(Record::Task(task)));
    }

    #[tokio::test]
    async fn personal_fields_are_sealed_with_the_users_key_and_erased_with_it() {
        let ring = KeyRing::in_memory(Keks::dev());
        let key = ring.ensure("alice").await.unwrap();
        let mut env = envelope();
        let TaskEvent::Created(t) = &mut env.event else { unreachable!() };
        t.title = Title::parse("Call the dentist".into()).unwrap();
        t.tags = domain::Tags::parse(vec!["health".into()]).unwrap();
        let enc = encode(&env, Some(&key));
        let text = String::from_utf8(enc.payload.clone()).unwrap();
        assert!(!text.contains("dentist") && !text.contains("health"), "{text}");
        assert!(text.contains("\"priority\":\"medium\""), "other fields stay readable: {text}");
        let h: std::collections::HashMap<&str, &[u8]> = enc.headers.iter().map(|h| (h.key, h.value.unwrap())).collect();
        assert_eq!(h[DATA_KEY_HEADER], key.id.to_string().as_bytes());
        env.meta.data_key = Some(key.id);
        assert_eq!(decode(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload), &*ring), Ok(env.clone()));
        // The state record is sealed too.
        let view = domain::current::TaskView::next(None, &env).unwrap();
        let state = encode_state(&env, Some(&view), Some(&key));
        assert!(!String::from_utf8(state.payload.unwrap()).unwrap().contains("dentist"));
        // Without the key (destroyed): erased, not a broken record.
        ring.destroy(&[key.id]).await.unwrap();
        assert_eq!(decode_record(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload), &*ring), Err(DecodeError::Erased(key.id)));
    }

    #[test]
    fn refuses_broken_records() {
        let env = envelope();
        let enc = encode(&env, None);
        let decode = decode::<TaskEvent, OwnedHeaders>;
        assert_eq!(decode(Some(b"other".as_slice()), Some(&enc.headers), Some(&enc.payload), &NoKeys), Err(DecodeError::KeyMismatch));
        assert_eq!(decode(None, None, Some(&enc.payload), &NoKeys), Err(DecodeError::MissingHeader("ce_specversion")));
        assert!(decode(None, Some(&enc.headers), Some(b"{\"title\": 1}".as_slice()), &NoKeys).is_err());
        assert_eq!(decode(None, Some(&enc.headers), None, &NoKeys), Err(DecodeError::EmptyValue));
        // A user-level event whose subject is not its ce_userid.
        let user = Envelope { subject: UserId::parse("bob".into()).unwrap(), meta: meta(1), event: UserEvent::WebhookRemoved };
        let enc = encode(&user, None);
        assert_eq!(decode_record(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload), &NoKeys), Err(DecodeError::KeyMismatch));
    }
}
