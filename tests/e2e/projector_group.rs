//! Projectors as a consumer group (issue 10): two projector instances share the partitions of the
//! log; one is killed (SIGKILL) while events flow and the other takes its partitions over. Rows and
//! offsets stay exact (every projection at the end of every partition, the read models identical to
//! a from-scratch rebuild) and every reaction happened exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use reqwest::Method;
use serde_json::{json, Value};

use e2e::{free_port, Stack, StackOptions, Svc};
use test_support::eventually;

use crate::reactions::settled;

const PARTITIONS: i32 = 6;
/// Every read-model table.
const TABLES: [&str; 6] = ["tasks", "task_history", "notifications", "notification_reads", "webhooks", "reminder_schedule"];

/// What the writers got accepted.
#[derive(Default)]
struct Written {
    created: Vec<String>,
    /// Recurring tasks whose completion was accepted: each calls for one next occurrence.
    completed_series: Vec<String>,
    /// Tasks with a reminder due during the run.
    reminded: Vec<String>,
}

/// A command, retried under its Idempotency-Key while the command API answers 503 (or cannot be
/// reached); its first definitive answer must be a success.
async fn accepted(stack: &Stack, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let key = uuid::Uuid::new_v4().to_string();
    let mut last = String::new();
    for _ in 0..60 {
        match stack.command("gina", method.clone(), path, body.clone(), &[("Idempotency-Key", key.as_str())]).await {
            Ok((s, _, b)) if (200..300).contains(&s) => return Ok(b),
            Ok((503, _, b)) => last = b.to_string(),
            Ok((s, _, b)) => anyhow::bail!("{method} {path} answered {s}: {b}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    anyhow::bail!("{method} {path} still unavailable: {last}")
}

/// One writer: creates (every 4th a daily series, every 25th with a reminder due in a few
/// seconds), updates and completes tasks until `stop`.
async fn write_until(stack: Arc<Stack>, stop: Arc<AtomicBool>, sent: Arc<AtomicUsize>, written: Arc<Mutex<Written>>, writer: usize) -> anyhow::Result<()> {
    let mut i = 0usize;
    while !stop.load(Ordering::Acquire) {
        let n = writer * 1_000_000 + i;
        let recurring = i.is_multiple_of(4);
        let reminded = !recurring && i % 25 == 3;
        let mut body = json!({"title": format!("task {n}"), "tags": [format!("w{writer}")]});
        if recurring {
            body["due_at"] = json!((Utc::now() + chrono::Duration::days(1)).date_naive().and_hms_opt(9, 0, 0).map(|d| d.and_utc()));
            body["recurrence"] = json!("FREQ=DAILY");
        } else if reminded {
            body["due_at"] = json!(Utc::now() + chrono::Duration::seconds(4));
            body["remind_before"] = json!("PT2S");
        }
        let id = accepted(&stack, Method::POST, "/v1/tasks", Some(body)).await?["task_id"].as_str().unwrap_or_default().to_owned();
        accepted(&stack, Method::PATCH, &format!("/v1/tasks/{id}"), Some(json!({"description": format!("d{n}"), "priority": "high"}))).await?;
        if !reminded {
            accepted(&stack, Method::POST, &format!("/v1/tasks/{id}/complete"), None).await?;
        }
        {
            let mut w = written.lock().unwrap_or_else(|e| e.into_inner());
            w.created.push(id.clone());
            if recurring {
                w.completed_series.push(id);
            } else if reminded {
                w.reminded.push(id);
            }
        }
        sent.fetch_add(1, Ordering::AcqRel);
        i += 1;
    }
    Ok(())
}

/// The partitions a projector applies (its `/readyz` header), when it answers ready.
async fn owned_by(stack: &Stack, port: u16) -> Option<BTreeSet<i32>> {
    let res = stack.http.get(format!("http://127.0.0.1:{port}/readyz")).timeout(Duration::from_secs(2)).send().await.ok()?;
    if !res.status().is_success() {
        return None;
    }
    let header = res.headers().get("projector-partitions")?.to_str().ok()?.to_owned();
    Some(header.split(',').filter(|p| !p.is_empty()).filter_map(|p| p.parse().ok()).collect())
}

/// The log as a read_committed consumer sees it to its end: per partition the offset after its
/// last record (0 when it has none), and every record's (ce_type, ce_subject).
async fn read_log(stack: &Stack) -> anyhow::Result<(BTreeMap<i32, i64>, Vec<(String, String)>)> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::{Headers, Message};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", format!("e2e-log-{}", uuid::Uuid::new_v4()))
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&stack.topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut ends: BTreeMap<i32, i64> = (0..PARTITIONS).map(|p| (p, 0)).collect();
    let mut at_end = BTreeSet::new();
    let mut records = Vec::new();
    while at_end.len() < PARTITIONS as usize {
        match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await? {
            Ok(m) => {
                let header = |name: &str| {
                    m.headers().and_then(|h| h.iter().find(|h| h.key == name).and_then(|h| h.value)).map(|v| String::from_utf8_lossy(v).into_owned())
                };
                records.push((header("ce_type").unwrap_or_default(), header("ce_subject").unwrap_or_default()));
                ends.insert(m.partition(), m.offset() + 1);
                at_end.remove(&m.partition());
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                at_end.insert(p);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok((ends, records))
}

/// Per read-model table: row count and a checksum of every row.
async fn checksums(stack: &Stack) -> anyhow::Result<Vec<(String, i64, String)>> {
    let mut db = stack.db().await?;
    let mut out = Vec::new();
    for t in TABLES {
        let (n, sum): (i64, Option<String>) =
            sqlx::query_as(&format!("SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {t} t")).fetch_one(&mut db).await?;
        out.push((t.to_owned(), n, sum.unwrap_or_default()));
    }
    Ok(out)
}

async fn scalar(stack: &Stack, sql: &str) -> anyhow::Result<i64> {
    let mut db = stack.db().await?;
    Ok(sqlx::query_scalar::<_, i64>(sql).fetch_one(&mut db).await?)
}

/// A fresh stack whose projector (`PROJECTOR_INSTANCE_ID` `a`) shares the partitions with a second
/// one (`b`, its own health address), once both own some.
struct TwoProjectors {
    stack: Arc<Stack>,
    a: (String, u16),
    b: (String, u16),
    b_process: tokio::process::Child,
    all: BTreeSet<i32>,
}

impl TwoProjectors {
    async fn start() -> anyhow::Result<Self> {
        let a_id = format!("projector-a-{}", uuid::Uuid::new_v4().simple());
        let opts = StackOptions { partitions: PARTITIONS, extra_env: vec![("PROJECTOR_INSTANCE_ID".into(), a_id.clone())], ..Default::default() };
        let stack = Arc::new(Stack::start_with(opts).await?);
        let a_port: u16 = stack.url(Svc::Projector, "").rsplit(':').next().unwrap_or_default().parse()?;
        let b_port = free_port();
        let b_id = format!("projector-b-{}", uuid::Uuid::new_v4().simple());
        let b_addr = format!("127.0.0.1:{b_port}");
        let b_process = stack.spawn_instance(Svc::Projector, &[("PROJECTOR_ADDR", b_addr.as_str()), ("PROJECTOR_INSTANCE_ID", b_id.as_str())])?;
        let group = Self { stack, a: (a_id, a_port), b: (b_id, b_port), b_process, all: (0..PARTITIONS).collect() };
        let (a, b) = group.shared().await?;
        eprintln!("partitions: {} {a:?}, {} {b:?}", group.a.0, group.b.0);
        Ok(group)
    }

    /// Waits until both projectors own partitions, together every one, none twice.
    async fn shared(&self) -> anyhow::Result<(BTreeSet<i32>, BTreeSet<i32>)> {
        eventually("the two projectors to share the partitions", Duration::from_secs(60), || async {
            let (a, b) = (owned_by(&self.stack, self.a.1).await?, owned_by(&self.stack, self.b.1).await?);
            let together: BTreeSet<i32> = a.union(&b).copied().collect();
            (!a.is_empty() && !b.is_empty() && a.is_disjoint(&b) && together == self.all).then_some((a, b))
        })
        .await
    }

    /// Waits until projector `a` owns every partition (a stopped `b` may hold its offsets rows in
    /// an open transaction until PostgreSQL ends it: idle for 30 s).
    async fn a_owns_all(&self) -> anyhow::Result<()> {
        eventually("projector a to own every partition", Duration::from_secs(90), || async {
            (owned_by(&self.stack, self.a.1).await? == self.all).then_some(())
        })
        .await
    }

    /// `projector status`: every partition line of every projection names one of `owners`, and
    /// each of them owns some.
    async fn status_names(&self, owners: &[&str]) -> anyhow::Result<()> {
        let status = self.stack.projector_cli(&["status"]).output().await?;
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(status.status.success(), "{text}{}", String::from_utf8_lossy(&status.stderr));
        let rows: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
        assert_eq!(rows.len(), platform::projections::PROJECTIONS.len() * self.all.len(), "{text}");
        assert!(rows.iter().all(|l| owners.iter().any(|o| l.contains(o))), "{text}");
        assert!(owners.iter().all(|o| text.contains(o)), "{text}");
        Ok(())
    }
}

/// Four writers sending commands until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    written: Arc<Mutex<Written>>,
    writers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Load {
    fn start(stack: &Arc<Stack>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(Mutex::new(Written::default()));
        let writers = (0..4).map(|w| tokio::spawn(write_until(stack.clone(), stop.clone(), sent.clone(), written.clone(), w))).collect();
        Self { stop, sent, written, writers }
    }

    /// Waits until `more` tasks were written after now; returns how many were written before.
    async fn more(&self, more: usize) -> anyhow::Result<usize> {
        let from = self.sent.load(Ordering::Acquire);
        eventually("commands to flow", Duration::from_secs(120), || async { (self.sent.load(Ordering::Acquire) >= from + more).then_some(()) }).await?;
        Ok(from)
    }

    async fn stop(self) -> anyhow::Result<Written> {
        self.stop.store(true, Ordering::Release);
        for w in self.writers {
            w.await??;
        }
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        Ok(std::mem::take(&mut *w))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_mid_batch_hands_its_partitions_over_with_exact_rows_offsets_and_reactions() -> anyhow::Result<()> {
    let mut group = TwoProjectors::start().await?;
    group.status_names(&[&group.a.0, &group.b.0]).await?;
    let load = Load::start(&group.stack);
    load.more(60).await?;
    // Both apply batches now: SIGKILL one of them mid-stream.
    group.b_process.kill().await?;
    // The survivor takes every partition over (the broker drops the dead member after its session
    // timeout) and goes on applying.
    group.a_owns_all().await?;
    let killed_at = load.more(40).await?;
    let written = load.stop().await?;
    eprintln!("{killed_at} tasks written before the kill");
    assert_exact(&group.stack, &written).await?;
    // `projector status` and the survivor's metrics: it owns every partition.
    group.status_names(&[&group.a.0]).await?;
    let metrics = group.stack.http.get(format!("http://127.0.0.1:{}/metrics", group.a.1)).send().await?.text().await?;
    assert!(metrics.lines().any(|l| l == format!("projector_partitions_owned {}", group.all.len())), "{metrics}");
    let stack = Arc::try_unwrap(group.stack).map_err(|_| anyhow::anyhow!("stack still shared"))?;
    stack.cleanup().await
}

/// A zombie: a projector stopped (SIGSTOP) until its partitions moved to the other one, then
/// continued (SIGCONT) while events flow. Whatever it still applies from where it was is fenced by
/// the offsets' compare-and-set (or, when the new owner has not moved them yet, is exactly what the
/// new owner would have applied, and the new owner's own batch is then fenced); it rejoins the
/// group and the two share the partitions again. Rows, offsets and reactions stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_projector_that_comes_back_as_a_zombie_applies_nothing_twice() -> anyhow::Result<()> {
    let group = TwoProjectors::start().await?;
    let load = Load::start(&group.stack);
    load.more(40).await?;
    let pid = group.b_process.id().ok_or_else(|| anyhow::anyhow!("projector b exited"))?.to_string();
    let signal = |sig: &str| std::process::Command::new("kill").arg(format!("-{sig}")).arg(&pid).status();
    signal("STOP")?;
    group.a_owns_all().await?;
    load.more(30).await?;
    signal("CONT")?;
    load.more(30).await?;
    group.shared().await?;
    let written = load.stop().await?;
    assert_exact(&group.stack, &written).await?;
    group.status_names(&[&group.a.0, &group.b.0]).await?;
    let stack = Arc::try_unwrap(group.stack).map_err(|_| anyhow::anyhow!("stack still shared"))?;
    stack.cleanup().await
}

/// After the writers stopped: every reminder fired, everything applied, no reaction pending; then
/// every projection stands exactly after the last record of every partition, the history is the
/// log, every reaction happened exactly once, and the read models equal a from-scratch rebuild.
async fn assert_exact(stack: &Stack, written: &Written) -> anyhow::Result<()> {
    let Written { created: creates, completed_series: series, reminded } = written;
    eprintln!("tasks written: {} ({} series completed, {} reminders)", creates.len(), series.len(), reminded.len());
    assert!(!series.is_empty() && !reminded.is_empty());
    // Generous: a reminder whose firing failed (the command API overloaded: the whole suite runs
    // in parallel on two cores in CI) waits for its backoff, 1 s doubling per failure, so a few
    // failures in a row can take it past two minutes. A reminder that never fires still fails here,
    // and the failure shows where each unfired reminder stands.
    let fired = eventually("the reminders to fire", Duration::from_secs(300), || async {
        let fired = scalar(stack, "SELECT count(*) FROM task_history WHERE event_type = 'task.reminder_due'").await.ok()?;
        (fired >= reminded.len() as i64).then_some(())
    })
    .await;
    if let Err(e) = fired {
        let mut db = stack.db().await?;
        let waiting: Vec<(String,)> = sqlx::query_as(
            "SELECT concat_ws(' ', s.task_id, s.remind_at, 'attempts', a.attempts, 'next', a.next_attempt_at, 'failure', a.failure, a.last_error, 'claimed by', a.claimed_by, a.claimed_until) \
             FROM reminder_schedule s LEFT JOIN reminder_attempts a USING (task_id, remind_at) ORDER BY s.remind_at",
        )
        .fetch_all(&mut db)
        .await
        .unwrap_or_default();
        eprintln!("reminders still scheduled ({}): {waiting:#?}", waiting.len());
        // Fired but not projected, or never fired (answered stale)? The log against the rows.
        if let Ok((_, records)) = read_log(stack).await {
            let due: BTreeSet<&str> = records.iter().filter(|(t, _)| t == "task.reminder_due").map(|(_, s)| s.as_str()).collect();
            let missing: Vec<&String> = reminded.iter().filter(|id| !due.contains(id.as_str())).collect();
            eprintln!("task.reminder_due in the log: {} ({} reminded tasks without one: {missing:?})", due.len(), missing.len());
            for id in missing {
                let types: Vec<&str> = records.iter().filter(|(_, s)| s == id).map(|(t, _)| t.as_str()).collect();
                type Time = Option<chrono::DateTime<Utc>>;
                let row: Option<(String, Time, Time, Time, i32)> =
                    sqlx::query_as("SELECT status, due_at, remind_at, reminded_for, version FROM tasks WHERE id = $1::uuid")
                        .bind(id)
                        .fetch_optional(&mut db)
                        .await
                        .unwrap_or_default();
                eprintln!("  {id}: in the log {types:?}; row (status, due_at, remind_at, reminded_for, version) {row:?}");
            }
        }
        let offsets: Vec<(String, i32, i64)> =
            sqlx::query_as("SELECT projection, partition, next_offset FROM projection_offsets ORDER BY 1, 2").fetch_all(&mut db).await.unwrap_or_default();
        eprintln!("log end {:?}; projection offsets {offsets:?}", stack.log_end().await.ok());
        return Err(e);
    }
    settled(stack).await?;
    let all: BTreeSet<i32> = (0..PARTITIONS).collect();
    // Offsets: every projection stands exactly after the last record of every partition.
    let (ends, records) = read_log(stack).await?;
    let highs = stack.log_end().await?;
    let mut db = stack.db().await?;
    let offsets: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT projection, partition, next_offset FROM projection_offsets ORDER BY 1, 2").fetch_all(&mut db).await?;
    assert_eq!(offsets.len(), platform::projections::PROJECTIONS.len() * all.len(), "{offsets:?}");
    for (projection, partition, next) in &offsets {
        assert_eq!(Some(next), ends.get(partition), "{projection} partition {partition}: stored offset vs the log's last record + 1");
        assert_eq!(platform::projections::lag(*next, highs[partition]), 0, "{projection} partition {partition} lags its high watermark {}", highs[partition]);
    }
    // Rows: one history row per task event of the log, no more, no less.
    let task_events = records.iter().filter(|(t, _)| t.starts_with("task.")).count() as i64;
    let history = scalar(stack, "SELECT count(*) FROM task_history").await?;
    if history != task_events {
        // Which tasks miss history rows, and which of their events.
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT task_id::text, event_type FROM task_history ORDER BY task_id, version").fetch_all(&mut db).await.unwrap_or_default();
        let mut in_log: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (t, s) in records.iter().filter(|(t, _)| t.starts_with("task.")) {
            in_log.entry(s.as_str()).or_default().push(t.as_str());
        }
        let mut in_rows: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (s, t) in &rows {
            in_rows.entry(s.as_str()).or_default().push(t.as_str());
        }
        let short: Vec<_> = in_log.iter().filter(|(s, evs)| in_rows.get(*s).map_or(0, Vec::len) != evs.len()).collect();
        eprintln!("{} tasks whose history differs from the log; the first 10:", short.len());
        for (s, evs) in short.iter().take(10) {
            eprintln!("  {s}: log {evs:?}, history {:?}", in_rows.get(*s));
        }
    }
    assert_eq!(history, task_events);
    // Reactions, in the log: one next occurrence per completed series, one reminder per task.
    let created: BTreeMap<&str, usize> = records.iter().filter(|(t, _)| t == "task.created").fold(BTreeMap::new(), |mut m, (_, s)| {
        *m.entry(s.as_str()).or_default() += 1;
        m
    });
    assert!(created.values().all(|n| *n == 1), "a task was created twice");
    let next_of = |parent: &String| domain::ids::next_occurrence_id(domain::TaskId::from_uuid(parent.parse().expect("uuid")), 2).to_string();
    let expected: BTreeSet<String> = creates.iter().cloned().chain(series.iter().map(next_of)).collect();
    let in_log: BTreeSet<String> = created.keys().map(|s| s.to_string()).collect();
    assert_eq!(in_log.difference(&expected).collect::<Vec<_>>(), Vec::<&String>::new(), "created but not expected");
    let missing: Vec<&String> = expected.difference(&in_log).collect();
    assert_eq!(missing, Vec::<&String>::new(), "expected but not created");
    for parent in series {
        let children = scalar(stack, &format!("SELECT count(*) FROM tasks WHERE recurrence_parent_id = '{parent}'")).await?;
        assert_eq!(children, 1, "series {parent} has {children} next occurrences");
    }
    for task in reminded {
        let fired = records.iter().filter(|(t, s)| t == "task.reminder_due" && s == task).count();
        assert_eq!(fired, 1, "the reminder of {task} fired {fired} times");
    }
    assert_eq!(scalar(stack, "SELECT count(*) FROM notifications").await?, reminded.len() as i64);
    // The read models equal a from-scratch rebuild.
    let before = checksums(stack).await?;
    let out = stack.projector_cli(&["rebuild", "--yes"]).output().await?;
    assert!(out.status.success(), "rebuild failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(checksums(stack).await?, before, "the live read models differ from a rebuild");
    Ok(())
}
