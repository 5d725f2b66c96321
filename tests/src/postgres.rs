//! A private PostgreSQL cluster for tests that restart the database (the shared one stays up).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

pub struct PrivatePostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// initdb + start on a free port (Debian's server binaries, as `postgres` when run as root).
    pub async fn start() -> anyhow::Result<Self> {
        let pg = Self::init().await?;
        pg.start_server()?;
        Ok(pg)
    }

    /// initdb only: the cluster has its port (see [`url`](Self::url)) but nothing listens there
    /// until [`start_server`](Self::start_server).
    pub async fn init() -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("PostgreSQL server binaries not found in /usr/lib/postgresql (./dev test installs them)")?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .context("no /usr/lib/postgresql/*/bin/initdb")?;
        let dir = std::env::temp_dir().join(format!("ts-e2e-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let pg = Self { dir, bin, port: crate::free_port() };
        if is_root() {
            pg.run(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&pg.dir))?;
        }
        let data = pg.dir.join("data");
        pg.as_pg(&["initdb", "-A", "trust", "-U", "postgres", "--no-sync", "-D"], &[data.to_str().unwrap_or_default()])?;
        Ok(pg)
    }

    /// Starts the server (waits until it accepts connections).
    pub fn start_server(&self) -> anyhow::Result<()> {
        self.pg_ctl("start")
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A fast shutdown (every connection is cut) and a start again.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl("restart")
    }

    fn pg_ctl(&self, action: &str) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let log = self.dir.join("postgres.log");
        let options = format!("-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off", self.port, self.dir.display());
        self.as_pg(&["pg_ctl", action, "-w", "-m", "fast", "-D"], &[data.to_str().unwrap_or_default(), "-l", log.to_str().unwrap_or_default(), "-o", &options])
    }

    fn as_pg(&self, program_and_flags: &[&str], rest: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(program_and_flags[0]);
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        c.args(&program_and_flags[1..]).args(rest).current_dir(&self.dir);
        self.run(&mut c)
    }

    fn run(&self, c: &mut Command) -> anyhow::Result<()> {
        let out = c.output().with_context(|| format!("running {c:?}"))?;
        if !out.status.success() {
            bail!("{c:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.as_pg(&["pg_ctl", "stop", "-m", "immediate", "-D"], &[data.to_str().unwrap_or_default()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
