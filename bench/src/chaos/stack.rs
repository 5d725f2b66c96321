//! The stack under test: the service processes (N command APIs, M projectors, one query API, each
//! instance on its base port + 100 x i as `./dev up --scale` starts them), and the broker and the
//! database, which only `deploy/local/chaos.sh` touches (when the run owns them).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    CommandApi,
    Projector,
    QueryApi,
}

impl Kind {
    pub fn binary(self) -> &'static str {
        match self {
            Kind::CommandApi => "command-api",
            Kind::Projector => "projector",
            Kind::QueryApi => "query-api",
        }
    }
}

/// One service instance.
pub struct Instance {
    pub kind: Kind,
    pub index: usize,
    pub port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Instance {
    pub fn name(&self) -> String {
        format!("{}-{}", self.kind.binary(), self.index)
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// Where things are and how the services are configured.
pub struct StackConfig {
    pub bin_dir: PathBuf,
    pub log_dir: PathBuf,
    /// Settings every service gets (Kafka, database, topic, secrets...).
    pub env: Vec<(String, String)>,
    pub command_apis: usize,
    pub projectors: usize,
    /// The base ports: command API, query API, projector (instance i: + 100 x i).
    pub base_port: u16,
    /// `deploy/local/chaos.sh`, when this run may stop the broker and restart the database.
    pub script: Option<PathBuf>,
}

pub struct Stack {
    pub config: StackConfig,
    pub instances: Vec<Instance>,
    http: reqwest::Client,
}

impl Stack {
    pub fn new(config: StackConfig) -> anyhow::Result<Self> {
        let port = |base: u16, i: usize| base + 100 * i as u16;
        let command_urls: Vec<String> = (0..config.command_apis).map(|i| format!("http://127.0.0.1:{}", port(config.base_port, i))).collect();
        let mut instances = Vec::new();
        for (i, url) in command_urls.iter().enumerate() {
            let p = port(config.base_port, i);
            instances.push(Instance {
                kind: Kind::CommandApi,
                index: i,
                port: p,
                env: vec![
                    ("COMMAND_API_ADDR".into(), format!("127.0.0.1:{p}")),
                    ("COMMAND_API_INSTANCE_ID".into(), format!("command-api-{i}")),
                    ("COMMAND_API_ADVERTISED_URL".into(), url.clone()),
                ],
                child: None,
            });
        }
        for i in 0..config.projectors {
            let p = port(config.base_port + 2, i);
            instances.push(Instance {
                kind: Kind::Projector,
                index: i,
                port: p,
                env: vec![
                    ("PROJECTOR_ADDR".into(), format!("127.0.0.1:{p}")),
                    ("PROJECTOR_INSTANCE_ID".into(), format!("projector-{i}")),
                    // Each projector sends its reactions to one command API (any accepts any command).
                    ("COMMAND_API_URL".into(), command_urls[i % command_urls.len()].clone()),
                ],
                child: None,
            });
        }
        let p = config.base_port + 1;
        instances.push(Instance { kind: Kind::QueryApi, index: 0, port: p, env: vec![("QUERY_API_ADDR".into(), format!("127.0.0.1:{p}"))], child: None });
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        Ok(Self { config, instances, http })
    }

    /// The index (in `instances`) of instance `index` of `kind`.
    pub fn find(&self, kind: Kind, index: usize) -> usize {
        self.instances.iter().position(|s| s.kind == kind && s.index == index).expect("no such instance")
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.instances.iter().filter(|s| s.kind == kind).count()
    }

    pub fn urls(&self, kind: Kind) -> Vec<String> {
        self.instances.iter().filter(|s| s.kind == kind).map(Instance::url).collect()
    }

    /// Starts every instance and waits until all are ready.
    pub async fn start_all(&mut self) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.config.log_dir)?;
        for i in 0..self.instances.len() {
            self.spawn(i)?;
        }
        for i in 0..self.instances.len() {
            self.wait_ready(i, Duration::from_secs(120)).await?;
        }
        Ok(())
    }

    /// Starts instance `i` (its output appended to `<log_dir>/<name>.log`).
    pub fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let s = &self.instances[i];
        let exe = self.config.bin_dir.join(s.kind.binary());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.config.log_dir.join(format!("{}.log", s.name())))?;
        let child = Command::new(&exe)
            .envs(self.config.env.iter().cloned())
            .envs(s.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        self.instances[i].child = Some(child);
        Ok(())
    }

    /// Polls `/readyz` of instance `i` until it answers 200; returns how long that took.
    pub async fn wait_ready(&mut self, i: usize, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let url = format!("{}/readyz", self.instances[i].url());
        loop {
            if let Some(child) = self.instances[i].child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    anyhow::bail!("{} exited ({status}) before it was ready; see {}", self.instances[i].name(), self.log_of(i).display());
                }
            }
            if self.http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                return Ok(started.elapsed());
            }
            anyhow::ensure!(started.elapsed() < timeout, "{} was not ready within {timeout:?}; see {}", self.instances[i].name(), self.log_of(i).display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_of(&self, i: usize) -> PathBuf {
        self.config.log_dir.join(format!("{}.log", self.instances[i].name()))
    }

    /// `kill -9` of instance `i`, waiting until it is gone.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.instances[i].child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// SIGTERM to every instance, then SIGKILL to those still running after 20 s.
    pub async fn stop_all(&mut self) {
        for s in &self.instances {
            if let Some(pid) = s.child.as_ref().and_then(Child::id) {
                let _ = signal(pid, "TERM");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for s in &mut self.instances {
            if let Some(mut child) = s.child.take() {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, child.wait()).await.is_err() {
                    eprintln!("{} did not stop within 20 s; killing it", s.name());
                    let _ = child.kill().await;
                }
            }
        }
    }

    /// The projector CLI (`projector rebuild ...`) against this stack.
    pub fn projector_cli(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.config.bin_dir.join("projector"));
        c.envs(self.config.env.iter().cloned()).args(args).kill_on_drop(true);
        c
    }

    fn script(&self) -> anyhow::Result<&PathBuf> {
        self.config.script.as_ref().context("no --stack-script: this run does not own the broker and the database")
    }

    async fn run_script(&self, action: &str) -> anyhow::Result<String> {
        let out = Command::new(self.script()?).arg(action).stdin(Stdio::null()).output().await?;
        anyhow::ensure!(out.status.success(), "chaos.sh {action} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub async fn kafka_pid(&self) -> anyhow::Result<u32> {
        let out = self.run_script("kafka-pid").await?;
        out.parse().with_context(|| format!("chaos.sh kafka-pid printed {out:?}"))
    }

    pub async fn kafka_start(&self) -> anyhow::Result<()> {
        self.run_script("kafka-start").await.map(drop)
    }

    pub async fn postgres_restart(&self) -> anyhow::Result<()> {
        self.run_script("postgres-restart").await.map(drop)
    }
}

/// Sends `SIG<name>` to `pid` (the `kill` command: no unsafe code for one call).
pub fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}
