//! The phases that work on the database and a large log directly: the raw COPY limit of
//! PostgreSQL, and a backlog of 1 000 000 events (projector catch-up, rebuild, command API restore).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use domain::{NewTask, Priority, TaskEvent, TaskId, TaskPatch, Title, UserId};
use platform::codec::{self, Envelope, Metadata};

use crate::{round, rss_mb, CpuMeter, Ctx};

fn database_url(ctx: &Ctx) -> anyhow::Result<&str> {
    ctx.cli.database_url.as_deref().ok_or_else(|| anyhow::anyhow!("--database-url (DATABASE_URL) is needed for this phase"))
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{db}")
}

/// `pg_raw_copy_rows_per_s`: binary COPY of rows shaped like `task_history` (the widest read model)
/// into a scratch table of the same PostgreSQL: what the projector's writes could reach at best.
pub async fn pg_copy(ctx: &Ctx) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut conn = PgConnection::connect(database_url(ctx)?).await?;
    let table = format!("bench_copy_{}", Uuid::new_v4().simple());
    sqlx::query(&format!(
        "CREATE TABLE {table} (event_id uuid PRIMARY KEY, task_id uuid NOT NULL, user_id text NOT NULL, version int4 NOT NULL,
         event_type text NOT NULL, schema_version int4 NOT NULL, occurred_at timestamptz NOT NULL, data jsonb NOT NULL,
         correlation_id text, causation_id text, log_partition int4 NOT NULL, log_offset int8 NOT NULL)"
    ))
    .execute(&mut conn)
    .await?;
    let rows = ctx.n(500_000);
    let mut buf = Vec::with_capacity(rows * 200);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.extend_from_slice(&0i32.to_be_bytes());
    let data = br#"{"title":"write the quarterly report","priority":"high","tags":["work","q4"]}"#;
    for i in 0..rows {
        buf.extend_from_slice(&12i16.to_be_bytes());
        let field = |buf: &mut Vec<u8>, bytes: &[u8]| {
            buf.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
            buf.extend_from_slice(bytes);
        };
        field(&mut buf, Uuid::now_v7().as_bytes());
        field(&mut buf, Uuid::from_u128(i as u128 / 5).as_bytes());
        field(&mut buf, format!("user-{}", i % 1000).as_bytes());
        field(&mut buf, &((i % 5) as i32 + 1).to_be_bytes());
        field(&mut buf, b"task.updated");
        field(&mut buf, &1i32.to_be_bytes());
        field(&mut buf, &(820_000_000_000_000i64 + i as i64).to_be_bytes());
        let mut jsonb = vec![1u8];
        jsonb.extend_from_slice(data);
        field(&mut buf, &jsonb);
        field(&mut buf, b"corr-0123456789");
        field(&mut buf, b"cause-0123456789");
        field(&mut buf, &((i % 12) as i32).to_be_bytes());
        field(&mut buf, &(i as i64).to_be_bytes());
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    let started = Instant::now();
    let mut copy = conn.copy_in_raw(&format!("COPY {table} FROM STDIN (FORMAT binary)")).await?;
    for chunk in buf.chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    let copied = copy.finish().await?;
    let rate = copied as f64 / started.elapsed().as_secs_f64();
    sqlx::query(&format!("DROP TABLE {table}")).execute(&mut conn).await?;
    eprintln!("pg_raw_copy_rows_per_s = {rate:.0} ({copied} rows, binary COPY, task_history-shaped)");
    Ok(BTreeMap::from([("pg_raw_copy_rows_per_s".into(), round(rate))]))
}

/// Where the service binaries are: beside this one.
pub fn bin(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(name))).unwrap_or_else(|| PathBuf::from(name))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// The backlog: `events` events over `events / 5` tasks (created, updated twice, completed, then
/// reopened or, one in five, deleted), round by round so that each task's events are spread over the
/// log, produced in large Kafka transactions exactly as the command API encodes them: personal
/// fields sealed with each user's data key (made first, wrapped with the KEK that the benchmark's
/// services are given).
async fn produce_backlog(ctx: &Ctx, topic: &str, events: usize, kek: &str) -> anyhow::Result<()> {
    let settings = crate::kafka_settings(ctx, topic);
    platform::kafka::ensure_topics(&settings).await?;
    let producer: FutureProducer = platform::kafka::client_config(&settings, "bench-backlog")
        .set("transactional.id", format!("bench-backlog-{}", Uuid::new_v4()))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()?;
    tokio::task::block_in_place(|| producer.init_transactions(Duration::from_secs(30)))?;
    let tasks = (events / 5).max(1);
    let ids: Vec<TaskId> = (0..tasks).map(|_| TaskId::new_v7()).collect();
    let users: Vec<UserId> = (0..1000).map(|u| UserId::parse(format!("user-{u}")).expect("valid user")).collect();
    let keys = std::sync::Arc::new(platform::keys::KeyRing::new(platform::keys::Keks::parse(kek)?));
    keys.start(&settings, "bench-backlog").await?;
    let mut user_keys = Vec::with_capacity(users.len());
    for u in &users {
        user_keys.push(keys.ensure(u.as_ref()).await?);
    }
    let now = chrono::Utc::now();
    let mut sent = 0;
    tokio::task::block_in_place(|| producer.begin_transaction())?;
    for round in 0..5u32 {
        for (i, id) in ids.iter().enumerate() {
            if sent == events {
                break;
            }
            let event = match round {
                0 => {
                    let mut t = NewTask::new(Title::parse(format!("task {i}")).expect("valid title"));
                    t.priority = Priority::High;
                    TaskEvent::Created(t)
                }
                1 | 2 => TaskEvent::Updated(TaskPatch { title: Some(Title::parse(format!("task {i} v{round}")).expect("valid title")), ..Default::default() }),
                3 => TaskEvent::Completed,
                _ if i % 5 == 0 => TaskEvent::Deleted,
                _ => TaskEvent::Reopened,
            };
            let key = &user_keys[i % users.len()];
            let enc = codec::encode(
                &Envelope {
                    subject: *id,
                    meta: Metadata {
                        event_id: Uuid::now_v7(),
                        user_id: users[i % users.len()].clone(),
                        sequence: round + 1,
                        occurred_at: now,
                        correlation_id: Some(Uuid::now_v7().to_string()),
                        causation_id: None,
                        traceparent: None,
                        idempotency: None,
                        data_key: Some(key.id),
                    },
                    event,
                },
                Some(key),
            );
            let record = FutureRecord::to(topic).key(&enc.key).payload(&enc.payload).headers(enc.headers);
            // Fire and forget: the commit below waits for every delivery.
            drop(producer.send_result(record).map_err(|(e, _)| e)?);
            sent += 1;
            if sent % 100_000 == 0 {
                tokio::task::block_in_place(|| -> anyhow::Result<()> {
                    producer.commit_transaction(Duration::from_secs(60))?;
                    producer.begin_transaction()?;
                    Ok(())
                })?;
            }
        }
    }
    tokio::task::block_in_place(|| producer.commit_transaction(Duration::from_secs(60)))?;
    Ok(())
}

async fn high_watermarks(ctx: &Ctx, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer = platform::kafka::client_config(&crate::kafka_settings(ctx, topic), "bench-backlog-watermarks").create()?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        let mut out = BTreeMap::new();
        for p in md.topics()[0].partitions() {
            out.insert(p.id(), consumer.fetch_watermarks(&topic, p.id(), Duration::from_secs(10))?.1);
        }
        Ok(out)
    })
    .await?
}

/// Whether every projection has applied the whole log.
async fn caught_up(db: &mut PgConnection, topic: &str, highs: &BTreeMap<i32, i64>) -> anyhow::Result<bool> {
    let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT partition, min(next_offset) FROM projection_offsets WHERE topic = $1 GROUP BY partition")
        .bind(topic)
        .fetch_all(db)
        .await
        .unwrap_or_default();
    let applied: BTreeMap<i32, i64> = rows.into_iter().collect();
    Ok(highs.iter().all(|(p, h)| platform::projections::lag(applied.get(p).copied().unwrap_or(0), *h) == 0))
}

/// The environment of a service started over the backlog.
struct BacklogEnv<'a> {
    ctx: &'a Ctx,
    db_url: String,
    topic: &'a str,
    kek: &'a str,
}

impl BacklogEnv<'_> {
    fn apply(&self, c: &mut tokio::process::Command) {
        c.env("KAFKA_BROKERS", &self.ctx.cli.brokers)
            .env("DATABASE_URL", &self.db_url)
            .env("TASK_EVENTS_TOPIC", self.topic)
            .env("AUTH_JWT_SECRET", &self.ctx.cli.secret)
            .env("SERVICE_JWT_SECRET", format!("bench-service-secret-{}", Uuid::new_v4().simple()))
            .env("TASKSTREAM_KEK", self.kek)
            .env("COMMAND_API_URL", "http://127.0.0.1:9")
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
    }
}

/// One catch-up of the live projector over the whole backlog, from process start to every
/// partition applied, into the (empty) database of `env`: `projector_events_per_s`, its CPU
/// shares and `rss_mb_projector`.
async fn catch_up(env: &BacklogEnv<'_>, highs: &BTreeMap<i32, i64>, events: usize) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    let mut cmd = tokio::process::Command::new(bin("projector"));
    env.apply(&mut cmd);
    cmd.env("PROJECTOR_ADDR", format!("127.0.0.1:{}", free_port())).stderr(std::process::Stdio::null());
    let started = Instant::now();
    let mut projector = cmd.spawn()?;
    // Where the catch-up's CPU goes: the projector's, and the broker's and PostgreSQL's when given.
    let mut procs: Vec<(String, String)> = projector.id().map(|p| ("projector".to_owned(), p.to_string())).into_iter().collect();
    procs.extend(env.ctx.cli.cpu.iter().cloned());
    let cpu = CpuMeter::start(procs);
    let mut db_conn = loop {
        if let Ok(c) = PgConnection::connect(&env.db_url).await {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    while !caught_up(&mut db_conn, env.topic, highs).await? {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "the projector did not catch up within 10 minutes");
        if let Some(status) = projector.try_wait()? {
            anyhow::bail!("the projector exited with {status} before it caught up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let rate = events as f64 / secs;
    let shares = cpu.finish("projector_events_per_s", &mut out);
    eprintln!("projector_events_per_s = {rate:.0} ({events} events in {secs:.1} s, from process start; CPU: {shares})");
    out.insert("projector_events_per_s".into(), round(rate));
    if let Some(mb) = projector.id().and_then(|pid| rss_mb(&pid.to_string())) {
        out.insert("rss_mb_projector".into(), round(mb));
    }
    // A graceful stop: it leaves the consumer group, so the next catch-up (a new member of the
    // same group) gets the partitions at once. A killed member held them until its session
    // expired, which the next run's rate included (up to the broker's 6 s session timeout).
    stop_gracefully(&mut projector).await;
    Ok(out)
}

/// SIGTERM, then up to 30 s for the process to exit, then SIGKILL.
async fn stop_gracefully(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let _ = child.kill().await;
}

/// `projector_events_per_s` (with `rss_mb_projector`: the median of `--repeat` catch-ups over the
/// same log, each into a database of its own, and their spread), `rebuild_1m_seconds`,
/// `command_api_restore_1m_seconds`, `rss_mb_command_api_1m_tasks`.
pub async fn backlog(ctx: &Ctx) -> anyhow::Result<(BTreeMap<String, Value>, BTreeMap<String, [f64; 2]>)> {
    let admin = database_url(ctx)?.to_owned();
    let events = ctx.n(1_000_000);
    let run = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let topic = format!("bench-backlog-{run}");
    let mut admin_conn = PgConnection::connect(&admin).await?;
    let started = Instant::now();
    // A key-encryption key of this run's own, given to the services it starts.
    let kek = platform::keys::Keks::generate("bench");
    produce_backlog(ctx, &topic, events, &kek).await?;
    eprintln!("backlog: {events} events produced in {:.1} s", started.elapsed().as_secs_f64());
    let highs = high_watermarks(ctx, &topic).await?;

    // Catch-ups of the live projector from an empty database, as many as the short phases have
    // runs (a median and a range, not one noisy run). The rebuild and the restores below use the
    // last run's database.
    let mut catch_ups = Vec::new();
    let mut db = String::new();
    for i in 0..ctx.cli.repeat.max(1) {
        if !db.is_empty() {
            sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut admin_conn).await?;
        }
        db = format!("bench_backlog_{run}_{i}");
        sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut admin_conn).await?;
        let env = BacklogEnv { ctx, db_url: with_db(&admin, &db), topic: &topic, kek: &kek };
        catch_ups.push(catch_up(&env, &highs, events).await?);
    }
    let (mut out, spread) = crate::medians(&catch_ups);
    let env = BacklogEnv { ctx, db_url: with_db(&admin, &db), topic: &topic, kek: &kek };

    // Rebuild of every projection over the same log.
    let mut cmd = tokio::process::Command::new(bin("projector"));
    env.apply(&mut cmd);
    cmd.args(["rebuild", "--yes"]).stderr(std::process::Stdio::piped());
    let started = Instant::now();
    let rebuilt = cmd.output().await?;
    let secs = started.elapsed().as_secs_f64();
    if rebuilt.status.success() {
        eprintln!("rebuild_1m_seconds = {secs:.1}");
        out.insert("rebuild_1m_seconds".into(), round(secs));
    } else {
        eprintln!("rebuild failed: {}", String::from_utf8_lossy(&rebuilt.stderr));
        out.insert("rebuild_1m_seconds".into(), Value::Null);
    }

    // The command API restores the state of every task before it is ready: the first start reads
    // the whole log (and records a snapshot per partition), a restart reads the snapshots and the
    // tail after them.
    let port = free_port();
    let start_api = || {
        let mut cmd = tokio::process::Command::new(bin("command-api"));
        env.apply(&mut cmd);
        cmd.env("COMMAND_API_ADDR", format!("127.0.0.1:{port}"))
            .env("KAFKA_TRANSACTIONAL_ID", format!("bench-restore-{run}"))
            .env("TASKSTREAM_DEV", "1")
            .stderr(std::process::Stdio::null());
        cmd.spawn()
    };
    for key in ["command_api_restore_1m_from_log_seconds", "command_api_restore_1m_seconds"] {
        let started = Instant::now();
        let mut api = start_api()?;
        loop {
            let ready = ctx.http.get(format!("http://127.0.0.1:{port}/readyz")).send().await.is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "the command API did not restore within 10 minutes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!("{key} = {secs:.2} ({events} events)");
        out.insert(key.into(), round(secs));
        if let Some(mb) = api.id().and_then(|pid| rss_mb(&pid.to_string())) {
            out.insert("rss_mb_command_api_1m_tasks".into(), round(mb));
        }
        // A graceful stop: it leaves the group, so the restart gets the partitions at once.
        stop_gracefully(&mut api).await;
    }
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).execute(&mut admin_conn).await?;
    platform::kafka::delete_topics(&crate::kafka_settings(ctx, &topic)).await;
    out.insert("backlog_events".into(), json!(events));
    Ok((out, spread))
}
