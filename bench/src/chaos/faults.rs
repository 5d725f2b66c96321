//! The faults, one at a time: what each does to the stack and when it counts as recovered.

use std::time::{Duration, Instant};

use crate::stack::{signal, Kind, Stack};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of command API 0, restarted at once.
    CommandApiKill,
    /// `kill -9` of the last of several command APIs, restarted after `FAILOVER_DOWN` (the others
    /// take its partitions meanwhile).
    CommandApiFailover,
    /// `kill -9` of projector 0, restarted at once.
    ProjectorKill,
    /// `kill -9` of the last of several projectors, restarted after `FAILOVER_DOWN`.
    ProjectorFailover,
    /// `kill -9` of the query API, restarted at once.
    QueryApiKill,
    /// `SIGSTOP` of the broker for `--pause-seconds`, then `SIGCONT`.
    KafkaPause,
    /// `kill -9` of the broker, started again.
    KafkaKill,
    /// PostgreSQL restarted with a fast shutdown.
    PostgresRestart,
}

/// How long a failed-over instance stays down.
const FAILOVER_DOWN: Duration = Duration::from_secs(15);
/// How long a killed service stays down before its restart (a supervisor's reaction time).
const RESTART_DELAY: Duration = Duration::from_secs(1);
const READY_TIMEOUT: Duration = Duration::from_secs(120);

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::CommandApiKill,
        Fault::CommandApiFailover,
        Fault::ProjectorKill,
        Fault::ProjectorFailover,
        Fault::QueryApiKill,
        Fault::KafkaPause,
        Fault::KafkaKill,
        Fault::PostgresRestart,
    ];
    /// The short run (`--short`): the faults that matter most.
    pub const SHORT: [Fault; 4] = [Fault::CommandApiKill, Fault::ProjectorKill, Fault::KafkaKill, Fault::PostgresRestart];

    pub fn name(self) -> &'static str {
        match self {
            Fault::CommandApiKill => "command-api-kill",
            Fault::CommandApiFailover => "command-api-failover",
            Fault::ProjectorKill => "projector-kill",
            Fault::ProjectorFailover => "projector-failover",
            Fault::QueryApiKill => "query-api-kill",
            Fault::KafkaPause => "kafka-pause",
            Fault::KafkaKill => "kafka-kill",
            Fault::PostgresRestart => "postgres-restart",
        }
    }

    pub fn parse(s: &str) -> Result<Fault, String> {
        Self::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|f| f.name()).collect();
            format!("unknown fault {s:?} (known: {})", known.join(", "))
        })
    }

    /// Why this fault cannot run on this stack, if it cannot.
    pub fn unavailable(self, stack: &Stack) -> Option<&'static str> {
        match self {
            Fault::CommandApiFailover if stack.count(Kind::CommandApi) < 2 => Some("needs 2 or more command APIs (--scale command-api=N)"),
            Fault::ProjectorFailover if stack.count(Kind::Projector) < 2 => Some("needs 2 or more projectors (--scale projector=M)"),
            Fault::KafkaPause | Fault::KafkaKill | Fault::PostgresRestart if stack.config.script.is_none() => {
                Some("the broker and the database are not this run's (KAFKA_BROKERS / DATABASE_URL were given)")
            }
            _ => None,
        }
    }

    /// What is done, for the progress lines and the report.
    pub fn describe(self, stack: &Stack, pause: Duration) -> String {
        let last = |k| stack.count(k) - 1;
        match self {
            Fault::CommandApiKill => format!("kill -9 command-api-0 (of {}), restart after {RESTART_DELAY:?}", stack.count(Kind::CommandApi)),
            Fault::CommandApiFailover => format!("kill -9 command-api-{}, restart after {FAILOVER_DOWN:?}", last(Kind::CommandApi)),
            Fault::ProjectorKill => format!("kill -9 projector-0 (of {}), restart after {RESTART_DELAY:?}", stack.count(Kind::Projector)),
            Fault::ProjectorFailover => format!("kill -9 projector-{}, restart after {FAILOVER_DOWN:?}", last(Kind::Projector)),
            Fault::QueryApiKill => format!("kill -9 query-api, restart after {RESTART_DELAY:?}"),
            Fault::KafkaPause => format!("SIGSTOP the Kafka broker for {pause:?}, then SIGCONT"),
            Fault::KafkaKill => format!("kill -9 the Kafka broker, start it again after {RESTART_DELAY:?}"),
            Fault::PostgresRestart => "restart PostgreSQL (fast shutdown)".to_owned(),
        }
    }

    /// Injects the fault and waits until what it broke is back (restarted and ready); returns when
    /// that was.
    pub async fn inject(self, stack: &mut Stack, pause: Duration) -> anyhow::Result<Instant> {
        match self {
            Fault::CommandApiKill => kill_and_restart(stack, Kind::CommandApi, 0, RESTART_DELAY).await,
            Fault::CommandApiFailover => kill_and_restart(stack, Kind::CommandApi, stack.count(Kind::CommandApi) - 1, FAILOVER_DOWN).await,
            Fault::ProjectorKill => kill_and_restart(stack, Kind::Projector, 0, RESTART_DELAY).await,
            Fault::ProjectorFailover => kill_and_restart(stack, Kind::Projector, stack.count(Kind::Projector) - 1, FAILOVER_DOWN).await,
            Fault::QueryApiKill => kill_and_restart(stack, Kind::QueryApi, 0, RESTART_DELAY).await,
            Fault::KafkaPause => {
                let pid = stack.kafka_pid().await?;
                signal(pid, "STOP")?;
                tokio::time::sleep(pause).await;
                signal(pid, "CONT")?;
                Ok(Instant::now())
            }
            Fault::KafkaKill => {
                let pid = stack.kafka_pid().await?;
                signal(pid, "KILL")?;
                while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(RESTART_DELAY).await;
                stack.kafka_start().await?;
                Ok(Instant::now())
            }
            Fault::PostgresRestart => {
                stack.postgres_restart().await?;
                Ok(Instant::now())
            }
        }
    }
}

async fn kill_and_restart(stack: &mut Stack, kind: Kind, index: usize, down: Duration) -> anyhow::Result<Instant> {
    let i = stack.find(kind, index);
    stack.kill(i).await?;
    tokio::time::sleep(down).await;
    stack.spawn(i)?;
    stack.wait_ready(i, READY_TIMEOUT).await?;
    Ok(Instant::now())
}
