//! The event catalogue: an AsyncAPI 3.0 document of every topic the services write, with the JSON
//! Schema of every event type and schema version, generated from the Rust types (the domain's
//! `DomainEvent::data_schemas`, `current::TaskView`) and the codec's CloudEvents headers, so it cannot
//! drift from them. Committed under `schemas/` (a test fails when the committed files differ from
//! what this generates, or when a committed event schema changed incompatibly) and served by the
//! command API at `GET /v1/asyncapi.json`.

use serde_json::{json, Map, Value};

use domain::aggregate::{dataschema_uri, DataSchema};
use domain::Aggregates;

use crate::codec::{CONTENT_TYPE, SEQUENCE_WIDTH, SOURCE};

/// The AsyncAPI version of the document and the Kafka bindings' version.
pub const ASYNCAPI_VERSION: &str = "3.0.0";
const KAFKA_BINDING: &str = "0.5.0";
/// The schema format of the payloads (the schemas are generated as JSON Schema draft 07).
const SCHEMA_FORMAT: &str = "application/schema+json;version=draft-07";

/// The names and sizes of the topics (the defaults are those of `KafkaSettings`).
#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub partitions: i32,
    pub dlq: String,
    pub owners: String,
    pub snapshots: String,
    pub updates: String,
    pub keys: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self::for_events_topic("task-events", 12)
    }
}

impl Topics {
    pub fn for_events_topic(events: &str, partitions: i32) -> Self {
        Self {
            events: events.to_owned(),
            partitions,
            dlq: format!("{events}.dlq"),
            owners: format!("{events}.owners"),
            snapshots: format!("{events}.snapshots"),
            updates: crate::settings::updates_topic_for(events),
            keys: format!("{events}.keys"),
        }
    }

    pub fn from_settings(settings: &crate::settings::KafkaSettings) -> Self {
        Self::for_events_topic(&settings.task_events_topic, settings.task_events_partitions)
    }
}

/// The current-state topic (of the log `task-events`; another log's is `<events>.updates`,
/// `settings::updates_topic_for`).
pub const UPDATES_TOPIC: &str = "task-updates";
/// `ce_type` of a `task-updates` record, and the name of its data schema.
pub const TASK_STATE_TYPE: &str = domain::current::TaskView::TYPE;

/// The dead-letter headers the projector adds to the original record's headers (projector/src/dlq.rs).
pub const DLQ_HEADERS: [(&str, &str); 6] = [
    ("dlq_projection", "The projection(s) that could not apply the record (comma-separated; they are applied together)."),
    ("dlq_error", "Why: the decoding or applying error."),
    ("dlq_original_topic", "The topic the record was read from."),
    ("dlq_original_partition", "Its partition (decimal)."),
    ("dlq_original_offset", "Its offset (decimal)."),
    ("dlq_id", "The dead letter's id in the projector's dead_letters table (`projector dlq replay ID`)."),
];

/// Every (aggregate, type, version) schema of event data, current and older.
pub fn event_schemas() -> Vec<(&'static str, DataSchema)> {
    let mut all = Aggregates::data_schemas();
    all.sort_by(|a, b| (a.1.event_type, a.1.version).cmp(&(b.1.event_type, b.1.version)));
    all
}

/// The file name of a (type, version) schema under `schemas/events/`.
pub fn schema_file_name(event_type: &str, version: u32) -> String {
    format!("{event_type}.v{version}.json")
}

/// A component key: `task.created` v1 -> `task_created_v1`.
fn key(event_type: &str, version: u32) -> String {
    format!("{}_v{version}", event_type.replace('.', "_"))
}

fn string(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

/// The CloudEvents binary-mode headers of an event record (platform::codec) of `event_type` whose
/// data is in schema `version`, keyed by `subject`'s kind.
fn cloudevents_headers(event_type: &str, version: u32, subject: Value, data_required: bool) -> Value {
    let mut p = Map::new();
    p.insert("ce_specversion".into(), json!({"type": "string", "const": "1.0", "description": "CloudEvents spec version."}));
    p.insert("ce_id".into(), json!({"type": "string", "format": "uuid", "description": "Unique per event (UUID v7)."}));
    p.insert("ce_type".into(), json!({"type": "string", "const": event_type, "description": "The event type."}));
    p.insert("ce_source".into(), json!({"type": "string", "const": SOURCE}));
    p.insert("ce_time".into(), json!({"type": "string", "format": "date-time", "description": "When the event was accepted (RFC 3339, microseconds, UTC)."}));
    p.insert("ce_subject".into(), subject);
    p.insert(
        "ce_dataschema".into(),
        json!({"type": "string", "const": dataschema_uri(event_type, version), "description": "The type and schema version of the data (absent on the oldest records: version 1)."}),
    );
    p.insert("content-type".into(), json!({"type": "string", "const": CONTENT_TYPE}));
    p.insert("ce_userid".into(), string("Extension: the user who produced the event (the token's sub)."));
    p.insert(
        "ce_sequence".into(),
        json!({
            "type": "string",
            "pattern": format!("^[0-9]{{1,{SEQUENCE_WIDTH}}}$"),
            "examples": [format!("{:0SEQUENCE_WIDTH$}", 1)],
            "description": format!("Extension (CloudEvents sequence): the stream version this event produced (1, 2, ...), zero-padded to {SEQUENCE_WIDTH} digits so that string order is numeric order. Records written before the padding have unpadded values (\"1\", \"10\"): compare numerically to be safe."),
        }),
    );
    p.insert(
        "ce_correlationid".into(),
        string("Extension: the correlation id of the request (X-Request-Id or generated), shared by everything the request caused."),
    );
    p.insert("ce_causationid".into(), string("Extension: what caused the event (the request id, or the id of the event a reaction answered)."));
    p.insert("traceparent".into(), json!({"type": "string", "description": "W3C trace context, when tracing is on."}));
    p.insert("ce_idempotencykey".into(), string("Extension: the Idempotency-Key of the command, when it had one."));
    p.insert("ce_requestdigest".into(), string("Extension: the digest of the request that carried ce_idempotencykey: hex HMAC-SHA256 under a key derived from the user's data key (plain SHA-256 in records of earlier versions)."));
    p.insert(
        "ce_datakey".into(),
        json!({"type": "string", "format": "uuid", "description": "Extension: the user's data key that sealed the personal fields of the data (titles, descriptions, tags, webhook URL and secret: each string is sealed:v1:<base64url(nonce | AES-256-GCM ciphertext | tag)>). Absent when nothing is sealed. A record whose key is destroyed (the user was erased) is unreadable: treat it as erased."}),
    );
    let mut required = vec!["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "ce_subject", "ce_userid", "ce_sequence"];
    if data_required {
        required.push("content-type");
    }
    json!({"type": "object", "properties": p, "required": required})
}

fn task_key() -> Value {
    json!({"type": "string", "format": "uuid", "description": "The task id (= ce_subject)."})
}

fn user_key() -> Value {
    json!({"type": "string", "description": "The user id (= ce_subject) of a user-level event."})
}

fn kafka_message_binding(key: Value) -> Value {
    json!({"kafka": {"key": key, "bindingVersion": KAFKA_BINDING}})
}

fn multi_format(schema: &Value) -> Value {
    json!({"schemaFormat": SCHEMA_FORMAT, "schema": schema})
}

fn channel_binding(topic: &str, partitions: i32, config: Value) -> Value {
    json!({"kafka": {"topic": topic, "partitions": partitions, "topicConfiguration": config, "bindingVersion": KAFKA_BINDING}})
}

/// The AsyncAPI 3.0 document of the topics.
pub fn asyncapi(topics: &Topics) -> Value {
    let mut schemas = Map::new();
    let mut messages = Map::new();
    let mut event_refs = Map::new();
    for (aggregate, s) in event_schemas() {
        let k = key(s.event_type, s.version);
        let current = !event_schemas().iter().any(|(_, o)| o.event_type == s.event_type && o.version > s.version);
        let (subject, key_schema) = match aggregate {
            "Task" => (json!({"type": "string", "format": "uuid", "description": "The task id (= the record key)."}), task_key()),
            _ => (json!({"type": "string", "description": "The user id (= the record key) of a user-level event."}), user_key()),
        };
        schemas.insert(format!("{}.v{}", s.event_type, s.version), multi_format(&s.schema));
        let status = if current {
            "the current version, written by the command API"
        } else {
            "an older version, still in the log; read through an upcaster into the current version"
        };
        messages.insert(
            k.clone(),
            json!({
                "name": s.event_type,
                "title": format!("{} v{}", s.event_type, s.version),
                "summary": s.schema.get("description").cloned().unwrap_or(Value::Null),
                "description": format!("Aggregate {aggregate}; data schema {} ({status}).", dataschema_uri(s.event_type, s.version)),
                "contentType": CONTENT_TYPE,
                "headers": cloudevents_headers(s.event_type, s.version, subject, true),
                "payload": {"$ref": format!("#/components/schemas/{}.v{}", s.event_type, s.version)},
                "bindings": kafka_message_binding(key_schema),
            }),
        );
        event_refs.insert(k.clone(), json!({"$ref": format!("#/components/messages/{k}")}));
    }
    // Not an event: a record a partition's writer commits to close a transaction Kafka left open.
    schemas.insert(
        "log.barrier".into(),
        json!({
            "type": "object",
            "description": "Where the transaction that this barrier closed began (the partition's last stable offset then) and how far the partition was written.",
            "properties": {
                "partition": {"type": "integer"},
                "open_from": {"type": "integer", "format": "int64"},
                "written_to": {"type": "integer", "format": "int64"},
            },
            "required": ["partition", "open_from", "written_to"],
        }),
    );
    messages.insert(
        "log_barrier".into(),
        json!({
            "name": crate::codec::BARRIER_TYPE,
            "title": "barrier (not an event)",
            "summary": "A record that is not an event: skip it. A partition's writer commits one when, after it fenced the partition's previous producer, Kafka still held a transaction of that producer open (its marker missing, seen after broker kills): the barrier's commit marker closes that transaction, whose records become readable. No key, no ce_subject, no ce_userid or ce_sequence.",
            "contentType": CONTENT_TYPE,
            "headers": {
                "type": "object",
                "properties": {
                    "ce_specversion": {"const": "1.0"},
                    "ce_id": {"type": "string", "format": "uuid"},
                    "ce_type": {"const": crate::codec::BARRIER_TYPE},
                    "ce_source": {"type": "string"},
                    "ce_time": {"type": "string", "format": "date-time"},
                    "content-type": {"const": CONTENT_TYPE},
                },
                "required": ["ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time"],
            },
            "payload": {"$ref": "#/components/schemas/log.barrier"},
            "bindings": kafka_message_binding(json!({"type": "null", "description": "No key: a barrier belongs to no stream."})),
        }),
    );
    event_refs.insert("log_barrier".into(), json!({"$ref": "#/components/messages/log_barrier"}));
    messages.insert(
        "log_barrier_tombstone".into(),
        json!({
            "name": "log.barrier.tombstone",
            "title": "barrier (not a task)",
            "summary": "Written with a barrier of the log, in the same partition, to close the same open transaction here: a tombstone of the key log.barrier, which no task has. Skip it.",
            "headers": {"type": "object", "properties": {"ce_type": {"const": crate::codec::BARRIER_TYPE}}, "required": ["ce_type"]},
            "payload": {"type": "null", "description": "No value (a Kafka tombstone)."},
            "bindings": kafka_message_binding(json!({"const": crate::codec::BARRIER_TYPE})),
        }),
    );
    schemas.insert(format!("{TASK_STATE_TYPE}.v1"), multi_format(&domain::current::TaskView::json_schema()));
    messages.insert(
        "task_state_v1".into(),
        json!({
            "name": TASK_STATE_TYPE,
            "title": "task state v1",
            "summary": "The full state of a task after an accepted command.",
            "contentType": CONTENT_TYPE,
            "headers": cloudevents_headers(TASK_STATE_TYPE, 1, task_key(), true),
            "payload": {"$ref": format!("#/components/schemas/{TASK_STATE_TYPE}.v1")},
            "bindings": kafka_message_binding(task_key()),
        }),
    );
    messages.insert(
        "task_tombstone".into(),
        json!({
            "name": "task.tombstone",
            "title": "task deleted (tombstone)",
            "summary": "The task was deleted: a record with the task id as key and no value, so compaction forgets the task.",
            "headers": cloudevents_headers(TASK_STATE_TYPE, 1, task_key(), false),
            "payload": {"type": "null", "description": "No value (a Kafka tombstone)."},
            "bindings": kafka_message_binding(task_key()),
        }),
    );
    let mut dlq_headers = Map::new();
    for (name, description) in DLQ_HEADERS {
        dlq_headers.insert(name.into(), string(description));
    }
    messages.insert(
        "dead_letter".into(),
        json!({
            "name": "dead-letter",
            "title": "dead letter",
            "summary": "A record of the log that the projector could not decode or apply, as it was (key, value, headers) plus the dlq_* headers.",
            "headers": {"type": "object", "properties": dlq_headers, "required": DLQ_HEADERS.iter().map(|(n, _)| *n).collect::<Vec<_>>(), "additionalProperties": {"type": "string", "description": "The original record's headers (ce_*, content-type, traceparent), unchanged."}},
            "payload": {"description": "The original record's value, unchanged (it may be anything: it could not be decoded)."},
            "bindings": kafka_message_binding(json!({"type": "string", "description": "The original record's key."})),
        }),
    );
    messages.insert(
        "partition_owner".into(),
        json!({
            "name": "partition-owner",
            "title": "partition owner (internal)",
            "summary": "Which command-API instance owns a partition of the log, written in the owner's transaction when it takes the partition over. Internal: its format may change in any release.",
            "payload": {"type": "object"},
            "bindings": kafka_message_binding(json!({"type": "string", "description": "The partition of the log (decimal)."})),
            "x-internal": true,
        }),
    );
    messages.insert(
        "data_key".into(),
        json!({
            "name": "data-key",
            "title": "wrapped data key (internal)",
            "summary": "One data key of a user, wrapped (AES-256-GCM) with a key-encryption key from configuration; a tombstone destroys it (erasure). Internal: its format may change in any release.",
            "payload": {"type": "object"},
            "bindings": kafka_message_binding(json!({"type": "string", "format": "uuid", "description": "The data key's id (ce_datakey of what it sealed)."})),
            "x-internal": true,
        }),
    );
    messages.insert(
        "partition_snapshot".into(),
        json!({
            "name": "partition-snapshot",
            "title": "partition snapshot chunk (internal)",
            "summary": "A chunk of a command-API partition writer's snapshot (decider states, idempotency answers, log position), so a restart reads only the tail of the log. Internal: its format may change in any release.",
            "payload": {"type": "object"},
            "x-internal": true,
        }),
    );
    let refs = |names: &[&str]| -> Value {
        names.iter().map(|n| (n.to_string(), json!({"$ref": format!("#/components/messages/{n}")}))).collect::<Map<_, _>>().into()
    };
    let op_messages = |channel: &str, names: Vec<String>| -> Value {
        names.iter().map(|n| json!({"$ref": format!("#/channels/{channel}/messages/{n}")})).collect::<Vec<_>>().into()
    };
    let event_names: Vec<String> = event_refs.keys().cloned().collect();
    json!({
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:taskstream:catalogue",
        "info": {
            "title": "taskstream event catalogue",
            "version": "1.0.0",
            "description": "The Kafka topics of taskstream: the event log (the source of truth), its dead letters, the current state of every task, and the command API's internal topics. Every record of task-events and task-updates is a CloudEvents 1.0 event in binary content mode (attributes as ce_* headers, the data as the value). Personal fields (titles, descriptions, tags, the webhook URL and its secret) are sealed with the user's data key named by ce_datakey; erasing the user destroys the key (crypto-shredding), so those records stay in place but become unreadable. Compatibility: a schema version, once published, never changes incompatibly; a new version may only add optional fields, anything else (removing, renaming or retyping a field, adding a required one) is a new version, and readers upcast older versions. Generated from the Rust types (platform::catalogue); the JSON Schemas are also under schemas/events/.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "local": {"host": "127.0.0.1:9092", "protocol": "kafka", "description": "The local broker of ./dev (KAFKA_BROKERS)."},
        },
        "channels": {
            "taskEvents": {
                "address": topics.events,
                "title": "the event log",
                "description": "Every accepted event, keyed by its stream (task id, or user id for user-level events), so every stream is totally ordered. Never deleted by age or size. Only accepted events are appended, plus (rarely) a barrier (log.barrier), which is not an event and which readers skip.",
                "messages": event_refs,
                "bindings": channel_binding(&topics.events, topics.partitions, json!({"cleanup.policy": ["delete"], "retention.ms": -1, "retention.bytes": -1})),
            },
            "taskEventsDlq": {
                "address": topics.dlq,
                "title": "dead letters of the projector",
                "description": "Records of the log that a projection could not decode or apply, with headers saying which projection failed, why, and the original topic, partition and offset.",
                "messages": refs(&["dead_letter"]),
                "bindings": channel_binding(&topics.dlq, topics.partitions, json!({"cleanup.policy": ["delete"]})),
            },
            "taskUpdates": {
                "address": topics.updates,
                "title": "the current state of every task",
                "description": "Compacted, key = task id: the task's full state after each accepted command, a tombstone when it is deleted. Written in the same Kafka transaction as the events on the log, so the two never disagree (read with isolation.level=read_committed).",
                "messages": refs(&["task_state_v1", "task_tombstone", "log_barrier_tombstone"]),
                "bindings": channel_binding(&topics.updates, topics.partitions, json!({"cleanup.policy": ["compact"]})),
            },
            "partitionOwners": {
                "address": topics.owners,
                "title": "partition owners (internal)",
                "description": "Internal to the command API: which instance owns which partition of the log. Not for outside consumers.",
                "messages": refs(&["partition_owner"]),
                "bindings": channel_binding(&topics.owners, 1, json!({"cleanup.policy": ["compact"]})),
                "x-internal": true,
            },
            "partitionSnapshots": {
                "address": topics.snapshots,
                "title": "partition snapshots (internal)",
                "description": "Internal to the command API: snapshots of its partition writers (partition p's snapshot in partition p). Not for outside consumers.",
                "messages": refs(&["partition_snapshot"]),
                "bindings": channel_binding(&topics.snapshots, topics.partitions, json!({"cleanup.policy": ["compact"], "max.message.bytes": 8_388_608})),
                "x-internal": true,
            },
            "dataKeys": {
                "address": topics.keys,
                "title": "the users' data keys (internal)",
                "description": "Internal: every user's data keys, wrapped with a key-encryption key that the log does not hold; compacted so that an erased key's record leaves the broker's disk within a known bound. Not for outside consumers.",
                "messages": refs(&["data_key"]),
                "bindings": channel_binding(&topics.keys, 1, json!({"cleanup.policy": ["compact"]})),
                "x-internal": true,
            },
        },
        "operations": {
            "appendEvents": {
                "action": "send",
                "channel": {"$ref": "#/channels/taskEvents"},
                "title": "the command API appends accepted events",
                "messages": op_messages("taskEvents", event_names.clone()),
            },
            "projectEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/taskEvents"},
                "title": "the projector reads the log into the read models",
                "messages": op_messages("taskEvents", event_names),
            },
            "publishDeadLetters": {
                "action": "send",
                "channel": {"$ref": "#/channels/taskEventsDlq"},
                "title": "the projector publishes dead letters",
                "messages": op_messages("taskEventsDlq", vec!["dead_letter".into()]),
            },
            "publishTaskState": {
                "action": "send",
                "channel": {"$ref": "#/channels/taskUpdates"},
                "title": "the command API publishes each task's state with its events",
                "messages": op_messages("taskUpdates", vec!["task_state_v1".into(), "task_tombstone".into(), "log_barrier_tombstone".into()]),
            },
            "announceOwners": {
                "action": "send",
                "channel": {"$ref": "#/channels/partitionOwners"},
                "messages": op_messages("partitionOwners", vec!["partition_owner".into()]),
            },
            "storeDataKeys": {
                "action": "send",
                "channel": {"$ref": "#/channels/dataKeys"},
                "messages": op_messages("dataKeys", vec!["data_key".into()]),
            },
            "writeSnapshots": {
                "action": "send",
                "channel": {"$ref": "#/channels/partitionSnapshots"},
                "messages": op_messages("partitionSnapshots", vec!["partition_snapshot".into()]),
            },
        },
        "components": {"schemas": schemas, "messages": messages},
    })
}

/// Every file of the catalogue under `schemas/`: (relative path, content). The content is pretty
/// JSON with a final newline.
pub fn files() -> Vec<(String, String)> {
    let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialize") + "\n";
    let mut out = vec![("asyncapi.json".to_owned(), pretty(&asyncapi(&Topics::default())))];
    for (_, s) in event_schemas() {
        out.push((format!("events/{}", schema_file_name(s.event_type, s.version)), pretty(&s.schema)));
    }
    out.push((format!("events/{}", schema_file_name(TASK_STATE_TYPE, 1)), pretty(&domain::current::TaskView::json_schema())));
    out
}

/// Why `new` (generated now) is not a compatible successor of `old` (the committed schema of the
/// same type and version): every problem found, by JSON path. Compatible: the same schema, except
/// descriptions, titles and examples, and new properties that are not required. Anything else
/// (a property removed or retyped, a new required property, a changed format, pattern or enum)
/// needs a new version and an upcaster.
pub fn incompatibilities(old: &Value, new: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    compare(old, new, "$", &mut problems);
    problems
}

const ANNOTATIONS: [&str; 4] = ["description", "title", "examples", "$comment"];

fn compare(old: &Value, new: &Value, path: &str, problems: &mut Vec<String>) {
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        if old != new {
            problems.push(format!("{path}: changed from {old} to {new}"));
        }
        return;
    };
    let required = |m: &Map<String, Value>| -> Vec<String> {
        let mut r: Vec<String> =
            m.get("required").and_then(Value::as_array).map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default();
        r.sort();
        r
    };
    let (old_required, new_required) = (required(o), required(n));
    for r in &new_required {
        if !old_required.contains(r) {
            problems.push(format!("{path}: property {r:?} became required"));
        }
    }
    for r in &old_required {
        if !new_required.contains(r) {
            problems.push(format!("{path}: property {r:?} is no longer required (consumers rely on it)"));
        }
    }
    let empty = Map::new();
    let props = |m: &Map<String, Value>| m.get("properties").and_then(Value::as_object).cloned().unwrap_or_else(|| empty.clone());
    let (old_props, new_props) = (props(o), props(n));
    for (name, schema) in &old_props {
        match new_props.get(name) {
            None => problems.push(format!("{path}: property {name:?} was removed")),
            Some(s) => compare(schema, s, &format!("{path}.properties.{name}"), problems),
        }
    }
    let keys: std::collections::BTreeSet<&String> = o.keys().chain(n.keys()).collect();
    for k in keys {
        if ANNOTATIONS.contains(&k.as_str()) || k == "required" || k == "properties" {
            continue;
        }
        match (o.get(k), n.get(k)) {
            (Some(a), Some(b)) => compare(a, b, &format!("{path}.{k}"), problems),
            (Some(a), None) => problems.push(format!("{path}: {k} {a} was removed")),
            (None, Some(b)) => problems.push(format!("{path}: {k} {b} was added")),
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn schemas_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas")
    }

    /// The committed catalogue is what the code generates. `UPDATE_SCHEMAS=1 cargo test -p platform
    /// catalogue` writes it, refusing a schema of an existing (type, version) that changed
    /// incompatibly (that needs a new version and an upcaster).
    #[test]
    fn committed_catalogue_is_what_the_code_generates() {
        let dir = schemas_dir();
        let update = std::env::var("UPDATE_SCHEMAS").is_ok_and(|v| v == "1");
        let mut stale = Vec::new();
        for (path, content) in files() {
            let file = dir.join(&path);
            let committed = std::fs::read_to_string(&file).ok();
            if committed.as_deref() == Some(content.as_str()) {
                continue;
            }
            if update {
                if let Some(old) = committed.as_deref().and_then(|c| serde_json::from_str::<Value>(c).ok()).filter(|_| path.starts_with("events/")) {
                    let problems = incompatibilities(&old, &serde_json::from_str(&content).unwrap());
                    assert!(problems.is_empty(), "schemas/{path} changed incompatibly; add a new version with an upcaster instead:\n{}", problems.join("\n"));
                }
                std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                std::fs::write(&file, &content).unwrap();
                eprintln!("wrote schemas/{path}");
            } else {
                stale.push(path);
            }
        }
        assert!(stale.is_empty(), "schemas/ differs from the generated catalogue: {stale:?}; run UPDATE_SCHEMAS=1 cargo test -p platform catalogue");
        // No file of an event version that the code no longer describes (versions are never removed).
        let generated: Vec<String> = files().into_iter().map(|(p, _)| p).collect();
        for entry in std::fs::read_dir(dir.join("events")).unwrap() {
            let name = format!("events/{}", entry.unwrap().file_name().to_string_lossy());
            assert!(generated.contains(&name), "schemas/{name} is committed but no longer generated: a published schema version must stay described");
        }
    }

    /// The compatibility check of `./dev test`: every committed schema of a (type, version) is
    /// compatible with what the code generates for it now.
    #[test]
    fn committed_event_schemas_are_frozen_except_for_new_optional_fields() {
        let dir = schemas_dir();
        for (path, content) in files().into_iter().filter(|(p, _)| p.starts_with("events/")) {
            let Ok(committed) = std::fs::read_to_string(dir.join(&path)) else { continue };
            let old: Value = serde_json::from_str(&committed).unwrap();
            let problems = incompatibilities(&old, &serde_json::from_str(&content).unwrap());
            assert!(problems.is_empty(), "schemas/{path} changed incompatibly; keep it and add a new version with an upcaster:\n{}", problems.join("\n"));
        }
    }

    #[test]
    fn the_compatibility_check_allows_new_optional_fields_only() {
        let old = json!({"type": "object", "properties": {"a": {"type": "string", "description": "x"}, "b": {"type": "integer"}}, "required": ["a"]});
        let ok = json!({"type": "object", "properties": {"a": {"type": "string", "description": "y"}, "b": {"type": "integer"}, "c": {"type": "string"}}, "required": ["a"]});
        assert_eq!(incompatibilities(&old, &ok), Vec::<String>::new());
        let removed = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]});
        assert_eq!(incompatibilities(&old, &removed), ["$: property \"b\" was removed"]);
        let retyped = json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}, "required": ["a"]});
        assert_eq!(incompatibilities(&old, &retyped), ["$.properties.b.type: changed from \"integer\" to \"string\""]);
        let required =
            json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "string"}}, "required": ["a", "c"]});
        assert_eq!(incompatibilities(&old, &required), ["$: property \"c\" became required"]);
        let formatted = json!({"type": "object", "properties": {"a": {"type": "string", "format": "uuid"}, "b": {"type": "integer"}}, "required": ["a"]});
        assert_eq!(incompatibilities(&old, &formatted), ["$.properties.a: format \"uuid\" was added"]);
    }

    /// Runs schemas/tools/check.mjs with the modules deploy/local/asyncapi.sh installs.
    fn check_mjs(args: &[&str]) -> (bool, String) {
        let Ok(node_path) = std::env::var("ASYNCAPI_NODE_PATH") else {
            panic!(
                "ASYNCAPI_NODE_PATH is not set: run the tests with ./dev test, or install the AsyncAPI tools with \
                 `bash -c 'source deploy/local/lib.sh; source deploy/local/asyncapi.sh; ensure_asyncapi_tools'` and set \
                 ASYNCAPI_NODE_PATH=$PWD/.local/asyncapi/node_modules"
            )
        };
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new("node")
            .arg(root.join("schemas/tools/check.mjs"))
            .args(args)
            .env("NODE_PATH", node_path)
            .current_dir(&root)
            .output()
            .expect("node runs (deploy/local/asyncapi.sh installs it)");
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    #[test]
    fn the_official_asyncapi_parser_accepts_the_document() {
        let dir = std::env::temp_dir().join(format!("taskstream-asyncapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The document as generated (the committed one is the same, see above), with other topic names.
        let file = dir.join("asyncapi.json");
        std::fs::write(&file, serde_json::to_string(&asyncapi(&Topics::for_events_topic("other-events", 3))).unwrap()).unwrap();
        let (ok, output) = check_mjs(&["document", file.to_str().unwrap()]);
        assert!(ok, "{output}");
        assert!(output.contains("valid AsyncAPI 3.0.0") && output.contains("other-events.dlq"), "{output}");
        // A broken document is refused (the check is not vacuous).
        let mut broken = asyncapi(&Topics::default());
        broken["operations"]["appendEvents"]["channel"] = json!({"$ref": "#/channels/nowhere"});
        std::fs::write(&file, serde_json::to_string(&broken).unwrap()).unwrap();
        let (ok, output) = check_mjs(&["document", file.to_str().unwrap()]);
        assert!(!ok, "a dangling $ref was accepted: {output}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Data of every event type as the code writes it, with every optional field set and unset, is
    /// valid against its committed schema; data the reader refuses is invalid.
    #[test]
    fn event_data_as_written_is_valid_against_the_committed_schemas() {
        use domain::user::{NotificationCreated, NotificationRead, UserEvent, WebhookRegistered, WebhookUrl};
        use domain::{DomainEvent, NewTask, Priority, Recurrence, RemindBefore, ReminderDue, Tags, TaskEvent, TaskId, TaskPatch, TimeZone, Title};
        let at = chrono::DateTime::from_timestamp(1_900_000_000, 123_000).unwrap();
        let mut full = NewTask::new(Title::parse("full".into()).unwrap());
        full.description = Some(domain::Description::parse("d\nline".into()).unwrap());
        full.priority = Priority::Urgent;
        full.due_at = Some(at);
        full.timezone = TimeZone::parse("Europe/Berlin".into()).unwrap();
        full.recurrence = Some(Recurrence::parse("FREQ=WEEKLY;BYDAY=MO".into()).unwrap());
        full.remind_before = Some(RemindBefore::parse("P1DT1H30M".into()).unwrap());
        full.tags = Tags::parse(vec!["a".into(), "b".into()]).unwrap();
        full.recurrence_parent_id = Some(TaskId::new_v7());
        full.occurrence = Some(3);
        let clearing = TaskPatch { description: Some(None), due_at: Some(None), recurrence: Some(None), remind_before: Some(None), ..TaskPatch::default() };
        let setting = TaskPatch {
            title: Some(Title::parse("t".into()).unwrap()),
            priority: Some(Priority::Low),
            timezone: Some(TimeZone::UTC),
            tags: Some(Tags::default()),
            remind_before: Some(Some(RemindBefore::parse("PT30M".into()).unwrap())),
            ..TaskPatch::default()
        };
        let task_events = [
            TaskEvent::Created(NewTask::new(Title::parse("min".into()).unwrap())),
            TaskEvent::Created(full.clone()),
            TaskEvent::Updated(clearing),
            TaskEvent::Updated(setting),
            TaskEvent::Completed,
            TaskEvent::Reopened,
            TaskEvent::Deleted,
            TaskEvent::ReminderDue(ReminderDue { remind_at: at, due_at: at }),
        ];
        let user_events = [
            UserEvent::NotificationCreated(NotificationCreated { notification_id: uuid::Uuid::now_v7(), task_id: TaskId::new_v7(), remind_at: at }),
            UserEvent::NotificationRead(NotificationRead { notification_id: uuid::Uuid::now_v7() }),
            UserEvent::WebhookRegistered(WebhookRegistered {
                url: WebhookUrl::parse("https://example.com/hook".into(), false).unwrap(),
                secret: "s3cret".into(),
            }),
            UserEvent::WebhookRemoved,
        ];
        let record = |t: &str, v: u32, data: &[u8]| json!({"type": t, "version": v, "data": serde_json::from_slice::<Value>(data).unwrap()});
        let mut records: Vec<Value> = task_events.iter().map(|e| record(e.event_type(), e.schema_version(), &e.to_json())).collect();
        records.extend(user_events.iter().map(|e| record(e.event_type(), e.schema_version(), &e.to_json())));
        let meta = domain::Metadata {
            event_id: uuid::Uuid::now_v7(),
            user_id: domain::UserId::parse("alice".into()).unwrap(),
            sequence: 1,
            occurred_at: at,
            correlation_id: None,
            causation_id: None,
            traceparent: None,
            idempotency: None,
            data_key: None,
        };
        let view = domain::current::TaskView::next(None, &domain::Envelope { subject: TaskId::new_v7(), meta, event: TaskEvent::Created(full) }).unwrap();
        records.push(json!({"type": TASK_STATE_TYPE, "version": 1, "data": view}));
        let dir = std::env::temp_dir().join(format!("taskstream-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("records.json");
        std::fs::write(&file, serde_json::to_string(&records).unwrap()).unwrap();
        let schemas = schemas_dir().join("events");
        let (ok, output) = check_mjs(&["records", schemas.to_str().unwrap(), file.to_str().unwrap()]);
        assert!(ok, "{output}");
        assert!(output.contains(&format!("{} record(s) checked, 0 invalid", records.len())), "{output}");
        // What the reader refuses, the schemas refuse.
        let bad = [
            json!({"type": "task.created", "version": 1, "data": {"title": 1}}),
            json!({"type": "task.created", "version": 1, "data": {"title": "a", "remind_before": "soon"}}),
            json!({"type": "task.created", "version": 1, "data": {"title": "a", "remind_before": "P1M"}}),
            json!({"type": "task.created", "version": 1, "data": {"priority": "high"}}),
            json!({"type": "task.updated", "version": 1, "data": {"priority": "HIGH"}}),
            json!({"type": "task.reminder_due", "version": 1, "data": {"remind_at": "yesterday", "due_at": "2030-01-01T00:00:00Z"}}),
            json!({"type": "notification.read", "version": 1, "data": {"notification_id": "not-a-uuid"}}),
            // Valid data, headers against the AsyncAPI message: a sequence that is not a number.
            json!({"type": "task.completed", "version": 1, "data": {}, "headers": {
                "ce_specversion": "1.0", "ce_id": uuid::Uuid::now_v7(), "ce_type": "task.completed", "ce_source": SOURCE,
                "ce_time": "2030-01-01T00:00:00Z", "ce_subject": uuid::Uuid::now_v7(), "ce_userid": "a", "ce_sequence": "x1",
                "content-type": CONTENT_TYPE}}),
        ];
        std::fs::write(&file, serde_json::to_string(&bad).unwrap()).unwrap();
        let (ok, output) = check_mjs(&["records", schemas.to_str().unwrap(), file.to_str().unwrap()]);
        assert!(!ok && output.contains(&format!("{} record(s) checked, {} invalid", bad.len(), bad.len())), "{output}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The dead-letter headers the document lists are the ones the projector writes (its producer
    /// lives in the projector crate, which this crate cannot import: compare with its source).
    #[test]
    fn the_documented_dead_letter_headers_are_the_projectors() {
        let source = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../projector/src/dlq.rs")).unwrap();
        let written: Vec<&str> = source.match_indices("(\"dlq_").map(|(i, _)| source[i + 2..].split('"').next().unwrap()).collect();
        let documented: Vec<&str> = DLQ_HEADERS.iter().map(|(n, _)| *n).collect();
        assert_eq!(written, documented, "projector/src/dlq.rs writes other dead-letter headers than the catalogue lists");
    }

    #[test]
    fn every_event_type_has_a_v1_schema_and_each_version_once() {
        use domain::DomainEvent;
        let all = event_schemas();
        for t in domain::TaskEvent::TYPES.iter().chain(domain::user::UserEvent::TYPES) {
            assert!(all.iter().any(|(_, s)| s.event_type == *t && s.version == 1), "{t} has no v1 schema");
        }
        assert_eq!(all.len(), {
            let mut k: Vec<_> = all.iter().map(|(_, s)| (s.event_type, s.version)).collect();
            k.dedup();
            k.len()
        });
    }
}
