//! The read-model rows and how events change them. Pure: no IO, so batch folding is tested directly.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use domain::recurrence::{next_occurrence, NextOccurrence};
use domain::user::UserEvent;
use domain::{ids, Recurrence, TaskEvent, TaskId, TimeZone};
use platform::codec::{self, Envelope};
use platform::keys::{KeyError, KeyRing};
use platform::position::Position;
use platform::readmodel::status;
pub use platform::readmodel::TaskRow;

/// A decoded record with its place in the log.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub position: Position,
    pub envelope: Envelope<TaskEvent>,
}

/// A decoded user-level record with its place in the log.
#[derive(Debug, Clone)]
pub struct RecordedUser {
    pub position: Position,
    pub envelope: Envelope<UserEvent>,
}

/// A record as it is in the log (key, headers, payload), kept for the records that are dead-lettered
/// or parked, and re-decoded when they are replayed.
///
/// Its bytes are copied into one buffer: every record read is kept until its batch is applied, and
/// a copy per header (a dozen allocations per record, freed on another thread) took about a fifth
/// of the projector's CPU in a catch-up (`perf`, `loadgen backlog`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub position: Position,
    /// The key, each header's name and value, and the payload, one after the other.
    bytes: Vec<u8>,
    key: Option<Span>,
    /// Each header's name and value.
    headers: Vec<(Span, Span)>,
    payload: Option<Span>,
}

/// Where a part of a [`RawRecord`] lies in its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl RawRecord {
    /// A record from its parts; a header without a value gets an empty one.
    pub fn new(position: Position, key: Option<&[u8]>, headers: &[(&str, Option<&[u8]>)], payload: Option<&[u8]>) -> Self {
        let size = key.map_or(0, <[u8]>::len)
            + headers.iter().map(|(name, value)| name.len() + value.map_or(0, <[u8]>::len)).sum::<usize>()
            + payload.map_or(0, <[u8]>::len);
        let mut bytes = Vec::with_capacity(size);
        let mut put = |part: &[u8]| {
            let start = bytes.len() as u32;
            bytes.extend_from_slice(part);
            Span { start, end: bytes.len() as u32 }
        };
        let key = key.map(&mut put);
        let headers = headers.iter().map(|(name, value)| (put(name.as_bytes()), put(value.unwrap_or_default()))).collect();
        let payload = payload.map(&mut put);
        Self { position, bytes, key, headers, payload }
    }

    pub fn from_message<M: rdkafka::message::Message>(m: &M) -> Self {
        use rdkafka::message::Headers;
        let position = Position { partition: m.partition(), offset: m.offset() };
        let headers: Vec<(&str, Option<&[u8]>)> = m.headers().map(|h| h.iter().map(|h| (h.key, h.value)).collect()).unwrap_or_default();
        Self::new(position, m.key(), &headers, m.payload())
    }

    fn part(&self, span: Span) -> &[u8] {
        &self.bytes[span.start as usize..span.end as usize]
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key.map(|s| self.part(s))
    }

    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.map(|s| self.part(s))
    }

    /// Each header's name and value, in the record's order.
    pub fn headers(&self) -> impl ExactSizeIterator<Item = (&str, &[u8])> {
        self.headers.iter().map(|h| self.header(h))
    }

    /// A header's name (it was a `&str` when copied in) and value.
    fn header(&self, (name, value): &(Span, Span)) -> (&str, &[u8]) {
        (std::str::from_utf8(self.part(*name)).unwrap_or_default(), self.part(*value))
    }

    /// The header names, as the dead letter and parked record tables store them.
    pub fn header_names(&self) -> Vec<String> {
        self.headers().map(|(name, _)| name.to_owned()).collect()
    }

    /// The header values, in the order of [`RawRecord::header_names`].
    pub fn header_values(&self) -> Vec<Vec<u8>> {
        self.headers().map(|(_, value)| value.to_vec()).collect()
    }

    /// The record's key as text (task or user id); lossy for a key that is not UTF-8.
    pub fn key_text(&self) -> String {
        self.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default()
    }

    /// The `ce_type` header, if any.
    pub fn event_type(&self) -> Option<String> {
        self.headers().find(|(name, _)| *name == "ce_type").map(|(_, value)| String::from_utf8_lossy(value).into_owned())
    }

    pub fn decode(&self, keys: &KeyRing) -> Result<codec::Record, codec::DecodeError> {
        codec::decode_record(self.key(), Some(self), self.payload(), keys)
    }
}

/// The record's headers, read in place (no librdkafka header list is built for them).
impl rdkafka::message::Headers for RawRecord {
    fn count(&self) -> usize {
        self.headers.len()
    }

    fn try_get(&self, idx: usize) -> Option<rdkafka::message::Header<'_, &[u8]>> {
        let (key, value) = self.header(self.headers.get(idx)?);
        Some(rdkafka::message::Header { key, value: Some(value) })
    }
}

/// A record that could not be decoded or applied, on its way to the dead letters.
#[derive(Debug, Clone)]
pub struct FailedRecord {
    pub raw: RawRecord,
    pub error: String,
}

/// A webhook's signing secret stays sealed in the read model, exactly as the log holds it (so a
/// rebuild writes the same value); the deliverer opens it to sign (`webhooks::open_secret`). A
/// registration written before sealing keeps its plain secret.
fn keep_secret_sealed(mut record: codec::Record, payload: Option<&[u8]>) -> codec::Record {
    if let codec::Record::User(Envelope { event: UserEvent::WebhookRegistered(w), meta, .. }) = &mut record {
        if meta.data_key.is_some() {
            let sealed = payload.and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok()).and_then(|data| match data.get("signing_secret") {
                Some(serde_json::Value::String(v)) if v.starts_with(platform::keys::SEALED_PREFIX) => Some(v.clone()),
                _ => None,
            });
            if let Some(sealed) = sealed {
                w.secret = sealed;
            }
        }
    }
    record
}

/// Decodes a record. A data key not known here yet was stored before the record was appended, so
/// on that miss (only) the keys topic is read to its end and the record decoded again; a key that
/// is still unknown then was destroyed (the record is erased).
async fn decode_settling(
    keys: &KeyRing,
    decode: impl Fn() -> Result<codec::Record, codec::DecodeError>,
) -> Result<Result<codec::Record, codec::DecodeError>, KeyError> {
    let decoded = decode();
    if let Err(codec::DecodeError::Erased(id)) = &decoded {
        if keys.settle(id).await? {
            return Ok(decode());
        }
    }
    Ok(decoded)
}

/// What one transaction applies: task and user-level records, in log order within each partition.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub tasks: Vec<Recorded>,
    pub users: Vec<RecordedUser>,
    /// Records that could not be decoded (or applied): dead-lettered in live mode.
    pub failed: Vec<FailedRecord>,
    /// The decoded records as read, for parking them behind a dead letter.
    pub raw: Vec<RawRecord>,
    /// Next offset per partition after this batch (includes skipped records).
    pub to: HashMap<i32, i64>,
    /// Records sealed with a destroyed data key (their user was erased): skipped, projected to
    /// nothing.
    pub erased: u64,
}

impl Batch {
    /// Decoded records.
    pub fn len(&self) -> usize {
        self.tasks.len() + self.users.len()
    }
    pub fn is_empty(&self) -> bool {
        self.to.is_empty()
    }

    /// Adds a record, as read from the log (or stored: a dead letter or a parked record being
    /// released); a decoded one is kept as read too, for parking. `Err` only when the keys topic
    /// could not be read.
    pub async fn push(&mut self, raw: RawRecord, keys: &KeyRing) -> Result<(), KeyError> {
        let position = raw.position;
        self.to.insert(position.partition, position.offset + 1);
        match decode_settling(keys, || raw.decode(keys)).await? {
            Ok(record) => {
                self.push_decoded(position, keep_secret_sealed(record, raw.payload()), keys);
                self.raw.push(raw);
            }
            Err(codec::DecodeError::Erased(_)) => self.erased += 1,
            // Not an event (a writer closed a transaction Kafka had left open): nothing to apply.
            Err(codec::DecodeError::Barrier) => {}
            Err(e) => self.failed.push(FailedRecord { error: format!("cannot decode: {e}"), raw }),
        }
        Ok(())
    }

    fn push_decoded(&mut self, position: Position, record: codec::Record, keys: &KeyRing) {
        match record {
            codec::Record::Task(envelope) => self.tasks.push(Recorded { position, envelope }),
            codec::Record::User(envelope) => {
                // The keys an erasure names are destroyed from here on, even before their tombstones
                // are read: a record sealed with one, in any partition, is erased.
                if let UserEvent::Erased(e) = &envelope.event {
                    keys.forget(&e.data_keys);
                }
                self.users.push(RecordedUser { position, envelope })
            }
        }
    }

    /// Keeps only the records (and end offsets) of the partitions `keep` accepts: the records of a
    /// partition revoked by a rebalance while the batch was read are dropped, never applied.
    pub fn retain_partitions(&mut self, keep: impl Fn(i32) -> bool) {
        self.tasks.retain(|r| keep(r.position.partition));
        self.users.retain(|r| keep(r.position.partition));
        self.failed.retain(|f| keep(f.raw.position.partition));
        self.raw.retain(|r| keep(r.position.partition));
        self.to.retain(|p, _| keep(*p));
    }

    /// Splits the batch into at most `ways` batches by partition, each partition whole in one of
    /// them, balanced by records (a partition's records stay in order). Each part can be applied
    /// in its own transaction: the offsets are compared and set per partition, and a stream (with
    /// its parked records) lives in one partition.
    pub fn split_by_partition(self, ways: usize) -> Vec<Batch> {
        let mut load: HashMap<i32, usize> = self.to.keys().map(|p| (*p, 0)).collect();
        for p in self.tasks.iter().map(|r| r.position.partition).chain(self.users.iter().map(|r| r.position.partition)) {
            *load.entry(p).or_default() += 1;
        }
        for p in self.failed.iter().map(|f| f.raw.position.partition).chain(self.raw.iter().map(|r| r.position.partition)) {
            load.entry(p).or_default();
        }
        let ways = ways.clamp(1, load.len().max(1));
        if ways == 1 {
            return vec![self];
        }
        let mut partitions: Vec<(i32, usize)> = load.into_iter().collect();
        partitions.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut part_of: HashMap<i32, usize> = HashMap::new();
        let mut sizes = vec![0usize; ways];
        for (p, n) in partitions {
            let i = (0..ways).min_by_key(|i| sizes[*i]).expect("ways >= 1");
            sizes[i] += n;
            part_of.insert(p, i);
        }
        let mut parts: Vec<Batch> = (0..ways).map(|_| Batch::default()).collect();
        for r in self.tasks {
            parts[part_of[&r.position.partition]].tasks.push(r);
        }
        for r in self.users {
            parts[part_of[&r.position.partition]].users.push(r);
        }
        for f in self.failed {
            parts[part_of[&f.raw.position.partition]].failed.push(f);
        }
        for r in self.raw {
            parts[part_of[&r.position.partition]].raw.push(r);
        }
        for (p, o) in self.to {
            parts[part_of[&p]].to.insert(p, o);
        }
        parts.retain(|b| !b.is_empty());
        parts
    }

    /// The key (task or user id) of every decoded record with its position.
    pub fn keys(&self) -> impl Iterator<Item = (String, Position)> + '_ {
        let tasks = self.tasks.iter().map(|r| (r.envelope.subject.to_string(), r.position));
        let users = self.users.iter().map(|r| (r.envelope.meta.user_id.to_string(), r.position));
        tasks.chain(users)
    }
}

/// What happens to a task row when an event is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant, reason = "nearly every event leaves a row; boxing it would allocate once per event")]
pub enum RowState {
    Present(TaskRow),
    Removed,
}

/// Reaction kind: CreateTask of a recurring task's next occurrence (`POST /v1/tasks`).
pub const SPAWN_OCCURRENCE: &str = "spawn_occurrence";
/// Reaction kind: RecordNotification of a fired reminder in its user's stream
/// (`POST /internal/v1/notifications/{id}`).
pub const RECORD_NOTIFICATION: &str = "record_notification";

/// A command that a live event calls for (sent through the command API by the reactor).
#[derive(Debug, Clone, PartialEq)]
pub struct Reaction {
    /// Deterministic: the id of what the reaction creates.
    pub id: Uuid,
    pub kind: &'static str,
    pub user_id: String,
    pub task_id: Uuid,
    /// The command's JSON body.
    pub payload: serde_json::Value,
    pub causation_id: Uuid,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
}

/// A notification row (from `task.reminder_due`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationRow {
    pub id: Uuid,
    pub user_id: String,
    pub task_id: Uuid,
    pub kind: &'static str,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub event_id: Uuid,
}

/// What applying events produced besides task rows.
#[derive(Debug, Default)]
pub struct Effects {
    pub reactions: Vec<Reaction>,
    pub notifications: Vec<NotificationRow>,
    /// The folded records (their indices, ascending) whose task has no row to apply them to: its
    /// `task.created` was never projected (sealed with a key destroyed before it was read: the
    /// task was erased with its user) or the task was deleted. They leave no trace, not even in
    /// the history: an erased task's later events carry no personal field and decode.
    pub orphans: Vec<usize>,
}

impl Effects {
    /// The records of `folded` (the batch this was folded from) that were applied to a row.
    pub fn projected<'a>(&self, folded: &'a [Recorded]) -> Vec<&'a Recorded> {
        let mut orphans = self.orphans.iter().peekable();
        folded
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                let orphan = orphans.peek() == Some(&i);
                if orphan {
                    orphans.next();
                }
                !orphan
            })
            .map(|(_, r)| r)
            .collect()
    }
}

/// The next occurrence of a recurring task completed by `env`, as a CreateTask command.
fn spawn_next_occurrence(r: &TaskRow, env: &Envelope<TaskEvent>) -> Option<Reaction> {
    let rule = Recurrence::parse(r.recurrence.clone()?).ok()?;
    let zone = TimeZone::parse(r.timezone.clone()).ok()?;
    let occurrence = r.occurrence.and_then(|o| u32::try_from(o).ok()).unwrap_or(1);
    let NextOccurrence::Due { due_at, occurrence } = next_occurrence(&rule, zone, r.due_at?, env.meta.occurred_at, occurrence) else {
        return None;
    };
    let id = *ids::next_occurrence_id(env.subject, occurrence).as_uuid();
    let priority = r.priority();
    let mut payload = serde_json::json!({
        "task_id": id,
        "title": r.title,
        "priority": priority.as_str(),
        "due_at": due_at,
        "timezone": r.timezone,
        "recurrence": r.recurrence,
        "tags": r.tags,
        "recurrence_parent_id": env.subject,
        "occurrence": occurrence,
    });
    if let Some(d) = &r.description {
        payload["description"] = d.clone().into();
    }
    if let Some(rb) = &r.remind_before {
        payload["remind_before"] = rb.clone().into();
    }
    Some(Reaction {
        id,
        kind: SPAWN_OCCURRENCE,
        user_id: r.user_id.clone(),
        task_id: r.id,
        payload,
        causation_id: env.meta.event_id,
        correlation_id: env.meta.correlation_id.clone(),
        traceparent: env.meta.traceparent.clone(),
    })
}

/// The notification of a fired reminder, recorded in its user's stream (RecordNotification): the
/// user's stream learns its notifications only from its own events, so MarkNotificationRead is
/// decided from the user's partition alone. The reaction's id is the notification's.
fn record_notification(r: &TaskRow, env: &Envelope<TaskEvent>, id: Uuid, remind_at: DateTime<Utc>) -> Reaction {
    Reaction {
        id,
        kind: RECORD_NOTIFICATION,
        user_id: r.user_id.clone(),
        task_id: r.id,
        payload: serde_json::json!({ "task_id": r.id, "remind_at": remind_at }),
        causation_id: env.meta.event_id,
        correlation_id: env.meta.correlation_id.clone(),
        traceparent: env.meta.traceparent.clone(),
    }
}

/// Applies one event to the current row (if any). Events at or below the row's version were
/// already applied and are ignored (this makes applying a batch idempotent).
pub fn apply(row: Option<RowState>, env: &Envelope<TaskEvent>) -> Option<RowState> {
    apply_with_effects(row, env, &mut Effects::default())
}

/// `apply`, also collecting the reactions and notifications the event calls for.
pub fn apply_with_effects(row: Option<RowState>, env: &Envelope<TaskEvent>, effects: &mut Effects) -> Option<RowState> {
    let version = i32::try_from(env.meta.sequence).unwrap_or(i32::MAX);
    if let Some(RowState::Present(r)) = &row {
        if version <= r.version {
            return row;
        }
    }
    let at = env.meta.occurred_at;
    match (row, &env.event) {
        (None, TaskEvent::Created(t)) => {
            let mut r = TaskRow {
                id: *env.subject.as_uuid(),
                user_id: env.meta.user_id.to_string(),
                title: t.title.to_string(),
                description: t.description.as_ref().map(|d| d.to_string()),
                status: status::OPEN.into(),
                priority: t.priority.rank(),
                due_at: t.due_at,
                timezone: t.timezone.name().to_owned(),
                recurrence: t.recurrence.as_ref().map(|r| r.to_string()),
                remind_before: t.remind_before.as_ref().map(|r| r.as_ref().to_owned()),
                remind_at: None,
                tags: t.tags.to_strings(),
                version,
                created_at: at,
                updated_at: at,
                completed_at: None,
                recurrence_parent_id: t.recurrence_parent_id.map(|p| *p.as_uuid()),
                occurrence: t.occurrence.and_then(|o| i32::try_from(o).ok()),
                reminded_for: None,
            };
            r.recompute_remind_at();
            Some(RowState::Present(r))
        }
        (Some(RowState::Present(mut r)), event) => {
            r.version = version;
            r.updated_at = at;
            match event {
                TaskEvent::Created(_) => {}
                TaskEvent::Updated(p) => {
                    if let Some(t) = &p.title {
                        r.title = t.to_string();
                    }
                    if let Some(d) = &p.description {
                        r.description = d.as_ref().map(|d| d.to_string());
                    }
                    if let Some(pr) = p.priority {
                        r.priority = pr.rank();
                    }
                    if let Some(d) = p.due_at {
                        r.due_at = d;
                    }
                    if let Some(tz) = p.timezone {
                        r.timezone = tz.name().to_owned();
                    }
                    if let Some(rec) = &p.recurrence {
                        r.recurrence = rec.as_ref().map(|x| x.to_string());
                    }
                    if let Some(rb) = &p.remind_before {
                        r.remind_before = rb.as_ref().map(|x| x.as_ref().to_owned());
                    }
                    if let Some(tags) = &p.tags {
                        r.tags = tags.to_strings();
                    }
                    r.recompute_remind_at();
                }
                TaskEvent::Completed => {
                    r.status = status::COMPLETED.into();
                    r.completed_at = Some(at);
                    effects.reactions.extend(spawn_next_occurrence(&r, env));
                }
                TaskEvent::ReminderDue(rd) => {
                    r.reminded_for = Some(rd.remind_at);
                    let id = ids::reminder_notification_id(env.subject, rd.remind_at);
                    effects.reactions.push(record_notification(&r, env, id, rd.remind_at));
                    effects.notifications.push(NotificationRow {
                        id,
                        user_id: r.user_id.clone(),
                        task_id: r.id,
                        kind: "reminder",
                        message: format!("Reminder: \"{}\" is due at {}", r.title, rd.due_at.to_rfc3339()),
                        created_at: at,
                        event_id: env.meta.event_id,
                    });
                }
                TaskEvent::Reopened => {
                    r.status = status::OPEN.into();
                    r.completed_at = None;
                }
                TaskEvent::Deleted => return Some(RowState::Removed),
            }
            Some(RowState::Present(r))
        }
        // An event for a task whose row is gone or never existed: nothing to show for it.
        (other, _) => other,
    }
}

/// Folds a batch (in log order) over the rows loaded for its tasks; returns the final state of
/// every task the batch touched.
pub fn fold(loaded: HashMap<TaskId, TaskRow>, batch: &[Recorded]) -> HashMap<TaskId, Option<RowState>> {
    fold_with_effects(loaded, batch).0
}

/// `fold`, also returning what the batch's events call for.
pub fn fold_with_effects(loaded: HashMap<TaskId, TaskRow>, batch: &[Recorded]) -> (HashMap<TaskId, Option<RowState>>, Effects) {
    let mut rows: HashMap<TaskId, Option<RowState>> = loaded.into_iter().map(|(k, v)| (k, Some(RowState::Present(v)))).collect();
    let mut effects = Effects::default();
    for (i, rec) in batch.iter().enumerate() {
        let slot = rows.entry(rec.envelope.subject).or_insert(None);
        let orphan = match slot {
            Some(RowState::Present(_)) => false,
            None => !matches!(rec.envelope.event, TaskEvent::Created(_)),
            Some(RowState::Removed) => true,
        };
        if orphan {
            effects.orphans.push(i);
        }
        *slot = apply_with_effects(slot.take(), &rec.envelope, &mut effects);
    }
    (rows, effects)
}

/// A rebuild's bulk phase keeps the row of every task replayed so far here, instead of reading and
/// upserting it per batch; the rows are written to PostgreSQL when the phase ends (and, before an
/// erasure, the ones changed since the last write). A deleted task leaves the table, unless it was
/// written already: then its entry stays, without a row, until the next write deletes it.
#[derive(Debug, Default)]
pub struct TaskTable {
    slots: HashMap<TaskId, Slot>,
}

#[derive(Debug)]
struct Slot {
    /// `None`: deleted since it was written.
    row: Option<TaskRow>,
    /// In PostgreSQL (a write wrote it).
    written: bool,
    /// Changed since it was last written (or never written).
    dirty: bool,
}

/// What a write of a [`TaskTable`] sends: rows never written (`fresh`), rows written before and
/// changed since (`changed`; possibly deleted and created again meanwhile), and the ids of rows
/// written before and deleted since (`removed`).
#[derive(Debug, Default)]
pub struct DirtyRows<'a> {
    pub fresh: Vec<&'a TaskRow>,
    pub changed: Vec<&'a TaskRow>,
    pub removed: Vec<Uuid>,
}

impl DirtyRows<'_> {
    pub fn is_empty(&self) -> bool {
        self.fresh.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

impl TaskTable {
    /// Tasks held (rows, and deleted rows still to be deleted in PostgreSQL).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Folds a batch's task records onto the table: the rows of the batch's tasks are taken out and
    /// folded by [`fold_with_effects`], as the rows a batch loads from PostgreSQL are, and what it
    /// leaves goes back (a deleted task leaves the table).
    pub fn fold(&mut self, batch: &[Recorded]) -> Effects {
        let loaded: HashMap<TaskId, TaskRow> =
            batch.iter().filter_map(|r| Some((r.envelope.subject, self.slots.get_mut(&r.envelope.subject)?.row.take()?))).collect();
        let (folded, effects) = fold_with_effects(loaded, batch);
        for (id, state) in folded {
            match state {
                Some(RowState::Present(r)) => {
                    let slot = self.slots.entry(id).or_insert(Slot { row: None, written: false, dirty: true });
                    slot.row = Some(r);
                    slot.dirty = true;
                }
                // No row: the task was deleted (or never had one). A row that was written must still
                // be deleted in PostgreSQL; one that never was is simply forgotten.
                Some(RowState::Removed) | None => match self.slots.get_mut(&id) {
                    Some(slot) if slot.written => slot.dirty = true,
                    Some(_) => {
                        self.slots.remove(&id);
                    }
                    None => {}
                },
            }
        }
        effects
    }

    /// The rows changed since the last write, each list in id order.
    pub fn dirty(&self) -> DirtyRows<'_> {
        let mut out = DirtyRows::default();
        for (id, slot) in self.slots.iter().filter(|(_, s)| s.dirty) {
            match (&slot.row, slot.written) {
                (Some(r), false) => out.fresh.push(r),
                (Some(r), true) => out.changed.push(r),
                (None, _) => out.removed.push(*id.as_uuid()),
            }
        }
        out.fresh.sort_unstable_by_key(|r| r.id);
        out.changed.sort_unstable_by_key(|r| r.id);
        out.removed.sort_unstable();
        out
    }

    /// After [`dirty`](Self::dirty)'s rows were committed: they are in PostgreSQL as they are here.
    pub fn mark_written(&mut self) {
        self.slots.retain(|_, s| s.row.is_some() || !s.dirty);
        for slot in self.slots.values_mut() {
            slot.written = true;
            slot.dirty = false;
        }
    }

    /// Drops tasks whose rows PostgreSQL no longer has (an erasure deleted them).
    pub fn forget(&mut self, ids: &[Uuid]) {
        for id in ids {
            self.slots.remove(&TaskId::from_uuid(*id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use domain::{Metadata, NewTask, Priority, RemindBefore, TaskPatch, Title, UserId};
    use proptest::prelude::*;

    fn env(task: u128, seq: u32, event: TaskEvent) -> Recorded {
        Recorded {
            position: Position { partition: 0, offset: i64::from(seq) },
            envelope: Envelope {
                subject: TaskId::from_uuid(Uuid::from_u128(task)),
                meta: Metadata {
                    event_id: Uuid::from_u128(task * 1000 + u128::from(seq)),
                    user_id: UserId::parse("alice".into()).unwrap(),
                    sequence: seq,
                    occurred_at: DateTime::from_timestamp(1_700_000_000 + i64::from(seq), 0).unwrap(),
                    correlation_id: None,
                    causation_id: None,
                    traceparent: None,
                    idempotency: None,
                    data_key: None,
                },
                event,
            },
        }
    }

    #[tokio::test]
    async fn a_barrier_is_skipped_and_its_offset_passed() {
        let (payload, headers) = codec::encode_barrier(4, 10, 12);
        let m = rdkafka::message::OwnedMessage::new(Some(payload), None, "task-events".into(), rdkafka::Timestamp::NotAvailable, 4, 13, Some(headers));
        let keys = platform::keys::KeyRing::in_memory(platform::keys::Keks::dev());
        let mut batch = Batch::default();
        batch.push(RawRecord::from_message(&m), &keys).await.unwrap();
        assert_eq!(batch.len(), 0, "a barrier is not an event");
        assert!(batch.failed.is_empty() && batch.raw.is_empty(), "nor a record to dead-letter or park");
        assert_eq!(batch.to.get(&4), Some(&14), "its offset is passed (stored with the rows)");
        assert!(!batch.is_empty());
    }

    #[test]
    fn a_batch_splits_into_whole_partitions_balanced_by_records_in_their_order() {
        let mut batch = Batch::default();
        // Partition 0: 4 records, 1: 2, 2: 1, 3: none (only an end offset: transaction markers).
        for (partition, offset) in [(0, 1), (1, 1), (0, 2), (2, 1), (0, 3), (1, 2), (0, 4)] {
            let mut r = env(u128::from(partition as u32) * 100 + u128::from(offset as u64), 1, created());
            r.position = Position { partition, offset };
            batch.tasks.push(r);
            batch.to.insert(partition, offset + 1);
        }
        let raw = RawRecord::new(Position { partition: 2, offset: 2 }, None, &[], None);
        batch.failed.push(FailedRecord { raw, error: "x".into() });
        batch.to.insert(2, 3);
        batch.to.insert(3, 10);
        let parts = batch.split_by_partition(2);
        assert_eq!(parts.len(), 2);
        let shape = |b: &Batch| {
            let mut to: Vec<(i32, i64)> = b.to.iter().map(|(p, o)| (*p, *o)).collect();
            to.sort_unstable();
            let records: Vec<(i32, i64)> = b.tasks.iter().map(|r| (r.position.partition, r.position.offset)).collect();
            let failed: Vec<i32> = b.failed.iter().map(|f| f.raw.position.partition).collect();
            (to, records, failed)
        };
        // The busiest partition alone; the others (3 records) together.
        assert_eq!(shape(&parts[0]), (vec![(0, 5)], vec![(0, 1), (0, 2), (0, 3), (0, 4)], vec![]));
        assert_eq!(shape(&parts[1]), (vec![(1, 3), (2, 3), (3, 10)], vec![(1, 1), (2, 1), (1, 2)], vec![2]));
        // One way, or one partition: the batch as it is.
        let mut one = Batch::default();
        one.to.insert(4, 1);
        assert_eq!(one.split_by_partition(4).len(), 1);
        assert!(Batch::default().split_by_partition(2).len() <= 1);
    }

    #[test]
    fn a_raw_record_gives_back_its_key_headers_and_payload() {
        use rdkafka::message::Headers as _;
        let headers = [("ce_type", Some(&b"task.created"[..])), ("empty", None), ("traceparent", Some(&b"00-ab"[..]))];
        let raw = RawRecord::new(Position { partition: 3, offset: 9 }, Some(b"k-1"), &headers, Some(b"{\"a\":1}"));
        assert_eq!(raw.key(), Some(&b"k-1"[..]));
        assert_eq!(raw.payload(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(raw.key_text(), "k-1");
        assert_eq!(raw.event_type().as_deref(), Some("task.created"));
        assert_eq!(raw.header_names(), ["ce_type", "empty", "traceparent"]);
        assert_eq!(raw.header_values(), [b"task.created".to_vec(), vec![], b"00-ab".to_vec()]);
        assert_eq!(raw.count(), 3);
        let third = raw.get(2);
        assert_eq!((third.key, third.value), ("traceparent", Some(&b"00-ab"[..])));
        assert!(raw.try_get(3).is_none());
        let bare = RawRecord::new(Position { partition: 0, offset: 0 }, None, &[], None);
        assert_eq!((bare.key(), bare.payload(), bare.event_type(), bare.count()), (None, None, None, 0));
        assert_eq!(bare.key_text(), "");
    }

    #[test]
    fn retaining_partitions_drops_the_records_and_end_offsets_of_the_others() {
        let mut batch = Batch::default();
        for (partition, offset) in [(0, 5), (1, 7), (0, 6), (2, 1)] {
            let mut r = env(u128::from(offset as u64) + 1, 1, created());
            r.position = Position { partition, offset };
            batch.tasks.push(r);
            batch.to.insert(partition, offset + 1);
        }
        let raw = RawRecord::new(Position { partition: 1, offset: 8 }, None, &[], None);
        batch.failed.push(FailedRecord { raw, error: "x".into() });
        batch.to.insert(1, 9);
        batch.retain_partitions(|p| p != 1);
        let positions: Vec<(i32, i64)> = batch.tasks.iter().map(|r| (r.position.partition, r.position.offset)).collect();
        assert_eq!(positions, [(0, 5), (0, 6), (2, 1)]);
        assert!(batch.failed.is_empty());
        assert_eq!(batch.to, HashMap::from([(0, 7), (2, 2)]));
        batch.retain_partitions(|_| false);
        assert!(batch.is_empty() && batch.tasks.is_empty() && batch.failed.is_empty());
    }

    fn created() -> TaskEvent {
        let mut t = NewTask::new(Title::parse("t".into()).unwrap());
        t.due_at = DateTime::from_timestamp(1_800_000_000, 0);
        t.remind_before = Some(RemindBefore::parse("PT1H".into()).unwrap());
        TaskEvent::Created(t)
    }

    #[test]
    fn lifecycle_gives_the_expected_row() {
        let batch = vec![
            env(1, 1, created()),
            env(1, 2, TaskEvent::Updated(TaskPatch { priority: Some(Priority::Urgent), ..Default::default() })),
            env(1, 3, TaskEvent::Completed),
        ];
        let rows = fold(HashMap::new(), &batch);
        let Some(Some(RowState::Present(r))) = rows.get(&TaskId::from_uuid(Uuid::from_u128(1))) else { panic!() };
        assert_eq!((r.version, r.status.as_str(), r.priority), (3, "completed", 3));
        assert_eq!(r.remind_at, DateTime::from_timestamp(1_800_000_000 - 3600, 0));
        assert_eq!(r.completed_at, Some(batch[2].envelope.meta.occurred_at));
        let rows = fold(HashMap::new(), &[batch[0].clone(), env(1, 2, TaskEvent::Deleted)]);
        assert_eq!(rows[&TaskId::from_uuid(Uuid::from_u128(1))], Some(RowState::Removed));
    }

    #[test]
    fn completing_a_recurring_task_calls_for_its_next_occurrence_once_per_event() {
        let mut t = NewTask::new(Title::parse("stand-up".into()).unwrap());
        t.due_at = DateTime::from_timestamp(1_800_000_000, 0);
        t.recurrence = Some(Recurrence::parse("FREQ=DAILY;COUNT=2".into()).unwrap());
        t.remind_before = Some(RemindBefore::parse("PT5M".into()).unwrap());
        let batch = vec![env(7, 1, TaskEvent::Created(t)), env(7, 2, TaskEvent::Completed)];
        let (_, effects) = fold_with_effects(HashMap::new(), &batch);
        assert_eq!(effects.reactions.len(), 1);
        let r = &effects.reactions[0];
        assert_eq!(r.id, *ids::next_occurrence_id(TaskId::from_uuid(Uuid::from_u128(7)), 2).as_uuid());
        assert_eq!(r.payload["occurrence"], 2);
        assert_eq!(r.payload["remind_before"], "PT5M");
        assert_eq!(r.payload["due_at"], serde_json::json!(DateTime::from_timestamp(1_800_000_000 + 86_400, 0).unwrap()));
        // Redelivered: already applied, no second reaction.
        let (rows, _) = fold_with_effects(HashMap::new(), &batch);
        let Some(Some(RowState::Present(row))) = rows.get(&TaskId::from_uuid(Uuid::from_u128(7))).cloned() else { panic!() };
        let (_, again) = fold_with_effects(HashMap::from([(TaskId::from_uuid(Uuid::from_u128(7)), row.clone())]), &batch[1..]);
        assert!(again.reactions.is_empty());
        // The last occurrence of a COUNT=2 series spawns nothing.
        let mut last = row;
        last.status = "open".into();
        last.occurrence = Some(2);
        let (_, none) = fold_with_effects(HashMap::from([(TaskId::from_uuid(Uuid::from_u128(7)), last)]), &[env(7, 3, TaskEvent::Completed)]);
        assert!(none.reactions.is_empty());
    }

    #[test]
    fn completing_a_minutely_or_secondly_series_80_days_late_calls_for_the_next_instance_after_the_completion() {
        // The completion (sequence 2) happens at 1_700_000_002; the task was due 80 days before.
        let due = 1_700_000_000 - 80 * 86_400;
        for (rule, next) in [("FREQ=MINUTELY", 1_700_000_060), ("FREQ=SECONDLY", 1_700_000_003)] {
            let mut t = NewTask::new(Title::parse("ping".into()).unwrap());
            t.due_at = DateTime::from_timestamp(due, 0);
            t.recurrence = Some(Recurrence::parse(rule.into()).unwrap());
            let (_, effects) = fold_with_effects(HashMap::new(), &[env(8, 1, TaskEvent::Created(t)), env(8, 2, TaskEvent::Completed)]);
            assert_eq!(effects.reactions.len(), 1, "{rule}");
            assert_eq!(effects.reactions[0].payload["due_at"], serde_json::json!(DateTime::from_timestamp(next, 0).unwrap()), "{rule}");
            assert_eq!(effects.reactions[0].payload["occurrence"], 2, "{rule}");
        }
    }

    #[test]
    fn a_fired_reminder_gives_its_notification_and_records_it_in_the_users_stream_once() {
        let remind_at = DateTime::from_timestamp(1_800_000_000 - 3600, 0).unwrap();
        let due = TaskEvent::ReminderDue(domain::ReminderDue { remind_at, due_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap() });
        let batch = vec![env(3, 1, created()), env(3, 2, due)];
        let (rows, effects) = fold_with_effects(HashMap::new(), &batch);
        let task = TaskId::from_uuid(Uuid::from_u128(3));
        let id = ids::reminder_notification_id(task, remind_at);
        assert_eq!(effects.notifications.len(), 1);
        assert_eq!((effects.notifications[0].id, effects.notifications[0].event_id), (id, batch[1].envelope.meta.event_id));
        assert_eq!(effects.reactions.len(), 1);
        let r = &effects.reactions[0];
        assert_eq!((r.id, r.kind, r.user_id.as_str(), r.task_id), (id, RECORD_NOTIFICATION, "alice", Uuid::from_u128(3)));
        assert_eq!(r.payload, serde_json::json!({ "task_id": Uuid::from_u128(3), "remind_at": remind_at }));
        assert_eq!(r.causation_id, batch[1].envelope.meta.event_id);
        // Redelivered: already applied, neither a second notification nor a second reaction.
        let Some(Some(RowState::Present(row))) = rows.get(&task).cloned() else { panic!() };
        let (_, again) = fold_with_effects(HashMap::from([(task, row)]), &batch[1..]);
        assert!(again.reactions.is_empty() && again.notifications.is_empty());
    }

    #[test]
    fn events_of_a_task_without_a_row_are_orphans_and_only_the_others_are_projected() {
        // Task 1 was never projected (its creation erased); task 2 is created here, then deleted.
        let batch = vec![env(1, 2, TaskEvent::Completed), env(2, 1, created()), env(2, 2, TaskEvent::Deleted), env(1, 3, TaskEvent::Deleted)];
        let (rows, effects) = fold_with_effects(HashMap::new(), &batch);
        assert_eq!(effects.orphans, [0, 3]);
        let projected: Vec<(u128, u32)> =
            effects.projected(&batch).iter().map(|r| (r.envelope.subject.as_uuid().as_u128(), r.envelope.meta.sequence)).collect();
        assert_eq!(projected, [(2, 1), (2, 2)]);
        assert_eq!(rows.get(&TaskId::from_uuid(Uuid::from_u128(1))), Some(&None), "no row for the erased task");
        // An event after the deletion has nothing to apply to either.
        let (_, after) = fold_with_effects(HashMap::new(), &[env(2, 1, created()), env(2, 2, TaskEvent::Deleted), env(2, 3, TaskEvent::Reopened)]);
        assert_eq!(after.orphans, [2]);
    }

    fn any_history() -> impl Strategy<Value = Vec<Recorded>> {
        // Several tasks, each a valid sequence of events, interleaved.
        proptest::collection::vec((0u128..4, proptest::collection::vec(0u8..4, 0..8)), 1..5).prop_map(|tasks| {
            let mut out = Vec::new();
            for (i, (_, steps)) in tasks.iter().enumerate() {
                let id = i as u128 + 1;
                let mut seq = 1;
                out.push(env(id, seq, created()));
                let mut done = false;
                for s in steps {
                    seq += 1;
                    let e = match (s, done) {
                        (0, false) => {
                            done = true;
                            TaskEvent::Completed
                        }
                        (0, true) | (1, true) => {
                            done = false;
                            TaskEvent::Reopened
                        }
                        _ => TaskEvent::Updated(TaskPatch { title: Some(Title::parse(format!("v{seq}")).unwrap()), ..Default::default() }),
                    };
                    out.push(env(id, seq, e));
                }
            }
            out
        })
    }

    fn materialise(rows: HashMap<TaskId, Option<RowState>>) -> HashMap<TaskId, TaskRow> {
        rows.into_iter()
            .filter_map(|(k, v)| match v {
                Some(RowState::Present(r)) => Some((k, r)),
                _ => None,
            })
            .collect()
    }

    /// Tasks with every kind of event (reminders fired, deletions, events after a deletion, a task
    /// created again), their events interleaved round by round as a log holds them.
    fn any_log() -> impl Strategy<Value = Vec<Recorded>> {
        proptest::collection::vec(proptest::collection::vec(0u8..7, 0..8), 1..6).prop_map(|tasks| {
            let mut streams: Vec<Vec<Recorded>> = Vec::new();
            for (i, steps) in tasks.iter().enumerate() {
                let id = i as u128 + 1;
                let mut events = vec![env(id, 1, created())];
                for (n, s) in steps.iter().enumerate() {
                    let seq = n as u32 + 2;
                    let e = match s {
                        0 => TaskEvent::Completed,
                        1 => TaskEvent::Reopened,
                        2 => TaskEvent::ReminderDue(domain::ReminderDue {
                            remind_at: DateTime::from_timestamp(1_800_000_000 - 3600, 0).unwrap(),
                            due_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
                        }),
                        3 => TaskEvent::Deleted,
                        // Created again (after a deletion: a row anew; else ignored).
                        4 => created(),
                        _ => TaskEvent::Updated(TaskPatch { title: Some(Title::parse(format!("v{seq}")).unwrap()), ..Default::default() }),
                    };
                    events.push(env(id, seq, e));
                }
                streams.push(events);
            }
            let longest = streams.iter().map(Vec::len).max().unwrap_or(0);
            (0..longest).flat_map(|round| streams.iter().filter_map(move |s| s.get(round).cloned()).collect::<Vec<_>>()).collect()
        })
    }

    /// What writing a table's dirty rows does to a stand-in of the `tasks` table; each kind of write
    /// must find the table as the table's flags say.
    fn write(pg: &mut HashMap<TaskId, TaskRow>, dirty: DirtyRows<'_>) {
        for r in dirty.fresh {
            assert!(pg.insert(TaskId::from_uuid(r.id), r.clone()).is_none(), "a fresh row was written before");
        }
        for r in dirty.changed {
            assert!(pg.insert(TaskId::from_uuid(r.id), r.clone()).is_some(), "a changed row was never written");
        }
        for id in dirty.removed {
            assert!(pg.remove(&TaskId::from_uuid(id)).is_some(), "a removed row was never written");
        }
    }

    proptest! {
        /// A rebuild's bulk phase: folding the log onto a table (written now and then, as before an
        /// erasure, and at the end) leaves the rows, and produces the notifications, that applying
        /// it batch by batch to PostgreSQL does (load the batch's rows, fold, upsert or delete).
        #[test]
        fn a_task_table_written_now_and_then_ends_with_the_rows_of_the_per_batch_path(
            log in any_log(), split in 1usize..7, writes in proptest::collection::vec(any::<bool>(), 0..40),
        ) {
            let (mut per_batch, mut per_batch_notes) = (HashMap::<TaskId, TaskRow>::new(), Vec::new());
            let (mut table, mut pg, mut bulk_notes) = (TaskTable::default(), HashMap::<TaskId, TaskRow>::new(), Vec::new());
            for (i, chunk) in log.chunks(split).enumerate() {
                let loaded = chunk.iter().filter_map(|r| Some((r.envelope.subject, per_batch.get(&r.envelope.subject)?.clone()))).collect();
                let (folded, effects) = fold_with_effects(loaded, chunk);
                for (id, state) in folded {
                    match state {
                        Some(RowState::Present(r)) => {
                            per_batch.insert(id, r);
                        }
                        Some(RowState::Removed) => {
                            per_batch.remove(&id);
                        }
                        None => {}
                    }
                }
                per_batch_notes.extend(effects.notifications);
                bulk_notes.extend(table.fold(chunk).notifications);
                if writes.get(i).copied().unwrap_or(false) {
                    write(&mut pg, table.dirty());
                    table.mark_written();
                    prop_assert!(table.dirty().is_empty());
                }
            }
            write(&mut pg, table.dirty());
            prop_assert_eq!(pg, per_batch);
            prop_assert_eq!(bulk_notes, per_batch_notes);
        }
    }

    #[test]
    fn a_task_table_forgets_rows_and_deletes_only_written_ones() {
        let mut table = TaskTable::default();
        table.fold(&[env(1, 1, created()), env(2, 1, created()), env(3, 1, created())]);
        // Never written: a deleted task just leaves the table.
        table.fold(&[env(3, 2, TaskEvent::Deleted)]);
        assert_eq!(table.len(), 2);
        let dirty = table.dirty();
        assert_eq!(dirty.fresh.iter().map(|r| r.id).collect::<Vec<_>>(), [Uuid::from_u128(1), Uuid::from_u128(2)]);
        assert!(dirty.changed.is_empty() && dirty.removed.is_empty());
        table.mark_written();
        // Written: a deleted task stays until its row is deleted; a changed one is written again.
        table.fold(&[env(1, 2, TaskEvent::Deleted), env(2, 2, TaskEvent::Completed)]);
        let dirty = table.dirty();
        assert!(dirty.fresh.is_empty());
        assert_eq!(dirty.changed.iter().map(|r| (r.id, r.version)).collect::<Vec<_>>(), [(Uuid::from_u128(2), 2)]);
        assert_eq!(dirty.removed, [Uuid::from_u128(1)]);
        assert_eq!(table.len(), 2);
        table.mark_written();
        assert_eq!(table.len(), 1);
        // An erasure deleted the row in PostgreSQL: later events of the task change nothing.
        table.forget(&[Uuid::from_u128(2)]);
        assert!(table.is_empty());
        table.fold(&[env(2, 3, TaskEvent::Reopened)]);
        assert!(table.is_empty() && table.dirty().is_empty());
        // Written, deleted and created again: the row is written anew.
        table.fold(&[env(4, 1, created())]);
        table.mark_written();
        table.fold(&[env(4, 2, TaskEvent::Deleted)]);
        table.fold(&[env(4, 1, created())]);
        let dirty = table.dirty();
        assert_eq!(dirty.changed.iter().map(|r| (r.id, r.version)).collect::<Vec<_>>(), [(Uuid::from_u128(4), 1)]);
        assert!(dirty.fresh.is_empty() && dirty.removed.is_empty());
    }

    proptest! {
        /// Splitting the log into batches of any size, or redelivering part of it, yields the same
        /// read model as applying it once in one batch.
        #[test]
        fn batches_and_duplicates_give_the_same_rows(history in any_history(), split in 1usize..7, dup in 0usize..5) {
            let once = materialise(fold(HashMap::new(), &history));
            let mut state: HashMap<TaskId, TaskRow> = HashMap::new();
            for chunk in history.chunks(split) {
                // redeliver the tail of the previous chunk too
                state = materialise(fold(state, chunk));
                let again: Vec<Recorded> = chunk.iter().take(dup).cloned().collect();
                state = materialise(fold(state, &again));
            }
            prop_assert_eq!(state, once);
        }
    }
}
