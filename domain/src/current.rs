//! The current state of a task as outside consumers see it: the value of the `task-updates` topic
//! (compacted, key = task id, one record per accepted command, a tombstone on delete). A pure fold of
//! the task's events, so the writer can stage it in the same Kafka transaction as the events, and a
//! consumer of `task-events` would compute the same value. Its JSON Schema is in the catalogue.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::aggregate::Envelope;
use crate::events::TaskEvent;
use crate::values::{Description, Priority, Recurrence, RemindBefore, Tags, TaskId, TimeZone, Title, UserId};

/// Open or completed (`task-updates` never carries a deleted task: deletion is a tombstone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(inline)]
pub enum TaskViewStatus {
    Open,
    Completed,
}

/// The full state of a live task after an accepted command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TaskView {
    pub task_id: TaskId,
    /// The owner (`ce_userid` of the creation).
    pub owner: UserId,
    /// The task's version: `ce_sequence` of the last event applied.
    pub version: u32,
    pub title: Title,
    pub description: Option<Description>,
    pub status: TaskViewStatus,
    pub priority: Priority,
    pub due_at: Option<DateTime<Utc>>,
    pub timezone: TimeZone,
    pub recurrence: Option<Recurrence>,
    pub remind_before: Option<RemindBefore>,
    /// When the reminder fires (`due_at - remind_before`), when both are set.
    pub remind_at: Option<DateTime<Utc>>,
    /// The remind time whose reminder already fired, if any.
    pub reminded_for: Option<DateTime<Utc>>,
    pub tags: Tags,
    /// The series task this task is the next occurrence of.
    pub recurrence_parent_id: Option<TaskId>,
    pub occurrence: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl TaskView {
    /// `ce_type` of a `task-updates` record, and the name of its data schema.
    pub const TYPE: &'static str = "task.state";
    /// The schema version of the state as written now.
    pub const VERSION: u32 = 1;

    /// The state after `env`, given the state before it (`None`: no task yet, or deleted). `None`
    /// after a deletion (the tombstone); an event for a task without state leaves it without.
    pub fn next(current: Option<TaskView>, env: &Envelope<TaskEvent>) -> Option<TaskView> {
        let at = env.meta.occurred_at;
        let mut v = match (current, &env.event) {
            (_, TaskEvent::Created(t)) => {
                return Some(TaskView {
                    task_id: env.subject,
                    owner: env.meta.user_id.clone(),
                    version: env.meta.sequence,
                    title: t.title.clone(),
                    description: t.description.clone(),
                    status: TaskViewStatus::Open,
                    priority: t.priority,
                    due_at: t.due_at,
                    timezone: t.timezone,
                    recurrence: t.recurrence.clone(),
                    remind_before: t.remind_before.clone(),
                    remind_at: remind_at(t.due_at, t.remind_before.as_ref()),
                    reminded_for: None,
                    tags: t.tags.clone(),
                    recurrence_parent_id: t.recurrence_parent_id,
                    occurrence: t.occurrence,
                    created_at: at,
                    updated_at: at,
                    completed_at: None,
                })
            }
            (_, TaskEvent::Deleted) | (None, _) => return None,
            (Some(v), _) => v,
        };
        match &env.event {
            TaskEvent::Updated(p) => {
                if let Some(t) = &p.title {
                    v.title = t.clone();
                }
                if let Some(d) = &p.description {
                    v.description = d.clone();
                }
                if let Some(pr) = p.priority {
                    v.priority = pr;
                }
                if let Some(d) = p.due_at {
                    v.due_at = d;
                }
                if let Some(tz) = p.timezone {
                    v.timezone = tz;
                }
                if let Some(r) = &p.recurrence {
                    v.recurrence = r.clone();
                }
                if let Some(r) = &p.remind_before {
                    v.remind_before = r.clone();
                }
                if let Some(t) = &p.tags {
                    v.tags = t.clone();
                }
                v.remind_at = remind_at(v.due_at, v.remind_before.as_ref());
            }
            TaskEvent::Completed => {
                v.status = TaskViewStatus::Completed;
                v.completed_at = Some(at);
            }
            TaskEvent::Reopened => {
                v.status = TaskViewStatus::Open;
                v.completed_at = None;
            }
            TaskEvent::ReminderDue(r) => v.reminded_for = Some(r.remind_at),
            TaskEvent::Created(_) | TaskEvent::Deleted => unreachable!("handled above"),
        }
        v.version = env.meta.sequence;
        v.updated_at = at;
        Some(v)
    }

    /// The JSON Schema (draft 07) of the `task-updates` value.
    pub fn json_schema() -> serde_json::Value {
        let mut schema = schemars::generate::SchemaSettings::draft07().into_generator().into_root_schema_for::<TaskView>().to_value();
        if let Some(o) = schema.as_object_mut() {
            o.insert("$id".into(), crate::aggregate::dataschema_uri(Self::TYPE, Self::VERSION).into());
            o.insert("title".into(), format!("{} v{}", Self::TYPE, Self::VERSION).into());
            o.insert(
                "description".into(),
                "The full state of a task after an accepted command: the value of task-updates (key = task id; a deleted task is a tombstone, a record without value).".into(),
            );
        }
        schema
    }
}

fn remind_at(due_at: Option<DateTime<Utc>>, remind_before: Option<&RemindBefore>) -> Option<DateTime<Utc>> {
    Some(remind_before?.remind_at(due_at?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Metadata;
    use crate::events::{NewTask, ReminderDue, TaskPatch};
    use uuid::Uuid;

    fn env(seq: u32, secs: i64, event: TaskEvent) -> Envelope<TaskEvent> {
        Envelope {
            subject: TaskId::from_uuid(Uuid::from_u128(7)),
            meta: Metadata {
                event_id: Uuid::from_u128(seq.into()),
                user_id: UserId::parse("alice".into()).unwrap(),
                sequence: seq,
                occurred_at: DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap(),
                correlation_id: None,
                causation_id: None,
                traceparent: None,
                idempotency: None,
                data_key: None,
            },
            event,
        }
    }

    #[test]
    fn the_view_follows_every_event_and_a_deletion_is_a_tombstone() {
        let mut t = NewTask::new(Title::parse("write".into()).unwrap());
        t.due_at = DateTime::from_timestamp(1_900_000_000, 0);
        t.remind_before = Some(RemindBefore::parse("PT30M".into()).unwrap());
        let v = TaskView::next(None, &env(1, 0, TaskEvent::Created(t))).unwrap();
        assert_eq!((v.version, v.status, v.owner.as_ref()), (1, TaskViewStatus::Open, "alice"));
        assert_eq!(v.remind_at, DateTime::from_timestamp(1_900_000_000 - 1800, 0));
        let patch = TaskPatch { title: Some(Title::parse("rewrite".into()).unwrap()), remind_before: Some(None), ..TaskPatch::default() };
        let v = TaskView::next(Some(v), &env(2, 10, TaskEvent::Updated(patch))).unwrap();
        assert_eq!((v.title.as_ref(), v.remind_at, v.version), ("rewrite", None, 2));
        let at = DateTime::from_timestamp(1_899_000_000, 0).unwrap();
        let v = TaskView::next(Some(v), &env(3, 20, TaskEvent::ReminderDue(ReminderDue { remind_at: at, due_at: at }))).unwrap();
        assert_eq!(v.reminded_for, Some(at));
        let v = TaskView::next(Some(v), &env(4, 30, TaskEvent::Completed)).unwrap();
        assert_eq!((v.status, v.completed_at, v.updated_at), (TaskViewStatus::Completed, DateTime::from_timestamp(1_800_000_030, 0), v.completed_at.unwrap()));
        let v = TaskView::next(Some(v), &env(5, 40, TaskEvent::Reopened)).unwrap();
        assert_eq!((v.status, v.completed_at, v.created_at), (TaskViewStatus::Open, None, DateTime::from_timestamp(1_800_000_000, 0).unwrap()));
        assert_eq!(TaskView::next(Some(v), &env(6, 50, TaskEvent::Deleted)), None);
        assert_eq!(TaskView::next(None, &env(7, 60, TaskEvent::Completed)), None);
    }

    #[test]
    fn the_view_round_trips_as_json_with_every_field_present() {
        let v = TaskView::next(None, &env(1, 0, TaskEvent::Created(NewTask::new(Title::parse("x".into()).unwrap())))).unwrap();
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["status"], "open");
        assert!(json["description"].is_null() && json.get("description").is_some());
        assert_eq!(serde_json::from_value::<TaskView>(json).unwrap(), v);
    }
}
