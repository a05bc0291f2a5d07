//! The `fluxa` command: a thin CLI over `fluxa-server` (serve, migrate) and the queue's
//! dead-letter operations. Every option also reads a `FLUXA_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod config_file;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use fluxa_api::Limits;
use fluxa_queue::RedriveSelector;
use fluxa_server::{Config, Role};
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

/// Fluxa: an event-ingestion pipeline (HTTP ingest -> queue -> processor -> store -> query API).
#[derive(Parser, Debug)]
#[command(name = "fluxa", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run Fluxa: the HTTP API and the processor workers (see --role).
    Serve(ServeArgs),
    /// Create or upgrade the store and queue schemas, then exit.
    Migrate(DataArgs),
    /// Inspect and redrive the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Args, Debug, Clone)]
struct DataArgs {
    /// Folder holding the embedded backends (store.db, queue.db) and the local blob store
    /// (blobs/).
    #[arg(long, env = "FLUXA_DATA_DIR", default_value = "./fluxa-data")]
    data_dir: PathBuf,
    /// PostgreSQL URL (postgres://user:password@host:port/db) for the store and the queue,
    /// shared by any number of replicas. Unset: embedded SQLite under --data-dir. Prefer the
    /// environment variable, which keeps the password off the command line.
    #[arg(long, env = "FLUXA_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
}

impl DataArgs {
    fn config(self) -> Config {
        let mut config = Config::with_data_dir(self.data_dir);
        config.database_url = self.database_url.map(SecretString::from);
        config
    }
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum RoleArg {
    /// API and workers in one process.
    All,
    /// Only the HTTP API.
    Api,
    /// Only the processor workers.
    Worker,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A TOML file with defaults for the options below, under the same names in snake_case
    /// (see config.example.toml). Flags and FLUXA_* variables override it.
    #[arg(long, env = "FLUXA_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    /// Address the HTTP API listens on (port 0 picks a free port).
    #[arg(long, env = "FLUXA_BIND", default_value = "127.0.0.1:8080")]
    bind: SocketAddr,
    /// Which parts to run in this process.
    #[arg(long, env = "FLUXA_ROLE", value_enum, default_value = "all")]
    role: RoleArg,
    /// Number of concurrent processor workers [default: 16 embedded, where concurrent workers
    /// share commits; 4 on PostgreSQL, where each holds a database connection].
    #[arg(long, env = "FLUXA_WORKERS")]
    workers: Option<usize>,
    /// Largest accepted payload in bytes (larger: 413 payload_too_large).
    #[arg(long, env = "FLUXA_MAX_PAYLOAD_BYTES", default_value_t = 10 * 1024 * 1024)]
    max_payload_bytes: usize,
    /// Largest accepted batch request body in bytes.
    #[arg(long, env = "FLUXA_MAX_BATCH_BYTES", default_value_t = 32 * 1024 * 1024)]
    max_batch_bytes: usize,
    /// How long a received message stays hidden before redelivery (e.g. 30s, 500ms).
    #[arg(long, env = "FLUXA_VISIBILITY_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    visibility_timeout: Duration,
    /// How long a worker's claim on an event id stays exclusive (a crashed worker's claim
    /// expires after it).
    #[arg(long, env = "FLUXA_LEASE", default_value = "30s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Receives after which a failing message is dead-lettered as retries_exhausted.
    #[arg(long, env = "FLUXA_MAX_RECEIVES", default_value_t = 3)]
    max_receives: u32,
    /// First retry delay after a transient failure; doubles with each receive.
    #[arg(long, env = "FLUXA_RETRY_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    retry_backoff: Duration,
    /// Upper bound for the retry delay.
    #[arg(long, env = "FLUXA_RETRY_BACKOFF_MAX", default_value = "60s", value_parser = humantime::parse_duration)]
    retry_backoff_max: Duration,
    /// How often workers delete payload blobs that no message points at.
    #[arg(long, env = "FLUXA_BLOB_SWEEP_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    blob_sweep_interval: Duration,
    /// Payload blobs younger than this are never swept (their ingest may still be enqueuing).
    #[arg(long, env = "FLUXA_BLOB_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    blob_grace: Duration,
    /// API tokens as SCOPES=TOKEN pairs separated by commas; SCOPES joins ingest, read and admin
    /// with '+' (e.g. "ingest+read=…,admin=…"). Unset: no authentication, loopback only.
    /// Prefer the environment variable: command lines are visible to other local users.
    #[arg(long, env = "FLUXA_API_TOKENS", hide_env_values = true)]
    api_tokens: Option<String>,
    /// Serve without API tokens even on a non-loopback address.
    #[arg(long, env = "FLUXA_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters, oldest first, one JSON object per line.
    List {
        #[command(flatten)]
        data: DataArgs,
        /// Only the entries of this event id.
        #[arg(long)]
        event_id: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter as JSON.
    Show {
        #[command(flatten)]
        data: DataArgs,
        /// The dead letter's id (from `fluxa dlq list`).
        id: String,
    },
    /// Move dead letters back to the queue for another try.
    Redrive {
        #[command(flatten)]
        data: DataArgs,
        /// Redrive every dead letter.
        #[arg(long, conflicts_with_all = ["event_id", "id"], required_unless_present_any = ["event_id", "id"])]
        all: bool,
        /// Redrive the dead letters of this event id.
        #[arg(long, conflicts_with = "id")]
        event_id: Option<String>,
        /// Redrive the dead letter with this id.
        #[arg(long)]
        id: Option<String>,
    },
}

impl ServeArgs {
    fn into_config(self) -> Config {
        let default_workers = if self.data.database_url.is_some() {
            fluxa_server::DEFAULT_WORKERS_POSTGRES
        } else {
            fluxa_server::DEFAULT_WORKERS_EMBEDDED
        };
        Config {
            bind: self.bind,
            data_dir: self.data.data_dir,
            database_url: self.data.database_url.map(SecretString::from),
            role: match self.role {
                RoleArg::All => Role::All,
                RoleArg::Api => Role::Api,
                RoleArg::Worker => Role::Worker,
            },
            workers: self.workers.unwrap_or(default_workers),
            limits: Limits {
                max_payload_bytes: self.max_payload_bytes,
                max_batch_bytes: self.max_batch_bytes,
            },
            visibility_timeout: self.visibility_timeout,
            lease: self.lease,
            max_receives: self.max_receives,
            retry_backoff: self.retry_backoff,
            retry_backoff_max: self.retry_backoff_max,
            blob_sweep_interval: self.blob_sweep_interval,
            blob_grace: self.blob_grace,
            api_tokens: self.api_tokens.map(SecretString::from),
            insecure_no_auth: self.insecure_no_auth,
        }
    }
}

/// Parses the command line, then fills `serve`'s unset options from its `--config` file.
fn parse_cli() -> anyhow::Result<Cli> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Serve(args), Some(serve_matches)) =
        (&mut cli.command, matches.subcommand_matches("serve"))
    {
        if let Some(path) = args.config.clone() {
            config_file::ConfigFile::load(&path)?.apply(args, serve_matches)?;
        }
    }
    Ok(cli)
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("fluxa: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let log_output = match cli.command {
        Command::Serve(_) => fluxa_telemetry::LogOutput::Stdout,
        _ => fluxa_telemetry::LogOutput::Stderr,
    };
    fluxa_telemetry::init_logging(log_output);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fluxa: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line.
            tracing::error!(error.message = %format!("{e:#}"), "fluxa failed");
            eprintln!("fluxa: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.into_config();
            config.validate()?;
            let listener = fluxa_server::bind(&config).await?;
            let shutdown = CancellationToken::new();
            fluxa_server::cancel_on_signals(shutdown.clone());
            fluxa_server::run(config, listener, shutdown).await
        }
        Command::Migrate(data) => {
            fluxa_server::open_backends(&data.config()).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Dlq { command } => run_dlq(command).await,
    }
}

async fn run_dlq(command: DlqCommand) -> anyhow::Result<()> {
    let data = match &command {
        DlqCommand::List { data, .. }
        | DlqCommand::Show { data, .. }
        | DlqCommand::Redrive { data, .. } => data.clone(),
    };
    let backends = fluxa_server::open_backends(&data.config()).await?;
    let queue = backends.queue;
    match command {
        DlqCommand::List {
            event_id, limit, ..
        } => {
            let entries = queue
                .list_dead_letters(limit, event_id.as_deref())
                .await
                .context("failed to list dead letters")?;
            for entry in &entries {
                println!(
                    "{}",
                    serde_json::to_string(&fluxa_api::dead_letter_json(entry))?
                );
            }
            eprintln!("{} dead letter(s)", entries.len());
        }
        DlqCommand::Show { id, .. } => {
            let entry = queue
                .get_dead_letter(&id)
                .await
                .context("failed to read the dead letter")?
                .with_context(|| format!("no dead letter with id {id}"))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&fluxa_api::dead_letter_json(&entry))?
            );
        }
        DlqCommand::Redrive {
            all, event_id, id, ..
        } => {
            let selector = match (all, event_id, id) {
                (_, Some(event_id), _) => RedriveSelector::EventId(event_id),
                (_, _, Some(id)) => RedriveSelector::Id(id),
                _ => RedriveSelector::All,
            };
            let n_redriven = queue
                .redrive(&selector)
                .await
                .context("failed to redrive")?;
            println!("{}", serde_json::json!({ "redriven": n_redriven }));
        }
    }
    Ok(())
}
