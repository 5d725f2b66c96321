//! The live projector's membership of the consumer group of `task-events`: several instances share
//! the partitions, Kafka's group coordinator decides which instance owns which (the broker's group
//! protocol of KIP-848, `group.protocol=consumer`: cooperative, so a rebalance only moves the
//! partitions that change owner).
//!
//! Offsets never live in Kafka: each projection's per-partition offset is stored in PostgreSQL with
//! its rows (compare-and-set, `store`). So the rebalance callbacks only keep the books
//! ([`Assignment`], pure): an assigned partition is paused at once and positioned by the live loop
//! (`runner`) at its stored offset before any of its records is applied; a revoked partition is
//! forgotten, and the records of it read but not applied yet are dropped. The callbacks run inside
//! the live loop's own `recv` (rdkafka serves them from `poll`), not while a batch is being
//! applied; should one be served anywhere else, a revocation waits until the batch in flight has
//! committed or been given up ([`Membership::applying`]). So when a revocation returns, no
//! transaction of a revoked partition is in flight, and none starts after it. A zombie (an instance whose partitions moved while it was stopped or cut off) that
//! still applies a batch fails the compare-and-set and is rolled back.
//!
//! Which instance owns which partition is also written to `projector_partition_owners`, for
//! `projector status` only (Kafka decides; PostgreSQL shows). Imports `consumer` (the settings of
//! every reader of the log).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::TopicPartitionList;
use sqlx::PgPool;
use tokio::sync::Notify;

use platform::settings::KafkaSettings;

use crate::consumer::log_config;

/// The group of the live projectors of `topic` (one group per topic, so the projectors of another
/// log on the same broker never rebalance with these).
pub fn group_id(topic: &str) -> String {
    format!("taskstream-projector.{topic}")
}

/// Who this instance is: its id (`PROJECTOR_INSTANCE_ID`, default `<hostname>:<port>`) and the
/// address of its health endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub address: String,
}

impl Instance {
    /// `id`, or `<hostname>:<port>` of `address` when none is configured.
    pub fn new(id: Option<String>, address: std::net::SocketAddr) -> Self {
        let id = id.filter(|i| !i.trim().is_empty()).unwrap_or_else(|| format!("{}:{}", hostname(), address.port()));
        Self { id, address: address.to_string() }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A partition Kafka assigned to this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub since: DateTime<Utc>,
    /// Sought to its stored offset: its records may be applied.
    pub positioned: bool,
}

/// What the live loop must do after rebalances: forget the revoked partitions (drop what was read
/// of them, delete their owner rows) and position the assigned ones at their stored offsets.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub revoked: BTreeSet<i32>,
    pub to_position: Vec<i32>,
}

/// The books of the assignment (pure): written by the rebalance callbacks, read by the live loop.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Assignment {
    held: BTreeMap<i32, Held>,
    /// Revoked since the live loop last took the changes.
    revoked: BTreeSet<i32>,
    /// Kafka assigned this member something (possibly nothing) at least once.
    joined: bool,
    /// A batch is being applied (see [`Membership::applying`]).
    applying: bool,
}

impl Assignment {
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = i32>, now: DateTime<Utc>) {
        self.joined = true;
        for p in partitions {
            self.held.entry(p).or_insert(Held { since: now, positioned: false });
        }
    }

    pub fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            if self.held.remove(&p).is_some() {
                self.revoked.insert(p);
            }
        }
    }

    /// The revoked partitions since the last call, and the held ones not positioned yet. A
    /// partition revoked and assigned again in between is in both: what was read of it is dropped
    /// and it is positioned afresh.
    pub fn take_changes(&mut self) -> Changes {
        let to_position = self.held.iter().filter(|(_, h)| !h.positioned).map(|(p, _)| *p).collect();
        Changes { revoked: std::mem::take(&mut self.revoked), to_position }
    }

    /// Whether a held partition still waits to be positioned.
    pub fn unpositioned(&self) -> bool {
        self.held.values().any(|h| !h.positioned)
    }

    /// Marks partitions as sought to their stored offsets (ignores any no longer held).
    pub fn positioned(&mut self, partitions: &[i32]) {
        for p in partitions {
            if let Some(h) = self.held.get_mut(p) {
                h.positioned = true;
            }
        }
    }

    /// Every held partition is positioned again (the stored offsets moved under this instance).
    pub fn reposition_all(&mut self) {
        for h in self.held.values_mut() {
            h.positioned = false;
        }
    }

    /// Whether the records of `partition` may be applied: held and positioned.
    pub fn owns(&self, partition: i32) -> bool {
        self.held.get(&partition).is_some_and(|h| h.positioned)
    }

    /// The partitions whose records may be applied, with since when they are held.
    pub fn owned(&self) -> Vec<(i32, DateTime<Utc>)> {
        self.held.iter().filter(|(_, h)| h.positioned).map(|(p, h)| (*p, h.since)).collect()
    }

    pub fn joined(&self) -> bool {
        self.joined
    }
}

/// The assignment shared by the rebalance callbacks, the live loop and `/readyz`, and a signal
/// that wakes the live loop's read when a rebalance happened.
#[derive(Debug, Default)]
pub struct Membership {
    books: Mutex<Assignment>,
    rebalanced: Notify,
    /// Signalled when a batch has been applied (or given up).
    applied: Condvar,
}

impl Membership {
    pub fn books(&self) -> MutexGuard<'_, Assignment> {
        // The books stay consistent even if a holder panicked (every change is one call).
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts afresh (a new consumer joins the group with nothing).
    pub fn reset(&self) {
        *self.books() = Assignment::default();
    }

    /// Resolves when a rebalance changed the books since the last wait (a pending signal is kept).
    pub async fn rebalanced(&self) {
        self.rebalanced.notified().await
    }

    fn changed(&self) {
        self.rebalanced.notify_one();
    }

    /// Starts applying a batch: `admit` drops from it what this instance may not apply (it sees the
    /// books as they are now), and until the returned guard is dropped a revocation waits (see
    /// `GroupContext::pre_rebalance`): no batch of a partition is applied after its revocation
    /// returned, and none is cut off while in flight.
    pub fn applying(&self, admit: impl FnOnce(&Assignment)) -> Applying<'_> {
        let mut books = self.books();
        admit(&books);
        books.applying = true;
        Applying(self)
    }

    /// Revokes `partitions` once no batch is being applied.
    fn revoke_after_the_batch_in_flight(&self, partitions: Vec<i32>) {
        let mut books = self.books();
        while books.applying {
            books = self.applied.wait(books).unwrap_or_else(|e| e.into_inner());
        }
        books.revoke(partitions);
    }
}

/// A batch being applied; dropped when it committed or was given up.
pub struct Applying<'m>(&'m Membership);

impl Drop for Applying<'_> {
    fn drop(&mut self) {
        self.0.books().applying = false;
        self.0.applied.notify_all();
    }
}

/// The consumer's context: keeps the books in the rebalance callbacks and logs client errors.
pub struct GroupContext {
    membership: Arc<Membership>,
    topic: String,
}

impl GroupContext {
    fn partitions(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }
}

impl rdkafka::ClientContext for GroupContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !matches!(error, rdkafka::error::KafkaError::PartitionEOF(_)) {
            tracing::error!(error.message = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for GroupContext {
    /// Revoked (or lost): forgotten before rdkafka unassigns them, once the batch in flight (if
    /// any) has committed or been given up; what was read of them and not applied is dropped. (This
    /// runs inside the live loop's read, on a thread of its own, while the batch read before may
    /// be in flight.)
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let partitions = self.partitions(tpl);
                tracing::info!(?partitions, "partitions revoked");
                self.membership.revoke_after_the_batch_in_flight(partitions);
                self.membership.changed();
            }
            Rebalance::Error(e) => tracing::warn!(error.message = %e, "consumer group rebalance error"),
            Rebalance::Assign(_) => {}
        }
    }

    /// Assigned: paused at once (rdkafka would fetch them from the log's start, as no offset is
    /// committed to Kafka) until the live loop has sought them to their stored offsets.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions = self.partitions(tpl);
            tracing::info!(?partitions, "partitions assigned");
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error.message = %e, "could not pause the assigned partitions until they are positioned");
            }
            self.membership.books().assign(partitions, Utc::now());
            self.membership.changed();
        }
    }
}

/// A read_committed member of the projectors' group for `topic`: KIP-848's protocol, no offsets
/// committed to Kafka (they live in PostgreSQL). Subscribe it to start.
pub fn consumer(kafka: &KafkaSettings, membership: Arc<Membership>) -> anyhow::Result<StreamConsumer<GroupContext>> {
    let topic = kafka.task_events_topic.clone();
    let mut cfg = log_config(kafka, "taskstream-projector", &group_id(&topic));
    cfg.set("group.protocol", "consumer");
    Ok(cfg.create_with_context(GroupContext { membership, topic })?)
}

/// A partition's owner as `projector status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub instance_id: String,
    pub address: String,
    pub assigned_at: DateTime<Utc>,
}

/// Records this instance as the owner of `partitions` (display only).
pub async fn record_owners(pool: &PgPool, topic: &str, owned: &[(i32, DateTime<Utc>)], me: &Instance) -> Result<(), sqlx::Error> {
    let (partitions, since): (Vec<i32>, Vec<DateTime<Utc>>) = owned.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO projector_partition_owners (topic, partition, instance_id, address, assigned_at)
         SELECT $1, p, $2, $3, s FROM UNNEST($4::int4[], $5::timestamptz[]) AS v(p, s)
         ON CONFLICT (topic, partition) DO UPDATE
         SET instance_id = EXCLUDED.instance_id, address = EXCLUDED.address, assigned_at = EXCLUDED.assigned_at",
    )
    .bind(topic)
    .bind(&me.id)
    .bind(&me.address)
    .bind(&partitions)
    .bind(&since)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes this instance's owner rows of `partitions` (all of them when `None`); a row another
/// instance took over meanwhile stays.
pub async fn forget_owners(pool: &PgPool, topic: &str, partitions: Option<&[i32]>, me: &Instance) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM projector_partition_owners WHERE topic = $1 AND instance_id = $2 AND ($3::int4[] IS NULL OR partition = ANY($3))")
        .bind(topic)
        .bind(&me.id)
        .bind(partitions)
        .execute(pool)
        .await?;
    Ok(())
}

/// The recorded owner of each partition of `topic`.
pub async fn owners(pool: &PgPool, topic: &str) -> Result<HashMap<i32, Owner>, sqlx::Error> {
    let rows: Vec<(i32, String, String, DateTime<Utc>)> =
        sqlx::query_as("SELECT partition, instance_id, address, assigned_at FROM projector_partition_owners WHERE topic = $1")
            .bind(topic)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(p, instance_id, address, assigned_at)| (p, Owner { instance_id, address, assigned_at })).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_900_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn assigned_partitions_are_owned_only_once_positioned() {
        let mut a = Assignment::default();
        assert!(!a.joined());
        a.assign([0, 1], at(0));
        assert!(a.joined());
        assert_eq!(a.owned(), []);
        assert_eq!(a.take_changes(), Changes { revoked: BTreeSet::new(), to_position: vec![0, 1] });
        a.positioned(&[0, 1]);
        assert_eq!(a.owned(), [(0, at(0)), (1, at(0))]);
        assert_eq!(a.take_changes(), Changes::default());
        // A cooperative rebalance adds one partition; the others keep their time.
        a.assign([2, 1], at(5));
        assert_eq!(a.take_changes().to_position, [2]);
        a.positioned(&[2]);
        assert_eq!(a.owned(), [(0, at(0)), (1, at(0)), (2, at(5))]);
    }

    #[test]
    fn revoked_partitions_are_reported_once_and_no_longer_owned() {
        let mut a = Assignment::default();
        a.assign([0, 1, 2], at(0));
        a.positioned(&[0, 1, 2]);
        a.revoke([1, 7]);
        assert_eq!(a.owned(), [(0, at(0)), (2, at(0))]);
        assert_eq!(a.take_changes(), Changes { revoked: BTreeSet::from([1]), to_position: vec![] });
        assert_eq!(a.take_changes(), Changes::default());
        // Positioning a partition revoked meanwhile does not make it owned.
        a.assign([3], at(1));
        a.revoke([3]);
        a.positioned(&[3]);
        assert_eq!(a.owned(), [(0, at(0)), (2, at(0))]);
    }

    #[test]
    fn a_partition_revoked_and_assigned_again_between_two_looks_is_dropped_and_positioned_afresh() {
        let mut a = Assignment::default();
        a.assign([4], at(0));
        a.positioned(&[4]);
        a.revoke([4]);
        a.assign([4], at(9));
        assert_eq!(a.take_changes(), Changes { revoked: BTreeSet::from([4]), to_position: vec![4] });
        assert_eq!(a.owned(), []);
        a.positioned(&[4]);
        assert_eq!(a.owned(), [(4, at(9))]);
    }

    #[test]
    fn a_partition_that_could_not_be_sought_waits_to_be_positioned() {
        let mut a = Assignment::default();
        assert!(!a.unpositioned());
        a.assign([0, 1], at(0));
        assert!(a.unpositioned());
        a.positioned(&[0]);
        assert!(a.unpositioned());
        assert_eq!(a.take_changes().to_position, [1]);
        a.positioned(&[1]);
        assert!(!a.unpositioned());
    }

    #[test]
    fn after_a_fenced_batch_every_held_partition_is_positioned_again() {
        let mut a = Assignment::default();
        a.assign([0, 1], at(0));
        a.positioned(&[0, 1]);
        a.reposition_all();
        assert_eq!(a.owned(), []);
        assert_eq!(a.take_changes().to_position, [0, 1]);
    }

    #[test]
    fn the_instance_id_defaults_to_host_and_port() {
        let addr: std::net::SocketAddr = "127.0.0.1:8182".parse().unwrap();
        assert_eq!(Instance::new(Some("p-1".into()), addr), Instance { id: "p-1".into(), address: "127.0.0.1:8182".into() });
        let default = Instance::new(None, addr);
        assert!(default.id.ends_with(":8182") && default.id.len() > 5, "{default:?}");
        assert_eq!(Instance::new(Some(" ".into()), addr).id, default.id);
    }

    #[test]
    fn a_revocation_waits_for_the_batch_in_flight_which_admits_only_owned_partitions() {
        let m = Arc::new(Membership::default());
        m.books().assign([0, 1, 2], at(0));
        m.books().positioned(&[0, 1]);
        let mut admitted = Vec::new();
        let applying = m.applying(|books| admitted = (0..4).filter(|p| books.owns(*p)).collect());
        assert_eq!(admitted, [0, 1], "partition 2 is not positioned, 3 not held");
        let revoker = {
            let m = m.clone();
            std::thread::spawn(move || m.revoke_after_the_batch_in_flight(vec![1]))
        };
        // The revocation cannot complete while the batch is in flight.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(200);
        while std::time::Instant::now() < deadline {
            assert!(m.books().owns(1) && !revoker.is_finished());
            std::thread::yield_now();
        }
        drop(applying);
        revoker.join().unwrap();
        assert!(!m.books().owns(1) && m.books().owns(0));
        assert_eq!(m.books().take_changes().revoked, BTreeSet::from([1]));
    }

    #[tokio::test]
    async fn a_rebalance_wakes_the_reader_even_if_it_came_first() {
        let m = Membership::default();
        m.changed();
        tokio::time::timeout(std::time::Duration::from_secs(1), m.rebalanced()).await.expect("the pending signal");
    }
}
