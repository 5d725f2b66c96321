//! Who owns which partition of `task-events`: this instance's partition writers, and what the other
//! instances announced in the owners topic. `Cluster::route` says where a command goes: to a local
//! writer, forwarded to the owner, or refused (503) while the partition has no owner.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::RwLock;

use serde::Serialize;

use crate::log::OwnerRecord;
use crate::partition::partition_of;
use crate::writer::{Phase, Writer};

/// This instance: its id and the URL peers forward commands to.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    pub id: String,
    pub url: String,
}

pub struct Cluster {
    me: Instance,
    /// The partition count of `task-events` (0 until known).
    partitions: AtomicI32,
    local: RwLock<HashMap<i32, Writer>>,
    owners: RwLock<HashMap<i32, OwnerRecord>>,
    /// Set at shutdown: the membership gives every partition up and leaves the group.
    leaving: AtomicBool,
    left: tokio::sync::Notify,
}

/// Where a command on a partition goes.
pub enum Route {
    Local(Writer),
    Remote(OwnerRecord),
    /// Nobody is known to own the partition (or it is moving): 503, retry later.
    Unowned,
}

impl Route {
    pub fn is_local(&self) -> bool {
        matches!(self, Route::Local(_))
    }
}

/// `GET /v1/cluster`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The instance that answered.
    pub instance: String,
    pub partitions: Vec<PartitionView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PartitionView {
    pub partition: i32,
    /// The owning instance's id (null while nobody owns it).
    pub owner: Option<String>,
    /// Where the owner is reached.
    pub url: Option<String>,
    /// Whether the owner accepts commands on it (as far as this instance knows: exact for its own
    /// partitions, the owner's announcement for the others).
    pub ready: bool,
    /// For this instance's own partitions: restoring, ready, recovering or stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// When the owner announced itself.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

impl Cluster {
    pub fn new(me: Instance, partitions: i32) -> Self {
        Self {
            me,
            partitions: AtomicI32::new(partitions),
            local: RwLock::default(),
            owners: RwLock::default(),
            leaving: AtomicBool::new(false),
            left: tokio::sync::Notify::new(),
        }
    }

    /// Shutdown: give every partition up (transactions in flight finish) and leave the group, so
    /// the partitions move at once instead of after the group's session timeout; waits at most
    /// `timeout`.
    pub async fn leave(&self, timeout: std::time::Duration) {
        let left = self.left.notified();
        self.leaving.store(true, Ordering::Release);
        if self.partitions() == 0 {
            return; // never joined
        }
        if tokio::time::timeout(timeout, left).await.is_err() {
            tracing::warn!("did not leave the group in time; the partitions move after the session timeout");
        }
    }

    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Called by the membership once it has left the group.
    pub fn has_left(&self) {
        self.left.notify_waiters();
    }

    /// Once the topic's partition count is known (read from Kafka at start).
    pub fn set_partitions(&self, partitions: i32) {
        self.partitions.store(partitions, Ordering::Release);
    }

    pub fn me(&self) -> &Instance {
        &self.me
    }

    pub fn partitions(&self) -> i32 {
        self.partitions.load(Ordering::Acquire)
    }

    /// The partition of a stream (`None` until the partition count is known).
    pub fn partition_of(&self, key: &str) -> Option<i32> {
        let n = self.partitions();
        (n > 0).then(|| partition_of(key, n))
    }

    pub fn route(&self, partition: i32) -> Route {
        if let Some(w) = self.local.read().unwrap_or_else(|e| e.into_inner()).get(&partition) {
            if w.phase() != Phase::Stopped {
                return Route::Local(w.clone());
            }
        }
        match self.owners.read().unwrap_or_else(|e| e.into_inner()).get(&partition) {
            Some(o) if o.instance != self.me.id => Route::Remote(o.clone()),
            _ => Route::Unowned,
        }
    }

    /// A partition writer of this instance started.
    pub fn add_local(&self, writer: Writer) {
        self.local.write().unwrap_or_else(|e| e.into_inner()).insert(writer.partition(), writer);
    }

    /// A partition was revoked: its writer (to stop) if there was one.
    pub fn remove_local(&self, partition: i32) -> Option<Writer> {
        self.local.write().unwrap_or_else(|e| e.into_inner()).remove(&partition)
    }

    pub fn local_partitions(&self) -> Vec<i32> {
        let mut ps: Vec<i32> = self.local.read().unwrap_or_else(|e| e.into_inner()).keys().copied().collect();
        ps.sort_unstable();
        ps
    }

    /// Local partitions whose writer accepts commands now.
    pub fn ready_local_partitions(&self) -> Vec<i32> {
        self.local.read().unwrap_or_else(|e| e.into_inner()).values().filter(|w| w.is_ready()).map(Writer::partition).collect()
    }

    /// An owner announced itself (read from the owners topic).
    pub fn learn_owner(&self, owner: OwnerRecord) {
        if owner.partition < 0 || owner.partition >= self.partitions() {
            return;
        }
        self.owners.write().unwrap_or_else(|e| e.into_inner()).insert(owner.partition, owner);
    }

    /// Ready to serve: none of this instance's partitions is being restored, and every partition
    /// has an owner this instance can reach (itself, or an announced peer).
    pub fn is_ready(&self) -> bool {
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        if local.values().any(|w| w.phase() == Phase::Restoring) {
            return false;
        }
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        let n = self.partitions();
        n > 0 && (0..n).all(|p| local.get(&p).is_some_and(Writer::is_ready) || owners.get(&p).is_some_and(|o| o.instance != self.me.id))
    }

    /// Why `is_ready` is false, for `/readyz`.
    pub fn not_ready_reason(&self) -> Option<String> {
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        let restoring: Vec<i32> = local.values().filter(|w| w.phase() == Phase::Restoring).map(Writer::partition).collect();
        if !restoring.is_empty() {
            return Some(format!("restoring the state of partitions {restoring:?} from the log"));
        }
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        if self.partitions() == 0 {
            return Some("the partitions of the event log are not known yet (is Kafka reachable?)".into());
        }
        let unowned: Vec<i32> = (0..self.partitions())
            .filter(|p| !(local.get(p).is_some_and(Writer::is_ready) || owners.get(p).is_some_and(|o| o.instance != self.me.id)))
            .collect();
        (!unowned.is_empty()).then(|| format!("partitions {unowned:?} have no ready owner yet"))
    }

    pub fn view(&self) -> ClusterView {
        let local = self.local.read().unwrap_or_else(|e| e.into_inner());
        let owners = self.owners.read().unwrap_or_else(|e| e.into_inner());
        let mut partitions = BTreeMap::new();
        for p in 0..self.partitions() {
            let view = match (local.get(&p), owners.get(&p)) {
                (Some(w), announced) => PartitionView {
                    partition: p,
                    owner: Some(self.me.id.clone()),
                    url: Some(self.me.url.clone()),
                    ready: w.is_ready(),
                    phase: Some(w.phase()),
                    since: announced.filter(|o| o.instance == self.me.id).map(|o| o.since),
                },
                (None, Some(o)) if o.instance != self.me.id => {
                    PartitionView { partition: p, owner: Some(o.instance.clone()), url: Some(o.url.clone()), ready: true, phase: None, since: Some(o.since) }
                }
                _ => PartitionView { partition: p, owner: None, url: None, ready: false, phase: None, since: None },
            };
            partitions.insert(p, view);
        }
        ClusterView { instance: self.me.id.clone(), partitions: partitions.into_values().collect() }
    }
}
