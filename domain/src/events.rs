//! Domain events: past tense, each with a stable type name and a schema version. New versions only
//! add optional fields. The event data is what travels as the Kafka record value.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::aggregate::{empty_json, parse_empty, parse_json, DataSchema, DomainEvent, UnknownEventType};
use crate::values::{Description, Priority, Recurrence, RemindBefore, Tags, TaskId, TimeZone, Title};

/// Everything a new task holds (the data of `task.created`, and the CreateTask payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NewTask {
    pub title: Title,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<Description>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub due_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub timezone: TimeZone,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrence: Option<Recurrence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remind_before: Option<RemindBefore>,
    #[serde(default)]
    pub tags: Tags,
    /// Set when this task is the next occurrence of a recurring series.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recurrence_parent_id: Option<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub occurrence: Option<u32>,
}

impl NewTask {
    pub fn new(title: Title) -> Self {
        Self {
            title,
            description: None,
            priority: Priority::default(),
            due_at: None,
            timezone: TimeZone::default(),
            recurrence: None,
            remind_before: None,
            tags: Tags::default(),
            recurrence_parent_id: None,
            occurrence: None,
        }
    }
}

/// A change to some fields (the data of `task.updated`, and the UpdateTask payload). For optional
/// fields: absent = unchanged, `null` = cleared, a value = set.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TaskPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<Title>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    pub description: Option<Option<Description>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    pub due_at: Option<Option<DateTime<Utc>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<TimeZone>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    pub recurrence: Option<Option<Recurrence>>,
    #[serde(default, deserialize_with = "double_option", skip_serializing_if = "Option::is_none")]
    pub remind_before: Option<Option<RemindBefore>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
}

impl TaskPatch {
    pub fn is_empty(&self) -> bool {
        self == &TaskPatch::default()
    }
}

/// `null` -> `Some(None)`, value -> `Some(Some(v))`; an absent field is `None` via `#[serde(default)]`.
fn double_option<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// Every fact that can happen to a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    Created(NewTask),
    Updated(TaskPatch),
    Completed,
    Reopened,
    Deleted,
    /// The reminder for the task's current schedule fired (at most once per remind time).
    ReminderDue(ReminderDue),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ReminderDue {
    /// The remind time this reminder is for (`due_at - remind_before`).
    pub remind_at: DateTime<Utc>,
    /// The due date it reminds of.
    pub due_at: DateTime<Utc>,
}

impl DomainEvent for TaskEvent {
    type Subject = TaskId;
    const TYPES: &'static [&'static str] = &["task.created", "task.updated", "task.completed", "task.reopened", "task.deleted", "task.reminder_due"];

    fn event_type(&self) -> &'static str {
        match self {
            TaskEvent::Created(_) => "task.created",
            TaskEvent::Updated(_) => "task.updated",
            TaskEvent::Completed => "task.completed",
            TaskEvent::Reopened => "task.reopened",
            TaskEvent::Deleted => "task.deleted",
            TaskEvent::ReminderDue(_) => "task.reminder_due",
        }
    }

    fn to_json(&self) -> Vec<u8> {
        match self {
            TaskEvent::Created(t) => serde_json::to_vec(t).expect("event data always serializes"),
            TaskEvent::Updated(p) => serde_json::to_vec(p).expect("event data always serializes"),
            TaskEvent::ReminderDue(r) => serde_json::to_vec(r).expect("event data always serializes"),
            TaskEvent::Completed | TaskEvent::Reopened | TaskEvent::Deleted => empty_json(),
        }
    }

    fn from_json(event_type: &str, data: &[u8]) -> Result<Self, UnknownEventType> {
        Ok(match event_type {
            "task.created" => TaskEvent::Created(parse_json(event_type, data)?),
            "task.updated" => TaskEvent::Updated(parse_json(event_type, data)?),
            "task.reminder_due" => TaskEvent::ReminderDue(parse_json(event_type, data)?),
            "task.completed" => parse_empty(event_type, data).map(|()| TaskEvent::Completed)?,
            "task.reopened" => parse_empty(event_type, data).map(|()| TaskEvent::Reopened)?,
            "task.deleted" => parse_empty(event_type, data).map(|()| TaskEvent::Deleted)?,
            other => return Err(UnknownEventType::Type(other.to_owned())),
        })
    }

    fn data_schemas() -> Vec<DataSchema> {
        vec![
            DataSchema::of::<NewTask>(
                "task.created",
                1,
                "A task was created: everything it holds. Fields with a default (priority medium, timezone UTC, no tags) are always written.",
            ),
            DataSchema::of::<TaskPatch>(
                "task.updated",
                1,
                "Some fields of a task changed: only the changed fields are present; for optional fields null means cleared.",
            ),
            DataSchema::empty("task.completed", 1, "The task was completed (the time is ce_time). The data is {}."),
            DataSchema::empty("task.reopened", 1, "The task was reopened (the time is ce_time). The data is {}."),
            DataSchema::empty("task.deleted", 1, "The task was deleted (the time is ce_time); its history stays. The data is {}."),
            DataSchema::of::<ReminderDue>("task.reminder_due", 1, "The reminder of the task's current schedule fired (at most once per remind time)."),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_distinguishes_absent_null_and_value() {
        let p: TaskPatch = serde_json::from_str(r#"{"description": null, "priority": "high"}"#).unwrap();
        assert_eq!(p.description, Some(None));
        assert_eq!(p.due_at, None);
        assert_eq!(p.priority, Some(Priority::High));
        let back = String::from_utf8(TaskEvent::Updated(p.clone()).to_json()).unwrap();
        assert_eq!(back, r#"{"description":null,"priority":"high"}"#);
        assert_eq!(TaskEvent::from_json("task.updated", back.as_bytes()).unwrap(), TaskEvent::Updated(p));
    }

    #[test]
    fn every_event_round_trips() {
        let mut t = NewTask::new(Title::parse("x".into()).unwrap());
        t.tags = Tags::parse(vec!["a".into()]).unwrap();
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let reminder = TaskEvent::ReminderDue(ReminderDue { remind_at: at, due_at: at });
        for e in [TaskEvent::Created(t), TaskEvent::Updated(TaskPatch::default()), TaskEvent::Completed, TaskEvent::Reopened, TaskEvent::Deleted, reminder] {
            assert_eq!(TaskEvent::from_json(e.event_type(), &e.to_json()).unwrap(), e);
        }
    }

    #[test]
    fn events_are_read_as_facts_without_todays_rules() {
        // An event says what was accepted when it was appended: a stricter rule later (shorter
        // titles, fewer tags, a shorter reminder range) must not make it unreadable.
        let long = "x".repeat(500);
        let tags: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
        let data = serde_json::json!({"title": long, "tags": tags, "remind_before": "P400D", "due_at": "2030-01-01T00:00:00Z"}).to_string();
        let TaskEvent::Created(t) = TaskEvent::from_json("task.created", data.as_bytes()).unwrap() else { panic!("not a creation") };
        assert_eq!(t.title.as_ref(), long);
        assert_eq!(t.tags.iter().count(), 30);
        assert_eq!(t.remind_before.as_ref().map(|r| r.seconds()), Some(400 * 86_400));
        // It is written back as it was read.
        assert_eq!(TaskEvent::from_json("task.created", &TaskEvent::Created(t.clone()).to_json()).unwrap(), TaskEvent::Created(t));
        // Input is still held to today's rules.
        assert!(Title::parse(long).is_err());
        assert!(Tags::parse(tags).is_err());
        assert!(RemindBefore::parse("P400D".into()).is_err());
        let patch = TaskEvent::from_json("task.updated", br#"{"title": "", "tags": [""]}"#).unwrap();
        assert!(matches!(patch, TaskEvent::Updated(p) if p.title.as_ref().map(|t| t.as_ref()) == Some("")));
    }

    #[test]
    fn invalid_data_is_refused_on_decode() {
        // What cannot be represented at all is refused.
        assert!(TaskEvent::from_json("task.created", br#"{"title": 1}"#).is_err());
        assert!(TaskEvent::from_json("task.created", br#"{"title": "a", "remind_before": "soon"}"#).is_err());
        assert!(TaskEvent::from_json("task.created", br#"{"title": "a", "timezone": "Nowhere/City"}"#).is_err());
        assert!(TaskEvent::from_json("task.exploded", b"{}").is_err());
        // Unknown (newer, optional) fields are tolerated.
        assert!(TaskEvent::from_json("task.created", br#"{"title": "a", "color": "red"}"#).is_ok());
    }
}
