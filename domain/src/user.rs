//! The user-level aggregate: the user's notifications (recorded, then read) and the webhook
//! registration. Its events are keyed by the user id in the log (`ce_subject` = user id), with their
//! own version sequence. Everything its rules look at is in this stream: a notification becomes
//! known to it by its own `notification.created` (recorded by the projector's reaction to a fired
//! reminder), never by reading another stream, so the user's partition decides alone.

use std::collections::HashMap;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{empty_json, parse_empty, parse_json, DataSchema, Decider, DomainEvent, Receipt, StreamId, UnknownEventType};
use crate::decider::DomainError;
use crate::ids::{reminder_notification_id, webhook_id};
use crate::values::{FieldError, TaskId, UserId, ValidationError};

/// A webhook endpoint: an absolute http(s) URL. Literal loopback, private, link-local, metadata and
/// other non-public addresses are refused unless `allow_private` (names are checked again after DNS
/// resolution by the adapters, which can do IO).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WebhookUrl(String);

impl schemars::JsonSchema for WebhookUrl {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "WebhookUrl".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string", "description": "The webhook endpoint: an absolute http(s) URL (written with at most 2000 characters, no credentials, no local or private address)."})
    }
}

impl AsRef<str> for WebhookUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Whether an address is one a webhook must never reach (SSRF).
pub fn is_forbidden_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated, still routed inside sites)
                || v6.to_ipv4_mapped().is_some_and(|v4| is_forbidden_address(IpAddr::V4(v4)))
                || s[..6] == [0; 6] // IPv4-compatible (::a.b.c.d, deprecated): never a real destination
                || s[0] == 0x2002 // 6to4: a tunnel to any IPv4 address
                || (s[0] == 0x2001 && s[1] == 0) // Teredo: a tunnel to any IPv4 address
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64
        }
    }
}

impl WebhookUrl {
    pub fn parse(s: String, allow_private: bool) -> Result<Self, ValidationError> {
        let bad = |m: &str| ValidationError(m.to_owned());
        if s.len() > 2000 {
            return Err(bad("must be at most 2000 characters"));
        }
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("must be an absolute http(s) URL"))?;
        if !matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") {
            return Err(bad("must use http or https"));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return Err(bad("must not contain credentials"));
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { authority }),
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("must have a host"));
        }
        if !allow_private {
            let lower = host.to_ascii_lowercase();
            if lower == "localhost" || lower.ends_with(".localhost") || lower == "metadata.google.internal" {
                return Err(bad("must not point at a local or metadata address"));
            }
            if let Ok(ip) = host.parse::<IpAddr>() {
                if is_forbidden_address(ip) {
                    return Err(bad("must not point at a loopback, private, link-local or metadata address"));
                }
            }
        }
        Ok(Self(s))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookRegistered {
    pub url: WebhookUrl,
    /// The HMAC-SHA256 key that signs the deliveries (the `Taskstream-Signature` header). Schema v2 names it
    /// `signing_secret`; v1 called it `secret` (`upcast::WebhookRegisteredV1`).
    #[serde(rename = "signing_secret")]
    pub secret: String,
}

/// A notification now exists for the user: the reminder of `task_id` at `remind_at` fired. Its id is
/// `ids::reminder_notification_id(task_id, remind_at)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NotificationCreated {
    pub notification_id: Uuid,
    pub task_id: TaskId,
    pub remind_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NotificationRead {
    pub notification_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEvent {
    NotificationCreated(NotificationCreated),
    NotificationRead(NotificationRead),
    WebhookRegistered(WebhookRegistered),
    WebhookRemoved,
    /// The user asked to be forgotten: their data keys are destroyed (crypto-shredding), the read
    /// models drop everything of theirs, and the stream starts afresh.
    Erased(UserErased),
}

/// The data of `user.erased`: which of the user's data keys the erasure destroys (every one known
/// when it was decided). The events sealed with them can no longer be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UserErased {
    #[serde(default)]
    pub data_keys: Vec<Uuid>,
}

impl DomainEvent for UserEvent {
    type Subject = UserId;
    const TYPES: &'static [&'static str] = &["notification.created", "notification.read", "webhook.registered", "webhook.removed", "user.erased"];

    fn event_type(&self) -> &'static str {
        match self {
            UserEvent::NotificationCreated(_) => "notification.created",
            UserEvent::NotificationRead(_) => "notification.read",
            UserEvent::WebhookRegistered(_) => "webhook.registered",
            UserEvent::WebhookRemoved => "webhook.removed",
            UserEvent::Erased(_) => "user.erased",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            UserEvent::WebhookRegistered(_) => 2,
            _ => 1,
        }
    }

    fn to_json(&self) -> Vec<u8> {
        match self {
            UserEvent::NotificationCreated(e) => serde_json::to_vec(e).expect("event data always serializes"),
            UserEvent::NotificationRead(e) => serde_json::to_vec(e).expect("event data always serializes"),
            UserEvent::WebhookRegistered(e) => serde_json::to_vec(e).expect("event data always serializes"),
            UserEvent::WebhookRemoved => empty_json(),
            UserEvent::Erased(e) => serde_json::to_vec(e).expect("event data always serializes"),
        }
    }

    fn from_json(event_type: &str, data: &[u8]) -> Result<Self, UnknownEventType> {
        Ok(match event_type {
            "notification.created" => UserEvent::NotificationCreated(parse_json(event_type, data)?),
            "notification.read" => UserEvent::NotificationRead(parse_json(event_type, data)?),
            "webhook.registered" => UserEvent::WebhookRegistered(parse_json(event_type, data)?),
            "webhook.removed" => parse_empty(event_type, data).map(|()| UserEvent::WebhookRemoved)?,
            "user.erased" => UserEvent::Erased(parse_json(event_type, data)?),
            other => return Err(UnknownEventType::Type(other.to_owned())),
        })
    }

    fn from_versioned_json(_: &UserId, event_type: &str, version: u32, data: &[u8]) -> Result<Self, UnknownEventType> {
        match (event_type, version) {
            ("webhook.registered", 1) => parse_json::<crate::upcast::WebhookRegisteredV1>(event_type, data).map(|v1| UserEvent::WebhookRegistered(v1.into())),
            _ => Self::from_json(event_type, data),
        }
    }

    fn data_schemas() -> Vec<DataSchema> {
        vec![
            DataSchema::of::<NotificationCreated>(
                "notification.created",
                1,
                "A notification exists for the user (ce_subject = user id): the reminder of task_id at remind_at fired.",
            ),
            DataSchema::of::<NotificationRead>("notification.read", 1, "The user read the notification."),
            DataSchema::of::<crate::upcast::WebhookRegisteredV1>(
                "webhook.registered",
                1,
                "The user registered (or replaced) their webhook endpoint and its signing secret (v1: the secret is called secret; read as v2 through an upcaster).",
            ),
            DataSchema::of::<WebhookRegistered>(
                "webhook.registered",
                2,
                "The user registered (or replaced) their webhook endpoint and the HMAC-SHA256 key that signs its deliveries (signing_secret; v1 called it secret).",
            ),
            DataSchema::empty("webhook.removed", 1, "The user removed their webhook. The data is {}."),
            DataSchema::of::<UserErased>(
                "user.erased",
                1,
                "The user was erased (crypto-shredding): the data keys listed are destroyed, so every event sealed with them is unreadable; read models drop the user's rows and the stream starts afresh.",
            ),
        ]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommandKind {
    /// Service only (the projector's reaction to `task.reminder_due`): the notification of the
    /// reminder of `task_id` at `remind_at` exists. Once per notification id.
    RecordNotification {
        notification_id: Uuid,
        task_id: TaskId,
        remind_at: DateTime<Utc>,
    },
    MarkNotificationRead(Uuid),
    SetWebhook {
        url: WebhookUrl,
        secret: String,
    },
    RemoveWebhook,
    /// Forget the user: destroy `data_keys` (the adapter lists the user's keys) and start afresh.
    Erase {
        data_keys: Vec<Uuid>,
    },
}

impl UserCommandKind {
    pub fn name(&self) -> &'static str {
        match self {
            UserCommandKind::RecordNotification { .. } => "RecordNotification",
            UserCommandKind::MarkNotificationRead(_) => "MarkNotificationRead",
            UserCommandKind::SetWebhook { .. } => "SetWebhook",
            UserCommandKind::RemoveWebhook => "RemoveWebhook",
            UserCommandKind::Erase { .. } => "EraseUser",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCommand {
    pub user: UserId,
    pub kind: UserCommandKind,
}

/// How long a read notification is remembered after its remind time, measured on the stream's own
/// clock: the latest remind time it recorded. Older read ones are forgotten, so the state follows
/// the unread notifications and those of the last 30 days, not the length of the stream's history.
/// A second mark-read of a forgotten one is a 404 instead of a 409, and recording it again is
/// accepted: `notification.created` changes no row of the read model (the reminder's
/// `task.reminder_due` made the notification), and the reactor's repeats come within minutes.
pub const READ_NOTIFICATION_MEMORY: chrono::TimeDelta = chrono::TimeDelta::days(30);

/// What the user's stream remembers of one of its notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    /// `None` for a notification known only from its read mark (a log from before
    /// `notification.created`): never forgotten, and no new ones can appear.
    pub remind_at: Option<DateTime<Utc>>,
    pub read: bool,
}

impl Remembered {
    /// Read, and its remind time older than the window before the stream's latest one.
    fn forgotten(&self, latest_remind_at: Option<DateTime<Utc>>) -> bool {
        let horizon = latest_remind_at.and_then(|latest| latest.checked_sub_signed(READ_NOTIFICATION_MEMORY));
        self.read && matches!((self.remind_at, horizon), (Some(at), Some(horizon)) if at < horizon)
    }
}

/// What the user-level decider needs: the notifications this stream remembers and whether a webhook
/// is registered (not its URL: the state is snapshotted, and a URL is personal data that only travels
/// sealed).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UserState {
    pub version: u32,
    pub notifications: HashMap<Uuid, Remembered>,
    /// The latest remind time recorded: the clock of [`READ_NOTIFICATION_MEMORY`].
    pub latest_remind_at: Option<DateTime<Utc>>,
    /// How many notifications the last sweep kept; the next sweep runs once there are twice as many.
    pub swept_len: usize,
    pub webhook: bool,
}

impl UserState {
    /// A notification the stream still knows: unread, or read within the memory window. A read one
    /// older than that counts as unknown whether or not a sweep has removed it yet, so answers do
    /// not depend on when sweeps run.
    fn remembered(&self, id: &Uuid) -> Option<&Remembered> {
        self.notifications.get(id).filter(|n| !n.forgotten(self.latest_remind_at))
    }

    /// Removes what the window forgot, once the map has doubled since the last sweep (amortised
    /// O(1) per notification).
    fn sweep(&mut self) {
        if self.notifications.len() < (2 * self.swept_len).max(64) {
            return;
        }
        let latest = self.latest_remind_at;
        self.notifications.retain(|_, n| !n.forgotten(latest));
        self.swept_len = self.notifications.len();
    }
}

/// The user-level aggregate's decider; its stream is keyed by the user id.
pub struct UserDecider;

impl StreamId for UserId {
    fn parse_subject(subject: &str) -> Result<Self, ValidationError> {
        UserId::parse(subject.to_owned())
    }
    fn owner(&self) -> Option<&UserId> {
        Some(self)
    }
}

impl Decider for UserDecider {
    type Command = UserCommand;
    type Event = UserEvent;
    type State = UserState;

    fn stream_id(cmd: &UserCommand) -> UserId {
        cmd.user.clone()
    }
    fn actor(cmd: &UserCommand) -> &UserId {
        &cmd.user
    }
    fn command_name(cmd: &UserCommand) -> &'static str {
        cmd.kind.name()
    }
    fn decide(cmd: &UserCommand, state: &UserState) -> Result<Vec<UserEvent>, DomainError> {
        match &cmd.kind {
            UserCommandKind::RecordNotification { notification_id, task_id, remind_at } => {
                if *notification_id != reminder_notification_id(*task_id, *remind_at) {
                    return Err(DomainError::Invalid(vec![FieldError::new("notification_id", "is not the id of the reminder of task_id at remind_at")]));
                }
                if state.remembered(notification_id).is_some() {
                    return Err(DomainError::NotificationExists);
                }
                Ok(vec![UserEvent::NotificationCreated(NotificationCreated { notification_id: *notification_id, task_id: *task_id, remind_at: *remind_at })])
            }
            UserCommandKind::MarkNotificationRead(id) => match state.remembered(id) {
                None => Err(DomainError::UnknownNotification),
                Some(Remembered { read: true, .. }) => Err(DomainError::AlreadyRead),
                Some(Remembered { read: false, .. }) => Ok(vec![UserEvent::NotificationRead(NotificationRead { notification_id: *id })]),
            },
            UserCommandKind::SetWebhook { url, secret } => {
                if secret.len() < 16 || secret.len() > 256 {
                    return Err(DomainError::Invalid(vec![FieldError::new("secret", "must be 16..=256 characters")]));
                }
                Ok(vec![UserEvent::WebhookRegistered(WebhookRegistered { url: url.clone(), secret: secret.clone() })])
            }
            UserCommandKind::RemoveWebhook => match state.webhook {
                true => Ok(vec![UserEvent::WebhookRemoved]),
                false => Err(DomainError::NotFound),
            },
            // Always accepted: erasing again (a retry, or keys made since) destroys what is left.
            UserCommandKind::Erase { data_keys } => Ok(vec![UserEvent::Erased(UserErased { data_keys: data_keys.clone() })]),
        }
    }
    fn evolve(mut state: UserState, _actor: &UserId, event: &UserEvent) -> UserState {
        state.version += 1;
        match event {
            UserEvent::NotificationCreated(e) => {
                state.latest_remind_at = state.latest_remind_at.max(Some(e.remind_at));
                if state.remembered(&e.notification_id).is_none() {
                    state.notifications.insert(e.notification_id, Remembered { remind_at: Some(e.remind_at), read: false });
                }
                state.sweep();
            }
            UserEvent::NotificationRead(e) => {
                state.notifications.entry(e.notification_id).or_insert(Remembered { remind_at: None, read: true }).read = true;
            }
            UserEvent::WebhookRegistered(_) => state.webhook = true,
            UserEvent::WebhookRemoved => state.webhook = false,
            // A fresh identity: nothing of before is known any more (the version goes on).
            UserEvent::Erased(_) => state = UserState { version: state.version, ..UserState::default() },
        }
        state
    }
    fn version(state: &UserState) -> u32 {
        state.version
    }
    fn receipt(user: &UserId, event: &UserEvent) -> Receipt {
        let (id_field, id, secret) = match event {
            UserEvent::NotificationCreated(e) => ("notification_id", e.notification_id, None),
            UserEvent::NotificationRead(e) => ("notification_id", e.notification_id, None),
            UserEvent::WebhookRegistered(e) => ("webhook_id", webhook_id(user), Some(e.secret.as_str().into())),
            UserEvent::WebhookRemoved => ("webhook_id", webhook_id(user), None),
            UserEvent::Erased(_) => ("erasure_id", crate::ids::user_erasure_id(user), None),
        };
        Receipt { id_field, id, created: false, etag: false, secret }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        UserId::parse("alice".into()).unwrap()
    }

    fn cmd(kind: UserCommandKind) -> UserCommand {
        UserCommand { user: alice(), kind }
    }

    fn task() -> TaskId {
        TaskId::from_uuid(Uuid::from_u128(42))
    }

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn record(task: TaskId, remind_at: DateTime<Utc>) -> UserCommand {
        cmd(UserCommandKind::RecordNotification { notification_id: reminder_notification_id(task, remind_at), task_id: task, remind_at })
    }

    fn read(id: Uuid) -> UserCommand {
        cmd(UserCommandKind::MarkNotificationRead(id))
    }

    /// The state after `events`, each applied as the log would (`evolve` only).
    fn given(events: &[UserEvent]) -> UserState {
        events.iter().fold(UserState::default(), |s, e| UserDecider::evolve(s, &alice(), e))
    }

    fn created(task: TaskId, remind_at: DateTime<Utc>) -> UserEvent {
        UserEvent::NotificationCreated(NotificationCreated { notification_id: reminder_notification_id(task, remind_at), task_id: task, remind_at })
    }

    #[test]
    fn a_fired_reminder_is_recorded_once_per_notification_id() {
        let events = UserDecider::decide(&record(task(), at()), &UserState::default()).unwrap();
        assert_eq!(events, vec![created(task(), at())]);
        let s = given(&events);
        assert_eq!(s.version, 1);
        assert_eq!(s.notifications.get(&reminder_notification_id(task(), at())), Some(&Remembered { remind_at: Some(at()), read: false }));
        // A repeat (a re-sent reaction) is refused: the reactor counts the 409 as done.
        assert_eq!(UserDecider::decide(&record(task(), at()), &s), Err(DomainError::NotificationExists));
        // Another remind time of the same task is another notification.
        let later = at() + chrono::Duration::days(1);
        assert_eq!(UserDecider::decide(&record(task(), later), &s).unwrap(), vec![created(task(), later)]);
    }

    #[test]
    fn a_notification_id_that_is_not_the_reminders_is_refused() {
        let forged = cmd(UserCommandKind::RecordNotification { notification_id: Uuid::from_u128(7), task_id: task(), remind_at: at() });
        assert!(matches!(UserDecider::decide(&forged, &UserState::default()), Err(DomainError::Invalid(e)) if e[0].field == "notification_id"));
    }

    #[test]
    fn a_recorded_notification_is_read_once() {
        let id = reminder_notification_id(task(), at());
        let s = given(&[created(task(), at())]);
        let events = UserDecider::decide(&read(id), &s).unwrap();
        assert_eq!(events, vec![UserEvent::NotificationRead(NotificationRead { notification_id: id })]);
        let s = UserDecider::evolve(s, &alice(), &events[0]);
        assert_eq!(s.version, 2);
        assert_eq!(UserDecider::decide(&read(id), &s), Err(DomainError::AlreadyRead));
        // Reading does not make it new again: recording it once more is still a repeat.
        assert_eq!(UserDecider::decide(&record(task(), at()), &s), Err(DomainError::NotificationExists));
    }

    #[test]
    fn only_the_users_own_stream_makes_a_notification_known() {
        // Not recorded (yet): whatever happened in the task's stream, this stream has not heard of it.
        let id = reminder_notification_id(task(), at());
        assert_eq!(UserDecider::decide(&read(id), &UserState::default()), Err(DomainError::UnknownNotification));
        assert_eq!(UserDecider::decide(&read(Uuid::from_u128(6)), &given(&[created(task(), at())])), Err(DomainError::UnknownNotification));
        // A log written before notification.created existed: read marks still make the id known (read).
        let old = given(&[UserEvent::NotificationRead(NotificationRead { notification_id: id })]);
        assert_eq!(UserDecider::decide(&read(id), &old), Err(DomainError::AlreadyRead));
        assert_eq!(UserDecider::decide(&record(task(), at()), &old), Err(DomainError::NotificationExists));
    }

    /// A year of reminders, one a day, each read the same day.
    fn a_year_of_read_notifications() -> UserState {
        let mut s = UserState::default();
        for day in 0..365 {
            let (t, when) = (TaskId::from_uuid(Uuid::from_u128(1000 + day as u128)), at() + chrono::Duration::days(day));
            for c in [record(t, when), read(reminder_notification_id(t, when))] {
                for e in UserDecider::decide(&c, &s).unwrap() {
                    s = UserDecider::evolve(s, &alice(), &e);
                }
            }
        }
        s
    }

    #[test]
    fn read_notifications_are_forgotten_once_their_remind_time_is_older_than_the_memory_window() {
        let s = a_year_of_read_notifications();
        // The state follows the notifications of the window, not the length of the stream's history.
        let window = READ_NOTIFICATION_MEMORY.num_days() as usize + 1;
        assert!(s.notifications.len() <= 2 * window.max(64), "{} notifications remembered", s.notifications.len());
        // Inside the window: a repeat is still a repeat, a second read still a 409.
        let (t, when) = (TaskId::from_uuid(Uuid::from_u128(1000 + 364)), at() + chrono::Duration::days(364));
        assert_eq!(UserDecider::decide(&record(t, when), &s), Err(DomainError::NotificationExists));
        assert_eq!(UserDecider::decide(&read(reminder_notification_id(t, when)), &s), Err(DomainError::AlreadyRead));
        // Older than the window: the stream no longer knows it (whether or not a sweep removed it yet).
        for day in [0, 364 - READ_NOTIFICATION_MEMORY.num_days() - 1] {
            let (t, when) = (TaskId::from_uuid(Uuid::from_u128(1000 + day as u128)), at() + chrono::Duration::days(day));
            assert_eq!(UserDecider::decide(&read(reminder_notification_id(t, when)), &s), Err(DomainError::UnknownNotification), "day {day}");
            assert!(UserDecider::decide(&record(t, when), &s).is_ok(), "day {day}");
        }
    }

    #[test]
    fn a_remind_time_at_the_edge_of_the_calendar_does_not_break_the_window() {
        let edge = DateTime::<Utc>::MIN_UTC;
        let s = given(&[created(task(), edge)]);
        let id = reminder_notification_id(task(), edge);
        let events = UserDecider::decide(&read(id), &s).unwrap();
        let s = UserDecider::evolve(s, &alice(), &events[0]);
        assert_eq!(UserDecider::decide(&read(id), &s), Err(DomainError::AlreadyRead));
    }

    #[test]
    fn unread_notifications_are_never_forgotten() {
        let old = TaskId::from_uuid(Uuid::from_u128(7));
        let mut s = given(&[created(old, at())]);
        // A year of other reminders, each read: sweeps run, the unread one stays.
        for day in 1..365 {
            let (t, when) = (TaskId::from_uuid(Uuid::from_u128(1000 + day as u128)), at() + chrono::Duration::days(day));
            s = UserDecider::evolve(s, &alice(), &created(t, when));
            s = UserDecider::evolve(s, &alice(), &UserEvent::NotificationRead(NotificationRead { notification_id: reminder_notification_id(t, when) }));
        }
        let id = reminder_notification_id(old, at());
        assert_eq!(UserDecider::decide(&record(old, at()), &s), Err(DomainError::NotificationExists));
        assert_eq!(UserDecider::decide(&read(id), &s).unwrap(), vec![UserEvent::NotificationRead(NotificationRead { notification_id: id })]);
    }

    #[test]
    fn notification_created_round_trips_through_json() {
        let e = created(task(), at());
        assert_eq!(e.event_type(), "notification.created");
        assert!(UserEvent::TYPES.contains(&"notification.created"));
        assert_eq!(UserEvent::from_json("notification.created", &e.to_json()).unwrap(), e);
        let json: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(json["task_id"], task().to_string());
        assert_eq!(UserDecider::receipt(&alice(), &e).id, reminder_notification_id(task(), at()));
    }

    #[test]
    fn webhooks_are_set_and_removed() {
        let url = WebhookUrl::parse("https://hooks.example.com/taskstream".into(), false).unwrap();
        let set = cmd(UserCommandKind::SetWebhook { url: url.clone(), secret: "s".repeat(32) });
        let events = UserDecider::decide(&set, &UserState::default()).unwrap();
        let s = UserDecider::evolve(UserState::default(), &alice(), &events[0]);
        assert!(s.webhook);
        assert_eq!(UserDecider::decide(&cmd(UserCommandKind::RemoveWebhook), &s).unwrap(), vec![UserEvent::WebhookRemoved]);
        assert_eq!(UserDecider::decide(&cmd(UserCommandKind::RemoveWebhook), &UserState::default()), Err(DomainError::NotFound));
        let short = cmd(UserCommandKind::SetWebhook { url: WebhookUrl::parse("https://a.example".into(), false).unwrap(), secret: "x".into() });
        assert!(matches!(UserDecider::decide(&short, &UserState::default()), Err(DomainError::Invalid(_))));
    }

    #[test]
    fn erasure_starts_the_stream_afresh_and_is_always_accepted() {
        let url = WebhookUrl::parse("https://hooks.example.com/taskstream".into(), false).unwrap();
        let s = given(&[created(task(), at()), UserEvent::WebhookRegistered(WebhookRegistered { url, secret: "s".repeat(32) })]);
        let keys = vec![Uuid::from_u128(1), Uuid::from_u128(2)];
        let events = UserDecider::decide(&cmd(UserCommandKind::Erase { data_keys: keys.clone() }), &s).unwrap();
        assert_eq!(events, vec![UserEvent::Erased(UserErased { data_keys: keys })]);
        let after = UserDecider::evolve(s, &alice(), &events[0]);
        assert_eq!(after, UserState { version: 3, ..UserState::default() });
        assert_eq!(UserDecider::decide(&cmd(UserCommandKind::RemoveWebhook), &after), Err(DomainError::NotFound));
        // The old reminder's notification may be recorded again (its task is gone with the key).
        assert!(UserDecider::decide(&record(task(), at()), &after).is_ok());
        assert!(UserDecider::decide(&cmd(UserCommandKind::Erase { data_keys: vec![] }), &after).is_ok());
        assert_eq!(UserEvent::from_json("user.erased", &events[0].to_json()).unwrap(), events[0]);
    }

    #[test]
    fn webhook_urls_refuse_ssrf_targets() {
        for ok in ["https://hooks.example.com/x", "http://93.184.216.34:8080/hook", "https://[2606:4700::1]/h"] {
            assert!(WebhookUrl::parse(ok.into(), false).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://example.com",
            "example.com/hook",
            "http://localhost/x",
            "http://127.0.0.1:9000/",
            "http://10.1.2.3/",
            "http://192.168.1.1/",
            "http://172.16.0.1/",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]/",
            "http://[fd00::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://0.0.0.0/",
            "http://user:pw@example.com/",
            "http:///nohost",
            "http://metadata.google.internal/",
        ] {
            assert!(WebhookUrl::parse(bad.into(), false).is_err(), "{bad} should be refused");
        }
        assert!(WebhookUrl::parse("http://127.0.0.1:9000/".into(), true).is_ok());
    }

    #[test]
    fn ipv6_forms_that_reach_ipv4_or_site_local_space_are_refused() {
        for bad in [
            "::127.0.0.1",         // IPv4-compatible
            "::10.0.0.1",          // IPv4-compatible, private
            "::8.8.8.8",           // IPv4-compatible (deprecated form: never a real destination)
            "2002:7f00:1::",       // 6to4 of 127.0.0.1
            "2002:0808:0808::1",   // 6to4 of a public address: a tunnel, refused as a whole
            "fec0::1",             // site-local
            "2001:db8::1",         // documentation
            "2001:0:4136:e378::1", // Teredo
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(is_forbidden_address(ip), "{bad} should be refused");
            assert!(WebhookUrl::parse(format!("http://[{bad}]/h"), false).is_err(), "{bad} should be refused in a URL");
        }
        for ok in ["2606:4700::1", "2a00:1450:4001::200e"] {
            assert!(!is_forbidden_address(ok.parse().unwrap()), "{ok} is public");
        }
    }
}
