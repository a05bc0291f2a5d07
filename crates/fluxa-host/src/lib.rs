//! What Fluxa's two hosts share: `fluxa serve` (fluxa-server, with the CLI) and the Lambda
//! functions (fluxa-lambda). [`Config`] reads and checks the settings; [`open_validated`] and
//! its siblings open the backends a configuration names; [`sqs`] keeps an SQS queue's dead
//! letters operable by draining them into the store; and the processor's and the pruner's
//! settings come from a [`Config`] through one `From` each, so a host copies no field.
//!
//! Without its default `sqlite` feature the crate opens no embedded backend, so a host that
//! never runs one (a Lambda function) links no SQLite.

use std::sync::Arc;

use anyhow::Context;
use fluxa_blob::BlobStore;
use fluxa_processor::{ProcessorConfig, Retention};
use fluxa_queue::{BlobReferences, Consumer, DeadLetterAdmin, Producer, QueueSettings};
use fluxa_store::{EventReader, Store, StoreAdmin};

mod config;
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
        #[cfg(feature = "sqlite")]
        StoreBackend::Sqlite { data_dir } => {
            std::fs::create_dir_all(data_dir).with_context(|| {
                format!("failed to create data directory {}", data_dir.display())
            })?;
            let sqlite = fluxa_sqlite::open(data_dir, config.into())
                .await
                .context("failed to open the embedded store and queue")?;
            Ok((
                StoreHandles::of(sqlite.store, sqlite.reader),
                QueueHandles::of(sqlite.queue),
            ))
        }
        #[cfg(not(feature = "sqlite"))]
        StoreBackend::Sqlite { .. } => anyhow::bail!(
            "this build has no embedded backend: set FLUXA_DATABASE_URL or \
             FLUXA_DATABASE_SECRET_ID"
        ),
        StoreBackend::Postgres { url } => {
            let url = url.url().await?;
            let pg = fluxa_postgres::open(&url, writer_pool_size(config), config.into())
                .await
                .context("failed to open the PostgreSQL store and queue")?;
            Ok((
                StoreHandles::of(pg.store, pg.reader),
                QueueHandles::of(pg.queue),
            ))
        }
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

/// A database queue's settings. (An SQS queue keeps its own: `fluxa serve` passes it the
/// visibility timeout, and its redrive policy is the receive limit.)
impl From<&Config> for QueueSettings {
    fn from(config: &Config) -> Self {
        Self {
            visibility_timeout: config.visibility_timeout,
            max_receives: config.max_receives,
        }
    }
}

/// The processor's settings, as every host configures it.
impl From<&Config> for ProcessorConfig {
    fn from(config: &Config) -> Self {
        Self {
            lease: config.lease,
            backoff_base: config.retry_backoff,
            backoff_max: config.retry_backoff_max,
            max_blob_memory: config.max_blob_memory,
        }
    }
}

/// The retention settings as the pruner takes them.
impl From<&Config> for Retention {
    fn from(config: &Config) -> Self {
        Self {
            events: config.retention_events,
            dead_letters: config.retention_dead_letters,
            idempotency: config.retention_idempotency,
            interval: config.prune_interval,
            batch: config.prune_batch,
        }
    }
}
