//! The steady load: an open-loop schedule of commands (creates, updates, completes, reopens,
//! recurring tasks, reminders due inside the run), every one with its own Idempotency-Key. A command
//! answered 503 (or 408/429/5xx, or not answered in time) is sent again with the same key and body,
//! with backoff, until it gets a definitive answer or its retry budget runs out. Every command and
//! its final answer go to the journal that `verify` checks against the log; a reader queries
//! GraphQL meanwhile, so unavailability of reads is measured too.
//!
//! A task has at most one command in flight (tasks wait in a pool between commands), so every
//! command's expected outcome is known: a definitive 4xx is itself a finding.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use platform::retry::{Jitter, Policy};
use rand::Rng;
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

const PRIORITIES: [&str; 4] = ["low", "medium", "high", "urgent"];
/// How a command answered unavailable is sent again: 250 ms doubled up to 5 s, +-25 % (a client
/// population that backs off, so a recovering service is not met by a retry storm).
const RETRY: Policy = Policy::new(Duration::from_millis(250), Duration::from_secs(5)).with_jitter(Jitter::PlusMinus25);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    CreateRecurring,
    CreateReminder,
    Update,
    Complete,
    Reopen,
}

/// The final answer to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted {
        version: u32,
        replayed: bool,
    },
    /// A definitive refusal (4xx other than 408/429).
    Rejected {
        status: u16,
        body: String,
    },
    /// No definitive answer within the retry budget: the command may or may not be in the log.
    Unresolved {
        last: String,
    },
}

#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub seq: u64,
    pub key: String,
    pub user: String,
    pub op: Op,
    pub task_id: Uuid,
    method: Method,
    path: String,
    body: Option<Value>,
    /// The phase (index) it was first sent in.
    pub phase: usize,
    pub sent_at: Instant,
    pub attempts: u32,
    /// Answers 503 (or 408/429/other 5xx) and timeouts before the final answer.
    pub unavailable: u32,
    pub saw_503: bool,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy)]
struct TaskRef {
    id: Uuid,
    user: usize,
}

#[derive(Default)]
struct Pool {
    open: Vec<TaskRef>,
    completed: Vec<TaskRef>,
}

pub struct LoadConfig {
    pub run_id: String,
    pub command_urls: Vec<String>,
    pub query_url: String,
    pub rate: f64,
    pub users: Vec<String>,
    pub tokens: Vec<String>,
    pub retry_budget: Duration,
    pub request_timeout: Duration,
    pub max_in_flight: usize,
    /// Reminders are created only when they fall due before this instant (so they fire in the run).
    pub reminders_until: DateTime<Utc>,
}

/// Live counters for the progress lines.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub saw_503: AtomicU64,
    /// 503 answers so far (a command retried three times counts three).
    pub answers_503: AtomicU64,
    pub rejected: AtomicU64,
    pub unresolved: AtomicU64,
    pub shed: AtomicU64,
    pub in_flight: AtomicUsize,
    pub retrying: AtomicUsize,
    pub reads_ok: AtomicU64,
    pub reads_failed: AtomicU64,
}

pub struct Load {
    config: LoadConfig,
    http: reqwest::Client,
    pool: Mutex<Pool>,
    next_seq: AtomicU64,
    pub phase: AtomicUsize,
    pub counters: Counters,
    journal: Mutex<Vec<CommandRecord>>,
    /// When a command got a 2xx, and when a read succeeded or failed.
    writes_ok: Mutex<Vec<Instant>>,
    reads: Mutex<Vec<(Instant, bool)>>,
    stopping: AtomicBool,
}

impl Load {
    pub fn new(config: LoadConfig) -> anyhow::Result<Arc<Self>> {
        let http = reqwest::Client::builder().pool_max_idle_per_host(512).timeout(config.request_timeout).build()?;
        Ok(Arc::new(Self {
            config,
            http,
            pool: Mutex::default(),
            next_seq: AtomicU64::new(0),
            phase: AtomicUsize::new(0),
            counters: Counters::default(),
            journal: Mutex::default(),
            writes_ok: Mutex::default(),
            reads: Mutex::default(),
            stopping: AtomicBool::new(false),
        }))
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Sends commands at the configured rate until [`Load::stop`]; every command runs on its own
    /// task, so a slow answer never delays the schedule (open loop). Beyond `max_in_flight`
    /// commands, or more than a second behind its time, a scheduled command is not sent (counted
    /// as shed).
    pub async fn drive(self: Arc<Self>) {
        let start = tokio::time::Instant::now();
        let mut i: u64 = 0;
        while !self.stopping.load(Ordering::Acquire) {
            let at = start + Duration::from_secs_f64(i as f64 / self.config.rate);
            tokio::time::sleep_until(at).await;
            i += 1;
            // Open loop, but a schedule more than a second behind (this process starved of CPU)
            // is not caught up in one burst: those commands are not sent (shed).
            let late = at.elapsed() > Duration::from_secs(1);
            if late || self.counters.in_flight.load(Ordering::Relaxed) >= self.config.max_in_flight {
                self.counters.shed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let cmd = self.next_command();
            self.counters.in_flight.fetch_add(1, Ordering::Relaxed);
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            let load = self.clone();
            tokio::spawn(async move {
                let done = load.execute(cmd).await;
                load.finish(done);
            });
        }
    }

    /// Queries GraphQL every 100 ms (as a random user) until [`Load::stop`].
    pub async fn read(self: Arc<Self>) {
        let query = json!({"query": "{ stats { total open completed } }"});
        while !self.stopping.load(Ordering::Acquire) {
            let user = rand::rng().random_range(0..self.config.users.len());
            let ok = self
                .http
                .post(format!("{}/graphql", self.config.query_url))
                .bearer_auth(&self.config.tokens[user])
                .timeout(Duration::from_secs(5))
                .json(&query)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let c = if ok { &self.counters.reads_ok } else { &self.counters.reads_failed };
            c.fetch_add(1, Ordering::Relaxed);
            self.reads.lock().expect("reads").push((Instant::now(), ok));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (up to `timeout`) until no command is in flight.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.counters.in_flight.load(Ordering::Relaxed) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    }

    /// Picks the next command: an operation for an idle task of the pool (taken out of it while
    /// in flight), or a create when there is none.
    fn next_command(&self) -> CommandRecord {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let mut rng = rand::rng();
        let roll: u32 = rng.random_range(0..100);
        let wanted = match roll {
            0..=21 => Op::Create,
            22..=26 => Op::CreateRecurring,
            27..=29 => Op::CreateReminder,
            30..=59 => Op::Update,
            60..=81 => Op::Complete,
            _ => Op::Reopen,
        };
        let picked = {
            let mut pool = self.pool.lock().expect("pool");
            let from = match wanted {
                Op::Update | Op::Complete => Some(&mut pool.open),
                Op::Reopen => Some(&mut pool.completed),
                _ => None,
            };
            from.filter(|v| !v.is_empty()).map(|v| {
                let i = rng.random_range(0..v.len());
                v.swap_remove(i)
            })
        };
        let (op, task) = match picked {
            Some(t) => (wanted, t),
            None => {
                let op = if matches!(wanted, Op::CreateRecurring | Op::CreateReminder) { wanted } else { Op::Create };
                (op, TaskRef { id: Uuid::new_v4(), user: rng.random_range(0..self.config.users.len()) })
            }
        };
        let now = Utc::now();
        let id = task.id;
        let (op, method, path, body) = match op {
            Op::Create => (
                op,
                Method::POST,
                "/v1/tasks".to_owned(),
                Some(json!({
                    "task_id": id, "title": format!("chaos {seq}"), "priority": PRIORITIES[seq as usize % 4],
                    "due_at": (now + chrono::Duration::days(2)).to_rfc3339(), "tags": ["chaos"],
                })),
            ),
            Op::CreateRecurring => (
                op,
                Method::POST,
                "/v1/tasks".to_owned(),
                Some(json!({
                    "task_id": id, "title": format!("chaos daily {seq}"), "due_at": (now + chrono::Duration::hours(1)).to_rfc3339(),
                    "timezone": "Europe/Paris", "recurrence": "FREQ=DAILY", "tags": ["chaos", "recurring"],
                })),
            ),
            Op::CreateReminder => {
                // Due between 5 s from now and the end of the reminder window, reminded 1 minute before.
                let room = (self.config.reminders_until - now).num_milliseconds() - 5_000;
                if room > 1_000 {
                    let at = now + chrono::Duration::milliseconds(5_000 + rng.random_range(0..room.min(60_000)));
                    (
                        op,
                        Method::POST,
                        "/v1/tasks".to_owned(),
                        Some(json!({
                            "task_id": id, "title": format!("chaos reminder {seq}"), "due_at": (at + chrono::Duration::minutes(1)).to_rfc3339(),
                            "remind_before": "PT1M", "tags": ["chaos", "reminder"],
                        })),
                    )
                } else {
                    (Op::Create, Method::POST, "/v1/tasks".to_owned(), Some(json!({"task_id": id, "title": format!("chaos {seq}")})))
                }
            }
            Op::Update => (
                op,
                Method::PATCH,
                format!("/v1/tasks/{id}"),
                Some(json!({
                    "title": format!("chaos edit {seq}"), "priority": PRIORITIES[seq as usize % 4],
                })),
            ),
            Op::Complete => (op, Method::POST, format!("/v1/tasks/{id}/complete"), None),
            Op::Reopen => (op, Method::POST, format!("/v1/tasks/{id}/reopen"), None),
        };
        CommandRecord {
            seq,
            key: format!("chaos-{}-{seq}", self.config.run_id),
            user: self.config.users[task.user].clone(),
            op,
            task_id: id,
            method,
            path,
            body,
            phase: self.phase.load(Ordering::Relaxed),
            sent_at: Instant::now(),
            attempts: 0,
            unavailable: 0,
            saw_503: false,
            outcome: Outcome::Unresolved { last: "not sent".into() },
        }
    }

    fn user_index(&self, user: &str) -> usize {
        self.config.users.iter().position(|u| u == user).unwrap_or(0)
    }

    /// One send of `cmd` to command API `instance`: the answer's status, body and whether it was
    /// replayed, or the transport error.
    async fn send_once(&self, cmd: &CommandRecord, instance: usize) -> Result<(u16, Value, bool), String> {
        let url = format!("{}{}", self.config.command_urls[instance], cmd.path);
        let mut req =
            self.http.request(cmd.method.clone(), url).bearer_auth(&self.config.tokens[self.user_index(&cmd.user)]).header("Idempotency-Key", &cmd.key);
        if let Some(b) = &cmd.body {
            req = req.json(b);
        }
        let res = req.send().await.map_err(|e| if e.is_timeout() { "timeout".to_owned() } else { format!("transport: {e}") })?;
        let status = res.status().as_u16();
        let replayed = res.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
        let retry_after = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let body: Value = match res.json().await {
            Ok(body) => body,
            // A 2xx whose body did not arrive (the client timed out or the connection dropped
            // after the status line) says the command was accepted but not at which version: not a
            // definitive answer. The retry, with the same Idempotency-Key, gets it replayed.
            Err(e) if (200..300).contains(&status) => return Err(format!("{status} without a readable body: {e}")),
            Err(_) => Value::Null,
        };
        let body = match retry_after {
            Some(s) if !(200..300).contains(&status) => json!({"answer": body, "retry_after": s}),
            _ => body,
        };
        Ok((status, body, replayed))
    }

    /// Sends `cmd` until a definitive answer or the end of its retry budget (the same key and body
    /// every time, to the next instance each time).
    async fn execute(&self, mut cmd: CommandRecord) -> CommandRecord {
        let deadline = cmd.sent_at + self.config.retry_budget;
        let mut backoff = RETRY.backoff();
        let mut retrying = false;
        loop {
            cmd.attempts += 1;
            let delay = backoff.next_delay();
            let instance = (cmd.seq as usize + cmd.attempts as usize - 1) % self.config.command_urls.len();
            let (wait, last) = match self.send_once(&cmd, instance).await {
                Ok((status, body, replayed)) if (200..300).contains(&status) => {
                    let version = body["version"].as_u64().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
                    cmd.outcome = Outcome::Accepted { version, replayed };
                    break;
                }
                Ok((status, body, _)) if matches!(status, 408 | 429) || status >= 500 => {
                    cmd.unavailable += 1;
                    if status == 503 {
                        cmd.saw_503 = true;
                        self.counters.answers_503.fetch_add(1, Ordering::Relaxed);
                    }
                    // Retry-After when it says more than the backoff (at most the backoff's cap).
                    let hint = body["retry_after"].as_u64().map(Duration::from_secs).unwrap_or_default();
                    (hint.min(RETRY.cap).max(delay), format!("{status}: {body}"))
                }
                Ok((status, body, _)) => {
                    cmd.outcome = Outcome::Rejected { status, body: body.to_string() };
                    break;
                }
                Err(e) => {
                    cmd.unavailable += 1;
                    (delay, e)
                }
            };
            if Instant::now() + wait >= deadline {
                cmd.outcome = Outcome::Unresolved { last };
                break;
            }
            if !retrying {
                retrying = true;
                self.counters.retrying.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(wait).await;
        }
        if retrying {
            self.counters.retrying.fetch_sub(1, Ordering::Relaxed);
        }
        cmd
    }

    /// Records a finished command and puts its task back in the pool (in the state the answer
    /// says); a task whose state is unknown (refused, unresolved) or that carries a reminder leaves
    /// the pool.
    fn finish(&self, cmd: CommandRecord) {
        let c = &self.counters;
        if cmd.saw_503 {
            c.saw_503.fetch_add(1, Ordering::Relaxed);
        }
        match &cmd.outcome {
            Outcome::Accepted { .. } => {
                c.accepted.fetch_add(1, Ordering::Relaxed);
                self.writes_ok.lock().expect("writes").push(Instant::now());
                let task = TaskRef { id: cmd.task_id, user: self.user_index(&cmd.user) };
                let mut pool = self.pool.lock().expect("pool");
                match cmd.op {
                    Op::Create | Op::CreateRecurring | Op::Update | Op::Reopen => pool.open.push(task),
                    Op::Complete => pool.completed.push(task),
                    Op::CreateReminder => {}
                }
            }
            Outcome::Rejected { .. } => {
                c.rejected.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Unresolved { .. } => {
                c.unresolved.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.journal.lock().expect("journal").push(cmd);
        c.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Sends accepted commands again with their keys (retried like the load): each must be answered
    /// 2xx with the first answer (the same version, `Idempotent-Replayed`), never executed a second
    /// time. Returns the mismatches, and how many replays got no definitive answer (inconclusive).
    pub async fn replay(&self, sample: &[CommandRecord]) -> (Vec<String>, u64) {
        let mut mismatches = Vec::new();
        let mut inconclusive = 0;
        for cmd in sample {
            let Outcome::Accepted { version, .. } = cmd.outcome else { continue };
            let again = CommandRecord { sent_at: Instant::now(), attempts: 0, unavailable: 0, saw_503: false, ..cmd.clone() };
            let what = format!("{} ({:?} {})", cmd.key, cmd.op, cmd.task_id);
            match self.execute(again).await.outcome {
                Outcome::Accepted { version: v, replayed } if v == version && replayed => {}
                Outcome::Accepted { version: v, replayed } => {
                    mismatches.push(format!("{what}: first answer version {version}, replay answered version {v} (replayed: {replayed})"))
                }
                Outcome::Rejected { status, body } => mismatches.push(format!("{what}: replay answered {status}: {body}")),
                Outcome::Unresolved { .. } => inconclusive += 1,
            }
        }
        (mismatches, inconclusive)
    }

    /// The replay sample of a phase: every accepted command that met unavailability first (up to
    /// 100), and 20 others at random.
    pub fn replay_sample(&self, phase: usize) -> Vec<CommandRecord> {
        let journal = self.journal.lock().expect("journal");
        let accepted: Vec<&CommandRecord> = journal.iter().filter(|c| c.phase == phase && matches!(c.outcome, Outcome::Accepted { .. })).collect();
        let mut out: Vec<CommandRecord> = accepted.iter().filter(|c| c.unavailable > 0).take(100).map(|c| (*c).clone()).collect();
        let mut rng = rand::rng();
        for _ in 0..20.min(accepted.len()) {
            out.push(accepted[rng.random_range(0..accepted.len())].clone());
        }
        out
    }

    pub fn journal(&self) -> Vec<CommandRecord> {
        self.journal.lock().expect("journal").clone()
    }

    pub fn writes_ok(&self) -> Vec<Instant> {
        let mut v = self.writes_ok.lock().expect("writes").clone();
        v.sort();
        v
    }

    pub fn reads(&self) -> Vec<(Instant, bool)> {
        self.reads.lock().expect("reads").clone()
    }
}

#[cfg(test)]
impl CommandRecord {
    pub fn for_test(key: &str, user: &str, task_id: Uuid, op: Op, outcome: Outcome) -> Self {
        Self {
            seq: 0,
            key: key.into(),
            user: user.into(),
            op,
            task_id,
            method: Method::POST,
            path: String::new(),
            body: None,
            phase: 0,
            sent_at: Instant::now(),
            attempts: 1,
            unavailable: 0,
            saw_503: false,
            outcome,
        }
    }
}

/// The longest stretch inside `[from, to]` without a success (successes sorted).
pub fn longest_gap(successes: impl IntoIterator<Item = Instant>, from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for t in successes.into_iter().filter(|t| *t >= from && *t <= to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to.saturating_duration_since(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_counts_the_edges_of_the_window() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(longest_gap([at(100), at(200), at(900)], at(0), at(1000)), Duration::from_millis(700));
        assert_eq!(longest_gap([at(100)], at(0), at(1000)), Duration::from_millis(900), "until the end of the window");
        assert_eq!(longest_gap([], at(0), at(1000)), Duration::from_millis(1000), "no success at all");
        assert_eq!(longest_gap([at(50), at(2000)], at(100), at(1000)), Duration::from_millis(900), "successes outside are ignored");
    }
}
