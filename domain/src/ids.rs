//! Derived ids: deterministic ids of things that reactions create, so that doing a reaction twice
//! (redelivery, a crash before the checkpoint, reopen and complete again) names the same thing twice,
//! and the fixed ids that command answers name.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::values::{TaskId, UserId};

const NS_OCCURRENCE: Uuid = Uuid::from_u128(0x6d0c_5a3e_8f1b_4c2a_9e57_1b2c_3d4e_5f60);
const NS_NOTIFICATION: Uuid = Uuid::from_u128(0x0b7e_42d1_6a9c_4f83_b215_7c8d_9e0f_a1b2);

/// The id of occurrence `occurrence` spawned from the series task `parent`.
pub fn next_occurrence_id(parent: TaskId, occurrence: u32) -> TaskId {
    let mut name = parent.as_uuid().as_bytes().to_vec();
    name.extend_from_slice(&occurrence.to_be_bytes());
    TaskId::from_uuid(Uuid::new_v5(&NS_OCCURRENCE, &name))
}

/// The id of the notification for the reminder of `task` at `remind_at`.
pub fn reminder_notification_id(task: TaskId, remind_at: DateTime<Utc>) -> Uuid {
    let mut name = task.as_uuid().as_bytes().to_vec();
    name.extend_from_slice(&remind_at.timestamp_micros().to_be_bytes());
    Uuid::new_v5(&NS_NOTIFICATION, &name)
}

/// The id of a user's webhook registration (one per user), named in SetWebhook/RemoveWebhook answers.
pub fn webhook_id(user: &UserId) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("taskstream:webhook:{user}").as_bytes())
}

/// The id an EraseUser answer names (one per user: erasing again names the same).
pub fn user_erasure_id(user: &UserId) -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("taskstream:erasure:{user}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let p = TaskId::from_uuid(Uuid::from_u128(42));
        assert_eq!(next_occurrence_id(p, 2), next_occurrence_id(p, 2));
        assert_ne!(next_occurrence_id(p, 2), next_occurrence_id(p, 3));
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert_eq!(reminder_notification_id(p, at), reminder_notification_id(p, at));
        assert_ne!(reminder_notification_id(p, at), reminder_notification_id(p, at + chrono::Duration::seconds(1)));
    }
}
