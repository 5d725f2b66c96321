//! Live updates: GraphQL subscriptions over WebSocket (`graphql-transport-ws`, authenticated in
//! `connection_init`). The projector NOTIFYs committed changes (delivered at commit, so what is
//! pushed is already readable); one listener per process fans them out, and each subscription only
//! passes on its own user's changes, read fresh from the read model.

use std::sync::Arc;
use std::time::Duration;

use async_graphql::{Context, SimpleObject, Subscription as GqlSubscription};
use futures::{Stream, StreamExt};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::broadcast;

use domain::UserId;
use platform::projections::{NotificationNotice, TaskChangeNotice, NOTIFICATIONS_CHANNEL, TASK_CHANGES_CHANNEL};

use crate::schema::{Notification, Task};
use crate::store;

#[derive(Debug, Clone)]
pub enum Change {
    Task(TaskChangeNotice),
    Notification(NotificationNotice),
}

/// Fans committed changes out to subscriptions.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<Change>>,
}

impl Default for Hub {
    fn default() -> Self {
        Self { tx: broadcast::channel(4096).0 }
    }
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    pub fn publish(&self, change: Change) {
        let _ = self.tx.send(Arc::new(change));
    }

    /// Follows the projector's NOTIFYs until the process stops (reconnecting on errors).
    pub fn spawn(&self, pool: PgPool) {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = hub.listen(&pool).await {
                    tracing::warn!(error.message = %e, "change listener failed; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    async fn listen(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen_all([TASK_CHANGES_CHANNEL, NOTIFICATIONS_CHANNEL]).await?;
        loop {
            let n = listener.recv().await?;
            match n.channel() {
                TASK_CHANGES_CHANNEL => match serde_json::from_str::<Vec<TaskChangeNotice>>(n.payload()) {
                    Ok(items) => items.into_iter().for_each(|c| self.publish(Change::Task(c))),
                    Err(e) => tracing::warn!(error.message = %e, "unreadable task change notification"),
                },
                NOTIFICATIONS_CHANNEL => match serde_json::from_str::<Vec<NotificationNotice>>(n.payload()) {
                    Ok(items) => items.into_iter().for_each(|c| self.publish(Change::Notification(c))),
                    Err(e) => tracing::warn!(error.message = %e, "unreadable notification notice"),
                },
                _ => {}
            }
        }
    }
}

/// A change to one of the caller's tasks; `task` is null when it was deleted.
#[derive(SimpleObject)]
pub struct TaskChange {
    /// created, updated, completed, reopened, deleted or reminder_due.
    pub kind: String,
    pub task: Option<Task>,
}

/// What a subscription needs besides the caller.
pub struct LiveContext {
    pub pool: PgPool,
    pub hub: Hub,
}

fn changes(hub: &Hub) -> impl Stream<Item = Arc<Change>> {
    futures::stream::unfold(hub.subscribe(), |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(c) => return Some((c, rx)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "a subscriber fell behind; some changes were not pushed to it");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

pub struct Subscription;

#[GqlSubscription]
impl Subscription {
    /// Changes to the caller's tasks, pushed once the read model has committed them.
    async fn task_changed(&self, ctx: &Context<'_>) -> async_graphql::Result<impl Stream<Item = TaskChange>> {
        let user = ctx.data::<UserId>()?.clone();
        let live = ctx.data::<LiveContext>()?;
        let pool = live.pool.clone();
        Ok(changes(&live.hub).filter_map(move |c| {
            let (user, pool) = (user.clone(), pool.clone());
            async move {
                let Change::Task(c) = c.as_ref() else { return None };
                if c.user != user.as_ref() {
                    return None;
                }
                let task = if c.kind == "deleted" {
                    None
                } else {
                    match store::task(&pool, &user, c.task_id).await {
                        Ok(row) => row.map(Task::from),
                        Err(e) => {
                            tracing::warn!(error.message = %e, "loading a changed task failed");
                            return None;
                        }
                    }
                };
                Some(TaskChange { kind: c.kind.clone(), task })
            }
        }))
    }

    /// New notifications of the caller.
    async fn notification_received(&self, ctx: &Context<'_>) -> async_graphql::Result<impl Stream<Item = Notification>> {
        let user = ctx.data::<UserId>()?.clone();
        let live = ctx.data::<LiveContext>()?;
        let pool = live.pool.clone();
        Ok(changes(&live.hub).filter_map(move |c| {
            let (user, pool) = (user.clone(), pool.clone());
            async move {
                let Change::Notification(n) = c.as_ref() else { return None };
                if n.user != user.as_ref() {
                    return None;
                }
                store::notification(&pool, &user, n.id).await.ok().flatten().map(Notification::from)
            }
        }))
    }
}
