//! Read-your-writes: how far the projections have applied the log, per partition (the minimum over
//! the projections), and a bounded wait for a command's position.
//!
//! Fed by the projector's notifications on `projection_progress` (sent inside its batch transaction,
//! so delivered exactly when the batch commits; payload
//! `{"topic": "task-events", "projection": "tasks", "offsets": [[partition, next_offset], ..]}`),
//! by a re-read of `projection_offsets` at start and whenever the listener had to reconnect, and by a
//! re-read every second as a fallback: a lost notification can only delay an answer, never hang it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use platform::position::Position;
use platform::projections::PROGRESS_CHANNEL;

/// The projections the query API reads: a position counts as applied once all of them are past it.
/// (The projector advances every projection in the same transaction, so the others are there too.)
pub const READ_PROJECTIONS: [&str; 2] = ["tasks", "task_history"];

/// partition -> next offset to apply.
type Offsets = HashMap<i32, i64>;

/// The fallback re-read period.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

#[derive(Clone)]
pub struct ProgressTracker {
    topic: Arc<str>,
    per_projection: Arc<Mutex<HashMap<String, Offsets>>>,
    /// Per partition, the minimum next offset over [`READ_PROJECTIONS`].
    applied: Arc<watch::Sender<Offsets>>,
    /// Whether the listener is connected and the table has been read since.
    listening: Arc<watch::Sender<bool>>,
}

/// One notification of the projector.
#[derive(Debug, Deserialize)]
struct Notice {
    topic: String,
    projection: String,
    offsets: Vec<(i32, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the projections have not yet reached the requested position (partition {}, offset {}) within {}ms; retry shortly",
        .position.partition, .position.offset, .waited.as_millis())]
pub struct NotYetApplied {
    pub position: Position,
    pub waited: Duration,
}

impl ProgressTracker {
    /// A tracker of the projections of `topic`, knowing nothing yet (see [`Self::spawn`]).
    pub fn new(topic: &str) -> Self {
        Self {
            topic: topic.into(),
            per_projection: Arc::default(),
            applied: Arc::new(watch::channel(Offsets::new()).0),
            listening: Arc::new(watch::channel(false).0),
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Starts following the projector: LISTEN (reconnecting as needed) and the fallback re-read.
    /// The tasks end with the runtime or once the pool is closed.
    pub fn spawn(&self, pool: PgPool) {
        tokio::spawn(self.clone().listen_forever(pool.clone()));
        tokio::spawn(self.clone().poll_forever(pool));
    }

    async fn listen_forever(self, pool: PgPool) {
        while !pool.is_closed() {
            let result = self.listen(&pool).await;
            self.listening.send_replace(false);
            if let Err(e) = result.map_err(anyhow::Error::from) {
                if pool.is_closed() {
                    break;
                }
                tracing::warn!(error.message = %e, error.cause_chain = ?e, "projection progress listener failed; reconnecting");
            }
            tokio::time::sleep(RECONNECT_AFTER).await;
        }
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(PROGRESS_CHANNEL).await?;
        // Anything committed before LISTEN took effect is in the table.
        self.reload(pool).await?;
        self.listening.send_replace(true);
        loop {
            match listener.try_recv().await? {
                Some(n) => match serde_json::from_str::<Notice>(n.payload()) {
                    Ok(notice) if *notice.topic == *self.topic => self.record(&notice.projection, notice.offsets),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error.message = %e, payload = n.payload(), "unreadable projection progress notification"),
                },
                // The connection was lost and has been re-established (LISTEN included):
                // notifications sent in between are gone, the table is not.
                None => self.reload(pool).await?,
            }
        }
    }

    async fn poll_forever(self, pool: PgPool) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + POLL_EVERY, POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pool.is_closed() {
            tick.tick().await;
            if let Err(e) = self.reload(&pool).await {
                tracing::debug!(error.message = %e, "re-reading projection_offsets failed");
            }
        }
    }

    /// Re-reads `projection_offsets`.
    pub async fn reload(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, i32, i64)> =
            sqlx::query_as("SELECT projection, partition, next_offset FROM projection_offsets WHERE topic = $1").bind(&*self.topic).fetch_all(pool).await?;
        let mut by_projection: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
        for (name, p, o) in rows {
            by_projection.entry(name).or_default().push((p, o));
        }
        for (name, offsets) in by_projection {
            self.record(&name, offsets);
        }
        Ok(())
    }

    /// Takes in `projection`'s progress. Offsets only move forward, so a re-read that raced a
    /// notification cannot move them back.
    fn record(&self, projection: &str, offsets: Vec<(i32, i64)>) {
        if !READ_PROJECTIONS.contains(&projection) {
            return;
        }
        let mut all = self.per_projection.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry(projection.to_owned()).or_default();
        let mut touched = Vec::new();
        for (p, o) in offsets {
            let cur = entry.entry(p).or_insert(0);
            if o > *cur {
                *cur = o;
                touched.push(p);
            }
        }
        if touched.is_empty() {
            return;
        }
        // A projection that has not reported a partition yet counts as 0 there.
        let mins: Vec<(i32, i64)> = touched
            .into_iter()
            .map(|p| (p, READ_PROJECTIONS.iter().map(|n| all.get(*n).and_then(|m| m.get(&p)).copied().unwrap_or(0)).min().unwrap_or(0)))
            .collect();
        drop(all);
        self.applied.send_if_modified(|applied| {
            let mut changed = false;
            for (p, min) in mins {
                let cur = applied.entry(p).or_insert(0);
                if min > *cur {
                    *cur = min;
                    changed = true;
                }
            }
            changed
        });
    }

    /// Every projection has applied the record at `pos` (its next offset is past it).
    pub fn is_applied(&self, pos: Position) -> bool {
        applied(&self.applied.borrow(), pos)
    }

    /// Whether the listener is connected and has read the table since (for tests and diagnostics).
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Resolves once the listener is connected and has read the table.
    pub async fn listening(&self) {
        let mut rx = self.listening.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|l| *l).await;
    }

    /// How many requests are waiting for a position right now.
    pub fn waiting(&self) -> usize {
        self.applied.receiver_count()
    }

    /// Waits (at most `timeout`) until every projection has applied the record at `pos`.
    pub async fn wait_for(&self, pos: Position, timeout: Duration) -> Result<(), NotYetApplied> {
        let mut rx = self.applied.subscribe();
        // `wait_for` fails only if the sender is dropped, which `self` prevents.
        let reached = tokio::time::timeout(timeout, async { rx.wait_for(|offsets| applied(offsets, pos)).await.is_ok() }).await;
        if reached == Ok(true) {
            Ok(())
        } else {
            Err(NotYetApplied { position: pos, waited: timeout })
        }
    }
}

fn applied(offsets: &Offsets, pos: Position) -> bool {
    offsets.get(&pos.partition).is_some_and(|next| *next > pos.offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_position_is_applied_once_every_projection_is_past_it() {
        let t = ProgressTracker::new("task-events");
        let pos = Position { partition: 3, offset: 10 };
        assert!(!t.is_applied(pos));
        t.record("tasks", vec![(3, 11)]);
        assert!(!t.is_applied(pos), "task_history has not applied it yet");
        t.record("task_history", vec![(3, 10)]);
        assert!(!t.is_applied(pos), "next_offset 10 means offset 10 is not applied yet");
        t.record("task_history", vec![(3, 11), (4, 1)]);
        assert!(t.is_applied(pos));
        assert!(!t.is_applied(Position { partition: 4, offset: 0 }), "tasks has not reported partition 4");
        // Offsets never move back; unknown projections do not count.
        t.record("tasks", vec![(3, 1)]);
        t.record("notifications", vec![(3, 0), (9, 100)]);
        assert!(t.is_applied(pos));
        assert!(!t.is_applied(Position { partition: 9, offset: 0 }));
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_the_last_projection_catches_up() {
        let t = ProgressTracker::new("task-events");
        let pos = Position { partition: 0, offset: 41 };
        t.record("tasks", vec![(0, 42)]);
        assert_eq!(t.waiting(), 0);
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait_for(pos, Duration::from_secs(30)).await }
        });
        // Wait until the request is really waiting, then let the projection catch up.
        while t.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished());
        t.record("task_history", vec![(0, 42)]);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert_eq!(t.waiting(), 0);
    }

    #[tokio::test]
    async fn a_wait_that_is_never_satisfied_times_out_with_a_clear_error() {
        let t = ProgressTracker::new("task-events");
        let pos = Position { partition: 2, offset: 7 };
        let err = t.wait_for(pos, Duration::from_millis(20)).await.unwrap_err();
        assert_eq!(err, NotYetApplied { position: pos, waited: Duration::from_millis(20) });
        assert!(err.to_string().contains("have not yet reached the requested position"), "{err}");
    }

    #[test]
    fn notifications_parse_as_the_projector_sends_them() {
        let n: Notice = serde_json::from_str(r#"{"topic":"task-events","projection":"tasks","offsets":[[0,12],[5,3]]}"#).unwrap();
        assert_eq!((n.topic.as_str(), n.projection.as_str(), n.offsets), ("task-events", "tasks", vec![(0, 12), (5, 3)]));
    }
}
