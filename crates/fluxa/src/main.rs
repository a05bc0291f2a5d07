//! The `fluxa` command: a thin CLI over `fluxa-server` (serve, migrate) and the queue's
//! dead-letter operations. Its flags are built from `fluxa_server::SETTINGS`, and
//! `fluxa_server::Config::load` does all parsing, layering and validation, so a setting is
//! added in `fluxa-server` alone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand};
use fluxa_queue::RedriveSelector;
use fluxa_server::{Config, FlagKind, Sources, ValidatedConfig, SETTINGS};
use tokio_util::sync::CancellationToken;

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
    /// Inspect and redrive the dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
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
    fn settings() -> impl Iterator<Item = &'static fluxa_server::Setting> {
        SETTINGS.iter().filter(|s| ALL || s.locates_backends)
    }

    /// `Config::load` over the process's `FLUXA_*` variables, the file and these flags.
    fn load(self) -> anyhow::Result<ValidatedConfig> {
        let mut sources = Sources::from_process_env()?;
        sources.file = self.config;
        sources.flags = self.flags;
        if !ALL {
            // `migrate` and `dlq` serve nothing: a FLUXA_BIND meant for `serve` must not make
            // them refuse to run (the no-tokens-on-a-public-address check is about serving).
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
            let arg = Arg::new(setting.key).long(setting.flag).help(help);
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

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// List dead letters, oldest first, one JSON object per line.
    List {
        #[command(flatten)]
        data: SettingArgs<false>,
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
        data: SettingArgs<false>,
        /// The dead letter's id (from `fluxa dlq list`).
        id: String,
    },
    /// Move dead letters back to the queue for another try.
    Redrive {
        #[command(flatten)]
        data: SettingArgs<false>,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (log_output, settings) = match cli.command {
        Command::Serve(ref args) => (fluxa_telemetry::LogOutput::Stdout, args.clone().load()),
        Command::Migrate(ref args) => (fluxa_telemetry::LogOutput::Stderr, args.clone().load()),
        Command::Dlq { ref command } => (
            fluxa_telemetry::LogOutput::Stderr,
            command.data().clone().load(),
        ),
    };
    let config = match settings {
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
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error.message = %format!("{e:#}"), "fluxa failed");
            eprintln!("fluxa: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: ValidatedConfig) -> anyhow::Result<()> {
    match command {
        Command::Serve(_) => {
            let listener = fluxa_server::bind(config.config()).await?;
            let shutdown = CancellationToken::new();
            fluxa_server::cancel_on_signals(shutdown.clone());
            fluxa_server::run(config, listener, shutdown).await
        }
        Command::Migrate(_) => {
            fluxa_server::open_validated(&config).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Dlq { command } => run_dlq(command, &config).await,
    }
}

impl DlqCommand {
    fn data(&self) -> &SettingArgs<false> {
        match self {
            Self::List { data, .. } | Self::Show { data, .. } | Self::Redrive { data, .. } => data,
        }
    }
}

async fn run_dlq(command: DlqCommand, config: &ValidatedConfig) -> anyhow::Result<()> {
    let backends = fluxa_server::open_validated(config).await?;
    let queue = backends.queue.dead_letters;
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
