//! Partition-owned writers end to end: several command APIs share the partitions of the log through
//! Kafka's consumer group, forward to each other, and survive losing one (kill -9) or having one
//! frozen (SIGSTOP, a zombie): every command answered 2xx is in the log exactly once, versions are
//! contiguous, and a fenced instance never answers 2xx for a command that is not in the log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{free_port, Stack, StackOptions, Svc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use serde_json::{json, Value};
use test_support::eventually;
use tokio::process::Child;

const PARTITIONS: i32 = 6;

/// One event of the log: (task, sequence, idempotency key).
#[derive(Debug, Clone)]
struct Logged {
    key: String,
    sequence: u32,
    idempotency_key: Option<String>,
}

/// Every committed record of the stack's topic.
async fn read_log(stack: &Stack) -> anyhow::Result<Vec<Logged>> {
    let end = stack.log_end().await?;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &stack.brokers)
        .set("group.id", format!("e2e-reader-{}", uuid::Uuid::new_v4()))
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let topic = stack.topic.clone();
    tokio::task::spawn_blocking(move || {
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in end.keys() {
            tpl.add_partition_offset(&topic, *p, rdkafka::Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let mut pending: HashSet<i32> = end.iter().filter(|(_, h)| **h > 0).map(|(p, _)| *p).collect();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let header = |name: &str| {
                        m.headers().and_then(|h| h.iter().find(|x| x.key == name)).and_then(|x| x.value).map(|v| String::from_utf8_lossy(v).into_owned())
                    };
                    out.push(Logged {
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        sequence: header("ce_sequence").and_then(|s| s.parse().ok()).unwrap_or(0),
                        idempotency_key: header("ce_idempotencykey"),
                    });
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    pending.remove(&p);
                }
                _ => {}
            }
        }
        anyhow::ensure!(pending.is_empty(), "could not read partitions {pending:?} to their end");
        Ok(out)
    })
    .await?
}

/// A command answered 2xx: the task, the version it answered and the key it was sent with.
#[derive(Debug, Clone)]
struct Accepted {
    task: String,
    version: u32,
    key: String,
}

struct Instances {
    ports: Vec<u16>,
    children: Vec<Option<Child>>,
}

impl Instances {
    /// The stack's own command API (instance 0) plus `extra` more in the same group.
    fn start(stack: &Stack, extra: usize) -> anyhow::Result<Self> {
        let main = stack.url(Svc::CommandApi, "");
        let main_port: u16 = main.rsplit(':').next().unwrap_or_default().parse()?;
        let mut ports = vec![main_port];
        let mut children = vec![None];
        for i in 1..=extra {
            let port = free_port();
            let (addr, id) = (format!("127.0.0.1:{port}"), format!("command-api-{i}"));
            children.push(Some(stack.spawn_instance(Svc::CommandApi, &[("COMMAND_API_ADDR", &addr), ("COMMAND_API_INSTANCE_ID", &id)])?));
            ports.push(port);
        }
        Ok(Self { ports, children })
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.ports[i])
    }

    fn respawn(&mut self, stack: &Stack, i: usize) -> anyhow::Result<()> {
        let (addr, id) = (format!("127.0.0.1:{}", self.ports[i]), format!("command-api-{i}"));
        self.children[i] = Some(stack.spawn_instance(Svc::CommandApi, &[("COMMAND_API_ADDR", &addr), ("COMMAND_API_INSTANCE_ID", &id)])?);
        Ok(())
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().and_then(Child::id).expect("a running extra instance")
    }
}

/// The owners of every partition as instance `i` sees them, once all are ready.
async fn owners(stack: &Stack, inst: &Instances, i: usize) -> Option<BTreeMap<i64, String>> {
    let view: Value = stack.http.get(inst.url(i, "/v1/cluster")).send().await.ok()?.json().await.ok()?;
    let parts = view["partitions"].as_array()?;
    let mut out = BTreeMap::new();
    for p in parts {
        if p["ready"] != json!(true) {
            return None;
        }
        out.insert(p["partition"].as_i64()?, p["owner"].as_str()?.to_owned());
    }
    (out.len() == PARTITIONS as usize).then_some(out)
}

/// Sends creates and completes/reopens round-robin over the instances until `stop`, recording every
/// 2xx. Every command carries an Idempotency-Key; a 503 or a timeout is retried with the same key.
async fn load(
    stack: Arc<Stack>,
    ports: Vec<u16>,
    accepted: Arc<Mutex<Vec<Accepted>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    worker: usize,
) -> anyhow::Result<u64> {
    let mut sent = 0u64;
    let mut tasks: Vec<(String, bool)> = Vec::new();
    let mut n = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let key = format!("w{worker}-{n}");
        let (method, path, body) = if tasks.len() < 8 || n.is_multiple_of(3) {
            (reqwest::Method::POST, "/v1/tasks".to_owned(), Some(json!({"title": format!("task {key}")})))
        } else {
            let i = n % tasks.len();
            let (id, done) = tasks[i].clone();
            tasks[i].1 = !done;
            (reqwest::Method::POST, format!("/v1/tasks/{id}/{}", if done { "reopen" } else { "complete" }), None)
        };
        for attempt in 0..100 {
            let port = ports[(n + attempt) % ports.len()];
            let mut req =
                stack.http.request(method.clone(), format!("http://127.0.0.1:{port}{path}")).bearer_auth(stack.token("alice")).header("idempotency-key", &key);
            if let Some(b) = &body {
                req = req.json(b);
            }
            sent += 1;
            match req.timeout(Duration::from_secs(20)).send().await {
                Ok(r) if r.status().is_success() => {
                    let v: Value = r.json().await?;
                    let task = v["task_id"].as_str().unwrap_or_default().to_owned();
                    if path == "/v1/tasks" {
                        tasks.push((task.clone(), false));
                    }
                    accepted.lock().unwrap().push(Accepted { task, version: v["version"].as_u64().unwrap_or(0) as u32, key: key.clone() });
                    break;
                }
                Ok(r) if r.status().as_u16() == 503 || r.status().as_u16() == 409 && attempt > 0 => {
                    // 409 on a retry: a complete/reopen whose first try landed (answered 503 by a
                    // writer that then lost the partition); the key's answer is not remembered
                    // for refusals, so the retry sees the new state. Nothing to record.
                    if r.status().as_u16() == 409 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(r) => {
                    let status = r.status();
                    anyhow::bail!("{method} {path} answered {status}: {}", r.text().await.unwrap_or_default());
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(sent)
}

/// Every 2xx is in the log exactly once (by its key), and every task's versions are 1..=n.
async fn check_log(stack: &Stack, accepted: &[Accepted]) -> anyhow::Result<()> {
    let log = read_log(stack).await?;
    let mut by_key: HashMap<&str, Vec<&Logged>> = HashMap::new();
    let mut versions: HashMap<&str, Vec<u32>> = HashMap::new();
    for l in &log {
        if let Some(k) = &l.idempotency_key {
            by_key.entry(k).or_default().push(l);
        }
        versions.entry(&l.key).or_default().push(l.sequence);
    }
    for a in accepted {
        let found = by_key.get(a.key.as_str()).map(Vec::as_slice).unwrap_or_default();
        anyhow::ensure!(found.len() == 1, "command {} answered 2xx (task {} v{}) is in the log {} times", a.key, a.task, a.version, found.len());
        anyhow::ensure!(found[0].key == a.task && found[0].sequence == a.version, "command {} answered {:?} but the log holds {:?}", a.key, a, found[0]);
    }
    for (task, vs) in versions {
        let expected: Vec<u32> = (1..=vs.len() as u32).collect();
        anyhow::ensure!(vs == expected, "versions of {task} are not contiguous: {vs:?}");
    }
    Ok(())
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_command_apis_share_the_partitions_and_survive_losing_one() -> anyhow::Result<()> {
    let stack = Arc::new(Stack::start_with(StackOptions { partitions: PARTITIONS, ..StackOptions::default() }).await?);
    let mut inst = Instances::start(&stack, 2)?;
    let spread = eventually("three instances to own the partitions", Duration::from_secs(90), || async {
        let o = owners(&stack, &inst, 0).await?;
        (o.values().collect::<HashSet<_>>().len() == 3).then_some(o)
    })
    .await?;
    eprintln!("owners: {spread:?}");

    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4).map(|w| tokio::spawn(load(stack.clone(), inst.ports.clone(), accepted.clone(), stop.clone(), w))).collect();
    eventually("some commands to be accepted", Duration::from_secs(30), || async { (accepted.lock().unwrap().len() > 40).then_some(()) }).await?;

    // kill -9 instance 2; its partitions move to the others.
    let moved: Vec<i64> = spread.iter().filter(|(_, o)| o.as_str() == "command-api-2").map(|(p, _)| *p).collect();
    assert!(!moved.is_empty());
    let killed_at = Instant::now();
    if let Some(mut c) = inst.children[2].take() {
        c.kill().await?;
    }
    let after = eventually("the killed instance's partitions to be owned by the others", Duration::from_secs(60), || async {
        let o = owners(&stack, &inst, 0).await?;
        moved.iter().all(|p| o.get(p).is_some_and(|x| x != "command-api-2")).then_some(o)
    })
    .await?;
    let failover = killed_at.elapsed();
    eprintln!("failover in {:.1} s; owners now {after:?}", failover.as_secs_f64());
    // Measured here for information (benchmarks measure it properly): Kafka's session timeout (6 s
    // on the local broker) plus the restore; generous bound for a loaded test machine.
    assert!(failover < Duration::from_secs(45), "partitions not served again after {failover:?}");
    let before = accepted.lock().unwrap().len();
    eventually("commands to be accepted after the failover", Duration::from_secs(30), || async {
        (accepted.lock().unwrap().len() > before + 40).then_some(())
    })
    .await?;

    // The killed instance restarts and rejoins.
    inst.respawn(&stack, 2)?;
    eventually("the restarted instance to own partitions again", Duration::from_secs(90), || async {
        owners(&stack, &inst, 1).await?.values().any(|o| o == "command-api-2").then_some(())
    })
    .await?;
    let before = accepted.lock().unwrap().len();
    eventually("commands to be accepted after the rejoin", Duration::from_secs(30), || async { (accepted.lock().unwrap().len() > before + 40).then_some(()) })
        .await?;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for w in workers {
        sent += w.await??;
    }
    let accepted = accepted.lock().unwrap().clone();
    eprintln!("{sent} requests sent, {} commands accepted", accepted.len());
    check_log(&stack, &accepted).await?;
    drop(inst);
    Arc::into_inner(stack).ok_or_else(|| anyhow::anyhow!("the stack is still shared"))?.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_command_api_whose_partitions_moved_appends_nothing_more() -> anyhow::Result<()> {
    let stack = Arc::new(Stack::start_with(StackOptions { partitions: PARTITIONS, ..StackOptions::default() }).await?);
    let inst = Instances::start(&stack, 1)?;
    let spread = eventually("two instances to own the partitions", Duration::from_secs(90), || async {
        let o = owners(&stack, &inst, 0).await?;
        (o.values().collect::<HashSet<_>>().len() == 2).then_some(o)
    })
    .await?;
    let zombie_parts: Vec<i64> = spread.iter().filter(|(_, o)| o.as_str() == "command-api-1").map(|(p, _)| *p).collect();

    // A task in each of the zombie's partitions, created through it.
    let mut tasks: Vec<String> = Vec::new();
    let mut accepted = Vec::new();
    let mut n = 0;
    while tasks.len() < 20 {
        n += 1;
        let key = format!("z-{n}");
        let r = stack
            .http
            .post(inst.url(1, "/v1/tasks"))
            .bearer_auth(stack.token("alice"))
            .header("idempotency-key", &key)
            .json(&json!({"title": key}))
            .send()
            .await?;
        assert_eq!(r.status().as_u16(), 201);
        let v: Value = r.json().await?;
        let task = v["task_id"].as_str().unwrap().to_owned();
        accepted.push(Accepted { task: task.clone(), version: 1, key });
        tasks.push(task);
    }

    // Freeze it until another instance owns its partitions (fencing its producers).
    signal(inst.pid(1), "STOP");
    eventually("the frozen instance's partitions to move", Duration::from_secs(60), || async {
        let o = owners(&stack, &inst, 0).await?;
        zombie_parts.iter().all(|p| o.get(p).is_some_and(|x| x != "command-api-1")).then_some(())
    })
    .await?;
    // Requests sent to the zombie while frozen wait in its socket; it serves them when it wakes.
    let pending: Vec<_> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let req = stack
                .http
                .patch(inst.url(1, &format!("/v1/tasks/{t}")))
                .bearer_auth(stack.token("alice"))
                .header("idempotency-key", format!("zu-{i}"))
                .json(&json!({"title": format!("zombie {i}")}));
            tokio::spawn(async move { req.timeout(Duration::from_secs(60)).send().await })
        })
        .collect();
    signal(inst.pid(1), "CONT");
    let mut answered = BTreeMap::new();
    for (i, p) in pending.into_iter().enumerate() {
        let r = p.await??;
        let status = r.status().as_u16();
        *answered.entry(status).or_insert(0) += 1;
        if r.status().is_success() {
            let v: Value = r.json().await?;
            accepted.push(Accepted { task: tasks[i].clone(), version: v["version"].as_u64().unwrap() as u32, key: format!("zu-{i}") });
        } else {
            assert_eq!(status, 503, "the zombie answered {status}");
        }
    }
    eprintln!("answers of the woken zombie: {answered:?}");
    // Whatever it answered 2xx (forwarded to the new owners, or accepted before it noticed: then
    // its fenced producer would have failed) is in the log exactly once.
    check_log(&stack, &accepted).await?;
    drop(inst);
    Arc::into_inner(stack).ok_or_else(|| anyhow::anyhow!("the stack is still shared"))?.cleanup().await
}
