//! Opaque Relay cursors: base64url of a small versioned text. A task cursor is the keyset position
//! (the sort-key values and the id) of a row for one order, and names that order, so a cursor taken
//! with another `orderBy` is refused instead of being silently misread.
//!
//! Timestamps travel as whole microseconds since the epoch, PostgreSQL's own resolution, so a
//! position round-trips exactly.
//!
//! The bottom of the crate: it imports no other module. [`Order`] is the read model's list of task
//! orders (the store builds its SQL from it; the schema maps the GraphQL `TaskOrder` onto it).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, Utc};
use uuid::Uuid;

use platform::readmodel::TaskRow;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cursor: pass a cursor returned by this field (with the same orderBy) as `after`")]
pub struct InvalidCursor;

/// The orders of `tasks`; each ends with the task id, so pages never skip or repeat a task. Tasks
/// without a due date come last in both due-date orders; `PriorityDesc` ties by due date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    #[default]
    DueAtAsc,
    DueAtDesc,
    CreatedAtAsc,
    CreatedAtDesc,
    PriorityDesc,
}

impl Order {
    pub const ALL: [Order; 5] = [Order::DueAtAsc, Order::DueAtDesc, Order::CreatedAtAsc, Order::CreatedAtDesc, Order::PriorityDesc];
}

/// Where a page of `tasks` starts: the sort key of the last row of the previous page, per order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyset {
    DueAtAsc { due_at: Option<DateTime<Utc>>, id: Uuid },
    DueAtDesc { due_at: Option<DateTime<Utc>>, id: Uuid },
    CreatedAtAsc { created_at: DateTime<Utc>, id: Uuid },
    CreatedAtDesc { created_at: DateTime<Utc>, id: Uuid },
    PriorityDesc { priority: i16, due_at: Option<DateTime<Utc>>, id: Uuid },
}

fn order_tag(o: Order) -> &'static str {
    match o {
        Order::DueAtAsc => "da",
        Order::DueAtDesc => "dd",
        Order::CreatedAtAsc => "ca",
        Order::CreatedAtDesc => "cd",
        Order::PriorityDesc => "pd",
    }
}

fn micros(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.timestamp_micros().to_string())
}

fn parse_micros(s: &str) -> Result<Option<DateTime<Utc>>, InvalidCursor> {
    if s == "-" {
        return Ok(None);
    }
    let n: i64 = s.parse().map_err(|_| InvalidCursor)?;
    DateTime::from_timestamp_micros(n).map(Some).ok_or(InvalidCursor)
}

fn decode_text(s: &str) -> Result<String, InvalidCursor> {
    let raw = URL_SAFE_NO_PAD.decode(s.trim()).map_err(|_| InvalidCursor)?;
    String::from_utf8(raw).map_err(|_| InvalidCursor)
}

impl Keyset {
    /// The position of `row` in `order`.
    pub fn of(order: Order, row: &TaskRow) -> Self {
        let id = row.id;
        match order {
            Order::DueAtAsc => Keyset::DueAtAsc { due_at: row.due_at, id },
            Order::DueAtDesc => Keyset::DueAtDesc { due_at: row.due_at, id },
            Order::CreatedAtAsc => Keyset::CreatedAtAsc { created_at: row.created_at, id },
            Order::CreatedAtDesc => Keyset::CreatedAtDesc { created_at: row.created_at, id },
            Order::PriorityDesc => Keyset::PriorityDesc { priority: row.priority, due_at: row.due_at, id },
        }
    }

    pub fn order(&self) -> Order {
        match self {
            Keyset::DueAtAsc { .. } => Order::DueAtAsc,
            Keyset::DueAtDesc { .. } => Order::DueAtDesc,
            Keyset::CreatedAtAsc { .. } => Order::CreatedAtAsc,
            Keyset::CreatedAtDesc { .. } => Order::CreatedAtDesc,
            Keyset::PriorityDesc { .. } => Order::PriorityDesc,
        }
    }

    /// `k1.<order>.<priority|->.<micros|->.<id>`, base64url.
    pub fn encode(&self) -> String {
        let (priority, at, id) = match *self {
            Keyset::DueAtAsc { due_at, id } | Keyset::DueAtDesc { due_at, id } => (None, due_at, id),
            Keyset::CreatedAtAsc { created_at, id } | Keyset::CreatedAtDesc { created_at, id } => (None, Some(created_at), id),
            Keyset::PriorityDesc { priority, due_at, id } => (Some(priority), due_at, id),
        };
        let priority = priority.map_or_else(|| "-".to_owned(), |p| p.to_string());
        URL_SAFE_NO_PAD.encode(format!("k1.{}.{priority}.{}.{id}", order_tag(self.order()), micros(at)))
    }

    /// Decodes a cursor that must belong to `order`.
    pub fn decode(s: &str, order: Order) -> Result<Self, InvalidCursor> {
        let raw = decode_text(s)?;
        let parts: Vec<&str> = raw.split('.').collect();
        let ["k1", tag, priority, at, id] = parts.as_slice() else { return Err(InvalidCursor) };
        if *tag != order_tag(order) {
            return Err(InvalidCursor);
        }
        let id = Uuid::parse_str(id).map_err(|_| InvalidCursor)?;
        let at = parse_micros(at)?;
        let priority = match *priority {
            "-" => None,
            p => Some(p.parse::<i16>().ok().filter(|p| (0..=3).contains(p)).ok_or(InvalidCursor)?),
        };
        match (order, priority, at) {
            (Order::DueAtAsc, None, due_at) => Ok(Keyset::DueAtAsc { due_at, id }),
            (Order::DueAtDesc, None, due_at) => Ok(Keyset::DueAtDesc { due_at, id }),
            (Order::CreatedAtAsc, None, Some(created_at)) => Ok(Keyset::CreatedAtAsc { created_at, id }),
            (Order::CreatedAtDesc, None, Some(created_at)) => Ok(Keyset::CreatedAtDesc { created_at, id }),
            (Order::PriorityDesc, Some(priority), due_at) => Ok(Keyset::PriorityDesc { priority, due_at, id }),
            _ => Err(InvalidCursor),
        }
    }
}

/// Where a page of `taskHistory` starts: the version of the last event of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCursor {
    pub version: i32,
}

impl HistoryCursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("h1.{}", self.version))
    }

    pub fn decode(s: &str) -> Result<Self, InvalidCursor> {
        let raw = decode_text(s)?;
        let version = raw.strip_prefix("h1.").ok_or(InvalidCursor)?.parse::<i32>().map_err(|_| InvalidCursor)?;
        if version < 0 {
            return Err(InvalidCursor);
        }
        Ok(Self { version })
    }
}

/// Where a page of `notifications` starts: (created_at, id) of the last one (newest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotificationCursor {
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub id: uuid::Uuid,
}

impl NotificationCursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("n1.{}.{}", self.created_at.timestamp_micros(), self.id))
    }

    pub fn decode(s: &str) -> Result<Self, InvalidCursor> {
        let raw = decode_text(s)?;
        let rest = raw.strip_prefix("n1.").ok_or(InvalidCursor)?;
        let (micros, id) = rest.split_once('.').ok_or(InvalidCursor)?;
        let micros: i64 = micros.parse().map_err(|_| InvalidCursor)?;
        Ok(Self {
            created_at: chrono::DateTime::from_timestamp_micros(micros).ok_or(InvalidCursor)?,
            id: uuid::Uuid::parse_str(id).map_err(|_| InvalidCursor)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(micros: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(micros).unwrap()
    }

    fn samples() -> Vec<Keyset> {
        let id = Uuid::now_v7();
        let t = at(1_767_225_600_123_456);
        vec![
            Keyset::DueAtAsc { due_at: Some(t), id },
            Keyset::DueAtAsc { due_at: None, id },
            Keyset::DueAtDesc { due_at: Some(at(-1)), id },
            Keyset::DueAtDesc { due_at: None, id },
            Keyset::CreatedAtAsc { created_at: t, id },
            Keyset::CreatedAtDesc { created_at: at(0), id },
            Keyset::PriorityDesc { priority: 3, due_at: Some(t), id },
            Keyset::PriorityDesc { priority: 0, due_at: None, id },
        ]
    }

    #[test]
    fn task_cursors_round_trip_exactly() {
        for k in samples() {
            let s = k.encode();
            assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "base64url: {s}");
            assert_eq!(Keyset::decode(&s, k.order()), Ok(k));
        }
    }

    #[test]
    fn a_cursor_of_another_order_is_refused() {
        for k in samples() {
            for o in Order::ALL.into_iter().filter(|o| *o != k.order()) {
                assert_eq!(Keyset::decode(&k.encode(), o), Err(InvalidCursor), "{k:?} as {o:?}");
            }
        }
    }

    #[test]
    fn the_row_gives_the_key_of_its_order() {
        let row = TaskRow {
            id: Uuid::now_v7(),
            user_id: "alice".into(),
            title: "t".into(),
            description: None,
            status: "open".into(),
            priority: 2,
            due_at: None,
            timezone: "UTC".into(),
            recurrence: None,
            remind_before: None,
            remind_at: None,
            tags: vec![],
            version: 1,
            created_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            updated_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            completed_at: None,
            recurrence_parent_id: None,
            occurrence: None,
            reminded_for: None,
        };
        assert_eq!(Keyset::of(Order::PriorityDesc, &row), Keyset::PriorityDesc { priority: 2, due_at: None, id: row.id });
        assert_eq!(Keyset::of(Order::CreatedAtDesc, &row), Keyset::CreatedAtDesc { created_at: row.created_at, id: row.id });
        for o in Order::ALL {
            assert_eq!(Keyset::of(o, &row).order(), o);
        }
    }

    #[test]
    fn garbage_is_an_invalid_cursor() {
        let id = Uuid::nil();
        let b64 = |s: String| URL_SAFE_NO_PAD.encode(s);
        let bad = [
            (String::new(), Order::DueAtAsc),
            ("garbage!".into(), Order::DueAtAsc),
            (b64("k1.da.-.-".into()), Order::DueAtAsc),
            (b64(format!("k2.da.-.-.{id}")), Order::DueAtAsc),
            (b64("k1.da.-.-.not-a-uuid".into()), Order::DueAtAsc),
            (b64(format!("k1.da.-.12x.{id}")), Order::DueAtAsc),
            (b64(format!("k1.da.-.{}.{id}", i64::MAX)), Order::DueAtAsc),
            (b64(format!("k1.da.1.-.{id}")), Order::DueAtAsc),
            (b64(format!("k1.ca.-.-.{id}")), Order::CreatedAtAsc),
            (b64(format!("k1.pd.-.-.{id}")), Order::PriorityDesc),
            (b64(format!("k1.pd.4.-.{id}")), Order::PriorityDesc),
            (b64(format!("k1.pd.1.-.{id}.extra")), Order::PriorityDesc),
            (URL_SAFE_NO_PAD.encode([0xff, 0xfe]), Order::DueAtAsc),
        ];
        for (s, order) in bad {
            assert_eq!(Keyset::decode(&s, order), Err(InvalidCursor), "{s:?}");
        }
        // The well-formed counterparts are accepted, so the cases above fail for the stated reason.
        assert!(Keyset::decode(&b64(format!("k1.da.-.-.{id}")), Order::DueAtAsc).is_ok());
        assert!(Keyset::decode(&b64(format!("k1.ca.-.0.{id}")), Order::CreatedAtAsc).is_ok());
        assert!(Keyset::decode(&b64(format!("k1.pd.3.-.{id}")), Order::PriorityDesc).is_ok());
    }

    #[test]
    fn history_cursors_round_trip_and_refuse_task_cursors() {
        let n = NotificationCursor { created_at: chrono::Utc.timestamp_micros(1_700_000_000_123_456).unwrap(), id: uuid::Uuid::now_v7() };
        assert_eq!(NotificationCursor::decode(&n.encode()), Ok(n));
        assert_eq!(NotificationCursor::decode("x"), Err(InvalidCursor));
        let h = HistoryCursor { version: 7 };
        assert_eq!(HistoryCursor::decode(&h.encode()), Ok(h));
        assert_eq!(HistoryCursor::decode(&samples()[0].encode()), Err(InvalidCursor));
        assert_eq!(HistoryCursor::decode(&URL_SAFE_NO_PAD.encode("h1.-3")), Err(InvalidCursor));
        assert_eq!(HistoryCursor::decode("h1.3"), Err(InvalidCursor), "not base64url of the text");
        assert_eq!(Keyset::decode(&h.encode(), Order::DueAtAsc), Err(InvalidCursor));
    }
}
