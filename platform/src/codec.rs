//! The event codec: a domain event plus its metadata <-> a Kafka record in CloudEvents 1.0 binary
//! content mode (attributes as `ce_*` headers, the event data as the value, key = task id).

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use uuid::Uuid;

use domain::user::UserEvent;
use domain::{TaskEvent, TaskId, UserId};

/// `ce_source` of events appended by the command API.
pub const SOURCE: &str = "/taskstream/command-api";
pub const CONTENT_TYPE: &str = "application/json";

/// Idempotency metadata recorded with a command's events so that a restarted command API still
/// recognises a retried request (`ce_idempotencykey`, `ce_requestdigest` extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyTag {
    pub key: String,
    pub request_digest: String,
}

/// A domain event with everything the log records about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventEnvelope {
    pub event_id: Uuid,
    pub task_id: TaskId,
    pub user_id: UserId,
    /// The task version this event produced (`ce_sequence`).
    pub sequence: u32,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    pub idempotency: Option<IdempotencyTag>,
    pub event: TaskEvent,
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

pub fn encode(env: &EventEnvelope) -> EncodedEvent {
    let subject = env.task_id.to_string();
    let headers = encode_parts(
        env.event_id,
        env.event.event_type(),
        env.event.schema_version(),
        &subject,
        &env.user_id,
        env.sequence,
        env.occurred_at,
        env.correlation_id.as_deref(),
        env.causation_id.as_deref(),
        env.traceparent.as_deref(),
        env.idempotency.as_ref(),
    );
    EncodedEvent { key: subject, payload: env.event.to_json(), headers, event_type: env.event.event_type() }
}

/// A user-level event (notification read state, webhook registration): key and `ce_subject` are
/// the user id, `ce_sequence` the user stream's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEnvelope {
    pub event_id: Uuid,
    pub user_id: UserId,
    pub sequence: u32,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    pub idempotency: Option<IdempotencyTag>,
    pub event: UserEvent,
}

/// Any record of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Task(EventEnvelope),
    User(UserEnvelope),
}

#[allow(clippy::too_many_arguments)]
fn encode_parts(
    event_id: Uuid,
    event_type: &str,
    schema_version: u32,
    subject: &str,
    user: &UserId,
    sequence: u32,
    occurred_at: DateTime<Utc>,
    correlation_id: Option<&str>,
    causation_id: Option<&str>,
    traceparent: Option<&str>,
    idempotency: Option<&IdempotencyTag>,
) -> OwnedHeaders {
    let id = event_id.to_string();
    let time = occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true);
    let sequence = sequence.to_string();
    let dataschema = format!("urn:taskstream:schema:{event_type}:v{schema_version}");
    let mut h = OwnedHeaders::new_with_capacity(16)
        .insert(header("ce_specversion", "1.0"))
        .insert(header("ce_id", &id))
        .insert(header("ce_type", event_type))
        .insert(header("ce_source", SOURCE))
        .insert(header("ce_time", &time))
        .insert(header("ce_subject", subject))
        .insert(header("ce_dataschema", &dataschema))
        .insert(header("content-type", CONTENT_TYPE))
        .insert(header("ce_userid", user.as_ref()))
        .insert(header("ce_sequence", &sequence));
    if let Some(c) = correlation_id {
        h = h.insert(header("ce_correlationid", c));
    }
    if let Some(c) = causation_id {
        h = h.insert(header("ce_causationid", c));
    }
    if let Some(t) = traceparent {
        h = h.insert(header("traceparent", t));
    }
    if let Some(i) = idempotency {
        h = h.insert(header("ce_idempotencykey", &i.key)).insert(header("ce_requestdigest", &i.request_digest));
    }
    h
}

pub fn encode_user(env: &UserEnvelope) -> EncodedEvent {
    let subject = env.user_id.to_string();
    let headers = encode_parts(
        env.event_id,
        env.event.event_type(),
        env.event.schema_version(),
        &subject,
        &env.user_id,
        env.sequence,
        env.occurred_at,
        env.correlation_id.as_deref(),
        env.causation_id.as_deref(),
        env.traceparent.as_deref(),
        env.idempotency.as_ref(),
    );
    EncodedEvent { key: subject, payload: env.event.to_json(), headers, event_type: env.event.event_type() }
}

/// The CloudEvents attributes every record carries, parsed and checked.
struct Common {
    event_id: Uuid,
    event_type: String,
    occurred_at: DateTime<Utc>,
    subject: String,
    user_id: UserId,
    sequence: u32,
    correlation_id: Option<String>,
    causation_id: Option<String>,
    traceparent: Option<String>,
    idempotency: Option<IdempotencyTag>,
}

fn decode_common<H: Headers>(key: Option<&[u8]>, headers: Option<&H>) -> Result<Common, DecodeError> {
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
    Ok(Common {
        event_id: Uuid::parse_str(get.required("ce_id")?).map_err(|e| invalid("ce_id", e.to_string()))?,
        event_type: get.required("ce_type")?.to_owned(),
        occurred_at: DateTime::parse_from_rfc3339(get.required("ce_time")?)
            .map_err(|e| invalid("ce_time", e.to_string()))?
            .with_timezone(&Utc),
        subject: subject.to_owned(),
        user_id: UserId::parse(get.required("ce_userid")?.to_owned()).map_err(|e| invalid("ce_userid", e.0))?,
        sequence: get.required("ce_sequence")?.parse().map_err(|_| invalid("ce_sequence", "not a number".into()))?,
        correlation_id: get.optional("ce_correlationid"),
        causation_id: get.optional("ce_causationid"),
        traceparent: get.optional("traceparent"),
        idempotency: match (get.optional("ce_idempotencykey"), get.optional("ce_requestdigest")) {
            (Some(key), Some(d)) => Some(IdempotencyTag { key, request_digest: d }),
            _ => None,
        },
    })
}

/// Decodes any record: task events (`task.*`) and user-level events.
pub fn decode_record<H: Headers>(key: Option<&[u8]>, headers: Option<&H>, payload: Option<&[u8]>) -> Result<Record, DecodeError> {
    let c = decode_common(key, headers)?;
    let payload = payload.filter(|p| !p.is_empty()).ok_or(DecodeError::EmptyValue)?;
    if c.event_type.starts_with("task.") {
        let task_id: TaskId = c
            .subject
            .parse()
            .map_err(|e: domain::ValidationError| DecodeError::InvalidHeader { name: "ce_subject", message: e.0 })?;
        let event = TaskEvent::from_json(&c.event_type, payload)?;
        return Ok(Record::Task(EventEnvelope {
            event_id: c.event_id,
            task_id,
            user_id: c.user_id,
            sequence: c.sequence,
            occurred_at: c.occurred_at,
            correlation_id: c.correlation_id,
            causation_id: c.causation_id,
            traceparent: c.traceparent,
            idempotency: c.idempotency,
            event,
        }));
    }
    if c.subject != c.user_id.as_ref() {
        return Err(DecodeError::KeyMismatch);
    }
    let event = UserEvent::from_json(&c.event_type, payload)?;
    Ok(Record::User(UserEnvelope {
        event_id: c.event_id,
        user_id: c.user_id,
        sequence: c.sequence,
        occurred_at: c.occurred_at,
        correlation_id: c.correlation_id,
        causation_id: c.causation_id,
        traceparent: c.traceparent,
        idempotency: c.idempotency,
        event,
    }))
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
}

/// Decodes a record that must be a task event.
pub fn decode<H: Headers>(key: Option<&[u8]>, headers: Option<&H>, payload: Option<&[u8]>) -> Result<EventEnvelope, DecodeError> {
    match decode_record(key, headers, payload)? {
        Record::Task(env) => Ok(env),
        Record::User(env) => Err(DecodeError::Data(domain::UnknownEventType::Type(env.event.event_type().to_owned()))),
    }
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
    use domain::{NewTask, Title};

    fn envelope() -> EventEnvelope {
        EventEnvelope {
            event_id: Uuid::now_v7(),
            task_id: TaskId::new_v7(),
            user_id: UserId::parse("alice".into()).unwrap(),
            sequence: 1,
            occurred_at: DateTime::parse_from_rfc3339("2026-11-22T10:00:00.123456Z").unwrap().with_timezone(&Utc),
            correlation_id: Some("corr".into()),
            causation_id: None,
            traceparent: None,
            idempotency: Some(IdempotencyTag { key: "k1".into(), request_digest: "abc".into() }),
            event: TaskEvent::Created(NewTask::new(Title::parse("t".into()).unwrap())),
        }
    }

    #[test]
    fn round_trips_through_cloudevents_headers() {
        let env = envelope();
        let enc = encode(&env);
        let back = decode(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload)).unwrap();
        assert_eq!(back, env);
        let names: Vec<&str> = enc.headers.iter().map(|h| h.key).collect();
        for required in ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "ce_subject", "content-type", "ce_userid", "ce_sequence", "ce_correlationid"] {
            assert!(names.contains(&required), "{required} missing");
        }
    }

    #[test]
    fn user_events_round_trip_and_are_told_apart() {
        let env = UserEnvelope {
            event_id: Uuid::now_v7(),
            user_id: UserId::parse("alice".into()).unwrap(),
            sequence: 3,
            occurred_at: DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z").unwrap().with_timezone(&Utc),
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            idempotency: None,
            event: UserEvent::NotificationRead(domain::user::NotificationRead { notification_id: Uuid::from_u128(9) }),
        };
        let enc = encode_user(&env);
        assert_eq!(enc.key, "alice");
        assert_eq!(decode_record(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload)), Ok(Record::User(env)));
        let task = envelope();
        let enc = encode(&task);
        assert_eq!(decode_record(Some(enc.key.as_bytes()), Some(&enc.headers), Some(&enc.payload)), Ok(Record::Task(task)));
    }

    #[test]
    fn refuses_broken_records() {
        let env = envelope();
        let enc = encode(&env);
        assert_eq!(decode(Some(b"other".as_slice()), Some(&enc.headers), Some(&enc.payload)), Err(DecodeError::KeyMismatch));
        assert_eq!(decode::<OwnedHeaders>(None, None, Some(&enc.payload)), Err(DecodeError::MissingHeader("ce_specversion")));
        assert!(decode(None, Some(&enc.headers), Some(b"{\"title\": 1}".as_slice())).is_err());
        assert_eq!(decode(None, Some(&enc.headers), None), Err(DecodeError::EmptyValue));
    }
}
