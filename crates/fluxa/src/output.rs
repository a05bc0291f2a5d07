//! How the operator commands print: a table for people (stdout is a terminal, or `--table`),
//! one JSON object per line for scripts (stdout is not a terminal, or `--json`); progress bars
//! on stderr, drawn only when stderr is a terminal.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use comfy_table::{presets, ContentArrangement, Table};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

#[derive(Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Print one JSON object per line (the default when stdout is not a terminal).
    #[arg(long, global = true, conflicts_with = "table")]
    pub json: bool,
    /// Print a table (the default when stdout is a terminal).
    #[arg(long, global = true)]
    pub table: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

impl OutputArgs {
    pub fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else if self.table || std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        }
    }
}

/// One column: its heading and where its value is in each row's JSON (a `/`-separated path).
pub type Column = (&'static str, &'static str);

/// Prints `rows` as `format` says: the table shows `columns`; JSON shows each row whole.
pub fn print_rows(format: Format, columns: &[Column], rows: &[Value]) {
    match format {
        Format::Json => {
            for row in rows {
                println!("{row}");
            }
        }
        Format::Table => {
            let mut table = new_table();
            table.set_header(columns.iter().map(|(heading, _)| *heading));
            for row in rows {
                table.add_row(columns.iter().map(|(_, path)| cell(lookup(row, path))));
            }
            println!("{table}");
        }
    }
}

/// Prints one object: as a two-column table of its members, or as one JSON line.
pub fn print_object(format: Format, object: &Value) {
    match format {
        Format::Json => println!("{object}"),
        Format::Table => {
            let mut table = new_table();
            if let Some(members) = object.as_object() {
                for (key, value) in members {
                    table.add_row([key.clone(), cell(Some(value))]);
                }
            }
            println!("{table}");
        }
    }
}

/// A table that wraps to the terminal's width, or keeps its natural width when the terminal
/// reports none worth fitting (a pseudo-terminal without a size says 0 columns, which would
/// squeeze every column to one character).
fn new_table() -> Table {
    let mut table = Table::new();
    table.load_preset(presets::UTF8_FULL_CONDENSED);
    let arrangement = match table.width() {
        Some(width) if width >= 40 => ContentArrangement::Dynamic,
        _ => ContentArrangement::Disabled,
    };
    table.set_content_arrangement(arrangement);
    table
}

fn lookup<'a>(row: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('/').try_fold(row, |value, key| value.get(key))
}

/// A cell's text: strings bare, `null` as a dash, anything else as compact JSON.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    }
}

/// A progress bar of `total` steps on stderr (hidden unless stderr is a terminal).
pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {human_pos}/{human_len} ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// A spinner counting steps of unknown total, on stderr.
pub fn spinner(what: &str) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} {human_pos} ({per_sec}, {elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message(what.to_owned());
    spinner.enable_steady_tick(Duration::from_millis(200));
    spinner
}
