//! How this instance comes to own partitions: Kafka's consumer-group membership (the broker's new
//! group protocol, KIP-848), with no home-made election. The group's consumer only serves the
//! rebalance callbacks (its partitions stay paused: the writers read the log themselves):
//! on assign, a writer is started per partition (it fences the previous owner, restores, announces,
//! then accepts); on revoke, the writer stops accepting, finishes its transaction in flight and
//! refuses the rest before the callback returns. A second thread tails the owners topic so every
//! instance knows where to forward commands.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::runtime::Handle;

use platform::settings::KafkaSettings;

use crate::cluster::Cluster;
use crate::log::OwnerRecord;
use crate::writer::Writer;

/// Starts the writer of a partition this instance was given.
pub type WriterFactory = Arc<dyn Fn(i32) -> Writer + Send + Sync>;

/// How long a revoked writer may take to finish its transaction in flight.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A writer that stopped by itself (fenced) while the group still assigns its partition to this
/// instance is started again after this long: longer than the group's session timeout, so a real
/// new owner has had the time to take the partition (and this instance to learn it lost it).
const RESTART_FENCED_AFTER: Duration = Duration::from_secs(15);

/// Owns every partition (one process, no group): for tests and single-instance tools.
pub fn own_all(cluster: &Cluster, factory: &WriterFactory) {
    for p in 0..cluster.partitions() {
        cluster.add_local(factory(p));
    }
}

struct Membership {
    cluster: Arc<Cluster>,
    factory: WriterFactory,
    topic: String,
    rt: Handle,
    fatal: AtomicBool,
    /// The partitions the group assigns to this instance, with when their writer was first seen
    /// stopped (fenced) while still assigned.
    assigned: Mutex<HashMap<i32, Option<Instant>>>,
}

impl ClientContext for Membership {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.fatal.store(true, Ordering::Release);
        }
        tracing::warn!(error.message = %error, reason, "command API group membership");
    }
}

impl Membership {
    fn ours(&self, tpl: &TopicPartitionList) -> Vec<i32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }

    fn revoke(&self, partitions: &[i32]) {
        {
            let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
            for p in partitions {
                assigned.remove(p);
            }
        }
        let writers: Vec<Writer> = partitions.iter().filter_map(|p| self.cluster.remove_local(*p)).collect();
        for w in &writers {
            w.stop();
        }
        for w in writers {
            if self.rt.block_on(async { tokio::time::timeout(STOP_TIMEOUT, w.stopped()).await }).is_err() {
                tracing::warn!(
                    partition = w.partition(),
                    "the revoked partition's writer did not stop in time; the new owner's fencing aborts its transaction"
                );
            }
        }
        if !partitions.is_empty() {
            tracing::info!(?partitions, "partitions revoked");
        }
        metrics::gauge!("command_api_partitions_owned").set(self.cluster.local_partitions().len() as f64);
    }
}

impl Membership {
    /// Restarts the writers that stopped by themselves (fenced) on partitions the group still
    /// assigns to this instance, once `RESTART_FENCED_AFTER` has passed.
    fn restart_fenced(&self) {
        let mut assigned = self.assigned.lock().unwrap_or_else(|e| e.into_inner());
        for (p, stopped_since) in assigned.iter_mut() {
            if self.cluster.route(*p).is_local() {
                *stopped_since = None;
                continue;
            }
            match stopped_since {
                None => *stopped_since = Some(Instant::now()),
                Some(t) if t.elapsed() >= RESTART_FENCED_AFTER => {
                    tracing::warn!(
                        partition = *p,
                        "the group still assigns this partition to this instance although its writer was fenced; taking it over again"
                    );
                    let _guard = self.rt.enter();
                    self.cluster.add_local((self.factory)(*p));
                    *stopped_since = None;
                }
                Some(_) => {}
            }
        }
    }
}

impl ConsumerContext for Membership {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.revoke(&self.ours(tpl));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let partitions = self.ours(tpl);
            // The group's consumer never reads: the writers do.
            if let Err(e) = consumer.pause(tpl) {
                tracing::warn!(error.message = %e, "could not pause the group consumer's partitions");
            }
            let _guard = self.rt.enter();
            self.assigned.lock().unwrap_or_else(|e| e.into_inner()).extend(partitions.iter().map(|p| (*p, None)));
            for p in &partitions {
                if self.cluster.route(*p).is_local() {
                    continue;
                }
                self.cluster.add_local((self.factory)(*p));
            }
            if !partitions.is_empty() {
                tracing::info!(?partitions, "partitions assigned; restoring them");
            }
            metrics::gauge!("command_api_partitions_owned").set(self.cluster.local_partitions().len() as f64);
        }
    }
}

/// Joins the command API's consumer group and keeps the membership (recreating the consumer after a
/// fatal error) until the process ends.
pub fn join(settings: &KafkaSettings, group: &str, cluster: Arc<Cluster>, factory: WriterFactory) -> anyhow::Result<()> {
    let rt = Handle::current();
    let settings = settings.clone();
    let group = group.to_owned();
    std::thread::Builder::new().name("membership".into()).spawn(move || loop {
        let context = Membership {
            cluster: cluster.clone(),
            factory: factory.clone(),
            topic: settings.task_events_topic.clone(),
            rt: rt.clone(),
            fatal: AtomicBool::new(false),
            assigned: Mutex::default(),
        };
        let mut cfg = platform::kafka::client_config(&settings, &format!("taskstream-command-api-{}", cluster.me().id));
        cfg.set("group.id", &group)
            .set("group.protocol", "consumer")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest");
        let consumer: BaseConsumer<Membership> = match cfg.create_with_context(context) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error.message = %e, "cannot create the group membership consumer; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if let Err(e) = consumer.subscribe(&[&settings.task_events_topic]) {
            tracing::error!(error.message = %e, "cannot join the command API group; retrying");
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        tracing::info!(group, instance = %cluster.me().id, "joined the command API group");
        let mut checked = Instant::now();
        loop {
            if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                tracing::debug!(error.message = %e, "group membership");
            }
            if checked.elapsed() >= Duration::from_secs(1) {
                consumer.context().restart_fenced();
                checked = Instant::now();
            }
            if cluster.is_leaving() {
                let all = cluster.local_partitions();
                consumer.context().revoke(&all);
                consumer.unsubscribe();
                drop(consumer); // closes the consumer: it leaves the group
                tracing::info!("left the command API group");
                cluster.has_left();
                return;
            }
            if consumer.context().fatal.load(Ordering::Acquire) {
                tracing::error!("the group membership failed fatally; giving every partition up and joining again");
                let all = cluster.local_partitions();
                consumer.context().revoke(&all);
                break;
            }
        }
    })?;
    Ok(())
}

/// Follows the owners topic (read_committed: only announcements of writers that were not fenced)
/// and tells `cluster` who owns what.
pub fn follow_owners(settings: &KafkaSettings, cluster: Arc<Cluster>) -> anyhow::Result<()> {
    let settings = settings.clone();
    std::thread::Builder::new().name("owners".into()).spawn(move || loop {
        let topic = settings.owners_topic();
        let mut cfg = platform::kafka::client_config(&settings, "taskstream-command-api-owners");
        cfg.set("group.id", format!("taskstream-command-api-owners-{}", cluster.me().id))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "50")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = match cfg.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error.message = %e, "cannot read the owners topic; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&topic, 0, Offset::Beginning)
            .and_then(|_| platform::kafka::assign_when_known(&consumer, &tpl, Duration::from_secs(5)))
            .is_err()
        {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        loop {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    if let Some(owner) = m.payload().and_then(|p| serde_json::from_slice::<OwnerRecord>(p).ok()) {
                        tracing::debug!(partition = owner.partition, instance = %owner.instance, "partition owner announced");
                        cluster.learn_owner(owner);
                    }
                }
                Some(Err(e)) => tracing::debug!(error.message = %e, "reading the owners topic"),
                None => {}
            }
        }
    })?;
    Ok(())
}
