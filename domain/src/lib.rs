//! The pure core of taskstream: value types parsed once, and the aggregates, each a decider of one
//! shape (`aggregate::Decider`: commands, past-tense events with type name + schema version, state,
//! `decide` holding every business rule, `evolve` only applying facts). No IO, no async.
//!
//! Modules, bottom to top: `values` (parsed value types), `ids` (derived ids) and `error` (why a
//! command is refused) <- `aggregate` (the
//! decider shape, the event envelope and its metadata, the registry macro) <- the aggregates:
//! `decider` + `events` (tasks), `user` (notifications recorded and read, webhook registration);
//! `recurrence` (next occurrence of a series, used by the projector's reactions); `upcast` (older
//! schema versions of event data, read into today's types); `current` (a task's full state, the
//! value of `task-updates`); `personal` (which fields of the event data are personal, sealed in the
//! log with the user's data key).

pub mod aggregate;
pub mod current;
pub mod decider;
pub mod error;
pub mod events;
pub mod ids;
pub mod personal;
pub mod recurrence;
pub mod upcast;
pub mod user;
pub mod values;

pub use aggregate::{
    CommandVisitor, DataSchema, Decider, DeciderVisitor, DomainEvent, Envelope, EnvelopeError, IdempotencyTag, Metadata, Receipt, RecordVisitor, StreamId,
    UnknownEventType,
};
pub use decider::{Command, CommandKind, DomainError, LiveTask, TaskDecider, TaskState, TaskStatus};
pub use events::{NewTask, ReminderDue, TaskEvent, TaskPatch};
pub use user::{UserDecider, UserEvent};
pub use values::{Description, FieldError, Priority, Recurrence, RemindBefore, Tag, Tags, TaskId, TimeZone, Title, UserId, ValidationError};

// The aggregates of taskstream: one line each. Generates `AnyCommand` and `Record`.
aggregate::aggregates! {
    Task => decider::TaskDecider,
    User => user::UserDecider,
}
