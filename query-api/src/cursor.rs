//! Opaque Relay cursors (base64url). A task cursor carries the keyset position for its order, and
//! the order itself, so a cursor from another order is refused instead of silently misread.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use uuid::Uuid;

use crate::schema::TaskOrder;

fn order_tag(o: TaskOrder) -> &'static str {
    match o {
        TaskOrder::DueAtAsc => "da",
        TaskOrder::DueAtDesc => "dd",
        TaskOrder::CreatedAtAsc => "ca",
        TaskOrder::CreatedAtDesc => "cd",
        TaskOrder::PriorityDesc => "pd",
    }
}

fn invalid() -> async_graphql::Error {
    async_graphql::Error::new("invalid cursor: use a cursor returned by this query with the same orderBy")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskCursor {
    pub order: TaskOrder,
    pub k0: i64,
    pub k1: i64,
    pub id: Uuid,
}

impl TaskCursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("t1:{}:{}:{}:{}", order_tag(self.order), self.k0, self.k1, self.id))
    }

    pub fn decode(s: &str, order: TaskOrder) -> async_graphql::Result<Self> {
        let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid())?;
        let raw = String::from_utf8(raw).map_err(|_| invalid())?;
        let parts: Vec<&str> = raw.split(':').collect();
        match parts.as_slice() {
            ["t1", tag, k0, k1, id] if *tag == order_tag(order) => Ok(Self {
                order,
                k0: k0.parse().map_err(|_| invalid())?,
                k1: k1.parse().map_err(|_| invalid())?,
                id: Uuid::parse_str(id).map_err(|_| invalid())?,
            }),
            _ => Err(invalid()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCursor {
    pub version: i32,
}

impl HistoryCursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("h1:{}", self.version))
    }

    pub fn decode(s: &str) -> async_graphql::Result<Self> {
        let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| invalid())?;
        let raw = String::from_utf8(raw).map_err(|_| invalid())?;
        let v = raw.strip_prefix("h1:").ok_or_else(invalid)?;
        Ok(Self { version: v.parse().map_err(|_| invalid())? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_other_orders() {
        let c = TaskCursor { order: TaskOrder::PriorityDesc, k0: -3, k1: i64::MAX, id: Uuid::now_v7() };
        assert_eq!(TaskCursor::decode(&c.encode(), TaskOrder::PriorityDesc).unwrap(), c);
        assert!(TaskCursor::decode(&c.encode(), TaskOrder::DueAtAsc).is_err());
        assert!(TaskCursor::decode("garbage", TaskOrder::DueAtAsc).is_err());
        let h = HistoryCursor { version: 7 };
        assert_eq!(HistoryCursor::decode(&h.encode()).unwrap(), h);
        assert!(HistoryCursor::decode(&c.encode()).is_err());
    }
}
