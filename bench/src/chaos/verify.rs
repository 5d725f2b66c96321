//! After the run: what the log (read_committed, from offset zero) and PostgreSQL say, checked
//! against the journal of answers. Nothing here changes the stack except the rebuild, which the
//! contract allows at any time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::load::{CommandRecord, Op, Outcome};

/// A record of `task-events`, as far as the checks need it.
#[derive(Debug, Clone)]
pub struct LogRecord {
    pub key: String,
    pub event_type: String,
    pub sequence: u32,
    pub user: String,
    pub idempotency_key: Option<String>,
    pub data: Value,
    /// Where it is (partition, offset) and its `ce_id`: named in a problem, to find it again.
    pub position: (i32, i64),
    pub id: String,
}

/// Every committed record of `topic`, in log order per partition (partitions one after another).
pub async fn read_log(settings: platform::settings::KafkaSettings) -> anyhow::Result<Vec<LogRecord>> {
    tokio::task::spawn_blocking(move || read_log_blocking(&settings)).await?
}

fn read_log_blocking(settings: &platform::settings::KafkaSettings) -> anyhow::Result<Vec<LogRecord>> {
    let topic = &settings.task_events_topic;
    let consumer: BaseConsumer<platform::kafka::QuietEof> = platform::kafka::client_config(settings, "chaos-verify")
        .set("group.id", format!("chaos-verify-{}", Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(platform::kafka::QuietEof)?;
    let partitions = platform::kafka::partitions(&consumer, topic, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut by_partition: BTreeMap<i32, Vec<LogRecord>> = BTreeMap::new();
    let started = std::time::Instant::now();
    let mut redelivered = 0u64;
    let mut barriers = 0u64;
    while at_end.len() < partitions.len() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "reading the log took more than 5 minutes");
        match consumer.poll(Duration::from_millis(500)) {
            None => {}
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e).context("reading the log"),
            Some(Ok(m)) => {
                at_end.remove(&m.partition());
                // Each offset once: a record delivered again (a client re-fetch) is not a second
                // append, and counting it twice would report a duplicate that the log does not hold.
                let last = by_partition.get(&m.partition()).and_then(|r| r.last()).map(|r| r.position.1);
                if last.is_some_and(|last| m.offset() <= last) {
                    redelivered += 1;
                    continue;
                }
                if platform::codec::is_barrier(m.headers()) {
                    // Not an event: a writer closed a transaction Kafka had left open here.
                    barriers += 1;
                    continue;
                }
                let mut h: HashMap<&str, String> = HashMap::new();
                if let Some(headers) = m.headers() {
                    for x in headers.iter() {
                        h.insert(x.key, x.value.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default());
                    }
                }
                let data = m.payload().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(Value::Null);
                by_partition.entry(m.partition()).or_default().push(LogRecord {
                    key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default(),
                    event_type: h.get("ce_type").cloned().unwrap_or_default(),
                    sequence: h.get("ce_sequence").and_then(|s| s.parse().ok()).unwrap_or(0),
                    user: h.get("ce_userid").cloned().unwrap_or_default(),
                    idempotency_key: h.get("ce_idempotencykey").cloned(),
                    data,
                    position: (m.partition(), m.offset()),
                    id: h.get("ce_id").cloned().unwrap_or_default(),
                });
            }
        }
    }
    if barriers > 0 {
        eprintln!("reading the log: {barriers} barrier(s): a writer closed a transaction that Kafka had left open (see the command APIs' logs)");
    }
    if redelivered > 0 {
        eprintln!("reading the log: {redelivered} records were delivered again by the client and counted once");
    }
    Ok(by_partition.into_values().flatten().collect())
}

/// After the run no transaction may be left open on the log: a partition whose last stable offset
/// stays short of its high watermark hides every record past it from read_committed readers (the
/// projector, a rebuild, a new writer), however long they wait. Names each such partition.
pub async fn no_open_transactions(settings: platform::settings::KafkaSettings) -> anyhow::Result<Check> {
    tokio::task::spawn_blocking(move || {
        let topic = settings.task_events_topic.clone();
        let committed: BaseConsumer = platform::kafka::client_config(&settings, "chaos-verify-ends").set("isolation.level", "read_committed").create()?;
        let written: BaseConsumer = platform::kafka::client_config(&settings, "chaos-verify-ends").set("isolation.level", "read_uncommitted").create()?;
        let timeout = Duration::from_secs(10);
        let mut problems = Vec::new();
        let partitions = platform::kafka::partitions(&committed, &topic, timeout)?;
        for p in &partitions {
            let (_, stable) = committed.fetch_watermarks(&topic, *p, timeout)?;
            let (_, high) = written.fetch_watermarks(&topic, *p, timeout)?;
            if stable < high {
                problems.push(format!(
                    "partition {p}: a transaction is still open at offset {stable} (written to {high}): the {} records past it are invisible to read_committed readers",
                    high - stable
                ));
            }
        }
        Ok(check(
            "no transaction left open on the log",
            &problems,
            format!("every partition's last stable offset is its high watermark ({} partitions)", partitions.len()),
        ))
    })
    .await?
}

/// One named check and what it found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, problems: &[String], fine: String) -> Check {
    if problems.is_empty() {
        Check { name, ok: true, detail: fine }
    } else {
        let mut detail = format!("{} problem(s): ", problems.len());
        detail.push_str(&problems.iter().take(5).cloned().collect::<Vec<_>>().join("; "));
        if problems.len() > 5 {
            detail.push_str("; ...");
        }
        Check { name, ok: false, detail }
    }
}

/// Per phase: commands answered 2xx that are not in the log (lost), in it more than once
/// (duplicated), refused with a definitive 4xx yet in the log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Exactness {
    pub lost: u64,
    pub duplicated: u64,
    pub refused_but_in_log: u64,
    pub unresolved_in_log: u64,
}

/// Every command of the journal against the log: an accepted command's key is on exactly one
/// event, of its task, at the version it was answered with; a refused command's key on none.
pub fn commands_against_log(journal: &[CommandRecord], log: &[LogRecord], phases: usize) -> (Vec<Exactness>, Check) {
    let mut by_key: HashMap<(&str, &str), Vec<&LogRecord>> = HashMap::new();
    for r in log {
        if let Some(k) = &r.idempotency_key {
            by_key.entry((r.user.as_str(), k.as_str())).or_default().push(r);
        }
    }
    let mut out = vec![Exactness::default(); phases];
    let mut problems = Vec::new();
    // How many of each finding per operation, e.g. "duplicated Update: 12".
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut kind = |what: &str, op: Op| *kinds.entry(format!("{what} {op:?}")).or_default() += 1;
    for c in journal {
        let events = by_key.get(&(c.user.as_str(), c.key.as_str())).map(Vec::as_slice).unwrap_or_default();
        let e = &mut out[c.phase.min(phases - 1)];
        match &c.outcome {
            Outcome::Accepted { version, .. } => {
                if events.is_empty() {
                    e.lost += 1;
                    kind("lost", c.op);
                    problems.push(format!("{} ({:?} {}) answered 2xx (version {version}) is not in the log", c.key, c.op, c.task_id));
                } else if events.len() > 1 {
                    e.duplicated += 1;
                    kind("duplicated", c.op);
                    problems.push(format!("{} ({:?} {}) is in the log {} times", c.key, c.op, c.task_id, events.len()));
                } else if events[0].key != c.task_id.to_string() || events[0].sequence != *version {
                    e.duplicated += 1;
                    kind("answered another version", c.op);
                    problems.push(format!(
                        "{} ({:?} {}) answered version {version}, but its event is {} version {}",
                        c.key, c.op, c.task_id, events[0].key, events[0].sequence
                    ));
                }
            }
            Outcome::Rejected { status, .. } => {
                if !events.is_empty() {
                    e.refused_but_in_log += 1;
                    kind(&format!("refused {status} but in the log"), c.op);
                    problems.push(format!("{} ({:?} {}) answered {status} is in the log", c.key, c.op, c.task_id));
                }
            }
            Outcome::Unresolved { .. } => {
                if events.len() > 1 {
                    e.duplicated += 1;
                    kind("duplicated unanswered", c.op);
                    problems.push(format!("{} ({:?} {}) never answered is in the log {} times", c.key, c.op, c.task_id, events.len()));
                } else if events.len() == 1 {
                    e.unresolved_in_log += 1;
                }
            }
        }
    }
    let accepted = journal.iter().filter(|c| matches!(c.outcome, Outcome::Accepted { .. })).count();
    let fine = format!("{accepted} commands answered 2xx, each in the log exactly once at the answered version");
    if !kinds.is_empty() {
        let by_kind: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        problems.insert(0, format!("by kind: {}", by_kind.join(", ")));
    }
    (out, check("every 2xx in the log exactly once, no refused command in it", &problems, fine))
}

/// Versions 1..n per stream (task or user), in log order.
pub fn versions_contiguous(log: &[LogRecord]) -> Check {
    let mut last: HashMap<&str, &LogRecord> = HashMap::new();
    let mut problems = Vec::new();
    for r in log {
        let prev = last.get(r.key.as_str()).map_or(0, |p| p.sequence);
        if r.sequence != prev + 1 {
            // Both records in full: the same ce_id twice is one append written twice, two ids two
            // decisions taken on the same state.
            let before = last
                .get(r.key.as_str())
                .map_or_else(String::new, |p| format!("; before it: {} at {}:{} id {} data {}", p.event_type, p.position.0, p.position.1, p.id, p.data));
            problems.push(format!(
                "{} ({}): version {} after {} (at {}:{} id {} data {}{before})",
                r.key, r.event_type, r.sequence, prev, r.position.0, r.position.1, r.id, r.data
            ));
        }
        last.insert(r.key.as_str(), r);
    }
    check("versions contiguous per task and user", &problems, format!("{} streams, {} events", last.len(), log.len()))
}

/// Every recurring task completed at least once has exactly one next occurrence in the log.
pub fn occurrences(log: &[LogRecord]) -> Check {
    let recurring: HashSet<&str> =
        log.iter().filter(|r| r.event_type == "task.created" && r.data.get("recurrence").is_some_and(|v| !v.is_null())).map(|r| r.key.as_str()).collect();
    let completed: HashSet<&str> =
        log.iter().filter(|r| r.event_type == "task.completed" && recurring.contains(r.key.as_str())).map(|r| r.key.as_str()).collect();
    let mut children: HashMap<String, usize> = HashMap::new();
    for r in log.iter().filter(|r| r.event_type == "task.created") {
        if let Some(p) = r.data.get("recurrence_parent_id").and_then(Value::as_str) {
            *children.entry(p.to_owned()).or_default() += 1;
        }
    }
    let mut problems = Vec::new();
    for t in &completed {
        match children.get(*t).copied().unwrap_or(0) {
            1 => {}
            n => problems.push(format!("recurring task {t} completed, {n} next occurrences")),
        }
    }
    for (p, n) in &children {
        if !completed.contains(p.as_str()) {
            problems.push(format!("{n} occurrence(s) of {p}, which was never completed"));
        }
    }
    check("every completed recurring task has exactly one next occurrence", &problems, format!("{} recurring tasks completed", completed.len()))
}

/// Every task created with a reminder (all fall due inside the run, the load sees to that; a
/// create answered 409 may be in the log too, so the log says which exist): exactly one
/// `task.reminder_due` in the log and one notification row; every notification reached the webhook
/// receiver exactly once (see [`deliveries`]), and nothing else did.
pub async fn reminders(log: &[LogRecord], db: &PgPool, arrivals: &HashMap<String, Vec<Instant>>, sender_kills: &[Instant]) -> anyhow::Result<Vec<Check>> {
    let tasks: Vec<Uuid> = log
        .iter()
        .filter(|r| r.event_type == "task.created" && r.data.get("remind_before").is_some_and(|v| !v.is_null()))
        .filter_map(|r| Uuid::parse_str(&r.key).ok())
        .collect();
    let mut due: HashMap<String, usize> = HashMap::new();
    for r in log.iter().filter(|r| r.event_type == "task.reminder_due") {
        *due.entry(r.key.clone()).or_default() += 1;
    }
    let mut fired = Vec::new();
    for t in &tasks {
        let n = due.get(&t.to_string()).copied().unwrap_or(0);
        if n != 1 {
            fired.push(format!("task {t}: {n} task.reminder_due events"));
        }
    }
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as("SELECT task_id, id FROM notifications").fetch_all(db).await?;
    let mut per_task: HashMap<Uuid, usize> = HashMap::new();
    for (t, _) in &rows {
        *per_task.entry(*t).or_default() += 1;
    }
    let mut notified = Vec::new();
    for t in &tasks {
        let n = per_task.get(t).copied().unwrap_or(0);
        if n != 1 {
            notified.push(format!("task {t}: {n} notifications"));
        }
    }
    let ids: HashSet<String> = rows.iter().map(|(_, n)| n.to_string()).collect();
    let (delivered, resent) = deliveries(&ids, arrivals, sender_kills);
    let total: usize = arrivals.values().map(Vec::len).sum();
    let resent =
        if resent == 0 { String::new() } else { format!(", {resent} posted again after their sender was killed before recording them (at least once)") };
    Ok(vec![
        check("every reminder due in the run fired exactly once", &fired, format!("{} reminders", tasks.len())),
        check("every fired reminder has exactly one notification", &notified, format!("{} notifications", rows.len())),
        check("every notification reached the webhook exactly once", &delivered, format!("{total} deliveries{resent}")),
    ])
}

/// How long before a projector was killed a delivery it posted may have been unrecorded (the POST's
/// answer and the record of its outcome take milliseconds; this is generous).
const UNRECORDED_BEFORE_KILL: Duration = Duration::from_secs(5);

/// How long after a kill's instant a POST the killed projector had sent may still be noted by the
/// receiver: the instant is taken just before the kill, and the receiver notes an arrival when its
/// handler runs (a full run saw a delivery posted at the kill noted after that instant).
const IN_FLIGHT_AT_KILL: Duration = Duration::from_secs(1);

/// Problems with the webhook deliveries of `notifications` (received `arrivals`, per notification
/// id), and how many second posts are the one case at-least-once delivery allows: the sender was
/// killed after posting and before recording the outcome, so the next sender posts again. A
/// second post is excused only when a projector was killed within [`UNRECORDED_BEFORE_KILL`] after
/// the earlier post (or at most [`IN_FLIGHT_AT_KILL`] before it was noted) and before the later one;
/// any other repeat (e.g. a resend after a database restart) is a duplicate.
fn deliveries(notifications: &HashSet<String>, arrivals: &HashMap<String, Vec<Instant>>, sender_kills: &[Instant]) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    let mut resent = 0;
    let mut ids: Vec<&String> = notifications.iter().collect();
    ids.sort();
    for id in ids {
        let times = arrivals.get(id).map(Vec::as_slice).unwrap_or_default();
        if times.is_empty() {
            problems.push(format!("notification {id} never reached the webhook"));
            continue;
        }
        let mut duplicates = 0;
        for pair in times.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            let crashed =
                sender_kills.iter().any(|&k| earlier <= k + IN_FLIGHT_AT_KILL && k <= later && k.saturating_duration_since(earlier) <= UNRECORDED_BEFORE_KILL);
            if crashed {
                resent += 1;
            } else {
                duplicates += 1;
            }
        }
        if duplicates > 0 {
            problems.push(format!("notification {id} delivered {} times", times.len()));
        }
    }
    let mut others: Vec<(&String, usize)> = arrivals.iter().filter(|(id, _)| !notifications.contains(*id)).map(|(id, t)| (id, t.len())).collect();
    others.sort();
    for (id, k) in others {
        problems.push(format!("{k} deliveries of {id}, which is no notification"));
    }
    (problems, resent)
}

/// The read-model tables and their checksums (row count, md5 over the rows in a fixed order).
const TABLES: [&str; 6] = ["tasks", "task_history", "notifications", "notification_reads", "webhooks", "reminder_schedule"];

pub async fn checksums(db: &PgPool) -> anyhow::Result<Vec<(String, i64, String)>> {
    let mut out = Vec::new();
    for t in TABLES {
        // Table names come from the constant above, never from input.
        let (n, sum): (i64, Option<String>) =
            sqlx::query_as(&format!("SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {t} t")).fetch_one(db).await?;
        out.push((t.to_owned(), n, sum.unwrap_or_default()));
    }
    Ok(out)
}

/// The read models before and after `projector rebuild --yes` (from offset zero).
pub fn rebuild_matches(before: &[(String, i64, String)], after: &[(String, i64, String)], rebuild_ok: Result<(), String>) -> Check {
    let mut problems = Vec::new();
    if let Err(e) = rebuild_ok {
        problems.push(e);
    }
    for (b, a) in before.iter().zip(after) {
        if b != a {
            problems.push(format!("{}: live {} rows (md5 {}), rebuilt {} rows (md5 {})", b.0, b.1, b.2, a.1, a.2));
        }
    }
    let rows: i64 = before.iter().map(|t| t.1).sum();
    check("read models identical to a rebuild from offset zero", &problems, format!("{} tables, {rows} rows", before.len()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::load::CommandRecord;

    fn record(key: &str, event_type: &str, sequence: u32, idempotency_key: Option<&str>, data: Value) -> LogRecord {
        LogRecord {
            key: key.into(),
            event_type: event_type.into(),
            sequence,
            user: "u".into(),
            idempotency_key: idempotency_key.map(Into::into),
            data,
            position: (0, 0),
            id: String::new(),
        }
    }

    fn command(key: &str, task: Uuid, op: Op, outcome: Outcome) -> CommandRecord {
        CommandRecord::for_test(key, "u", task, op, outcome)
    }

    #[test]
    fn an_accepted_command_is_in_the_log_exactly_once_at_its_version() {
        let t = Uuid::from_u128(1);
        let log = vec![
            record(&t.to_string(), "task.created", 1, Some("k1"), json!({})),
            record(&t.to_string(), "task.updated", 2, Some("k2"), json!({})),
            record(&t.to_string(), "task.updated", 3, Some("k2"), json!({})),
            record(&t.to_string(), "task.completed", 4, Some("k4"), json!({})),
        ];
        let journal = vec![
            command("k1", t, Op::Create, Outcome::Accepted { version: 1, replayed: false }),
            command("k2", t, Op::Update, Outcome::Accepted { version: 2, replayed: false }),
            command("k3", t, Op::Update, Outcome::Accepted { version: 3, replayed: false }),
            command("k4", t, Op::Complete, Outcome::Rejected { status: 409, body: String::new() }),
            command("k5", t, Op::Reopen, Outcome::Unresolved { last: "timeout".into() }),
        ];
        let (by_phase, check) = commands_against_log(&journal, &log, 1);
        assert!(!check.ok);
        let e = &by_phase[0];
        assert_eq!((e.lost, e.duplicated, e.refused_but_in_log, e.unresolved_in_log), (1, 1, 1, 0), "{check:?}");
        assert!(check.detail.contains("duplicated Update: 1") && check.detail.contains("lost Update: 1"), "{}", check.detail);
        let (_, fine) = commands_against_log(&journal[..1], &log, 1);
        assert!(fine.ok, "{fine:?}");
    }

    #[test]
    fn versions_must_be_contiguous_per_stream() {
        let ok = vec![
            record("a", "task.created", 1, None, json!({})),
            record("b", "task.created", 1, None, json!({})),
            record("a", "task.updated", 2, None, json!({})),
        ];
        assert!(versions_contiguous(&ok).ok);
        let gap = vec![record("a", "task.created", 1, None, json!({})), record("a", "task.updated", 3, None, json!({}))];
        assert!(!versions_contiguous(&gap).ok);
        let twice = vec![record("a", "task.created", 1, None, json!({})), record("a", "task.created", 1, None, json!({}))];
        assert!(!versions_contiguous(&twice).ok);
    }

    #[test]
    fn a_completed_recurring_task_has_exactly_one_next_occurrence() {
        let parent = record("p", "task.created", 1, None, json!({"recurrence": "FREQ=DAILY"}));
        let done = record("p", "task.completed", 2, None, json!({}));
        let child = record("c", "task.created", 1, None, json!({"recurrence": "FREQ=DAILY", "recurrence_parent_id": "p"}));
        assert!(occurrences(&[parent.clone(), done.clone(), child.clone()]).ok);
        assert!(!occurrences(&[parent.clone(), done.clone()]).ok, "none");
        let mut again = child.clone();
        again.key = "d".into();
        assert!(!occurrences(&[parent.clone(), done, child.clone(), again]).ok, "two");
        assert!(!occurrences(&[parent, child]).ok, "an occurrence of a task never completed");
    }

    #[test]
    fn a_second_post_is_excused_only_after_its_sender_was_killed_before_recording_it() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let ids: HashSet<String> = ["once", "crash", "in_flight", "after", "late", "again", "missing"].iter().map(|s| s.to_string()).collect();
        let arrivals = HashMap::from([
            ("once".to_owned(), vec![at(1)]),
            // Posted at 10, its projector killed at 11, posted again by the next one at 40.
            ("crash".to_owned(), vec![at(10), at(40)]),
            // Posted as its projector was killed (at 11), noted by the receiver a moment after.
            ("in_flight".to_owned(), vec![at(11) + Duration::from_millis(300), at(41)]),
            // Posted well after the kill (by another sender): a second post is a duplicate.
            ("after".to_owned(), vec![at(14), at(42)]),
            // Posted long before the kill: it was recorded, a second post is a duplicate.
            ("late".to_owned(), vec![at(2), at(45)]),
            // No kill in between (a database restart): a duplicate.
            ("again".to_owned(), vec![at(50), at(80)]),
            ("stranger".to_owned(), vec![at(3)]),
        ]);
        let (problems, resent) = deliveries(&ids, &arrivals, &[at(11)]);
        assert_eq!(resent, 2);
        assert_eq!(
            problems,
            [
                "notification after delivered 2 times",
                "notification again delivered 2 times",
                "notification late delivered 2 times",
                "notification missing never reached the webhook",
                "1 deliveries of stranger, which is no notification",
            ]
        );
    }
}
