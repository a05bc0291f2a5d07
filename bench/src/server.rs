//! The server under test: where its data lives (a fresh temp folder, or a freshly dropped
//! PostgreSQL database), the `fluxa serve` child process, and counting the events it has
//! processed straight from the `events` table, which works for a `--role worker` process too
//! (it has no HTTP listener, so no `/metrics`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::TryStreamExt;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Which of Fluxa's two backends a measurement runs on.
#[derive(Clone, Debug)]
pub enum Backend {
    /// SQLite files under the data folder.
    Embedded,
    /// The database at this URL, dropped before each scenario (the server recreates it).
    Postgres { url: String },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Postgres { .. } => "postgres",
        }
    }
}

/// Where one scenario's server keeps its data; every scenario gets an empty one.
pub struct Deployment {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
}

impl Deployment {
    /// An empty deployment: a new folder under `scratch`, and for PostgreSQL a dropped database.
    pub async fn fresh(backend: &Backend, scratch: &Path, name: &str) -> anyhow::Result<Self> {
        let data_dir = scratch.join(format!("{}-{name}", backend.name()));
        std::fs::create_dir_all(&data_dir)?;
        let database_url = match backend {
            Backend::Embedded => None,
            Backend::Postgres { url } => {
                drop_database(url).await?;
                Some(url.clone())
            }
        };
        Ok(Self {
            data_dir,
            database_url,
        })
    }
}

/// The database named in `url`, checked to be a bench database: the harness drops it.
pub fn bench_database_name(url: &str) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(url).context("the database URL does not parse")?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        bail!("the database name {name:?} must be non-empty letters, digits and underscores");
    }
    if !name.contains("bench") {
        bail!(
            "the harness drops and recreates the database {name:?} before every scenario; \
             refusing because its name does not contain \"bench\""
        );
    }
    Ok(name)
}

/// `url` with its database replaced by `database`.
pub fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).context("the database URL does not parse")?;
    parsed.set_path(&format!("/{database}"));
    Ok(parsed.into())
}

/// A one-connection pool on the server's maintenance database, for CREATE/DROP DATABASE.
pub async fn admin_pool(url: &str) -> anyhow::Result<PgPool> {
    let admin_url = with_database(url, "postgres")?;
    let options = PgConnectOptions::from_str(&admin_url)?;
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .context("cannot reach PostgreSQL's `postgres` database")
}

/// Drops the bench database named in `url`, with any session still on it.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let name = bench_database_name(url)?;
    let admin = admin_pool(url).await?;
    sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
        .execute(&admin)
        .await
        .with_context(|| format!("cannot drop the database {name}"))?;
    admin.close().await;
    Ok(())
}

/// `fluxa serve --role …`.
#[derive(Clone, Copy, Debug)]
pub enum Role {
    All,
    Api,
    Worker,
}

impl Role {
    fn arg(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Api => "api",
            Self::Worker => "worker",
        }
    }
}

/// A `fluxa serve` child process; dropping it kills the process.
pub struct Server {
    child: Child,
    addr: String,
    pub client: reqwest::Client,
}

impl Server {
    /// Starts `binary` on `deployment` and returns once it logged `fluxa started`.
    pub async fn start(
        binary: &Path,
        deployment: &Deployment,
        role: Role,
        workers: Option<usize>,
    ) -> anyhow::Result<Self> {
        Self::start_with(binary, deployment, role, workers, &[]).await
    }

    /// [`Server::start`] with more `serve` flags (retention, say).
    pub async fn start_with(
        binary: &Path,
        deployment: &Deployment,
        role: Role,
        workers: Option<usize>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        // The bench's own environment must not leak into the server (a stray FLUXA_API_TOKENS
        // would turn every request into a 401, a stray FLUXA_DATABASE_URL would move the
        // embedded run to PostgreSQL).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FLUXA_") {
                command.env_remove(key);
            }
        }
        command
            .args(["serve", "--bind", "127.0.0.1:0", "--role", role.arg()])
            .args(["--max-payload-bytes", "10485760"])
            .arg("--data-dir")
            .arg(&deployment.data_dir)
            .env("RUST_LOG", "warn,fluxa_server=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(url) = &deployment.database_url {
            command.env("FLUXA_DATABASE_URL", url);
        }
        if let Some(workers) = workers {
            command.args(["--workers", &workers.to_string()]);
        }
        command.args(extra);
        let mut child = command
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let addr = loop {
            let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .context("fluxa did not start within 60 s")??
            else {
                bail!("fluxa exited before it started");
            };
            let Ok(value) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if value["message"] == "fluxa started" {
                break value["addr"].as_str().unwrap_or_default().to_owned();
            }
        };
        // The pipe must keep draining, or the server blocks on a full stdout.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            child,
            addr,
            client,
        })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGTERM, then insists on a clean exit: a server that cannot stop cleanly under load is a
    /// finding, not noise.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the server already exited")?;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("cannot run `kill`")?;
        if !status.success() {
            bail!("`kill -TERM {pid}` failed");
        }
        let exit = tokio::time::timeout(Duration::from_secs(120), self.child.wait())
            .await
            .context("fluxa did not exit within 120 s of SIGTERM")??;
        if !exit.success() {
            bail!("fluxa exited with {exit} after SIGTERM");
        }
        Ok(())
    }

    /// The server's peak resident memory (VmHWM) so far.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        self.proc_status_bytes("VmHWM:")
    }

    /// The server's resident memory (VmRSS) now.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.proc_status_bytes("VmRSS:")
    }

    /// A `… kB` field of /proc/<pid>/status, in bytes.
    fn proc_status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let pid = self.child.id().context("the server exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc status"))?;
        Ok(kb * 1024)
    }

    /// The queue's gauges and the load-shedding figures from `GET /metrics` (the server reads
    /// the queue's depths at scrape time).
    pub async fn scrape(&self) -> anyhow::Result<Scrape> {
        let response = self
            .client
            .get(format!("{}/metrics", self.base_url()))
            .send()
            .await?;
        let status = response.status();
        if status != 200 {
            bail!("GET /metrics answered {status}");
        }
        let text = response.text().await?;
        let read = |name| gauge(&text, name).with_context(|| format!("no {name} in /metrics"));
        Ok(Scrape {
            pending: read("fluxa_queue_depth")?,
            in_flight: read("fluxa_queue_in_flight")?,
            dead_letters: read("fluxa_dlq_depth")?,
            // A counter appears with its first increment: absent means none shed yet.
            shed_total: gauge(&text, "fluxa_http_requests_shed_total").unwrap_or(0.0),
            connections: gauge(&text, "fluxa_http_connections_open"),
        })
    }
}

/// What one `GET /metrics` said.
#[derive(Clone, Copy, Debug)]
pub struct Scrape {
    /// `fluxa_queue_depth`: messages waiting to be received.
    pub pending: f64,
    /// `fluxa_queue_in_flight`: received, not yet acknowledged.
    pub in_flight: f64,
    /// `fluxa_dlq_depth`.
    pub dead_letters: f64,
    /// `fluxa_http_requests_shed_total`: requests the concurrency limit answered 503, which
    /// tells them from 503s for a backend the server found unavailable.
    pub shed_total: f64,
    /// `fluxa_http_connections_open`, where the server reports it.
    pub connections: Option<f64>,
}

/// The value of the unlabelled sample `name` in Prometheus text.
pub fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Reads how many rows the `events` table holds, while the server writes to it.
pub enum Counter {
    Embedded(SqlitePool),
    Postgres(PgPool),
}

impl Counter {
    /// Opens the deployment's store read-only; the server must have created it already.
    pub async fn open(deployment: &Deployment) -> anyhow::Result<Self> {
        match &deployment.database_url {
            None => {
                // WAL lets this reader see each commit without ever blocking the writer.
                let options = SqliteConnectOptions::new()
                    .filename(deployment.data_dir.join("store.db"))
                    .read_only(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .context("cannot open store.db read-only")?;
                Ok(Self::Embedded(pool))
            }
            Some(url) => {
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(PgConnectOptions::from_str(url)?)
                    .await
                    .context("cannot connect to the bench database")?;
                Ok(Self::Postgres(pool))
            }
        }
    }

    /// How many events are stored now: a lower bound while the server writes, cheap enough to
    /// read every few seconds during a run.
    pub async fn processed(&self) -> anyhow::Result<u64> {
        Ok(self.progress().await?.0)
    }

    /// Which of the events `prefix-0` … `prefix-(n-1)` are stored, by index.
    pub async fn stored(&self, prefix: &str, n: usize) -> anyhow::Result<Vec<bool>> {
        // A range on the primary key rather than LIKE, which neither backend may use an index
        // for; '.' is the character after '-'.
        let (low, high) = (format!("{prefix}-"), format!("{prefix}."));
        let sql = "SELECT event_id FROM events WHERE event_id >= $1 AND event_id < $2";
        let mut ids = match self {
            Self::Embedded(pool) => sqlx::query_scalar::<_, String>(sql)
                .bind(&low)
                .bind(&high)
                .fetch(pool),
            Self::Postgres(pool) => sqlx::query_scalar::<_, String>(sql)
                .bind(&low)
                .bind(&high)
                .fetch(pool),
        };
        let mut stored = vec![false; n];
        while let Some(id) = ids.try_next().await? {
            let i = id.strip_prefix(&low).and_then(|i| i.parse::<usize>().ok());
            match i {
                Some(i) if i < n => stored[i] = true,
                _ => bail!("an unexpected event {id:?} is stored"),
            }
        }
        Ok(stored)
    }

    /// The exact number of rows.
    pub async fn count(&self) -> anyhow::Result<u64> {
        let n: i64 = match self {
            Self::Embedded(pool) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM events")
                    .fetch_one(pool)
                    .await?
            }
            Self::Postgres(pool) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM events")
                    .fetch_one(pool)
                    .await?
            }
        };
        Ok(u64::try_from(n)?)
    }

    /// A cheap reading that never exceeds the count, and whether it is the count: SQLite's
    /// largest rowid is found in one b-tree descent and equals the row count while rows are
    /// only ever inserted, whereas COUNT(*) scans the table, and polling that every 50 ms would
    /// take CPU from the server in proportion to the backlog and so bias the 200k:10k ratio.
    /// PostgreSQL has no such shortcut for a text primary key, so it counts (see `wait_for` for
    /// how often).
    async fn progress(&self) -> anyhow::Result<(u64, bool)> {
        match self {
            Self::Embedded(pool) => {
                let max: Result<Option<i64>, _> =
                    sqlx::query_scalar("SELECT MAX(rowid) FROM events")
                        .fetch_one(pool)
                        .await;
                match max {
                    Ok(max) => Ok((u64::try_from(max.unwrap_or(0))?, false)),
                    // A WITHOUT ROWID table has no rowid to ask for.
                    Err(_) => Ok((self.count().await?, true)),
                }
            }
            Self::Postgres(_) => Ok((self.count().await?, true)),
        }
    }

    /// Polls until the table holds at least `n` rows, or until `limit` has passed since
    /// `since`, and says how far it got.
    ///
    /// Polls at most every 50 ms, and never more often than 20× the last reading took, so the
    /// poller costs the server at most ~5% of one core however large the table grows. A reading
    /// is dated when it was asked for: the rows it saw were there by then.
    pub async fn wait_for(
        &self,
        n: u64,
        since: Instant,
        limit: Duration,
    ) -> anyhow::Result<Progress> {
        let mut last = 0;
        loop {
            let asked = Instant::now();
            let (mut seen, exact) = self.progress().await?;
            // The shortcut is trusted only to say when to count; the count decides.
            if seen >= n && !exact {
                seen = self.count().await?;
            }
            let progress = Progress {
                processed: seen,
                elapsed: asked.duration_since(since),
                complete: seen >= n,
            };
            if progress.complete || progress.elapsed > limit {
                return Ok(progress);
            }
            if seen < last {
                bail!("the events table shrank from {last} to {seen} rows");
            }
            last = seen;
            let pause = (asked.elapsed() * 20).max(Duration::from_millis(50));
            tokio::time::sleep(pause).await;
        }
    }
}

/// How many events a server had processed how long after a start.
pub struct Progress {
    pub processed: u64,
    pub elapsed: Duration,
    /// Whether every awaited event was processed.
    pub complete: bool,
}

impl Progress {
    pub fn rate(&self) -> f64 {
        self.processed as f64 / self.elapsed.as_secs_f64()
    }

    /// Only complete progress, for figures that mean nothing when cut short.
    pub fn completed(self) -> anyhow::Result<Self> {
        if !self.complete {
            bail!(
                "only {} events processed after {:.0} s",
                self.processed,
                self.elapsed.as_secs_f64()
            );
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_database_named_like_a_bench_database_may_be_dropped() {
        let name = bench_database_name("postgres://postgres@127.0.0.1:5432/fluxa_bench").unwrap();
        assert_eq!(name, "fluxa_bench");
        assert!(bench_database_name("postgres://postgres@127.0.0.1:5432/fluxa").is_err());
        assert!(bench_database_name("postgres://postgres@127.0.0.1:5432/").is_err());
        assert!(bench_database_name("postgres://h/bench\"; DROP").is_err());
    }

    #[test]
    fn a_gauge_is_read_from_its_unlabelled_sample_only() {
        let text = "# TYPE fluxa_queue_depth gauge\nfluxa_queue_depth 12\n\
                    fluxa_queue_depth_max 99\nfluxa_dlq_depth{queue=\"x\"} 5\nfluxa_dlq_depth 0\n";
        assert_eq!(gauge(text, "fluxa_queue_depth"), Some(12.0));
        assert_eq!(gauge(text, "fluxa_dlq_depth"), Some(0.0));
        assert_eq!(gauge(text, "fluxa_queue_in_flight"), None);
    }

    #[test]
    fn swapping_the_database_keeps_host_port_user_and_password() {
        let url = with_database(
            "postgres://u:p%40ss@db.example:6543/fluxa_bench?sslmode=disable",
            "postgres",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u:p%40ss@db.example:6543/postgres?sslmode=disable"
        );
    }
}
