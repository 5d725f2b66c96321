//! Read-your-writes: tracks how far the projections have applied the log (per partition, the
//! minimum over projections) and lets a request wait until a command's position is applied.
//! Fed by the projector's NOTIFYs (sent inside its batch transaction, so delivered at commit), with
//! a periodic re-read of `projection_offsets` so a lost notification only delays, never hangs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use platform::position::Position;
use platform::projections::{PROGRESS_CHANNEL, PROJECTIONS};

type Offsets = HashMap<i32, i64>;

#[derive(Clone)]
pub struct ProgressTracker {
    topic: Arc<str>,
    per_projection: Arc<Mutex<HashMap<String, Offsets>>>,
    applied: watch::Sender<Offsets>,
}

#[derive(Deserialize)]
struct Notice {
    topic: String,
    projection: String,
    offsets: Vec<(i32, i64)>,
}

#[derive(Debug, thiserror::Error)]
#[error("the projections have not reached the requested position within {0:?}")]
pub struct NotYetApplied(pub Duration);

impl ProgressTracker {
    pub fn new(topic: &str) -> Self {
        Self { topic: topic.into(), per_projection: Arc::default(), applied: watch::channel(Offsets::new()).0 }
    }

    /// Starts following the projector's progress (LISTEN plus a periodic re-read).
    pub fn spawn(&self, pool: PgPool) {
        let me = self.clone();
        tokio::spawn(async move { me.follow(pool).await });
    }

    async fn follow(self, pool: PgPool) {
        loop {
            if let Err(e) = self.listen(&pool).await {
                tracing::warn!(error.message = %e, "progress listener failed; reconnecting");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(PROGRESS_CHANNEL).await?;
        // Anything committed before LISTEN took effect is picked up here.
        self.reload(pool).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                n = listener.try_recv() => match n? {
                    Some(n) => match serde_json::from_str::<Notice>(n.payload()) {
                        Ok(notice) if *notice.topic == *self.topic => self.record(&notice.projection, notice.offsets),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error.message = %e, "unreadable progress notification"),
                    },
                    // The connection dropped; notifications may have been missed.
                    None => self.reload(pool).await?,
                },
                _ = tick.tick() => self.reload(pool).await?,
            }
        }
    }

    /// Re-reads `projection_offsets`.
    pub async fn reload(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let rows: Vec<(String, i32, i64)> =
            sqlx::query_as("SELECT projection, partition, next_offset FROM projection_offsets WHERE topic = $1")
                .bind(&*self.topic)
                .fetch_all(pool)
                .await?;
        let mut by: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
        for (name, p, o) in rows {
            by.entry(name).or_default().push((p, o));
        }
        for (name, offsets) in by {
            self.record(&name, offsets);
        }
        Ok(())
    }

    fn record(&self, projection: &str, offsets: Vec<(i32, i64)>) {
        let mut all = self.per_projection.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry(projection.to_owned()).or_default();
        let mut touched = Vec::with_capacity(offsets.len());
        for (p, o) in offsets {
            let cur = entry.entry(p).or_insert(0);
            // Offsets only move forward (a stale re-read must not move them back).
            if o > *cur {
                *cur = o;
                touched.push(p);
            }
        }
        if touched.is_empty() {
            return;
        }
        let mins: Vec<(i32, i64)> = touched
            .into_iter()
            .map(|p| {
                let min = PROJECTIONS.iter().map(|name| all.get(*name).and_then(|m| m.get(&p)).copied().unwrap_or(0)).min().unwrap_or(0);
                (p, min)
            })
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

    pub fn is_applied(&self, pos: Position) -> bool {
        self.applied.borrow().get(&pos.partition).is_some_and(|next| *next > pos.offset)
    }

    /// Waits until every projection has applied the record at `pos`.
    pub async fn wait_for(&self, pos: Position, timeout: Duration) -> Result<(), NotYetApplied> {
        let mut rx = self.applied.subscribe();
        let wait = async {
            loop {
                if rx.borrow_and_update().get(&pos.partition).is_some_and(|next| *next > pos.offset) {
                    return;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| NotYetApplied(timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_every_projection() {
        let t = ProgressTracker::new("t");
        let pos = Position { partition: 3, offset: 10 };
        assert!(!t.is_applied(pos));
        t.record("tasks", vec![(3, 11)]);
        assert!(!t.is_applied(pos), "task_history has not applied it yet");
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.wait_for(pos, Duration::from_secs(5)).await })
        };
        t.record("task_history", vec![(3, 12)]);
        assert!(waiter.await.unwrap().is_ok());
        assert!(t.is_applied(pos));
        // Offsets never move back.
        t.record("tasks", vec![(3, 1)]);
        assert!(t.is_applied(pos));
        assert!(t.wait_for(Position { partition: 0, offset: 0 }, Duration::from_millis(20)).await.is_err());
    }
}
