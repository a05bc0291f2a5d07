//! Fluxa's configuration as a library: [`Config::load`] layers built-in defaults, an optional
//! TOML file, `FLUXA_*` environment variables and command-line overrides, then validates once.
//!
//! Every setting is one row of [`SETTINGS`]: its file key, its `FLUXA_*` variable and (derived
//! from the key) its flag, so the three spellings cannot drift apart. The CLI builds its flags
//! from that table and a Lambda `main` calls [`Sources::from_process_env`]; neither parses a
//! value itself, so adding a setting touches this file (and `config.example.toml`) only.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use fluxa_api::{ApiToken, Limits};
use secrecy::SecretString;

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
    pub fn runs_api(self) -> bool {
        matches!(self, Self::All | Self::Api)
    }

    pub fn runs_workers(self) -> bool {
        matches!(self, Self::All | Self::Worker)
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Api => "api",
            Self::Worker => "worker",
        }
    }
}

/// Default batch size: large enough that one commit carries many events, small enough that a
/// batch finishes quickly at shutdown and a slow blob does not hold many events back.
pub const DEFAULT_BATCH_SIZE: usize = 64;

/// Default worker count on the embedded backend: its writes are group-committed, so more
/// concurrent workers share more fsyncs (16 roughly doubles throughput over 4 in `bench/`).
pub const DEFAULT_WORKERS_EMBEDDED: usize = 16;

/// Default worker count on PostgreSQL: each worker may hold a connection, and replicas share
/// the server's connection limit.
pub const DEFAULT_WORKERS_POSTGRES: usize = 4;

/// Everything `fluxa serve` needs; [`Config::load`] builds and validates it.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the API listens.
    pub bind: SocketAddr,
    /// Folder of the embedded backends: `store.db`, `queue.db` and, unless `blob_url` says
    /// otherwise, `blobs/`.
    pub data_dir: PathBuf,
    /// A `postgres://` URL puts the store (and the queue) on PostgreSQL; `None` keeps them
    /// embedded in SQLite.
    pub database_url: Option<SecretString>,
    /// A Secrets Manager secret id or ARN holding the database credentials (the JSON RDS
    /// writes, or a `postgres://` URL), fetched once when the backends open; `database_url`,
    /// if also set, supplies what the secret lacks (RDS's managed secret has no host).
    pub database_secret_id: Option<String>,
    /// An SQS queue URL (the queue then lives in SQS, its dead letters in the store).
    pub queue_url: Option<String>,
    /// Where large payloads live: `s3://bucket/prefix` or `file:///path`; `None` means
    /// `<data_dir>/blobs`.
    pub blob_url: Option<String>,
    pub role: Role,
    /// Concurrent processor workers in this process.
    pub workers: usize,
    /// Messages one worker receives and processes as one batch.
    pub batch_size: usize,
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
    /// Bytes of fetched blob payloads the workers hold in memory at once, all together.
    pub max_blob_memory: usize,
    /// How often workers look for orphaned payload blobs.
    pub blob_sweep_interval: Duration,
    /// Blobs younger than this are never swept (their ingest may still be enqueuing).
    pub blob_grace: Duration,
    /// Events received longer ago than this are pruned; `None` keeps them for ever.
    pub retention_events: Option<Duration>,
    /// Dead letters older than this are pruned; `None` keeps them for ever.
    pub retention_dead_letters: Option<Duration>,
    /// Idempotency records whose event is gone and that have not changed for this long are
    /// pruned; `None` keeps them for ever. This is the deduplication window for ids whose
    /// event was pruned or erased: after it, the same event id may be stored again.
    pub retention_idempotency: Option<Duration>,
    /// How often the pruner looks for rows past their retention.
    pub prune_interval: Duration,
    /// Rows one prune statement deletes at most (one short transaction each).
    pub prune_batch: usize,
    /// API tokens (`SCOPES=TOKEN,…`); `None` turns authentication off.
    pub api_tokens: Option<SecretString>,
    /// Allows serving without tokens on a non-loopback address.
    pub insecure_no_auth: bool,
    /// A connection must deliver a request's headers within this, counted from the connection's
    /// start or from the first byte of a later request on it (contract: 10 s).
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this (contract: 60 s).
    pub keep_alive_timeout: Duration,
    /// Open connections at most; `None` ("auto") means the open-file limit, raised to its
    /// hard limit at start, less a reserve for the database, blob files and logs.
    pub max_connections: Option<usize>,
    /// How long a stopping server lets in-flight requests finish before it closes what is left
    /// (contract: 20 s).
    pub shutdown_grace: Duration,
}

/// The one place the defaults are written (payload limits come from [`Limits::default`]);
/// `config.example.toml` repeats them as documentation and a test keeps the two equal.
impl Default for Config {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./fluxa-data"),
            database_url: None,
            database_secret_id: None,
            queue_url: None,
            blob_url: None,
            role: Role::All,
            workers: DEFAULT_WORKERS_EMBEDDED,
            batch_size: DEFAULT_BATCH_SIZE,
            limits: Limits::default(),
            visibility_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(30),
            max_receives: 3,
            retry_backoff: Duration::from_secs(1),
            retry_backoff_max: Duration::from_secs(60),
            max_blob_memory: 128 * 1024 * 1024,
            blob_sweep_interval: Duration::from_secs(600),
            blob_grace: Duration::from_secs(3600),
            retention_events: None,
            retention_dead_letters: None,
            retention_idempotency: None,
            prune_interval: Duration::from_secs(60),
            prune_batch: 1000,
            api_tokens: None,
            insecure_no_auth: false,
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            max_connections: None,
            shutdown_grace: Duration::from_secs(20),
        }
    }
}

/// How a setting appears on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagKind {
    /// `--key VALUE`.
    Value,
    /// `--key` alone means `true`.
    Switch,
}

/// One setting: a file key, a `FLUXA_*` variable and a flag (`--` + the key in kebab-case),
/// all with the same meaning.
#[derive(Clone, Copy, Debug)]
pub struct Setting {
    /// The config-file key.
    pub key: &'static str,
    /// The long flag, without the leading `--` (the key in kebab-case).
    pub flag: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// What `--help` calls the flag's value.
    pub value_name: &'static str,
    /// One-paragraph help for `--help`.
    pub help: &'static str,
    pub kind: FlagKind,
    /// Never shown, logged or quoted in an error.
    pub secret: bool,
    /// Says where the backends are, so `fluxa migrate` and `fluxa dlq` take it too.
    pub locates_backends: bool,
}

const fn setting(
    key: &'static str,
    flag: &'static str,
    env: &'static str,
    value_name: &'static str,
    help: &'static str,
) -> Setting {
    Setting {
        key,
        flag,
        env,
        value_name,
        help,
        kind: FlagKind::Value,
        secret: false,
        locates_backends: false,
    }
}

/// Every setting, in `--help` order.
pub const SETTINGS: &[Setting] = &[
    Setting {
        locates_backends: true,
        ..setting(
            "data_dir",
            "data-dir",
            "FLUXA_DATA_DIR",
            "DIR",
            "Folder holding the embedded backends (store.db, queue.db) and, unless --blob-url \
             says otherwise, the local blob store (blobs/).",
        )
    },
    Setting {
        secret: true,
        locates_backends: true,
        ..setting(
            "database_url",
            "database-url",
            "FLUXA_DATABASE_URL",
            "URL",
            "PostgreSQL URL (postgres://user:password@host:port/db) for the store and the \
             queue, shared by any number of replicas. Unset: embedded SQLite under --data-dir. \
             Prefer the environment variable, which keeps the password off the command line.",
        )
    },
    Setting {
        locates_backends: true,
        ..setting(
            "database_secret_id",
            "database-secret-id",
            "FLUXA_DATABASE_SECRET_ID",
            "ID",
            "A Secrets Manager secret (id or ARN) holding the PostgreSQL credentials: the JSON \
             RDS writes (username, password, host, port, dbname) or a postgres:// URL. Read \
             once at start with the standard AWS_* settings; never logged. With \
             --database-url too, the URL supplies what the secret lacks.",
        )
    },
    Setting {
        locates_backends: true,
        ..setting(
            "queue_url",
            "queue-url",
            "FLUXA_QUEUE_URL",
            "URL",
            "An SQS queue URL for the queue (it must have a RedrivePolicy and take 1 MiB \
             messages; the AWS_* settings reach it). Needs the store on PostgreSQL, where the \
             dead letters drained from its DLQ are recorded. Unset: the queue lives with the \
             store.",
        )
    },
    Setting {
        locates_backends: true,
        ..setting(
            "blob_url",
            "blob-url",
            "FLUXA_BLOB_URL",
            "URL",
            "Where large payloads live: s3://bucket/prefix (an S3 bucket, with the standard \
             AWS_* settings for credentials, region and endpoint) or file:///absolute/path. \
             Unset: <data-dir>/blobs.",
        )
    },
    setting(
        "bind",
        "bind",
        "FLUXA_BIND",
        "ADDR",
        "Address the HTTP API listens on (port 0 picks a free port).",
    ),
    setting(
        "role",
        "role",
        "FLUXA_ROLE",
        "ROLE",
        "Which parts to run in this process: all, api or worker.",
    ),
    setting(
        "workers",
        "workers",
        "FLUXA_WORKERS",
        "N",
        "Number of concurrent processor workers [default: 16 embedded, where concurrent \
         workers share commits; 4 on PostgreSQL, where each holds a database connection].",
    ),
    setting(
        "batch_size",
        "batch-size",
        "FLUXA_BATCH_SIZE",
        "N",
        "Messages one worker receives and processes as one batch (one commit for the lot).",
    ),
    setting(
        "max_payload_bytes",
        "max-payload-bytes",
        "FLUXA_MAX_PAYLOAD_BYTES",
        "BYTES",
        "Largest accepted payload in bytes (larger: 413 payload_too_large).",
    ),
    setting(
        "max_batch_bytes",
        "max-batch-bytes",
        "FLUXA_MAX_BATCH_BYTES",
        "BYTES",
        "Largest accepted batch request body in bytes.",
    ),
    setting(
        "max_payload_depth",
        "max-payload-depth",
        "FLUXA_MAX_PAYLOAD_DEPTH",
        "N",
        "Deepest accepted nesting of arrays and objects in a payload (deeper: 400).",
    ),
    setting(
        "header_read_timeout",
        "header-read-timeout",
        "FLUXA_HEADER_READ_TIMEOUT",
        "DURATION",
        "A client must send a request's headers within this, from the connection's start or \
         from the first byte of a later request on it; otherwise it is disconnected.",
    ),
    setting(
        "keep_alive_timeout",
        "keep-alive-timeout",
        "FLUXA_KEEP_ALIVE_TIMEOUT",
        "DURATION",
        "An idle keep-alive connection is closed after this.",
    ),
    setting(
        "min_body_rate",
        "min-body-rate",
        "FLUXA_MIN_BODY_RATE",
        "BYTES",
        "Bytes per second a request body must average once --body-rate-grace has passed; \
         slower: 408 request_timeout and the connection is closed.",
    ),
    setting(
        "body_rate_grace",
        "body-rate-grace",
        "FLUXA_BODY_RATE_GRACE",
        "DURATION",
        "How long a request body may arrive at any pace before --min-body-rate applies.",
    ),
    setting(
        "max_concurrent_requests",
        "max-concurrent-requests",
        "FLUXA_MAX_CONCURRENT_REQUESTS",
        "N",
        "Requests handled at once (/healthz, /readyz and /metrics aside); beyond it: 503 \
         unavailable with Retry-After, at once.",
    ),
    setting(
        "max_body_memory",
        "max-body-memory",
        "FLUXA_MAX_BODY_MEMORY",
        "BYTES",
        "Bytes of request bodies held in memory across all requests; a body that would pass \
         it gets 503 unavailable before it is read. At least the largest accepted body.",
    ),
    setting(
        "max_blob_memory",
        "max-blob-memory",
        "FLUXA_MAX_BLOB_MEMORY",
        "BYTES",
        "Bytes of large payloads the workers hold in memory at once, all together; a batch \
         whose payloads would pass it waits, or is stored in groups that fit. At least \
         --max-payload-bytes.",
    ),
    setting(
        "max_connections",
        "max-connections",
        "FLUXA_MAX_CONNECTIONS",
        "N",
        "Open connections at most; further clients wait in the accept queue. auto: the \
         open-file limit (raised to its hard limit at start) less a reserve for the database, \
         blob files and logs.",
    ),
    setting(
        "shutdown_grace",
        "shutdown-grace",
        "FLUXA_SHUTDOWN_GRACE",
        "DURATION",
        "On SIGTERM/SIGINT, how long in-flight requests may take to finish before the \
         connections left are closed.",
    ),
    setting(
        "visibility_timeout",
        "visibility-timeout",
        "FLUXA_VISIBILITY_TIMEOUT",
        "DURATION",
        "How long a received message stays hidden before redelivery (e.g. 30s, 500ms).",
    ),
    setting(
        "lease",
        "lease",
        "FLUXA_LEASE",
        "DURATION",
        "How long a worker's claim on an event id stays exclusive (a crashed worker's claim \
         expires after it).",
    ),
    setting(
        "max_receives",
        "max-receives",
        "FLUXA_MAX_RECEIVES",
        "N",
        "Receives after which a failing message is dead-lettered as retries_exhausted.",
    ),
    setting(
        "retry_backoff",
        "retry-backoff",
        "FLUXA_RETRY_BACKOFF",
        "DURATION",
        "First retry delay after a transient failure; doubles with each receive.",
    ),
    setting(
        "retry_backoff_max",
        "retry-backoff-max",
        "FLUXA_RETRY_BACKOFF_MAX",
        "DURATION",
        "Upper bound for the retry delay.",
    ),
    setting(
        "blob_sweep_interval",
        "blob-sweep-interval",
        "FLUXA_BLOB_SWEEP_INTERVAL",
        "DURATION",
        "How often workers delete payload blobs that no message points at.",
    ),
    setting(
        "blob_grace",
        "blob-grace",
        "FLUXA_BLOB_GRACE",
        "DURATION",
        "Payload blobs younger than this are never swept (their ingest may still be \
         enqueuing).",
    ),
    setting(
        "retention_events",
        "retention-events",
        "FLUXA_RETENTION_EVENTS",
        "DURATION|off",
        "Prune stored events received longer ago than this (off: keep them for ever).",
    ),
    setting(
        "retention_dead_letters",
        "retention-dead-letters",
        "FLUXA_RETENTION_DEAD_LETTERS",
        "DURATION|off",
        "Prune dead letters older than this (off: keep them for ever).",
    ),
    setting(
        "retention_idempotency",
        "retention-idempotency",
        "FLUXA_RETENTION_IDEMPOTENCY",
        "DURATION|off",
        "Prune idempotency records whose event is gone (pruned, erased or never stored) and \
         that have not changed for this long (off: keep them for ever). This is the \
         deduplication window: after it, the same event id may be stored again.",
    ),
    setting(
        "prune_interval",
        "prune-interval",
        "FLUXA_PRUNE_INTERVAL",
        "DURATION",
        "How often workers prune rows past their retention.",
    ),
    setting(
        "prune_batch",
        "prune-batch",
        "FLUXA_PRUNE_BATCH",
        "N",
        "Rows one prune transaction deletes at most.",
    ),
    Setting {
        secret: true,
        ..setting(
            "api_tokens",
            "api-tokens",
            "FLUXA_API_TOKENS",
            "TOKENS",
            "API tokens as SCOPES=TOKEN pairs separated by commas; SCOPES joins ingest, read \
             and admin with '+' (e.g. \"ingest+read=…,admin=…\"). Unset: no authentication, \
             loopback only. Prefer the environment variable: command lines are visible to \
             other local users.",
        )
    },
    Setting {
        kind: FlagKind::Switch,
        ..setting(
            "insecure_no_auth",
            "insecure-no-auth",
            "FLUXA_INSECURE_NO_AUTH",
            "",
            "Serve without API tokens even on a non-loopback address.",
        )
    },
];

/// The variable naming the config file when no `--config` flag does.
pub const CONFIG_FILE_ENV: &str = "FLUXA_CONFIG";

/// The setting with this file key.
pub fn setting_named(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Where [`Config::load`] reads from. Deliberately not `Debug`: it holds secrets as plain text.
#[derive(Default)]
pub struct Sources {
    /// A TOML config file; `None` falls back to `FLUXA_CONFIG` in `env`, then to no file.
    pub file: Option<PathBuf>,
    /// The environment, passed in (not read from the process) so tests can run in parallel.
    pub env: HashMap<String, String>,
    /// Values the user gave on the command line, by file key (`"max_receives"`), as text;
    /// a switch given is `"true"`. Only what the user actually typed belongs here.
    pub flags: BTreeMap<String, String>,
}

impl Sources {
    /// The process's `FLUXA_*` variables and nothing else: what a Lambda `main` loads.
    pub fn from_process_env() -> anyhow::Result<Self> {
        let mut env = HashMap::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with("FLUXA_") {
                continue;
            }
            // Never quote the value: it may be a secret.
            let value = value
                .into_string()
                .map_err(|_| anyhow::anyhow!("{name} is not valid UTF-8"))?;
            env.insert(name.to_owned(), value);
        }
        Ok(Self {
            env,
            ..Self::default()
        })
    }
}

impl Config {
    /// A configuration with the documented defaults, keeping data under `data_dir`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// Layers, lowest first: [`Config::default`], the TOML file, `FLUXA_*` variables, flags;
    /// then validates once. Errors name the source and the key but never quote a value, which
    /// may be a password or a token.
    pub fn load(sources: Sources) -> anyhow::Result<ValidatedConfig> {
        Self::layered(sources)?.validate()
    }

    /// [`Config::load`] without the validation: for a host that checks the settings it uses
    /// itself ([`Config::check_settings`]) and picks its own backends (a Lambda function).
    pub fn layered(sources: Sources) -> anyhow::Result<Self> {
        Self::layered_over(Self::default(), sources)
    }

    /// [`Config::layered`] over a host's own defaults instead of the built-in ones (the Lambda
    /// functions' smaller body limits, say): the host names its defaults in one place, and the
    /// file and the environment still override them.
    pub fn layered_over(defaults: Self, sources: Sources) -> anyhow::Result<Self> {
        let mut config = defaults;
        let mut workers_given = false;

        let file = sources.file.clone().or_else(|| {
            sources
                .env
                .get(CONFIG_FILE_ENV)
                .filter(|path| !path.is_empty())
                .map(PathBuf::from)
        });
        if let Some(path) = &file {
            for (key, line, text) in read_file(path)? {
                config.set(key, &text).map_err(|reason| {
                    anyhow::anyhow!("config file {} line {line}: {key} {reason}", path.display())
                })?;
                workers_given |= key == "workers";
            }
        }

        for setting in SETTINGS {
            // An empty variable counts as unset, as with most tools (`FLUXA_DATABASE_URL=`).
            let Some(text) = sources.env.get(setting.env).filter(|t| !t.is_empty()) else {
                continue;
            };
            config
                .set(setting.key, text)
                .map_err(|reason| anyhow::anyhow!("{} {reason}", setting.env))?;
            workers_given |= setting.key == "workers";
        }

        for (key, text) in &sources.flags {
            let setting =
                setting_named(key).with_context(|| format!("--{key} is not a setting"))?;
            config
                .set(setting.key, text)
                .map_err(|reason| anyhow::anyhow!("--{} {reason}", setting.flag))?;
            workers_given |= setting.key == "workers";
        }

        // The worker default depends on the backend, which is known only after every layer.
        if !workers_given && (config.database_url.is_some() || config.database_secret_id.is_some())
        {
            config.workers = DEFAULT_WORKERS_POSTGRES;
        }
        Ok(config)
    }

    /// Sets one setting from its text form. The error is a reason that quotes no value.
    fn set(&mut self, key: &str, text: &str) -> Result<(), String> {
        fn count<T: std::str::FromStr>(text: &str) -> Result<T, String> {
            text.trim()
                .parse()
                .map_err(|_| "must be a whole number".to_owned())
        }
        fn duration(text: &str) -> Result<Duration, String> {
            humantime::parse_duration(text.trim())
                .map_err(|_| "must be a duration such as 30s or 500ms".to_owned())
        }
        fn optional_duration(text: &str) -> Result<Option<Duration>, String> {
            match text.trim() {
                "off" => Ok(None),
                _ => duration(text)
                    .map(Some)
                    .map_err(|_| "must be a duration such as 30d or 12h, or off".to_owned()),
            }
        }
        match key {
            "bind" => {
                self.bind = text
                    .trim()
                    .parse()
                    .map_err(|_| "must be an address such as 127.0.0.1:8080".to_owned())?;
            }
            "data_dir" => self.data_dir = PathBuf::from(text),
            "database_url" => self.database_url = Some(SecretString::from(text)),
            "database_secret_id" => {
                let id = text.trim();
                if id.is_empty() {
                    return Err("must name a secret (an id or an ARN)".to_owned());
                }
                self.database_secret_id = Some(id.to_owned());
            }
            "queue_url" => self.queue_url = Some(text.to_owned()),
            "blob_url" => self.blob_url = Some(text.to_owned()),
            "role" => {
                self.role = match text.trim() {
                    "all" => Role::All,
                    "api" => Role::Api,
                    "worker" => Role::Worker,
                    _ => return Err("must be all, api or worker".to_owned()),
                };
            }
            "workers" => self.workers = count(text)?,
            "batch_size" => self.batch_size = count(text)?,
            "max_payload_bytes" => self.limits.max_payload_bytes = count(text)?,
            "max_batch_bytes" => self.limits.max_batch_bytes = count(text)?,
            "max_payload_depth" => self.limits.max_payload_depth = count(text)?,
            "header_read_timeout" => self.header_read_timeout = duration(text)?,
            "keep_alive_timeout" => self.keep_alive_timeout = duration(text)?,
            "min_body_rate" => self.limits.min_body_rate = count(text)?,
            "body_rate_grace" => self.limits.body_rate_grace = duration(text)?,
            "max_concurrent_requests" => self.limits.max_concurrent_requests = count(text)?,
            "max_body_memory" => self.limits.max_body_memory = count(text)?,
            "max_blob_memory" => self.max_blob_memory = count(text)?,
            "max_connections" => {
                self.max_connections = match text.trim() {
                    "auto" => None,
                    _ => {
                        Some(count(text).map_err(|_| "must be a whole number or auto".to_owned())?)
                    }
                };
            }
            "shutdown_grace" => self.shutdown_grace = duration(text)?,
            "visibility_timeout" => self.visibility_timeout = duration(text)?,
            "lease" => self.lease = duration(text)?,
            "max_receives" => self.max_receives = count(text)?,
            "retry_backoff" => self.retry_backoff = duration(text)?,
            "retry_backoff_max" => self.retry_backoff_max = duration(text)?,
            "blob_sweep_interval" => self.blob_sweep_interval = duration(text)?,
            "blob_grace" => self.blob_grace = duration(text)?,
            "retention_events" => self.retention_events = optional_duration(text)?,
            "retention_dead_letters" => self.retention_dead_letters = optional_duration(text)?,
            "retention_idempotency" => self.retention_idempotency = optional_duration(text)?,
            "prune_interval" => self.prune_interval = duration(text)?,
            "prune_batch" => self.prune_batch = count(text)?,
            "api_tokens" => self.api_tokens = Some(SecretString::from(text)),
            "insecure_no_auth" => {
                self.insecure_no_auth = match text.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => return Err("must be true or false".to_owned()),
                };
            }
            _ => return Err("is not a setting".to_owned()),
        }
        Ok(())
    }

    /// The default of `key` as `--help` shows it; `None` for secrets, unset settings and those
    /// whose help explains their default.
    pub fn default_text(key: &str) -> Option<String> {
        let d = Self::default();
        let duration = |d: Duration| humantime::format_duration(d).to_string();
        Some(match key {
            "bind" => d.bind.to_string(),
            "data_dir" => d.data_dir.display().to_string(),
            "role" => d.role.as_str().to_owned(),
            "batch_size" => d.batch_size.to_string(),
            "max_payload_bytes" => d.limits.max_payload_bytes.to_string(),
            "max_batch_bytes" => d.limits.max_batch_bytes.to_string(),
            "max_payload_depth" => d.limits.max_payload_depth.to_string(),
            "header_read_timeout" => duration(d.header_read_timeout),
            "keep_alive_timeout" => duration(d.keep_alive_timeout),
            "min_body_rate" => d.limits.min_body_rate.to_string(),
            "body_rate_grace" => duration(d.limits.body_rate_grace),
            "max_concurrent_requests" => d.limits.max_concurrent_requests.to_string(),
            "max_body_memory" => d.limits.max_body_memory.to_string(),
            "max_blob_memory" => d.max_blob_memory.to_string(),
            "max_connections" => "auto".to_owned(),
            "shutdown_grace" => duration(d.shutdown_grace),
            "visibility_timeout" => duration(d.visibility_timeout),
            "lease" => duration(d.lease),
            "max_receives" => d.max_receives.to_string(),
            "retry_backoff" => duration(d.retry_backoff),
            "retry_backoff_max" => duration(d.retry_backoff_max),
            "blob_sweep_interval" => duration(d.blob_sweep_interval),
            "blob_grace" => duration(d.blob_grace),
            "retention_events" | "retention_dead_letters" | "retention_idempotency" => {
                "off".to_owned()
            }
            "prune_interval" => duration(d.prune_interval),
            "prune_batch" => d.prune_batch.to_string(),
            _ => return None,
        })
    }

    /// Refuses configurations that would run but misbehave, and derives the backends.
    pub fn validate(self) -> anyhow::Result<ValidatedConfig> {
        let tokens = self.check_settings()?;
        let backends = self.backends()?;
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
        Ok(ValidatedConfig {
            config: self,
            tokens,
            backends,
        })
    }

    /// The checks of every setting's range and of how settings fit together, whichever
    /// backends are used; returns the parsed API tokens.
    pub fn check_settings(&self) -> anyhow::Result<Vec<ApiToken>> {
        anyhow::ensure!(
            self.workers >= 1 || !self.role.runs_workers(),
            "--workers must be at least 1"
        );
        anyhow::ensure!(self.max_receives >= 1, "--max-receives must be at least 1");
        anyhow::ensure!(
            (1..=1000).contains(&self.batch_size),
            "--batch-size must be 1 to 1000"
        );
        anyhow::ensure!(
            !self.visibility_timeout.is_zero() && !self.lease.is_zero(),
            "--visibility-timeout and --lease must be positive"
        );
        anyhow::ensure!(
            !self.blob_sweep_interval.is_zero() && self.blob_grace >= Duration::from_secs(1),
            "--blob-sweep-interval must be positive and --blob-grace at least 1s"
        );
        anyhow::ensure!(
            !self.prune_interval.is_zero() && (1..=100_000).contains(&self.prune_batch),
            "--prune-interval must be positive and --prune-batch 1 to 100000"
        );
        anyhow::ensure!(
            [
                self.retention_events,
                self.retention_dead_letters,
                self.retention_idempotency
            ]
            .iter()
            .flatten()
            .all(|keep| *keep >= Duration::from_secs(1)),
            "a retention must be at least 1s (or off)"
        );
        anyhow::ensure!(
            self.limits.max_payload_bytes >= 1 && self.limits.max_batch_bytes >= 1,
            "--max-payload-bytes and --max-batch-bytes must be positive"
        );
        anyhow::ensure!(
            !self.header_read_timeout.is_zero() && !self.keep_alive_timeout.is_zero(),
            "--header-read-timeout and --keep-alive-timeout must be positive"
        );
        anyhow::ensure!(
            self.limits.min_body_rate >= 1 && !self.limits.body_rate_grace.is_zero(),
            "--min-body-rate and --body-rate-grace must be positive"
        );
        anyhow::ensure!(
            self.limits.max_concurrent_requests >= 1,
            "--max-concurrent-requests must be at least 1"
        );
        anyhow::ensure!(
            self.max_connections != Some(0),
            "--max-connections must be at least 1 (or auto)"
        );
        anyhow::ensure!(
            !self.shutdown_grace.is_zero(),
            "--shutdown-grace must be positive"
        );
        // Else the largest accepted body could never be read and would always get 503.
        anyhow::ensure!(
            self.limits.max_body_memory >= self.limits.largest_body(),
            "--max-body-memory must be at least the largest accepted body ({} bytes: \
             --max-batch-bytes, or --max-payload-bytes plus 64 KiB for its envelope)",
            self.limits.largest_body()
        );
        // Else one payload of the largest size would pass the bound on its own.
        anyhow::ensure!(
            self.max_blob_memory >= self.limits.max_payload_bytes,
            "--max-blob-memory must be at least --max-payload-bytes ({} bytes)",
            self.limits.max_payload_bytes
        );
        match &self.api_tokens {
            Some(spec) => Ok(ApiToken::parse_list(spec)?),
            None => Ok(Vec::new()),
        }
    }

    /// Where PostgreSQL is, if this configuration names it: the secret (completed by the URL,
    /// if any) or the URL.
    pub fn database_location(&self) -> anyhow::Result<Option<PgLocation>> {
        if let Some(url) = &self.database_url {
            anyhow::ensure!(
                fluxa_postgres::is_postgres_url(url),
                "--database-url / FLUXA_DATABASE_URL must be a postgres:// or postgresql:// URL"
            );
        }
        Ok(match (&self.database_secret_id, &self.database_url) {
            (Some(secret_id), base) => Some(PgLocation::Secret {
                secret_id: secret_id.clone(),
                base: base.clone(),
            }),
            (None, Some(url)) => Some(PgLocation::Url(url.clone())),
            (None, None) => None,
        })
    }

    /// Which store, queue and blob backends this configuration names.
    pub fn backends(&self) -> anyhow::Result<BackendChoice> {
        let store = match self.database_location()? {
            Some(url) => StoreBackend::Postgres { url },
            None => StoreBackend::Sqlite {
                data_dir: self.data_dir.clone(),
            },
        };
        let queue = match (&store, &self.queue_url) {
            (StoreBackend::Postgres { .. }, Some(url)) => {
                anyhow::ensure!(
                    url.starts_with("https://") || url.starts_with("http://"),
                    "--queue-url / FLUXA_QUEUE_URL must be an SQS queue URL \
                     (https://sqs.<region>.amazonaws.com/<account>/<queue>)"
                );
                QueueBackend::Sqs { url: url.clone() }
            }
            (StoreBackend::Sqlite { .. }, Some(_)) => anyhow::bail!(
                "--queue-url / FLUXA_QUEUE_URL (SQS) needs the store on PostgreSQL \
                 (--database-url or --database-secret-id): dead letters from SQS are recorded \
                 there"
            ),
            (StoreBackend::Sqlite { data_dir }, None) => QueueBackend::Sqlite {
                data_dir: data_dir.clone(),
            },
            (StoreBackend::Postgres { url }, None) => QueueBackend::Postgres { url: url.clone() },
        };
        let blobs = match &self.blob_url {
            None => BlobBackend::Fs {
                root: self.data_dir.join("blobs"),
            },
            Some(url) => BlobBackend::parse(url)?,
        };
        Ok(BackendChoice {
            store,
            queue,
            blobs,
        })
    }
}

/// Reads a config file into `(key, line, value as text)`. Errors give the line and the reason
/// but never quote the file, which may hold tokens or a database password.
fn read_file(path: &Path) -> anyhow::Result<Vec<(&'static str, usize, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read config file {}", path.display()))?;
    let line_of = |offset: usize| {
        text.as_bytes()[..offset.min(text.len())]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    };
    let table: BTreeMap<String, toml::Spanned<toml::Value>> =
        toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(0, |span| line_of(span.start));
            anyhow::anyhow!(
                "config file {} line {line}: {}",
                path.display(),
                e.message().trim()
            )
        })?;
    let mut values = Vec::with_capacity(table.len());
    for (key, value) in table {
        let line = line_of(value.span().start);
        // The key is safe to name (it is ours, or a typo of ours); its value is not.
        let setting = setting_named(&key).with_context(|| {
            format!(
                "config file {} line {line}: unknown field `{key}`",
                path.display()
            )
        })?;
        let text = match value.into_inner() {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            _ => anyhow::bail!(
                "config file {} line {line}: {key} must be a string, a number or a boolean",
                path.display()
            ),
        };
        values.push((setting.key, line, text));
    }
    Ok(values)
}

/// Where the store lives.
#[derive(Clone, Debug)]
pub enum StoreBackend {
    Sqlite { data_dir: PathBuf },
    Postgres { url: PgLocation },
}

/// Where the queue lives.
#[derive(Clone, Debug)]
pub enum QueueBackend {
    Sqlite {
        data_dir: PathBuf,
    },
    Postgres {
        url: PgLocation,
    },
    /// An SQS standard queue with a `RedrivePolicy`; its dead letters are recorded in the
    /// store, which is then always PostgreSQL.
    Sqs {
        url: String,
    },
}

/// How to reach PostgreSQL: a URL as configured, or a Secrets Manager secret that holds the
/// credentials (contract section 9).
#[derive(Clone, Debug)]
pub enum PgLocation {
    Url(SecretString),
    /// Fetched when the backends open, once per process (`fluxa_aws::secrets` caches it);
    /// `base` (`--database-url`, if set) supplies what the secret lacks.
    Secret {
        secret_id: String,
        base: Option<SecretString>,
    },
}

impl PgLocation {
    /// The URL to connect with, fetching the secret the first time.
    pub async fn url(&self) -> anyhow::Result<SecretString> {
        match self {
            Self::Url(url) => Ok(url.clone()),
            Self::Secret { secret_id, base } => {
                let url = fluxa_aws::secrets::cached_database_url(secret_id, base.as_ref()).await?;
                anyhow::ensure!(
                    fluxa_postgres::is_postgres_url(&url),
                    "the secret {secret_id} does not name a PostgreSQL database"
                );
                Ok(url)
            }
        }
    }

    /// Names the database for logs, never with a password (nor a secret's content).
    pub fn describe(&self) -> String {
        match self {
            Self::Url(url) => fluxa_postgres::describe_url(url),
            Self::Secret { secret_id, .. } => format!("credentials in secret {secret_id}"),
        }
    }
}

/// Where large payloads live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlobBackend {
    /// A local folder.
    Fs { root: PathBuf },
    /// An S3 bucket (or an S3-compatible store at `AWS_ENDPOINT_URL`), every key under
    /// `prefix` (`""` for the bucket's root; never with a leading or trailing `/`).
    S3 { bucket: String, prefix: String },
}

impl BlobBackend {
    /// Parses `FLUXA_BLOB_URL`: `s3://bucket/prefix` or `file:///absolute/path`. Errors do not
    /// quote the URL (a mistyped one might hold anything); S3 errors name the bucket, which is
    /// not a secret.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::parse_s3(rest);
        }
        match url.strip_prefix("file://") {
            Some(path) if path.starts_with('/') && path.len() > 1 => Ok(Self::Fs {
                root: PathBuf::from(path),
            }),
            _ => anyhow::bail!(
                "--blob-url / FLUXA_BLOB_URL must be s3://bucket/prefix or \
                 file:///absolute/path (or unset for <data-dir>/blobs)"
            ),
        }
    }

    /// `bucket/prefix`, after `s3://`. The bucket follows S3's naming rules for new buckets;
    /// the prefix is `/`-separated segments of S3's "safe" key characters, so that every key
    /// Fluxa builds under it is the same string in a message, a listing and the bucket.
    fn parse_s3(rest: &str) -> anyhow::Result<Self> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(
            !bucket.is_empty(),
            "--blob-url / FLUXA_BLOB_URL: s3:// needs a bucket name: s3://bucket/prefix"
        );
        // Credentials never belong in the URL; the message must not quote them back.
        anyhow::ensure!(
            !bucket.contains('@'),
            "--blob-url / FLUXA_BLOB_URL: an s3:// URL holds no credentials; set \
             AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or use an IAM role) instead"
        );
        if let Err(reason) = check_bucket_name(bucket) {
            anyhow::bail!(
                "--blob-url / FLUXA_BLOB_URL: the bucket name is not a valid S3 bucket name: \
                 {reason}"
            );
        }
        anyhow::ensure!(
            !prefix.contains(['?', '#']),
            "--blob-url / FLUXA_BLOB_URL: an s3:// URL takes no query or fragment: \
             s3://bucket/prefix"
        );
        let prefix = prefix.trim_end_matches('/');
        let valid_segment = |segment: &str| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.!*'()".contains(&b))
        };
        anyhow::ensure!(
            prefix.is_empty() || prefix.split('/').all(valid_segment),
            "--blob-url / FLUXA_BLOB_URL: the key prefix after the bucket must be \
             /-separated names of letters, digits and -_.!*'() (no empty, . or .. part)"
        );
        Ok(Self::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

/// S3's rules for a bucket name (general purpose buckets): 3 to 63 characters of lower-case
/// letters, digits, `.` and `-`, beginning and ending with a letter or a digit, no `..`, not
/// an IP address, and none of the reserved prefixes and suffixes.
fn check_bucket_name(bucket: &str) -> Result<(), &'static str> {
    if !(3..=63).contains(&bucket.len()) {
        return Err("it must be 3 to 63 characters long");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err("it may hold only lower-case letters, digits, '.' and '-'");
    }
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = bucket.as_bytes();
    if !alphanumeric(bytes[0]) || !alphanumeric(bytes[bytes.len() - 1]) {
        return Err("it must begin and end with a letter or a digit");
    }
    if bucket.contains("..") {
        return Err("it must not hold two adjacent periods");
    }
    if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("it must not be formatted as an IP address");
    }
    if ["xn--", "sthree-", "amzn-s3-demo-"]
        .iter()
        .any(|p| bucket.starts_with(p))
        || ["-s3alias", "--ol-s3", "--x-s3", "--table-s3", ".mrap"]
            .iter()
            .any(|s| bucket.ends_with(s))
    {
        return Err("it uses a prefix or suffix S3 reserves");
    }
    Ok(())
}

/// The three backends a configuration names; each has its own opener.
#[derive(Clone, Debug)]
pub struct BackendChoice {
    pub store: StoreBackend,
    pub queue: QueueBackend,
    pub blobs: BlobBackend,
}

/// A configuration that passed [`Config::validate`]: what [`crate::run`] takes, so it never
/// validates twice.
#[derive(Clone, Debug)]
pub struct ValidatedConfig {
    config: Config,
    tokens: Vec<ApiToken>,
    backends: BackendChoice,
}

impl ValidatedConfig {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The parsed API tokens; empty means authentication is off.
    pub fn tokens(&self) -> &[ApiToken] {
        &self.tokens
    }

    pub fn backends(&self) -> &BackendChoice {
        &self.backends
    }
}
