//! `projector rebuild`: replays the log from offset zero into fresh copies of the read-model tables
//! (schema `ts_rebuild`) while the live tables keep serving queries and the live projector keeps
//! applying new records. The copies never get ahead of the live projector; once they have caught up
//! with it, the live tables and the stored offsets are locked for a moment, the last records are
//! applied to the copies, and the copies replace the live tables in one transaction. The live
//! projector then continues from the same offsets, into the new tables. Replays never trigger
//! reactions (`ApplyMode::Replay`): no outbox rows, no webhook deliveries, no notifications sent.
//!
//! A replay skips what the live projection skipped: records of open or discarded dead letters and
//! parked records, so the copy is what the live projection holds.
//!
//! Far from the live head the replay is a bulk load: every task's row is kept in memory
//! ([`TaskTable`], folded with the same fold as every batch) instead of being read and upserted
//! per batch, history rows go in with COPY, and the tasks, their reminder schedule and the copies'
//! offsets are written once, when the bulk phase ends (before the secondary indexes are built).
//! From there on each batch is applied as the live projector applies it, up to the switch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

use platform::position::Position;
use platform::retry::Policy;
use platform::settings::{DatabaseSettings, KafkaSettings};

use crate::model::{Batch, Effects, RawRecord, TaskTable};
use crate::store::{self, ApplyMode, StoreError, PROJECTIONS, REBUILD_LOCK_KEY};

/// Where the copies are built.
pub const SCHEMA: &str = "ts_rebuild";
/// Applying a replayed batch again after a transient failure: 100 ms doubled up to 5 s.
const APPLY_RETRY: Policy = Policy::new(Duration::from_millis(100), Duration::from_secs(5));
/// The most tasks the bulk phase keeps in memory. A task takes about 0.6 KB there (its row, the
/// row's strings and its share of the map: the rebuild of the 1M-event backlog, 200 000 tasks, peaked
/// ~120 MB above the batch-by-batch replay), so about 1.2 GB at the bound; past it the rows are
/// written and the replay goes on batch by batch (as it does near the live head), slower but in
/// constant memory.
pub const BULK_MAX_TASKS: usize = 2_000_000;

/// The tables of each projection, in the order the live projector writes them (the switch locks
/// them in the same order, so it cannot deadlock with a live batch).
const TABLES: [(&str, &[&str]); 4] = [
    ("tasks", &["tasks"]),
    ("reminder_schedule", &["reminder_schedule"]),
    ("task_history", &["task_history"]),
    ("notifications", &["notification_reads", "webhooks", "notifications"]),
];

/// How a rebuild reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Progress bars on stderr when it is a terminal, else a line every few seconds.
    Cli,
    /// Log lines only (a rebuild started by the live projector).
    Log,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub kafka: KafkaSettings,
    pub database: DatabaseSettings,
    /// The projections to rebuild (all when empty).
    pub projections: Vec<String>,
    pub max_batch: usize,
    /// Transactions a replayed batch is applied in at once, each with whole partitions.
    pub apply_parallelism: usize,
    pub report: Report,
    /// Who asked: `cli` or `new-projection` (a projection without stored offsets).
    pub requested_by: &'static str,
    /// Opens the sealed fields (started: the keys topic is read).
    pub keys: std::sync::Arc<platform::keys::KeyRing>,
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub projections: Vec<String>,
    pub events: u64,
    pub elapsed: Duration,
    pub offsets: HashMap<i32, i64>,
}

impl Summary {
    pub fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        format!(
            "rebuilt {} from offset zero: {} events in {:.1} s ({:.0} events/s); switched to the new tables at the live offsets, old tables dropped",
            self.projections.join(", "),
            self.events,
            secs,
            self.events as f64 / secs.max(1e-3)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("unknown projection {0:?} (known: {known})", known = PROJECTIONS.join(", "))]
    UnknownProjection(String),
    #[error("another rebuild is running, or a dead letter is being replayed; try again when it has finished")]
    Busy,
    #[error("rebuild aborted; the live tables are untouched")]
    Aborted,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Checks projection names; empty means all.
pub fn select(names: &[String]) -> Result<Vec<String>, RebuildError> {
    if names.is_empty() {
        return Ok(PROJECTIONS.iter().map(|s| s.to_string()).collect());
    }
    let mut out = Vec::new();
    for n in names {
        if !PROJECTIONS.contains(&n.as_str()) {
            return Err(RebuildError::UnknownProjection(n.clone()));
        }
        if !out.contains(n) {
            out.push(n.clone());
        }
    }
    Ok(out)
}

/// Runs a rebuild until it has switched, or until `cancel` resolves (then the copies are dropped
/// and the live tables are untouched).
pub async fn run(opts: Options, cancel: impl Future<Output = ()>) -> Result<Summary, RebuildError> {
    run_bounded(opts, BULK_MAX_TASKS, cancel).await
}

/// [`run`] with the bulk phase bounded to `bulk_max_tasks` tasks in memory (tests use a small one).
#[doc(hidden)]
pub async fn run_bounded(opts: Options, bulk_max_tasks: usize, cancel: impl Future<Output = ()>) -> Result<Summary, RebuildError> {
    let projections = select(&opts.projections)?;
    let options: PgConnectOptions = opts.database.database_url.expose().parse().map_err(anyhow::Error::from)?;
    let options = options.application_name("taskstream-rebuild");
    let pool = PgPoolOptions::new().max_connections(4).connect_with(options.clone()).await.map_err(anyhow::Error::from)?;
    platform::db::migrate(&pool).await?;
    // The lock lives as long as this connection.
    let mut lock = options.connect().await.map_err(anyhow::Error::from)?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(REBUILD_LOCK_KEY).fetch_one(&mut lock).await.map_err(anyhow::Error::from)?;
    if !locked {
        return Err(RebuildError::Busy);
    }
    let work = Rebuild { opts: &opts, projections: projections.clone(), pool: pool.clone(), options: options.clone(), bulk_max_tasks };
    let result = tokio::select! {
        r = work.run() => r.map_err(RebuildError::Other),
        () = cancel => Err(RebuildError::Aborted),
    };
    // The pool's connections may have been in the middle of the replay's work when it was
    // cancelled: close them before cleaning up on a connection of its own.
    pool.close().await;
    if result.is_err() {
        if let Err(e) = forget(&options, &projections, opts.requested_by).await {
            tracing::warn!(error.message = %e, "could not drop the partial copies (the next rebuild drops them)");
        }
    }
    let _ = lock.close().await;
    result
}

/// After a failed or aborted rebuild: the copies go and the rebuild is no longer registered, both
/// or neither (the live tables were never touched: a switch in flight is rolled back with its
/// connection). A few attempts, for a database that is restarting.
async fn forget(options: &PgConnectOptions, projections: &[String], requested_by: &str) -> anyhow::Result<()> {
    let mut backoff = APPLY_RETRY.backoff();
    loop {
        let result: anyhow::Result<()> = async {
            let mut conn = options.connect().await?;
            let mut tx = conn.begin().await?;
            sqlx::query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM projection_rebuilds WHERE projection = ANY($1) AND requested_by = $2")
                .bind(projections)
                .bind(requested_by)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            let _ = conn.close().await;
            Ok(())
        }
        .await;
        match result {
            // Three attempts: the first and two retries.
            Err(e) if backoff.attempts() < 2 => {
                tracing::info!(error.message = %e, "dropping the partial copies failed; trying again");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}

struct Rebuild<'a> {
    opts: &'a Options,
    projections: Vec<String>,
    pool: PgPool,
    options: PgConnectOptions,
    bulk_max_tasks: usize,
}

/// Where the live projection is (per partition: the next offset it will apply) and what it skipped.
struct Live {
    caps: HashMap<i32, i64>,
    skip: HashSet<Position>,
}

/// The live offsets and skipped records, in one snapshot.
async fn live_position(conn: &mut PgConnection, topic: &str) -> anyhow::Result<Live> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
    let live = read_live(&mut tx, topic).await?;
    tx.commit().await?;
    Ok(live)
}

async fn read_live(tx: &mut PgConnection, topic: &str) -> anyhow::Result<Live> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, min(next_offset) FROM public.projection_offsets WHERE topic = $1 AND projection = ANY($2) GROUP BY partition")
            .bind(topic)
            .bind(PROJECTIONS.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
    let skip = crate::dlq::skipped_positions(&mut *tx, topic).await?;
    Ok(Live { caps: rows.into_iter().collect(), skip })
}

impl Rebuild<'_> {
    async fn run(&self) -> anyhow::Result<Summary> {
        let started = Instant::now();
        let topic = self.opts.kafka.task_events_topic.clone();
        self.create_copies().await?;
        // Commits to the copies do not wait for their WAL flush: a crash can only lose the last
        // batches together with their offsets, and a rebuild that stopped starts over anyway. The
        // switch commits on a connection of its own, synchronously.
        let ways = self.opts.apply_parallelism.max(1);
        let shadow = PgPoolOptions::new()
            .max_connections(ways as u32)
            .connect_with(self.options.clone().options([("search_path", SCHEMA), ("synchronous_commit", "off")]))
            .await?;
        platform::kafka::ensure_topics(&self.opts.kafka).await?;
        let consumer = crate::consumer::log_consumer(&self.opts.kafka, "taskstream-projector-rebuild")?;
        let mut conn = self.pool.acquire().await?;
        let live = live_position(&mut conn, &topic).await?;
        let partitions: Vec<i32> = {
            let mut p: Vec<i32> = live.caps.keys().copied().collect();
            p.sort_unstable();
            p
        };
        store::init_offsets(&shadow, &topic, &partitions).await?;
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
        }
        let consumer =
            tokio::task::spawn_blocking(move || platform::kafka::assign_when_known(&consumer, &tpl, Duration::from_secs(10)).map(|()| consumer)).await??;

        let mut replay = Replay {
            topic: topic.clone(),
            shadow: shadow.clone(),
            consumer,
            pending: HashMap::new(),
            at: partitions.iter().map(|p| (*p, 0)).collect(),
            max_batch: self.opts.max_batch,
            ways,
            inflight: None,
            events: 0,
            undecodable: 0,
            keys: self.opts.keys.clone(),
            bulk: Some(TaskTable::default()),
            bulk_max_tasks: self.bulk_max_tasks,
            report: self.opts.report,
        };
        let mut progress = Progress::new(self.opts.report, &self.projections);
        let mut last_saved = Instant::now();
        let mut indexed = false;
        loop {
            let live = live_position(&mut conn, &topic).await?;
            let gap = replay.gap(&live.caps);
            progress.show(replay.done(), replay.done() + gap);
            if last_saved.elapsed() > Duration::from_secs(1) {
                self.save_progress(replay.done(), replay.done() + gap).await?;
                last_saved = Instant::now();
            }
            if gap <= self.opts.max_batch as u64 && !indexed {
                // The copies were loaded without their secondary indexes (as bulk loaders do), and
                // the task rows were kept in memory: written, then the indexes built once, near the
                // live head; then the replay catches up what came meanwhile, batch by batch.
                replay.end_bulk().await?;
                self.build_indexes(&replay.shadow).await?;
                indexed = true;
                continue;
            }
            if gap <= self.opts.max_batch as u64 {
                // Close to the live head: switch (or, if the live projection ran ahead meanwhile,
                // keep catching up).
                if let Some(offsets) = self.try_switch(&mut replay, &topic).await? {
                    progress.finish();
                    shadow.close().await;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")).execute(&self.pool).await?;
                    if replay.undecodable > 0 {
                        tracing::warn!(records = replay.undecodable, "undecodable records that the live projection had not dead-lettered were skipped");
                    }
                    return Ok(Summary { projections: self.projections.clone(), events: replay.events, elapsed: started.elapsed(), offsets });
                }
            }
            replay.step(&live, Duration::from_millis(200)).await?;
        }
    }

    /// Empty copies of every projection's tables (all of them: the projections are folded
    /// together, so each one is built from the same replay), and the rebuild registered for status.
    /// The copies get the live tables' primary keys and unique constraints (under the same names;
    /// the upserts need them) and storage parameters, but not their other indexes, which
    /// `build_indexes` adds near the end.
    async fn create_copies(&self) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")).execute(&mut *tx).await?;
        sqlx::query(&format!("CREATE SCHEMA {SCHEMA}")).execute(&mut *tx).await?;
        for table in TABLES.iter().flat_map(|(_, t)| t.iter()) {
            sqlx::query(&format!("CREATE TABLE {SCHEMA}.{table} (LIKE public.{table} INCLUDING ALL EXCLUDING INDEXES)")).execute(&mut *tx).await?;
            let constraints: Vec<(String, String)> = sqlx::query_as(
                "SELECT conname::text, pg_get_constraintdef(oid) FROM pg_constraint
                 WHERE conrelid = format('public.%I', $1::text)::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
            )
            .bind(table)
            .fetch_all(&mut *tx)
            .await?;
            for (name, def) in constraints {
                sqlx::query(&format!("ALTER TABLE {SCHEMA}.{table} ADD CONSTRAINT {name} {def}")).execute(&mut *tx).await?;
            }
            // LIKE copies no storage parameters; the copy replaces the live table, so it keeps
            // them (`tasks`' fillfactor, which leaves room for updates in place).
            let options: Option<Vec<String>> = sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = format('public.%I', $1::text)::regclass")
                .bind(table)
                .fetch_one(&mut *tx)
                .await?;
            if let Some(options) = options.filter(|o| !o.is_empty()) {
                sqlx::query(&format!("ALTER TABLE {SCHEMA}.{table} SET ({})", options.join(", "))).execute(&mut *tx).await?;
            }
        }
        sqlx::query(&format!("CREATE TABLE {SCHEMA}.projection_offsets (LIKE public.projection_offsets INCLUDING ALL)")).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM projection_rebuilds WHERE projection = ANY($1)").bind(&self.projections).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO projection_rebuilds (projection, requested_by) SELECT p, $2 FROM UNNEST($1::text[]) AS p")
            .bind(&self.projections)
            .bind(self.opts.requested_by)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The live tables' indexes that back no constraint, built on the copies under the same names
    /// (`CREATE INDEX` on a loaded table sorts once, instead of maintaining the index row by row).
    async fn build_indexes(&self, shadow: &PgPool) -> anyhow::Result<()> {
        let tables: Vec<String> = TABLES.iter().flat_map(|(_, t)| t.iter().map(|t| t.to_string())).collect();
        let defs: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT c.relname::text, x.relname::text, pg_get_indexdef(i.indexrelid)
             FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_class x ON x.oid = i.indexrelid
             WHERE c.relnamespace = 'public'::regnamespace AND c.relname = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)
             ORDER BY 1, 2",
        )
        .bind(&tables)
        .fetch_all(&self.pool)
        .await?;
        let started = Instant::now();
        let mut conn = shadow.acquire().await?;
        sqlx::query("SET maintenance_work_mem = '256MB'").execute(&mut *conn).await?;
        for (table, name, def) in &defs {
            let (live, copy) = (format!(" ON public.{table} "), format!(" ON {SCHEMA}.{table} "));
            anyhow::ensure!(def.contains(&live), "internal: unexpected definition of index {name}: {def}");
            sqlx::query(&def.replacen(&live, &copy, 1)).execute(&mut *conn).await?;
        }
        sqlx::query("RESET maintenance_work_mem").execute(&mut *conn).await?;
        let line = format!("rebuild: built the copies' {} secondary indexes in {:.1} s", defs.len(), started.elapsed().as_secs_f64());
        match self.opts.report {
            Report::Cli => eprintln!("{line}"),
            Report::Log => tracing::info!("{line}"),
        }
        Ok(())
    }

    async fn save_progress(&self, done: u64, total: u64) -> anyhow::Result<()> {
        sqlx::query("UPDATE projection_rebuilds SET events_done = $2, events_total = $3 WHERE projection = ANY($1)")
            .bind(&self.projections)
            .bind(done as i64)
            .bind(total as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Locks the live tables of the rebuilt projections and the stored offsets (the live projector
    /// waits), applies the last records to the copies, and swaps them in. `None` when the copies
    /// could not catch up within a few seconds (the locks are released and the rebuild goes on).
    async fn try_switch(&self, replay: &mut Replay, topic: &str) -> anyhow::Result<Option<HashMap<i32, i64>>> {
        let tables: Vec<&str> = TABLES.iter().filter(|(p, _)| self.projections.iter().any(|s| s == p)).flat_map(|(_, t)| t.iter().copied()).collect();
        let mut conn = self.options.connect().await?;
        let mut tx = conn.begin().await?;
        sqlx::query("SET LOCAL lock_timeout = '5s'").execute(&mut *tx).await?;
        let list = tables.iter().map(|t| format!("public.{t}")).collect::<Vec<_>>().join(", ");
        if let Err(e) = sqlx::query(&format!("LOCK TABLE {list} IN ACCESS EXCLUSIVE MODE")).execute(&mut *tx).await {
            tracing::info!(error.message = %e, "could not lock the live tables yet; catching up further");
            return Ok(None);
        }
        sqlx::query("LOCK TABLE public.projection_offsets IN EXCLUSIVE MODE").execute(&mut *tx).await?;
        // The live offsets cannot move now.
        let live = read_live(&mut tx, topic).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while replay.gap(&live.caps) > 0 {
            if Instant::now() > deadline {
                tracing::info!(gap = replay.gap(&live.caps), "the copies did not catch up within 10 s under the switch lock; releasing it");
                return Ok(None);
            }
            replay.step(&live, Duration::from_millis(100)).await?;
            // Under the lock, each batch is waited for (the gap counts applied records only).
            replay.settle().await?;
        }
        replay.settle().await?;
        if replay.at != live.caps {
            anyhow::bail!("internal: the copies stand at {:?}, the live projection at {:?}", replay.at, live.caps);
        }
        // The copies' constraints and indexes carry the live ones' names.
        for t in &tables {
            sqlx::query(&format!("DROP TABLE public.{t}")).execute(&mut *tx).await?;
            sqlx::query(&format!("ALTER TABLE {SCHEMA}.{t} SET SCHEMA public")).execute(&mut *tx).await?;
        }
        sqlx::query("DELETE FROM projection_rebuilds WHERE projection = ANY($1)").bind(&self.projections).execute(&mut *tx).await?;
        tx.commit().await?;
        let _ = conn.close().await;
        Ok(Some(live.caps))
    }
}

/// The replay: reads the log from zero and applies it to the copies, never past the live offsets.
struct Replay {
    topic: String,
    shadow: PgPool,
    consumer: StreamConsumer,
    /// Records read but not applied yet (at or past the live offsets when they were read).
    pending: HashMap<i32, VecDeque<RawRecord>>,
    /// Next offset to apply, per partition.
    at: HashMap<i32, i64>,
    max_batch: usize,
    /// Transactions a batch is applied in at once.
    ways: usize,
    /// The batch being applied while the next one is read and decoded.
    inflight: Option<tokio::task::JoinHandle<anyhow::Result<Vec<Batch>>>>,
    events: u64,
    undecodable: u64,
    keys: std::sync::Arc<platform::keys::KeyRing>,
    /// The bulk phase's rows: every task replayed so far (`None` once written: then each batch is
    /// applied with its rows read from and written to the copies).
    bulk: Option<TaskTable>,
    /// The most tasks `bulk` may hold.
    bulk_max_tasks: usize,
    report: Report,
}

impl Drop for Replay {
    fn drop(&mut self) {
        // An aborted rebuild does not leave a batch running into the copies it drops.
        if let Some(inflight) = self.inflight.take() {
            inflight.abort();
        }
    }
}

impl Replay {
    fn done(&self) -> u64 {
        self.at.values().map(|o| *o as u64).sum()
    }

    fn gap(&self, caps: &HashMap<i32, i64>) -> u64 {
        caps.iter().map(|(p, cap)| (cap - self.at.get(p).copied().unwrap_or(0)).max(0) as u64).sum()
    }

    /// Reads what arrives within `wait` (or until a batch is full) and applies the records below
    /// the live offsets.
    async fn step(&mut self, live: &Live, wait: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut ready = self.ready(&live.caps);
        while ready < self.max_batch {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    if m.topic() == self.topic {
                        if m.offset() < live.caps.get(&m.partition()).copied().unwrap_or(0) {
                            ready += 1;
                        }
                        self.pending.entry(m.partition()).or_default().push_back(RawRecord::from_message(&m));
                    }
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => break,
            }
        }
        let mut batch = Batch::default();
        for (p, queue) in &mut self.pending {
            let cap = live.caps.get(p).copied().unwrap_or(0);
            while batch.len() + batch.failed.len() < self.max_batch && queue.front().is_some_and(|r| r.position.offset < cap) {
                let raw = queue.pop_front().expect("front checked");
                let position = raw.position;
                if live.skip.contains(&position) {
                    batch.to.insert(position.partition, position.offset + 1);
                } else {
                    batch.push(raw, &self.keys).await?;
                }
            }
        }
        // A replay parks nothing (it skips what it cannot decode): the records as read are not kept
        // while the batch waits for its turn and is applied.
        batch.raw = Vec::new();
        if batch.is_empty() {
            return self.settle().await;
        }
        if !batch.failed.is_empty() {
            self.undecodable += batch.failed.len() as u64;
            for f in &batch.failed {
                tracing::warn!(partition = f.raw.position.partition, offset = f.raw.position.offset, error.message = %f.error, "rebuild skips an undecodable record");
            }
        }
        if self.bulk.as_ref().is_some_and(|t| t.len() > self.bulk_max_tasks) {
            tracing::info!(tasks = self.bulk_max_tasks, "the rebuild's bulk phase reached its bound; going on batch by batch");
            self.end_bulk().await?;
        }
        let erases = batch.users.iter().any(|u| matches!(u.envelope.event, domain::user::UserEvent::Erased(_)));
        match &mut self.bulk {
            None => {
                // The batch read and decoded above overlapped the previous one's apply; it starts
                // when that one has committed (its offsets are this one's starting point).
                self.settle().await?;
                let (shadow, topic, from, ways) = (self.shadow.clone(), self.topic.clone(), self.at.clone(), self.ways);
                self.inflight = Some(tokio::spawn(async move { apply_parts(&shadow, &topic, batch, &from, ways).await }));
            }
            Some(_) if erases => {
                // An erasure deletes the rows PostgreSQL holds: the table's changed rows are written
                // in its transaction first, and the rows it deleted leave the table after it.
                self.settle().await?;
                let table = self.bulk.as_mut().expect("in the bulk phase");
                let effects = table.fold(&batch.tasks);
                let shadow = &self.shadow;
                let erased = retrying(|| store::apply_bulk(shadow, &batch, &effects, Some(&*table))).await?;
                table.mark_written();
                table.forget(&erased);
                self.events += batch.len() as u64;
                self.at.extend(batch.to);
            }
            Some(table) => {
                // Folded onto the table while the previous batch is written (which does not use it).
                let parts: Vec<(Batch, Effects)> = batch
                    .split_by_partition(self.ways)
                    .into_iter()
                    .map(|part| {
                        let effects = table.fold(&part.tasks);
                        (part, effects)
                    })
                    .collect();
                self.settle().await?;
                let shadow = self.shadow.clone();
                self.inflight = Some(tokio::spawn(async move { apply_bulk_parts(&shadow, parts).await }));
            }
        }
        Ok(())
    }

    /// Ends the bulk phase (if it is on): once the batch being applied has committed, the rows in
    /// memory are written with their schedule and the copies' offsets, and the table is dropped.
    async fn end_bulk(&mut self) -> anyhow::Result<()> {
        self.settle().await?;
        let Some(table) = self.bulk.take() else { return Ok(()) };
        let started = Instant::now();
        let (shadow, topic, at) = (&self.shadow, &self.topic, &self.at);
        retrying(|| store::flush_bulk(shadow, topic, &table, at)).await?;
        let line = format!("rebuild: wrote the {} task rows kept in memory in {:.1} s", table.len(), started.elapsed().as_secs_f64());
        match self.report {
            Report::Cli => eprintln!("{line}"),
            Report::Log => tracing::info!("{line}"),
        }
        Ok(())
    }

    /// Waits for the batch being applied, if any, and moves the offsets past it.
    async fn settle(&mut self) -> anyhow::Result<()> {
        let Some(inflight) = self.inflight.take() else { return Ok(()) };
        for part in inflight.await?? {
            self.events += part.len() as u64;
            self.at.extend(part.to);
        }
        Ok(())
    }

    fn ready(&self, caps: &HashMap<i32, i64>) -> usize {
        self.pending
            .iter()
            .map(|(p, q)| {
                let cap = caps.get(p).copied().unwrap_or(0);
                q.iter().take_while(|r| r.position.offset < cap).count()
            })
            .sum()
    }
}

/// Applies a replayed batch with whole partitions per transaction, `ways` transactions at once, as
/// the live projector does: a task's records stay in order, and each transaction compares and sets
/// its own partitions' offsets. Transient failures are retried.
async fn apply_parts(shadow: &PgPool, topic: &str, batch: Batch, from: &HashMap<i32, i64>, ways: usize) -> anyhow::Result<Vec<Batch>> {
    let runs = batch.split_by_partition(ways).into_iter().map(|part| async move {
        retrying(|| store::apply_batch(shadow, topic, &part, from, ApplyMode::Replay)).await?;
        Ok(part)
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

/// The bulk phase's [`apply_parts`]: each part (with what its fold produced) in its own
/// transaction, all at once.
async fn apply_bulk_parts(shadow: &PgPool, parts: Vec<(Batch, Effects)>) -> anyhow::Result<Vec<Batch>> {
    let runs = parts.into_iter().map(|(part, effects)| async move {
        retrying(|| store::apply_bulk(shadow, &part, &effects, None)).await?;
        Ok(part)
    });
    futures::future::join_all(runs).await.into_iter().collect()
}

/// Runs a write to the copies until it succeeds, again after each transient failure.
async fn retrying<T, F: Future<Output = Result<T, StoreError>>>(mut write: impl FnMut() -> F) -> anyhow::Result<T> {
    let mut backoff = APPLY_RETRY.backoff();
    loop {
        match write().await {
            Ok(out) => return Ok(out),
            Err(e) if e.is_deterministic() => anyhow::bail!("the replay cannot apply a batch: {e}"),
            Err(e) => {
                tracing::warn!(error.message = %e, "rebuild batch failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Progress on stderr: bars on a terminal, a line every 5 s otherwise.
struct Progress {
    bars: Option<(indicatif::MultiProgress, Vec<indicatif::ProgressBar>)>,
    report: Report,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    fn new(report: Report, projections: &[String]) -> Self {
        let bars = (report == Report::Cli && std::io::stderr().is_terminal()).then(|| {
            let multi = indicatif::MultiProgress::new();
            let style = indicatif::ProgressStyle::with_template("{prefix:>18} [{bar:30.cyan/blue}] {human_pos}/{human_len} events  {per_sec}  ETA {eta}")
                .expect("valid template")
                .progress_chars("=> ");
            let bars = projections
                .iter()
                .map(|p| {
                    let bar = multi.add(indicatif::ProgressBar::new(0));
                    bar.set_style(style.clone());
                    bar.set_prefix(p.clone());
                    bar
                })
                .collect();
            (multi, bars)
        });
        Self { bars, report, started: Instant::now(), last_line: Instant::now() }
    }

    fn show(&mut self, done: u64, total: u64) {
        if let Some((_, bars)) = &self.bars {
            for b in bars {
                b.set_length(total);
                b.set_position(done);
            }
            return;
        }
        if self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 { (total.saturating_sub(done)) as f64 / rate } else { 0.0 };
            let pct = if total > 0 { done as f64 * 100.0 / total as f64 } else { 100.0 };
            let line = format!("rebuild: {done}/{total} events ({pct:.0}%), {rate:.0} events/s, ETA {eta:.0} s");
            match self.report {
                Report::Cli => eprintln!("{line}"),
                Report::Log => tracing::info!("{line}"),
            }
        }
    }

    fn finish(&mut self) {
        if let Some((_, bars)) = &self.bars {
            for b in bars {
                b.finish();
            }
        }
    }
}

/// At start of the live projector: a projection added in code has no stored offsets while the
/// others have. It gets offset rows at the others' offsets (so live batches go on for every
/// projection) and a rebuild from offset zero is registered for it; rebuilds registered that way
/// and not finished (the process stopped) are returned too. Stale rows of command-line rebuilds
/// that died are cleared.
pub async fn new_projections(pool: &PgPool, topic: &str) -> anyhow::Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(REBUILD_LOCK_KEY).fetch_one(&mut *tx).await?;
    if !free {
        // A command-line rebuild is running; it owns its rows.
        return Ok(Vec::new());
    }
    sqlx::query("DELETE FROM projection_rebuilds WHERE requested_by = 'cli'").execute(&mut *tx).await?;
    let names: Vec<String> = PROJECTIONS.iter().map(|s| s.to_string()).collect();
    let present: Vec<String> = sqlx::query_scalar("SELECT DISTINCT projection FROM projection_offsets WHERE topic = $1 AND projection = ANY($2)")
        .bind(topic)
        .bind(&names)
        .fetch_all(&mut *tx)
        .await?;
    let missing: Vec<String> = names.iter().filter(|n| !present.contains(n)).cloned().collect();
    if !present.is_empty() && !missing.is_empty() {
        tracing::info!(projections = ?missing, "projections without stored offsets: rebuilding them from offset zero");
        sqlx::query(
            "INSERT INTO projection_offsets (projection, topic, partition, next_offset)
             SELECT n, $2, partition, min(next_offset) FROM projection_offsets CROSS JOIN UNNEST($1::text[]) AS n
             WHERE topic = $2 GROUP BY n, partition
             ON CONFLICT (projection, topic, partition) DO NOTHING",
        )
        .bind(&missing)
        .bind(topic)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO projection_rebuilds (projection, requested_by) SELECT p, 'new-projection' FROM UNNEST($1::text[]) AS p
             ON CONFLICT (projection) DO NOTHING",
        )
        .bind(&missing)
        .execute(&mut *tx)
        .await?;
    }
    let pending: Vec<String> =
        sqlx::query_scalar("SELECT projection FROM projection_rebuilds WHERE requested_by = 'new-projection' ORDER BY projection").fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(pending)
}
