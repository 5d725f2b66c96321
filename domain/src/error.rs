//! Why a command is refused: the one error type of every decider.

use crate::values::FieldError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The task does not exist, or belongs to someone else (answered the same way).
    #[error("task not found")]
    NotFound,
    #[error("a task with this id already exists")]
    AlreadyExists,
    #[error("the task was deleted")]
    Deleted,
    #[error("the task is already completed")]
    AlreadyCompleted,
    #[error("the task is not completed")]
    NotCompleted,
    #[error("no reminder is due for this task at that time (rescheduled, cancelled or already fired)")]
    NoReminderDue,
    #[error("the notification is already read")]
    AlreadyRead,
    /// MarkNotificationRead of an id the user's own stream has not recorded: another user's, made
    /// up, a reminder's notification whose `notification.created` is not in the log yet, or a read
    /// one its stream has forgotten (`user::READ_NOTIFICATION_MEMORY` after its remind time).
    #[error(
        "no notification with this id is recorded for you; a reminder's notification can be marked read once it is recorded in your stream, moments after it appears"
    )]
    UnknownNotification,
    /// RecordNotification of an id the user's stream already recorded.
    #[error("the notification is already recorded")]
    NotificationExists,
    #[error("the task is at version {actual}, not {expected}")]
    VersionMismatch { expected: u32, actual: u32 },
    #[error("validation failed")]
    Invalid(Vec<FieldError>),
}
