//! The self-hosted runtime: [`Config`] in, backends opened, then the API and/or the worker pool
//! run until the shutdown token is cancelled. The `fluxa` binary is a thin CLI over this.
//!
//! Entry points take a pre-bound listener and a `CancellationToken`, so tests can bind port 0
//! and stop a server without signals. [`http`] is the connection loop the API is served with:
//! timeouts, the connection cap and the shutdown deadline.

use std::sync::Arc;

use anyhow::Context;
use fluxa_api::AppState;
use fluxa_blob::BlobStore;
use fluxa_processor::{Processor, ProcessorConfig};
use fluxa_queue::{BlobReferences, Consumer, DeadLetterAdmin, Producer};
use fluxa_store::{EventReader, Store, StoreAdmin};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod config;
pub mod http;
pub mod sqs;

pub use config::{
    setting_named, BackendChoice, BlobBackend, Config, FlagKind, PgLocation, QueueBackend, Role,
    Setting, Sources, StoreBackend, ValidatedConfig, CONFIG_FILE_ENV, DEFAULT_WORKERS_EMBEDDED,
    DEFAULT_WORKERS_POSTGRES, SETTINGS,
};

/// The opened backends.
pub struct Backends {
    pub store: Arc<dyn Store>,
    pub reader: Arc<dyn EventReader>,
    pub store_admin: Arc<dyn StoreAdmin>,
    pub queue: QueueHandles,
    pub blobs: BlobStore,
    /// With an SQS queue: what moves its DLQ into the store (run beside the workers).
    pub dead_letter_drain: Option<DeadLetterDrain>,
}

/// The SQS dead-letter queue and the store table its messages are recorded in.
#[derive(Clone, Debug)]
pub struct DeadLetterDrain {
    pub queue: fluxa_aws::sqs::SqsQueue,
    pub table: fluxa_postgres::DeadLetterTable,
}

/// One queue backend, seen through each of its capabilities.
#[derive(Clone)]
pub struct QueueHandles {
    pub producer: Arc<dyn Producer>,
    pub consumer: Arc<dyn Consumer>,
    pub dead_letters: Arc<dyn DeadLetterAdmin>,
    pub blob_references: Arc<dyn BlobReferences>,
}

impl QueueHandles {
    fn of<Q>(queue: Q) -> Self
    where
        Q: Producer + Consumer + DeadLetterAdmin + BlobReferences,
    {
        let queue = Arc::new(queue);
        Self {
            producer: queue.clone(),
            consumer: queue.clone(),
            dead_letters: queue.clone(),
            blob_references: queue,
        }
    }
}

/// The store's three sides: writes (the processor's), reads (the query API's) and deletes
/// (operators' and the pruner's).
#[derive(Clone)]
pub struct StoreHandles {
    pub store: Arc<dyn Store>,
    pub reader: Arc<dyn EventReader>,
    pub admin: Arc<dyn StoreAdmin>,
}

impl StoreHandles {
    fn of<S, R>(store: S, reader: R) -> Self
    where
        S: Store + StoreAdmin,
        R: EventReader,
    {
        let store = Arc::new(store);
        Self {
            store: store.clone(),
            reader: Arc::new(reader),
            admin: store,
        }
    }
}

/// Opens (and migrates) the backends `config` names.
pub async fn open_backends(config: &Config) -> anyhow::Result<Backends> {
    open_chosen(config, &config.backends()?).await
}

/// Opens (and migrates) the backends a validated configuration names.
pub async fn open_validated(validated: &ValidatedConfig) -> anyhow::Result<Backends> {
    open_chosen(validated.config(), validated.backends()).await
}

/// Opens `choice`. The store and a database queue share one connection set
/// (`fluxa_sqlite::open` and `fluxa_postgres::open` open both at once, and two writers on one
/// SQLite file would only contend); an SQS queue comes with the PostgreSQL store alone.
async fn open_chosen(config: &Config, choice: &BackendChoice) -> anyhow::Result<Backends> {
    let blobs = open_blobs(&choice.blobs)?;
    if let QueueBackend::Sqs { url } = &choice.queue {
        let StoreBackend::Postgres { url: location } = &choice.store else {
            anyhow::bail!("an SQS queue needs the store on PostgreSQL");
        };
        let database_url = location.url().await?;
        let store = fluxa_postgres::open_store(
            &database_url,
            fluxa_postgres::PoolSizes {
                writer: writer_pool_size(config),
                reader: fluxa_postgres::READER_POOL_SIZE,
            },
        )
        .await
        .context("failed to open the PostgreSQL store")?;
        let queue = fluxa_aws::sqs::SqsQueue::connect(url.clone())
            .await
            .context("failed to open the SQS queue")?
            .with_visibility_timeout(config.visibility_timeout);
        let dead_letters = sqs::SqsDeadLetters::new(queue.clone(), store.dead_letters.clone());
        let queue_arc = Arc::new(queue.clone());
        let handles = StoreHandles::of(store.store, store.reader);
        return Ok(Backends {
            store: handles.store,
            reader: handles.reader,
            store_admin: handles.admin,
            queue: QueueHandles {
                producer: queue_arc.clone(),
                consumer: queue_arc,
                dead_letters: Arc::new(dead_letters),
                blob_references: Arc::new(sqs::LifecycleRuleCollectsBlobs),
            },
            blobs,
            dead_letter_drain: Some(DeadLetterDrain {
                queue,
                table: store.dead_letters,
            }),
        });
    }
    let (store, queue) = open_store_and_queue(config, &choice.store).await?;
    Ok(Backends {
        store: store.store,
        reader: store.reader,
        store_admin: store.admin,
        queue,
        blobs,
        dead_letter_drain: None,
    })
}

/// Opens (and migrates) the store `backend` names.
pub async fn open_store(config: &Config, backend: &StoreBackend) -> anyhow::Result<StoreHandles> {
    Ok(open_store_and_queue(config, backend).await?.0)
}

/// Every worker may hold a connection, plus room for API requests.
fn writer_pool_size(config: &Config) -> u32 {
    u32::try_from(config.workers)
        .unwrap_or(u32::MAX)
        .saturating_add(8)
}

/// Opens the blob store `backend` names: a local folder (created if missing), or an S3 client
/// built from the standard AWS settings. Nothing is sent to S3 here; readiness
/// (`BlobStore::check`) finds a missing bucket or refused credentials.
pub fn open_blobs(backend: &BlobBackend) -> anyhow::Result<BlobStore> {
    match backend {
        BlobBackend::Fs { root } => BlobStore::local(root)
            .with_context(|| format!("failed to open the local blob store {}", root.display())),
        // The context names the bucket only; fluxa_blob's errors hold no credential.
        BlobBackend::S3 { bucket, prefix } => BlobStore::s3(bucket, prefix)
            .with_context(|| format!("failed to open the S3 blob store s3://{bucket}/{prefix}")),
    }
}

async fn open_store_and_queue(
    config: &Config,
    backend: &StoreBackend,
) -> anyhow::Result<(StoreHandles, QueueHandles)> {
    match backend {
        StoreBackend::Sqlite { data_dir } => {
            std::fs::create_dir_all(data_dir).with_context(|| {
                format!("failed to create data directory {}", data_dir.display())
            })?;
            let queue_config = fluxa_sqlite::QueueConfig {
                visibility_timeout: config.visibility_timeout,
                max_receives: config.max_receives,
            };
            let sqlite = fluxa_sqlite::open(data_dir, queue_config)
                .await
                .context("failed to open the embedded store and queue")?;
            Ok((
                StoreHandles::of(sqlite.store, sqlite.reader),
                QueueHandles::of(sqlite.queue),
            ))
        }
        StoreBackend::Postgres { url } => {
            let queue_config = fluxa_postgres::QueueConfig {
                visibility_timeout: config.visibility_timeout,
                max_receives: config.max_receives,
            };
            let url = url.url().await?;
            let pg = fluxa_postgres::open(&url, writer_pool_size(config), queue_config)
                .await
                .context("failed to open the PostgreSQL store and queue")?;
            Ok((
                StoreHandles::of(pg.store, pg.reader),
                QueueHandles::of(pg.queue),
            ))
        }
    }
}

/// What the API's handlers share, over opened backends: the server's, and the CLI's when it
/// works on the backends directly (it then runs the same handlers in-process).
pub fn app_state(validated: &ValidatedConfig, backends: &Backends) -> AppState {
    AppState {
        queue: Some(Arc::clone(&backends.queue.producer)),
        dead_letters: Some(Arc::clone(&backends.queue.dead_letters)),
        blobs: Some(backends.blobs.clone()),
        reader: Some(Arc::clone(&backends.reader)),
        store_admin: Some(Arc::clone(&backends.store_admin)),
        limits: validated.config().limits,
        tokens: Arc::new(validated.tokens().to_vec()),
        metrics: fluxa_telemetry::metrics_handle(),
    }
}

/// Names the store/queue backend for logs: never the URL itself (it may hold a password).
pub fn backend_name(config: &Config) -> String {
    match config.backends() {
        Ok(BackendChoice {
            store: StoreBackend::Postgres { url },
            queue: QueueBackend::Sqs { url: queue_url },
            ..
        }) => format!("postgres ({}), queue sqs ({queue_url})", url.describe()),
        Ok(BackendChoice {
            store: StoreBackend::Postgres { url },
            ..
        }) => format!("postgres ({})", url.describe()),
        _ => "sqlite".to_owned(),
    }
}

/// Clients the kernel holds, connected but not yet accepted. tokio's `bind` asks for 128, which
/// a burst fills while the server is at its connection cap; past it new clients' handshakes are
/// dropped and retried only after seconds. Linux caps it at `net.core.somaxconn` (4096).
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the configured address.
pub async fn bind(config: &Config) -> anyhow::Result<TcpListener> {
    let bound = || -> std::io::Result<TcpListener> {
        let socket = if config.bind.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does, so a restart does not wait out TIME_WAIT.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(config.bind)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bound().with_context(|| format!("failed to bind {}", config.bind))
}

/// Runs Fluxa until `shutdown` is cancelled, then stops accepting, finishes in-flight requests
/// and messages, and returns. Requests get at most `shutdown_grace` to finish; connections
/// still open after it are dropped, so a stalled client cannot keep the process alive.
pub async fn run(
    validated: ValidatedConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = validated.config();
    // Before anything opens a file: the database and the connection cap both need the room.
    let file_limit = http::raise_file_limit();
    let backends = open_validated(&validated).await?;
    let local_addr = listener
        .local_addr()
        .context("the listener has no local address")?;

    let serve_options = http::ServeOptions::new(config, file_limit);
    let api = config.role.runs_api().then(|| {
        let app = fluxa_api::app(app_state(&validated, &backends));
        let shutdown = shutdown.clone();
        http::serve(listener, app, serve_options, shutdown)
    });
    let workers = config.role.runs_workers().then(|| {
        let processor = Processor::new(
            Arc::clone(&backends.store),
            backends.blobs.clone(),
            ProcessorConfig {
                lease: config.lease,
                backoff_base: config.retry_backoff,
                backoff_max: config.retry_backoff_max,
                max_blob_memory: config.max_blob_memory,
            },
        );
        // With an SQS queue nothing can tell an orphan from a waiting message's payload: the
        // bucket's lifecycle rule collects orphans, and listing the bucket every interval
        // would only cost requests.
        let sweeper = backends.dead_letter_drain.is_none().then(|| {
            fluxa_processor::run_blob_sweeper(
                Arc::clone(&backends.queue.blob_references),
                backends.blobs.clone(),
                config.blob_sweep_interval,
                config.blob_grace,
                shutdown.clone(),
            )
        });
        let sweeper = async move {
            if let Some(sweeper) = sweeper {
                sweeper.await;
            }
        };
        let pruner = fluxa_processor::run_pruner(
            Arc::clone(&backends.store_admin),
            Arc::clone(&backends.queue.dead_letters),
            retention(config),
            shutdown.clone(),
        );
        let drain = backends.dead_letter_drain.clone().map(|drain| {
            sqs::run_dead_letter_drain(
                drain.queue,
                drain.table,
                Arc::clone(&backends.store),
                Arc::clone(&backends.store_admin),
                shutdown.clone(),
            )
        });
        let drain = async move {
            if let Some(drain) = drain {
                drain.await;
            }
        };
        let workers = fluxa_processor::run_workers(
            processor,
            Arc::clone(&backends.queue.consumer),
            config.workers,
            config.batch_size,
            shutdown.clone(),
        );
        async move {
            tokio::join!(workers, sweeper, pruner, drain);
        }
    });

    tracing::info!(
        addr = %local_addr,
        role = ?config.role,
        workers = if config.role.runs_workers() { config.workers } else { 0 },
        data_dir = %config.data_dir.display(),
        backend = backend_name(config),
        max_connections = serve_options.max_connections,
        "fluxa started"
    );
    let api_task = async {
        match api {
            Some(api) => api.await,
            None => shutdown.cancelled().await,
        }
    };
    let worker_task = async {
        if let Some(workers) = workers {
            workers.await;
        }
    };
    tokio::join!(api_task, worker_task);
    tracing::info!("fluxa stopped");
    Ok(())
}

/// The retention settings as the pruner takes them.
pub fn retention(config: &Config) -> fluxa_processor::Retention {
    fluxa_processor::Retention {
        events: config.retention_events,
        dead_letters: config.retention_dead_letters,
        idempotency: config.retention_idempotency,
        interval: config.prune_interval,
        batch: config.prune_batch,
    }
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
