//! The one shape every aggregate has (in the spirit of fmodel's `Decider`): a stream key, commands,
//! past-tense events with a type name and schema version, a state with an initial value, `decide`
//! (every rule) and `evolve` (only facts). The envelope that carries an event through the log, its
//! metadata, and the answer a command gets are the same for every aggregate.
//!
//! Adding an aggregate: a new module with its `Decider` implementation, and one line in the
//! `aggregates!` list in `lib.rs`, which generates `AnyCommand` (what the command API submits) and
//! `Record` (any event read from the log), each with a visitor that hands the concrete `Decider` type
//! to generic code. The writer, the codec and the restore are written once, generically.

use std::fmt::{Debug, Display};
use std::hash::Hash;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::DomainError;
use crate::values::{UserId, ValidationError};

/// The key of an aggregate's stream: the Kafka record key and the CloudEvents `ce_subject`.
pub trait StreamId: Clone + Eq + Hash + Display + Debug + Send + Sync + 'static {
    fn parse_subject(subject: &str) -> Result<Self, ValidationError>;
    /// The user a stream belongs to by construction (user-level streams are keyed by the user id);
    /// a record whose `ce_userid` differs is refused.
    fn owner(&self) -> Option<&UserId> {
        None
    }
}

/// A fact of one aggregate, as it travels in the log: the type name is `ce_type`, the data the value.
pub trait DomainEvent: Clone + Debug + PartialEq + Send + Sync + 'static {
    /// The stream the events are keyed by.
    type Subject: StreamId;
    /// Every type name of this aggregate's events.
    const TYPES: &'static [&'static str];
    /// The stable type name (`ce_type`).
    fn event_type(&self) -> &'static str;
    /// The schema version of the data as written now (`ce_dataschema`). A published version only
    /// ever gains optional fields; removing, renaming or retyping a field, or adding a required
    /// one, is a new version whose reader upcasts the older ones (`from_versioned_json`, `upcast`).
    fn schema_version(&self) -> u32 {
        1
    }
    /// The event data as JSON.
    fn to_json(&self) -> Vec<u8>;
    /// Parses event data of the given type in its current schema version (older data without the
    /// fields a later version made required goes through [`DomainEvent::from_versioned_json`]).
    fn from_json(event_type: &str, data: &[u8]) -> Result<Self, UnknownEventType>;
    /// Parses event data of the given type written in schema `version` (the `v<N>` of
    /// `ce_dataschema`; 1 when absent): older versions are upcast to the current shape first.
    fn from_versioned_json(subject: &Self::Subject, event_type: &str, version: u32, data: &[u8]) -> Result<Self, UnknownEventType> {
        let _ = (subject, version);
        Self::from_json(event_type, data)
    }
    /// The JSON Schema of every type and schema version of this aggregate's event data, old
    /// versions included (they describe records still in the log). Generated from the Rust types.
    fn data_schemas() -> Vec<DataSchema>;
}

/// The JSON Schema (draft 07) of one (type, version) of event data.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSchema {
    pub event_type: &'static str,
    pub version: u32,
    pub schema: serde_json::Value,
}

impl DataSchema {
    /// The schema of `T`'s JSON form, titled `<type> v<version>`.
    pub fn of<T: schemars::JsonSchema>(event_type: &'static str, version: u32, description: &str) -> Self {
        let generator = schemars::generate::SchemaSettings::draft07().into_generator();
        let schema = generator.into_root_schema_for::<T>();
        let mut schema = schema.to_value();
        Self::describe(&mut schema, event_type, version, description);
        Self { event_type, version, schema }
    }

    /// The schema of event data without fields: any object (`{}` is written; newer optional fields
    /// are tolerated).
    pub fn empty(event_type: &'static str, version: u32, description: &str) -> Self {
        let mut schema = serde_json::json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"});
        Self::describe(&mut schema, event_type, version, description);
        Self { event_type, version, schema }
    }

    fn describe(schema: &mut serde_json::Value, event_type: &str, version: u32, description: &str) {
        if let Some(o) = schema.as_object_mut() {
            o.insert("$id".into(), format!("urn:taskstream:schema:{event_type}:v{version}").into());
            o.insert("title".into(), format!("{event_type} v{version}").into());
            o.insert("description".into(), description.into());
        }
    }
}

/// `ce_dataschema` of data of `event_type` in schema `version`.
pub fn dataschema_uri(event_type: &str, version: u32) -> String {
    format!("urn:taskstream:schema:{event_type}:v{version}")
}

/// The schema version named by a `ce_dataschema` value of `event_type` (`None` if it names another
/// type or is not of the form `urn:taskstream:schema:<type>:v<N>`).
pub fn parse_dataschema(event_type: &str, uri: &str) -> Option<u32> {
    let v = uri.strip_prefix("urn:taskstream:schema:")?.strip_prefix(event_type)?.strip_prefix(":v")?;
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|&n| n > 0)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownEventType {
    #[error("unknown event type {0:?}")]
    Type(String),
    #[error("invalid data for {event_type}: {message}")]
    Data { event_type: String, message: String },
}

/// `{}`, the data of events without fields.
pub fn empty_json() -> Vec<u8> {
    b"{}".to_vec()
}

/// Parses the data of `event_type` as `T` (the shared half of every `from_json`).
pub fn parse_json<T: DeserializeOwned>(event_type: &str, data: &[u8]) -> Result<T, UnknownEventType> {
    serde_json::from_slice(data).map_err(|e| UnknownEventType::Data { event_type: event_type.to_owned(), message: e.to_string() })
}

/// Checks that the data of a field-less event is JSON (any object, so newer fields are tolerated).
pub fn parse_empty(event_type: &str, data: &[u8]) -> Result<(), UnknownEventType> {
    parse_json::<serde_json::Value>(event_type, data).map(drop)
}

/// What a command's answer names: `{"<id_field>": id, "version": n, "position": ..}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// `task_id`, `notification_id`, `webhook_id`.
    pub id_field: &'static str,
    pub id: Uuid,
    /// The command created the thing it names (answered 201 with a Location).
    pub created: bool,
    /// The answer's version is the named thing's own version (answered as an ETag).
    pub etag: bool,
    /// A generated credential returned with the answer (SetWebhook's signing secret).
    pub secret: Option<Arc<str>>,
}

/// An aggregate: decide holds every business rule; evolve holds none (it only applies facts).
pub trait Decider: 'static {
    type Command: Clone + Debug + Send + Sync + 'static;
    type Event: DomainEvent;
    /// Only what the rules look at; `Default` is the state of a stream with no events.
    /// Serializable: a partition writer records its states in snapshots.
    type State: Default + Clone + Debug + Send + Sync + serde::Serialize + serde::de::DeserializeOwned + 'static;

    /// The stream the command is decided on.
    fn stream_id(cmd: &Self::Command) -> <Self::Event as DomainEvent>::Subject;
    /// Who asks (the events' `ce_userid`).
    fn actor(cmd: &Self::Command) -> &UserId;
    /// The command's name, for metrics and traces.
    fn command_name(cmd: &Self::Command) -> &'static str;
    fn decide(cmd: &Self::Command, state: &Self::State) -> Result<Vec<Self::Event>, DomainError>;
    /// Applies one accepted fact; `actor` is the user who produced it.
    fn evolve(state: Self::State, actor: &UserId, event: &Self::Event) -> Self::State;
    /// The stream's version (`ce_sequence` of its last event; 0 without events).
    fn version(state: &Self::State) -> u32;
    /// What the answer of the command that produced `event` (its last event) names. The same
    /// function answers a live command and, at restore, a command found in the log, so a retried
    /// Idempotency-Key always gets the first answer.
    fn receipt(subject: &<Self::Event as DomainEvent>::Subject, event: &Self::Event) -> Receipt;
}

/// Everything the log records about an event besides its data and subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub event_id: Uuid,
    /// `ce_userid`: who produced the event.
    pub user_id: UserId,
    /// The stream version this event produced (`ce_sequence`).
    pub sequence: u32,
    pub occurred_at: DateTime<Utc>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub traceparent: Option<String>,
    /// Recorded with a command's events so that a restarted command API still recognises a retried
    /// request (`ce_idempotencykey`, `ce_requestdigest` extensions).
    pub idempotency: Option<IdempotencyTag>,
    /// The user's data key that sealed the event's personal fields (`ce_datakey`), if any: an
    /// opaque id (the adapters seal and open; `personal` says which fields).
    pub data_key: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyTag {
    pub key: String,
    pub request_digest: String,
}

/// A domain event with everything the log records about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope<E: DomainEvent> {
    /// The stream key (`ce_subject`, the record key).
    pub subject: E::Subject,
    pub meta: Metadata,
    pub event: E,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("invalid subject: {0}")]
    Subject(String),
    #[error("the subject belongs to another user than ce_userid")]
    Owner,
    #[error(transparent)]
    Event(#[from] UnknownEventType),
}

impl<E: DomainEvent> Envelope<E> {
    /// Builds the envelope of an event read from the log (`subject`, `event_type` and the schema
    /// `version` of its data as recorded; older versions are upcast).
    pub fn from_data(subject: &str, meta: Metadata, event_type: &str, version: u32, data: &[u8]) -> Result<Self, EnvelopeError> {
        if !E::TYPES.contains(&event_type) {
            return Err(UnknownEventType::Type(event_type.to_owned()).into());
        }
        let subject = E::Subject::parse_subject(subject).map_err(|e| EnvelopeError::Subject(e.0))?;
        if subject.owner().is_some_and(|o| o != &meta.user_id) {
            return Err(EnvelopeError::Owner);
        }
        let event = E::from_versioned_json(&subject, event_type, version, data)?;
        Ok(Self { subject, meta, event })
    }
}

/// Generic code over commands: `AnyCommand::visit` calls `command::<D>` with the concrete decider.
pub trait CommandVisitor {
    type Output;
    fn command<D: Decider>(&mut self, cmd: &D::Command) -> Self::Output;
}

/// Generic code over every registered aggregate: `Aggregates::visit` calls `decider::<D>` once per
/// aggregate with its registered name.
pub trait DeciderVisitor {
    fn decider<D: Decider>(&mut self, name: &'static str);
}

/// Generic code over records: `Record::visit` calls `record::<D>` with the concrete decider.
pub trait RecordVisitor {
    type Output;
    fn record<D: Decider>(&mut self, env: &Envelope<D::Event>) -> Self::Output;
}

/// Registers the aggregates: generates `AnyCommand` and `Record` (one variant per aggregate) with
/// their visitors and the decoding of a record by its type name.
macro_rules! aggregates {
    ($($name:ident => $decider:ty),+ $(,)?) => {
        /// A command on any aggregate.
        #[derive(Debug, Clone)]
        pub enum AnyCommand {
            $($name(<$decider as $crate::aggregate::Decider>::Command),)+
        }

        impl AnyCommand {
            pub fn visit<V: $crate::aggregate::CommandVisitor>(&self, v: &mut V) -> V::Output {
                match self {
                    $(AnyCommand::$name(c) => v.command::<$decider>(c),)+
                }
            }
            pub fn name(&self) -> &'static str {
                match self {
                    $(AnyCommand::$name(c) => <$decider as $crate::aggregate::Decider>::command_name(c),)+
                }
            }
            pub fn actor(&self) -> &$crate::values::UserId {
                match self {
                    $(AnyCommand::$name(c) => <$decider as $crate::aggregate::Decider>::actor(c),)+
                }
            }
            /// The id of the stream the command decides on: the Kafka key of its events (so it
            /// names the partition whose writer decides it).
            pub fn stream_key(&self) -> String {
                match self {
                    $(AnyCommand::$name(c) => <$decider as $crate::aggregate::Decider>::stream_id(c).to_string(),)+
                }
            }
        }

        /// Every registered aggregate, for code that handles each (snapshots).
        pub struct Aggregates;

        impl Aggregates {
            pub fn visit<V: $crate::aggregate::DeciderVisitor>(v: &mut V) {
                $(v.decider::<$decider>(stringify!($name));)+
            }

            /// The JSON Schema of every type and version of every aggregate's event data, with the
            /// aggregate's name (the event catalogue).
            pub fn data_schemas() -> Vec<(&'static str, $crate::aggregate::DataSchema)> {
                let mut all = Vec::new();
                $(
                    all.extend(
                        <<$decider as $crate::aggregate::Decider>::Event as $crate::aggregate::DomainEvent>::data_schemas()
                            .into_iter()
                            .map(|s| (stringify!($name), s)),
                    );
                )+
                all
            }
        }

        /// Any event of the log, in its envelope.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Record {
            $($name($crate::aggregate::Envelope<<$decider as $crate::aggregate::Decider>::Event>),)+
        }

        impl Record {
            pub fn visit<V: $crate::aggregate::RecordVisitor>(&self, v: &mut V) -> V::Output {
                match self {
                    $(Record::$name(env) => v.record::<$decider>(env),)+
                }
            }

            /// The envelope of a record read from the log, by its type name.
            pub fn from_data(
                subject: &str,
                meta: $crate::aggregate::Metadata,
                event_type: &str,
                version: u32,
                data: &[u8],
            ) -> Result<Self, $crate::aggregate::EnvelopeError> {
                $(
                    if <<$decider as $crate::aggregate::Decider>::Event as $crate::aggregate::DomainEvent>::TYPES.contains(&event_type) {
                        return $crate::aggregate::Envelope::from_data(subject, meta, event_type, version, data).map(Record::$name);
                    }
                )+
                Err($crate::aggregate::UnknownEventType::Type(event_type.to_owned()).into())
            }

            pub fn meta(&self) -> &$crate::aggregate::Metadata {
                match self {
                    $(Record::$name(env) => &env.meta,)+
                }
            }

            pub fn event_type(&self) -> &'static str {
                match self {
                    $(Record::$name(env) => $crate::aggregate::DomainEvent::event_type(&env.event),)+
                }
            }
        }

        $(
            impl From<$crate::aggregate::Envelope<<$decider as $crate::aggregate::Decider>::Event>> for Record {
                fn from(env: $crate::aggregate::Envelope<<$decider as $crate::aggregate::Decider>::Event>) -> Self {
                    Record::$name(env)
                }
            }
        )+
    };
}
pub(crate) use aggregates;
