//! The self-hosted runtime: [`Config`] in, backends opened, then the API and/or the worker pool
//! run until the shutdown token is cancelled. The `fluxa` binary is a thin CLI over this.
//!
//! Entry points take a pre-bound listener and a `CancellationToken`, so tests can bind port 0
//! and stop a server without signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use fluxa_api::{ApiToken, AppState, Limits};
use fluxa_blob::BlobStore;
use fluxa_processor::{Processor, ProcessorConfig};
use fluxa_queue::Queue;
use fluxa_store::{EventReader, Store};
use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Which parts of Fluxa a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The API and the workers (the default).
    All,
    /// Only the HTTP API.
    Api,
    /// Only the queue workers.
    Worker,
}

impl Role {
    fn runs_api(self) -> bool {
        matches!(self, Self::All | Self::Api)
    }

    fn runs_workers(self) -> bool {
        matches!(self, Self::All | Self::Worker)
    }
}

/// Default worker count on the embedded backend: its writes are group-committed, so more
/// concurrent workers share more fsyncs (16 roughly doubles throughput over 4 in `bench/`).
pub const DEFAULT_WORKERS_EMBEDDED: usize = 16;

/// Default worker count on PostgreSQL: each worker may hold a connection, and replicas share
/// the server's connection limit.
pub const DEFAULT_WORKERS_POSTGRES: usize = 4;

/// Everything `fluxa serve` needs, validated by [`Config::validate`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the API listens.
    pub bind: SocketAddr,
    /// Folder of the embedded backends: `store.db`, `queue.db` and `blobs/` (with PostgreSQL,
    /// only `blobs/`).
    pub data_dir: PathBuf,
    /// A `postgres://` URL puts the store and the queue on PostgreSQL; `None` keeps them
    /// embedded in SQLite.
    pub database_url: Option<SecretString>,
    pub role: Role,
    /// Concurrent processor workers in this process.
    pub workers: usize,
    pub limits: Limits,
    /// How long a received message stays hidden before it is delivered again.
    pub visibility_timeout: Duration,
    /// How long a worker's claim on an event id stays exclusive.
    pub lease: Duration,
    /// Receives after which a failing message is dead-lettered as `retries_exhausted`.
    pub max_receives: u32,
    /// First retry delay after a transient failure (doubles per receive).
    pub retry_backoff: Duration,
    /// Upper bound on the retry delay.
    pub retry_backoff_max: Duration,
    /// How often workers look for orphaned payload blobs.
    pub blob_sweep_interval: Duration,
    /// Blobs younger than this are never swept (their ingest may still be enqueuing).
    pub blob_grace: Duration,
    /// API tokens (`SCOPES=TOKEN,…`); `None` turns authentication off.
    pub api_tokens: Option<SecretString>,
    /// Allows serving without tokens on a non-loopback address.
    pub insecure_no_auth: bool,
}

impl Config {
    /// A configuration with the documented defaults, keeping data under `data_dir`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            database_url: None,
            role: Role::All,
            workers: DEFAULT_WORKERS_EMBEDDED,
            limits: Limits::default(),
            visibility_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            max_receives: 3,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            blob_sweep_interval: Duration::from_secs(600),
            blob_grace: Duration::from_secs(3600),
            api_tokens: None,
            insecure_no_auth: false,
        }
    }

    /// Refuses configurations that would run but misbehave.
    pub fn validate(&self) -> anyhow::Result<Vec<ApiToken>> {
        anyhow::ensure!(
            self.workers >= 1 || !self.role.runs_workers(),
            "--workers must be at least 1"
        );
        anyhow::ensure!(self.max_receives >= 1, "--max-receives must be at least 1");
        anyhow::ensure!(
            !self.visibility_timeout.is_zero() && !self.lease.is_zero(),
            "--visibility-timeout and --lease must be positive"
        );
        anyhow::ensure!(
            !self.blob_sweep_interval.is_zero() && self.blob_grace >= Duration::from_secs(1),
            "--blob-sweep-interval must be positive and --blob-grace at least 1s"
        );
        anyhow::ensure!(
            self.limits.max_payload_bytes >= 1 && self.limits.max_batch_bytes >= 1,
            "--max-payload-bytes and --max-batch-bytes must be positive"
        );
        if let Some(url) = &self.database_url {
            anyhow::ensure!(
                fluxa_postgres::is_postgres_url(url),
                "--database-url must be a postgres:// or postgresql:// URL"
            );
        }
        let tokens = match &self.api_tokens {
            Some(spec) => ApiToken::parse_list(spec)?,
            None => Vec::new(),
        };
        if tokens.is_empty()
            && self.role.runs_api()
            && !self.bind.ip().is_loopback()
            && !self.insecure_no_auth
        {
            anyhow::bail!(
                "refusing to serve on {} without API tokens: set FLUXA_API_TOKENS, bind to a \
                 loopback address, or pass --insecure-no-auth",
                self.bind
            );
        }
        Ok(tokens)
    }
}

/// The opened backends.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub reader: Arc<dyn EventReader>,
    pub queue: Arc<dyn Queue>,
    pub blobs: BlobStore,
}

/// Opens (and migrates) the backends `config` names.
pub async fn open_backends(config: &Config) -> anyhow::Result<Backends> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "failed to create data directory {}",
            config.data_dir.display()
        )
    })?;
    let (store, reader, queue): (Arc<dyn Store>, Arc<dyn EventReader>, Arc<dyn Queue>) =
        match &config.database_url {
            None => {
                let queue_config = fluxa_sqlite::QueueConfig {
                    visibility_timeout: config.visibility_timeout,
                    max_receives: config.max_receives,
                };
                let sqlite = fluxa_sqlite::open(&config.data_dir, queue_config)
                    .await
                    .context("failed to open the embedded store and queue")?;
                (
                    Arc::new(sqlite.store),
                    Arc::new(sqlite.reader),
                    Arc::new(sqlite.queue),
                )
            }
            Some(url) => {
                let queue_config = fluxa_postgres::QueueConfig {
                    visibility_timeout: config.visibility_timeout,
                    max_receives: config.max_receives,
                };
                // Every worker may hold a connection, plus room for API requests.
                let pool_size = u32::try_from(config.workers)
                    .unwrap_or(u32::MAX)
                    .saturating_add(8);
                let pg = fluxa_postgres::open(url, pool_size, queue_config)
                    .await
                    .context("failed to open the PostgreSQL store and queue")?;
                (Arc::new(pg.store), Arc::new(pg.reader), Arc::new(pg.queue))
            }
        };
    let blobs = BlobStore::local(&config.data_dir.join("blobs"))
        .context("failed to open the local blob store")?;
    Ok(Backends {
        store,
        reader,
        queue,
        blobs,
    })
}

/// Names the store/queue backend for logs: never the URL itself (it may hold a password).
pub fn backend_name(config: &Config) -> String {
    match &config.database_url {
        None => "sqlite".to_owned(),
        Some(url) => format!("postgres ({})", fluxa_postgres::describe_url(url)),
    }
}

/// Binds the configured address.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("failed to bind {}", config.bind))
}

/// Runs Fluxa until `shutdown` is cancelled, then stops accepting, finishes in-flight requests
/// and messages, and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tokens = config.validate()?;
    let backends = open_backends(&config).await?;
    let local_addr = listener
        .local_addr()
        .context("the listener has no local address")?;

    let api = config.role.runs_api().then(|| {
        let state = AppState {
            queue: Arc::clone(&backends.queue),
            blobs: backends.blobs.clone(),
            reader: Arc::clone(&backends.reader),
            limits: config.limits,
            tokens: Arc::new(tokens),
            metrics: fluxa_telemetry::metrics_handle(),
        };
        let app = fluxa_api::app(state);
        let shutdown = shutdown.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
                .context("the HTTP server failed")
        }
    });
    let workers = config.role.runs_workers().then(|| {
        let processor = Processor::new(
            Arc::clone(&backends.store),
            backends.blobs.clone(),
            ProcessorConfig {
                lease: config.lease,
                max_receives: config.max_receives,
                backoff_base: config.retry_backoff,
                backoff_max: config.retry_backoff_max,
            },
        );
        let sweeper = fluxa_processor::run_blob_sweeper(
            Arc::clone(&backends.queue),
            backends.blobs.clone(),
            config.blob_sweep_interval,
            config.blob_grace,
            shutdown.clone(),
        );
        let workers = fluxa_processor::run_workers(
            processor,
            Arc::clone(&backends.queue),
            config.workers,
            shutdown.clone(),
        );
        async move {
            tokio::join!(workers, sweeper);
        }
    });

    tracing::info!(
        addr = %local_addr,
        role = ?config.role,
        workers = if config.role.runs_workers() { config.workers } else { 0 },
        data_dir = %config.data_dir.display(),
        backend = backend_name(&config),
        "fluxa started"
    );
    let api_task = async {
        match api {
            Some(api) => api.await,
            None => {
                shutdown.cancelled().await;
                Ok(())
            }
        }
    };
    let worker_task = async {
        if let Some(workers) = workers {
            workers.await;
        }
    };
    let (api_result, ()) = tokio::join!(api_task, worker_task);
    tracing::info!("fluxa stopped");
    api_result
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error.message = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received; shutting down"),
            () = terminate => tracing::info!("SIGTERM received; shutting down"),
        }
        token.cancel();
    });
}
