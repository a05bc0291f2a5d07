//! The `fluxa` command: a thin CLI over `fluxa-server` (serve, migrate) and the operator
//! commands (events, dlq, idempotency, import), which speak the HTTP API to a running server
//! or, in-process, over the configured backends. Its setting flags are built from
//! `fluxa_host::SETTINGS`, and `fluxa_host::Config::load` does all parsing, layering and
//! validation, so a setting is added in `fluxa-server` alone.
//!
//! Exit codes, for scripts: 0 success; 1 failure (unreachable, an outage, a server error);
//! 2 bad usage or input (400, 413, 415); 3 not found (404); 4 conflict (409); 5 an import that
//! finished with rejected lines; 6 unauthorized or forbidden (401, 403).

mod client;
mod import;
mod operate;
mod output;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use axum::http::StatusCode;
use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand};
use fluxa_host::{Config, FlagKind, Sources, ValidatedConfig, SETTINGS};
use tokio_util::sync::CancellationToken;

use crate::client::{ApiFailure, Client};
use crate::output::OutputArgs;

/// mimalloc rather than glibc's malloc: glibc raises its mmap threshold after a large buffer
/// is freed, so the 10 MiB bodies and payloads that the memory bounds admit one after another
/// are then kept on its heaps, and peak RSS grows by a few hundred MB past the bounds; mimalloc
/// gives freed pages back (measured in docs/SECURITY.md, Limits).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Serve(SettingArgs<true>),
    /// Create or upgrade the store and queue schemas, then exit.
    Migrate(SettingArgs<false>),
    /// List, read, check and erase stored events.
    Events {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: operate::EventsCommand,
    },
    /// List, show and redrive dead letters.
    Dlq {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: operate::DlqCommand,
    },
    /// Show and evict idempotency records.
    Idempotency {
        #[command(flatten)]
        target: Target,
        #[command(subcommand)]
        command: operate::IdempotencyCommand,
    },
    /// Ingest events from an NDJSON file (one event per line, as POST /v1/events takes it).
    Import {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        args: import::ImportArgs,
    },
}

/// Where an operator command goes: a running server (`--server`), or the configured backends
/// directly (the settings flags, `FLUXA_*` variables and `--config`).
#[derive(Args, Debug, Clone)]
struct Target {
    /// Talk to the running Fluxa server at this URL instead of opening the backends directly
    /// (the only way on AWS).
    #[arg(long, global = true, value_name = "URL", env = "FLUXA_SERVER")]
    server: Option<String>,
    /// The bearer token for --server (a token with the scope the command needs).
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "FLUXA_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    data: SettingArgs<false>,
}

impl Target {
    async fn client(&self) -> anyhow::Result<Client> {
        match &self.server {
            Some(url) => Client::remote(url, self.token.clone()),
            None => {
                anyhow::ensure!(
                    self.token.is_none(),
                    "--token is for --server; working on the backends directly needs none"
                );
                Client::local(&self.data.clone().load()?).await
            }
        }
    }
}

/// The settings given on the command line: every setting for `serve` (`ALL`), only those that
/// locate the backends for `migrate` and `dlq`. Values stay text until `Config::load`, so a bad
/// one is reported the same way whether it came from a flag, a variable or the file.
#[derive(Debug, Clone, Default)]
struct SettingArgs<const ALL: bool> {
    config: Option<PathBuf>,
    /// By file key; only what the user typed (the flags have no clap defaults for that reason).
    flags: BTreeMap<String, String>,
}

impl<const ALL: bool> SettingArgs<ALL> {
    fn settings() -> impl Iterator<Item = &'static fluxa_host::Setting> {
        SETTINGS.iter().filter(|s| ALL || s.locates_backends)
    }

    /// `Config::load` over the process's `FLUXA_*` variables, the file and these flags.
    fn load(self) -> anyhow::Result<ValidatedConfig> {
        let mut sources = Sources::from_process_env()?;
        sources.file = self.config;
        sources.flags = self.flags;
        if !ALL {
            // `migrate` and the operator commands serve nothing: a FLUXA_BIND meant for `serve`
            // must not make them refuse to run (the no-tokens-on-a-public-address check is about serving).
            sources.flags.insert("role".to_owned(), "worker".to_owned());
        }
        Config::load(sources)
    }
}

impl<const ALL: bool> Args for SettingArgs<ALL> {
    fn augment_args(mut cmd: clap::Command) -> clap::Command {
        cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .global(true)
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "A TOML file setting the options below, under the same names in snake_case \
                     (see config.example.toml). FLUXA_* variables and flags override it. \
                     [env: FLUXA_CONFIG]",
                ),
        );
        for setting in Self::settings() {
            // The env name and default go in the help text by hand: clap's own `env` and
            // `default_value` would make an unset flag look set, and could print a secret.
            let mut help = format!("{} [env: {}]", setting.help, setting.env);
            if let Some(default) = Config::default_text(setting.key) {
                help.push_str(&format!(" [default: {default}]"));
            }
            // Global, so an operator command takes them after its subcommand too
            // (`fluxa dlq list --data-dir …`).
            let arg = Arg::new(setting.key)
                .long(setting.flag)
                .global(true)
                .help(help);
            cmd = cmd.arg(match setting.kind {
                FlagKind::Value => arg.action(ArgAction::Set).value_name(setting.value_name),
                FlagKind::Switch => arg.action(ArgAction::SetTrue),
            });
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl<const ALL: bool> FromArgMatches for SettingArgs<ALL> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Self::default();
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        if let Some(path) = matches.get_one::<PathBuf>("config") {
            self.config = Some(path.clone());
        }
        for setting in Self::settings() {
            let value = match setting.kind {
                FlagKind::Switch => matches.get_flag(setting.key).then(|| "true".to_owned()),
                FlagKind::Value => matches.get_one::<String>(setting.key).cloned(),
            };
            if let Some(value) = value {
                self.flags.insert(setting.key.to_owned(), value);
            }
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_output = match cli.command {
        Command::Serve(_) => fluxa_telemetry::LogOutput::Stdout,
        Command::Migrate(_) => fluxa_telemetry::LogOutput::Stderr,
        _ => fluxa_telemetry::LogOutput::Operator,
    };
    // `serve` and `migrate` need their settings before anything starts; the operator
    // commands load them only when they open the backends (not with --server).
    let config = match &cli.command {
        Command::Serve(args) => Some(args.clone().load()),
        Command::Migrate(args) => Some(args.clone().load()),
        _ => None,
    }
    .transpose();
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line.
            eprintln!("fluxa: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    fluxa_telemetry::init_logging(log_output);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("fluxa: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            // A server's logs are where its failure must be; an operator command's answer is
            // the one line below.
            if log_output != fluxa_telemetry::LogOutput::Operator {
                tracing::error!(error.message = %format!("{e:#}"), "fluxa failed");
            }
            eprintln!("fluxa: {e:#}");
            exit_code(&e)
        }
    }
}

/// The exit code a failed command ends with (see the crate's documentation).
fn exit_code(error: &anyhow::Error) -> ExitCode {
    let Some(failure) = error.chain().find_map(|e| e.downcast_ref::<ApiFailure>()) else {
        return ExitCode::FAILURE;
    };
    match failure.status {
        StatusCode::NOT_FOUND => ExitCode::from(3),
        StatusCode::CONFLICT => ExitCode::from(4),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ExitCode::from(6),
        status if status.is_client_error() => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

async fn run(command: Command, config: Option<ValidatedConfig>) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(_) => {
            let config = config.expect("serve loads its settings first");
            let listener = fluxa_server::bind(config.config()).await?;
            let shutdown = CancellationToken::new();
            fluxa_server::cancel_on_signals(shutdown.clone());
            fluxa_server::run(config, listener, shutdown).await?;
        }
        Command::Migrate(_) => {
            let config = config.expect("migrate loads its settings first");
            fluxa_host::open_validated(&config).await?;
            eprintln!("migrations applied");
        }
        Command::Events { target, command } => {
            let client = target.client().await?;
            operate::events(&client, command, target.output.format()).await?;
        }
        Command::Dlq { target, command } => {
            let client = target.client().await?;
            operate::dlq(&client, command, target.output.format()).await?;
        }
        Command::Idempotency { target, command } => {
            let client = target.client().await?;
            operate::idempotency(&client, command, target.output.format()).await?;
        }
        Command::Import { target, args } => {
            let client = target.client().await?;
            let summary = import::run(&client, args, target.output.format()).await?;
            if summary.n_rejected() > 0 {
                return Ok(ExitCode::from(5));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
