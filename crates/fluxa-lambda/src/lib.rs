//! Fluxa's AWS Lambda functions, as thin adapters over the same library code `fluxa serve`
//! runs. Each binary in `src/bin/` is a `main` of a few lines over this crate:
//! - `ingest`, `query` and `admin` serve [`fluxa_api::app_with`] through lambda_http (API
//!   Gateway's HTTP API, payload format 2.0), each with only its role's routes and only the
//!   clients those routes use: ingest has no database, query no queue, no bucket and only a
//!   read-only connection ([`Role`]).
//! - `processor` takes the `SqsEvent`s of its event source mappings ([`processor`]): the main
//!   queue's records go through `Processor::process_batch`, the DLQ's are recorded in the store.
//!
//! Configuration comes from the environment only (`FLUXA_*`, as `fluxa serve` reads it, and the
//! standard `AWS_*`), read alike by every function ([`LambdaConfig`]); only the HTTP functions
//! require API tokens ([`http_app`]): the processor serves no requests, and the Terraform gives
//! it none. Everything a function opens (the pool, the SDK clients) is built once per
//! container, before the first invocation. Each container holds at most
//! [`CONNECTIONS_PER_CONTAINER`] database connections, the budget the Terraform assumes.
//! Logs are JSON lines that carry the invocation's AWS request id ([`init_logging`]); metrics
//! are CloudWatch embedded metric format lines ([`init_metrics`]).

pub mod processor;

use std::sync::Arc;

use anyhow::Context;
use fluxa_api::{AppState, Routes};
use fluxa_aws::sqs::SqsQueue;
use fluxa_host::{BlobBackend, Config, PgLocation, Sources};
use secrecy::SecretString;

/// Database connections one container may hold (the Terraform's `db_connections_per_container`
/// budget): one invocation at a time needs no more.
pub const CONNECTIONS_PER_CONTAINER: u32 = 2;

/// The largest request body a function may accept. Lambda's synchronous invoke payload is at
/// most 6 MB, and API Gateway puts the body in it as a JSON string, where escaping may double
/// it; 2.5 MiB always fits (the Terraform checks the same bound).
pub const MAX_BODY_BYTES: usize = 2_621_440;

/// The body limits a function uses when the environment sets none: 2 MiB bodies, the
/// Terraform's default, and payloads that fit one with their envelope.
const DEFAULT_BATCH_BYTES: usize = 2 * 1024 * 1024;
const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// The Lambda functions' defaults layer: `fluxa serve`'s defaults, but bodies that fit a
/// Lambda invoke. The environment overrides it as it overrides the built-in defaults.
pub fn lambda_defaults() -> Config {
    let mut config = Config::default();
    config.limits.max_batch_bytes = DEFAULT_BATCH_BYTES;
    config.limits.max_payload_bytes = DEFAULT_BATCH_BYTES - ENVELOPE_ALLOWANCE;
    config
}

/// What a function's environment configures, checked as `fluxa serve` checks it. What only
/// one role needs (tokens, the queue, the database) is required when that role opens it.
#[derive(Clone, Debug)]
pub struct LambdaConfig {
    pub config: Config,
    /// `FLUXA_API_TOKENS`, parsed; empty if unset ([`http_app`] refuses that).
    pub tokens: Vec<fluxa_api::ApiToken>,
}

impl LambdaConfig {
    /// Reads the process's `FLUXA_*` variables.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_sources(Sources::from_process_env()?)
    }

    /// Reads `sources` (tests pass their own environment).
    pub fn from_sources(sources: Sources) -> anyhow::Result<Self> {
        let config = Config::layered_over(lambda_defaults(), sources)?;
        let tokens = config.check_settings()?;
        anyhow::ensure!(
            config.limits.largest_body() <= MAX_BODY_BYTES,
            "FLUXA_MAX_BATCH_BYTES and FLUXA_MAX_PAYLOAD_BYTES (plus 64 KiB) must be at most \
             {MAX_BODY_BYTES} bytes on Lambda: a body rides escaped inside the 6 MB invoke \
             payload"
        );
        Ok(Self { config, tokens })
    }

    /// The API tokens an HTTP function checks requests against. Its routes are public (an
    /// API Gateway route or a function URL), so there is no loopback exception as for
    /// `fluxa serve`: only `FLUXA_INSECURE_NO_AUTH=true` lets it run without tokens.
    fn require_tokens(&self) -> anyhow::Result<Arc<Vec<fluxa_api::ApiToken>>> {
        anyhow::ensure!(
            !self.tokens.is_empty() || self.config.insecure_no_auth,
            "refusing to run without API tokens: set FLUXA_API_TOKENS (or \
             FLUXA_INSECURE_NO_AUTH=true)"
        );
        Ok(Arc::new(self.tokens.clone()))
    }

    /// Where the database is: the secret (`FLUXA_DATABASE_SECRET_ID`) or the URL.
    fn database(&self) -> anyhow::Result<PgLocation> {
        self.config.database_location()?.context(
            "this function needs the database: set FLUXA_DATABASE_SECRET_ID (or \
             FLUXA_DATABASE_URL)",
        )
    }

    async fn database_url(&self) -> anyhow::Result<SecretString> {
        self.database()?.url().await
    }

    /// The store, migrated, with [`CONNECTIONS_PER_CONTAINER`] writing connections. Its
    /// reading pool opens on first use, and the admin and processor functions never use it.
    async fn open_store(&self) -> anyhow::Result<fluxa_postgres::StoreBackends> {
        let url = self.database_url().await?;
        let sizes = fluxa_postgres::PoolSizes {
            writer: CONNECTIONS_PER_CONTAINER,
            reader: 1,
        };
        Ok(fluxa_postgres::open_store(&url, sizes).await?)
    }

    fn queue_url(&self) -> anyhow::Result<String> {
        self.config
            .queue_url
            .clone()
            .context("this function needs the queue: set FLUXA_QUEUE_URL")
    }

    fn blobs(&self) -> anyhow::Result<fluxa_blob::BlobStore> {
        let url = self
            .config
            .blob_url
            .as_deref()
            .context("this function needs the payload bucket: set FLUXA_BLOB_URL")?;
        fluxa_host::open_blobs(&BlobBackend::parse(url)?)
    }

    /// The state every HTTP role starts from: no backends yet, and the tokens it requires.
    fn http_state(&self) -> anyhow::Result<AppState> {
        Ok(AppState {
            queue: None,
            dead_letters: None,
            blobs: None,
            reader: None,
            store_admin: None,
            limits: self.config.limits,
            tokens: self.require_tokens()?,
            metrics: fluxa_telemetry::metrics_handle(),
        })
    }
}

/// The HTTP functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `POST /v1/events`, `POST /v1/events/batch`: the queue (send only) and the bucket.
    Ingest,
    /// `GET /v1/events…`: read-only database sessions, nothing else.
    Query,
    /// `/v1/admin/…`: the database, the queue (send only: a redrive) and the bucket.
    Admin,
}

/// Opens what `role` needs and builds its router: call once per container. Without API tokens
/// (or `FLUXA_INSECURE_NO_AUTH=true`) it fails, before it opens anything.
pub async fn http_app(role: Role, config: &LambdaConfig) -> anyhow::Result<axum::Router> {
    let mut state = config.http_state()?;
    let routes = match role {
        Role::Ingest => {
            state.queue = Some(Arc::new(open_sender(config).await?));
            state.blobs = Some(config.blobs()?);
            Routes::INGEST
        }
        Role::Query => {
            let url = config.database_url().await?;
            state.reader = Some(Arc::new(fluxa_postgres::open_reader(
                &url,
                CONNECTIONS_PER_CONTAINER,
            )?));
            Routes::QUERY
        }
        Role::Admin => {
            let store = config.open_store().await?;
            let queue = open_sender(config).await?;
            state.dead_letters = Some(Arc::new(fluxa_host::sqs::SqsDeadLetters::new(
                queue,
                store.dead_letters,
            )));
            state.store_admin = Some(Arc::new(store.store));
            state.blobs = Some(config.blobs()?);
            Routes::ADMIN
        }
    };
    Ok(fluxa_api::app_with(state, routes)?)
}

async fn open_sender(config: &LambdaConfig) -> anyhow::Result<SqsQueue> {
    // A missing setting is reported before the SDK looks for a region and credentials.
    let queue_url = config.queue_url()?;
    let client = aws_sdk_sqs::Client::new(&fluxa_aws::sdk_config().await);
    Ok(SqsQueue::open_sender(client, queue_url).await?)
}

/// JSON log lines on stdout (CloudWatch Logs keeps them), each with the span list, where
/// lambda_runtime's `Lambda runtime invoke` span carries the invocation's `requestId`.
/// `RUST_LOG` sets the filter (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second call (tests) finds a subscriber installed and changes nothing.
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .with_span_list(true)
        .with_target(true)
        .try_init();
}

/// Installs the CloudWatch EMF recorder for the `metrics` facade (namespace `Fluxa`, the
/// function's name as a dimension); the `run_*` functions flush it after every invocation.
pub fn init_metrics() -> anyhow::Result<&'static metrics_cloudwatch_embedded::Collector> {
    let function = std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "fluxa".into());
    metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace("Fluxa")
        .with_dimension("function", function)
        .lambda_cold_start_metric("ColdStart")
        .with_lambda_request_id("RequestId")
        .init()
        .map_err(|e| anyhow::anyhow!("could not install the EMF metrics recorder: {e}"))
}

/// The whole `main` of an HTTP function.
pub async fn run_http(role: Role) -> Result<(), lambda_http::Error> {
    init_logging();
    let metrics = init_metrics()?;
    let config = LambdaConfig::from_env()?;
    let app = http_app(role, &config).await?;
    tracing::info!(role = ?role, "fluxa function ready");
    metrics_cloudwatch_embedded::lambda::service::run_http(metrics, app).await
}
