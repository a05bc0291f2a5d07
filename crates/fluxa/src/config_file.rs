//! `fluxa serve --config FILE`: a TOML file with defaults for `serve`'s options, under the same
//! names in snake_case (see `config.example.toml` at the repository root). Precedence, highest
//! first: command-line flags, `FLUXA_*` environment variables, the file, built-in defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, ValueEnum};
use serde::Deserialize;

use crate::{RoleArg, ServeArgs};

/// The file's contents. Unknown keys are refused so a typo never silently does nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    bind: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    role: Option<String>,
    workers: Option<usize>,
    max_payload_bytes: Option<usize>,
    max_batch_bytes: Option<usize>,
    visibility_timeout: Option<String>,
    lease: Option<String>,
    max_receives: Option<u32>,
    retry_backoff: Option<String>,
    retry_backoff_max: Option<String>,
    blob_sweep_interval: Option<String>,
    blob_grace: Option<String>,
    api_tokens: Option<String>,
    insecure_no_auth: Option<bool>,
}

impl ConfigFile {
    /// Reads and parses `path`. Errors give the line and the parser's reason but never quote
    /// the file, which may hold tokens or a database password.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read config file {}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map(|span| {
                    let before = &text.as_bytes()[..span.start.min(text.len())];
                    before.iter().filter(|b| **b == b'\n').count() + 1
                })
                .unwrap_or(0);
            anyhow::anyhow!(
                "config file {} line {line}: {}",
                path.display(),
                e.message().trim()
            )
        })
    }

    /// Fills every option that neither a flag nor an environment variable set.
    pub fn apply(self, args: &mut ServeArgs, matches: &ArgMatches) -> anyhow::Result<()> {
        let unset = |id: &str| {
            !matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        macro_rules! take {
            ($field:ident => $target:expr) => {
                if let Some(value) = self.$field {
                    if unset(stringify!($field)) {
                        $target = value;
                    }
                }
            };
        }
        take!(bind => args.bind);
        take!(data_dir => args.data.data_dir);
        take!(max_payload_bytes => args.max_payload_bytes);
        take!(max_batch_bytes => args.max_batch_bytes);
        take!(max_receives => args.max_receives);
        take!(insecure_no_auth => args.insecure_no_auth);
        if let Some(url) = self.database_url {
            if unset("database_url") {
                args.data.database_url = Some(url);
            }
        }
        if let Some(workers) = self.workers {
            if unset("workers") {
                args.workers = Some(workers);
            }
        }
        if let Some(tokens) = self.api_tokens {
            if unset("api_tokens") {
                args.api_tokens = Some(tokens);
            }
        }
        if let Some(role) = self.role {
            if unset("role") {
                args.role = RoleArg::from_str(&role, false)
                    .map_err(|_| anyhow::anyhow!("config file: role must be all, api or worker"))?;
            }
        }
        let durations = [
            (
                "visibility_timeout",
                self.visibility_timeout,
                &mut args.visibility_timeout,
            ),
            ("lease", self.lease, &mut args.lease),
            ("retry_backoff", self.retry_backoff, &mut args.retry_backoff),
            (
                "retry_backoff_max",
                self.retry_backoff_max,
                &mut args.retry_backoff_max,
            ),
            (
                "blob_sweep_interval",
                self.blob_sweep_interval,
                &mut args.blob_sweep_interval,
            ),
            ("blob_grace", self.blob_grace, &mut args.blob_grace),
        ];
        for (id, text, target) in durations {
            if let Some(text) = text {
                if unset(id) {
                    *target = parse_duration(id, &text)?;
                }
            }
        }
        Ok(())
    }
}

fn parse_duration(key: &str, text: &str) -> anyhow::Result<Duration> {
    match humantime::parse_duration(text) {
        Ok(duration) => Ok(duration),
        Err(_) => bail!("config file: {key} must be a duration such as 30s or 500ms"),
    }
}
