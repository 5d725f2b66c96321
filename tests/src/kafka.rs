//! A private, throw-away Kafka broker for tests that take the broker down (the shared one must stay
//! up for the other tests). Uses the jars `./dev` fetched (`TASKSTREAM_KAFKA_LIBS`).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio::process::{Child, Command};

pub struct PrivateBroker {
    pub port: u16,
    controller_port: u16,
    dir: PathBuf,
    libs: String,
    child: Option<Child>,
}

impl PrivateBroker {
    pub async fn start() -> anyhow::Result<Self> {
        let libs = test_support::required_env("TASKSTREAM_KAFKA_LIBS");
        let port = crate::free_port();
        let controller_port = crate::free_port();
        let dir = std::env::temp_dir().join(format!("ts-broker-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(dir.join("data"))?;
        let props = format!(
            "node.id=1\nprocess.roles=broker,controller\n\
             listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{port}\ncontroller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             controller.quorum.voters=1@127.0.0.1:{controller_port}\nlog.dirs={}\n\
             offsets.topic.replication.factor=1\ntransaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\ngroup.initial.rebalance.delay.ms=0\nauto.create.topics.enable=false\n\
             group.consumer.min.session.timeout.ms=1000\ngroup.consumer.session.timeout.ms=6000\n\
             group.consumer.min.heartbeat.interval.ms=250\ngroup.consumer.heartbeat.interval.ms=1000\n",
            dir.join("data").display()
        );
        std::fs::write(dir.join("server.properties"), props)?;
        let status = Command::new("java")
            .args(["-cp", &format!("{libs}/*"), "kafka.tools.StorageTool", "format", "-t", "e2eBrokerClusterId0001", "-c"])
            .arg(dir.join("server.properties"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("formatting the private broker's storage failed");
        }
        let mut b = Self { port, controller_port, dir, libs, child: None };
        b.resume().await?;
        Ok(b)
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Takes the broker down hard (SIGKILL).
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().await?;
        }
        Ok(())
    }

    /// Starts (again) on the same ports and data, and waits for the port.
    pub async fn resume(&mut self) -> anyhow::Result<()> {
        let _ = self.controller_port;
        let child = Command::new("java")
            .args(["-Xmx512m", "-Xms128m", "-XX:+UseSerialGC", "-cp", &format!("{}/*", self.libs)])
            .arg(format!("-Dkafka.logs.dir={}", self.dir.join("logs").display()))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            if Instant::now() > deadline {
                bail!("private broker did not open its port");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
