//! `fluxa events …`, `fluxa dlq …` and `fluxa idempotency …`: the operator commands, each one
//! or a few calls to the HTTP API through a [`Client`], printed by [`crate::output`].

use anyhow::Context;
use axum::http::Method;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::{encode, query, Client};
use crate::output::{self, Column, Format};

/// The filters of `GET /v1/events`.
#[derive(Args, Debug, Clone, Default)]
pub struct EventFilterArgs {
    /// Only events of this type.
    #[arg(long)]
    pub event_type: Option<String>,
    /// Only events from this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only events received at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only events received before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

/// The filters of `GET /v1/admin/dlq` and of a filtered redrive.
#[derive(Args, Debug, Clone, Default)]
pub struct DlqFilterArgs {
    /// Only the dead letters of this event id.
    #[arg(long)]
    pub event_id: Option<String>,
    /// Only this error code (invalid_message, hash_mismatch, blob_missing, event_id_conflict,
    /// retries_exhausted, …).
    #[arg(long)]
    pub error_code: Option<String>,
    /// Only this error class: permanent or retries_exhausted.
    #[arg(long)]
    pub error_class: Option<String>,
    /// Only dead letters of events of this type.
    #[arg(long)]
    pub event_type: Option<String>,
    /// Only those dead-lettered at or after this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Only those dead-lettered before this time (RFC 3339).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
}

impl DlqFilterArgs {
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("event_id", self.event_id.clone()),
            ("error_code", self.error_code.clone()),
            ("error_class", self.error_class.clone()),
            ("event_type", self.event_type.clone()),
            ("since", self.since.clone()),
            ("until", self.until.clone()),
        ]
    }

    fn is_empty(&self) -> bool {
        self.pairs().iter().all(|(_, value)| value.is_none())
    }

    /// The filter as a redrive body's `filter` member.
    fn to_json(&self) -> Value {
        let members = self
            .pairs()
            .into_iter()
            .filter_map(|(name, value)| value.map(|value| (name.to_owned(), Value::String(value))))
            .collect();
        Value::Object(members)
    }
}

/// Paging options shared by the listings.
#[derive(Args, Debug, Clone, Default)]
pub struct PageArgs {
    /// At most this many per page (1 to 1000; default 100, or 1000 with --all).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Start after this cursor (printed by the previous page).
    #[arg(long)]
    pub cursor: Option<String>,
    /// Page through everything that matches, not only the first page.
    #[arg(long)]
    pub all: bool,
}

impl PageArgs {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(if self.all { 1000 } else { 100 })
    }
}

#[derive(Subcommand, Debug)]
pub enum EventsCommand {
    /// List stored events, oldest first, with filters.
    List {
        #[command(flatten)]
        filter: EventFilterArgs,
        #[command(flatten)]
        page: PageArgs,
        /// Include each event's payload.
        #[arg(long)]
        include_payload: bool,
    },
    /// Show one stored event, with its payload.
    Get { event_id: String },
    /// Show an event's processing status.
    Status { event_id: String },
    /// Erase an event: its row, payload, dead letters and blobs; it can never come back.
    Erase { event_id: String },
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters, oldest first, with filters.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one dead letter, with its original message.
    Show {
        /// The dead letter's id (from `fluxa dlq list`).
        id: String,
    },
    /// Move dead letters back to the queue for another try: all, by id, or by filters.
    Redrive {
        /// Redrive every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// Redrive the dead letter with this id.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Only count what would be redriven; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum IdempotencyCommand {
    /// Show an event's idempotency record.
    Show { event_id: String },
    /// Evict a processing or failed record, so the next delivery starts fresh.
    Evict { event_id: String },
}

const EVENT_COLUMNS: &[Column] = &[
    ("event_id", "event_id"),
    ("event_type", "event_type"),
    ("source", "source"),
    ("received_at", "received_at"),
    ("size", "payload_size"),
    ("mode", "payload_mode"),
    ("correlation_id", "correlation_id"),
];

const DEAD_LETTER_COLUMNS: &[Column] = &[
    ("id", "id"),
    ("event_id", "event_id"),
    ("event_type", "event_type"),
    ("class", "error_class"),
    ("code", "error/code"),
    ("receives", "receive_count"),
    ("dead_lettered_at", "dead_lettered_at"),
];

pub async fn events(client: &Client, command: EventsCommand, format: Format) -> anyhow::Result<()> {
    match command {
        EventsCommand::List {
            filter,
            page,
            include_payload,
        } => {
            let mut pairs = vec![
                ("event_type", filter.event_type),
                ("source", filter.source),
                ("since", filter.since),
                ("until", filter.until),
                ("limit", Some(page.limit().to_string())),
            ];
            if include_payload {
                pairs.push(("include", Some("payload".to_owned())));
            }
            list(
                client,
                "/v1/events",
                "events",
                pairs,
                &page,
                EVENT_COLUMNS,
                format,
            )
            .await
        }
        EventsCommand::Get { event_id } => {
            let event: Value = client
                .call(
                    Method::GET,
                    &format!("/v1/events/{}", encode(&event_id)),
                    None,
                )
                .await?;
            output::print_object(format, &event);
            Ok(())
        }
        EventsCommand::Status { event_id } => {
            let status: Value = client
                .call(
                    Method::GET,
                    &format!("/v1/events/{}/status", encode(&event_id)),
                    None,
                )
                .await?;
            output::print_object(format, &status);
            Ok(())
        }
        EventsCommand::Erase { event_id } => {
            client
                .call::<Value>(
                    Method::DELETE,
                    &format!("/v1/admin/events/{}", encode(&event_id)),
                    None,
                )
                .await?;
            output::print_object(format, &json!({"event_id": event_id, "erased": true}));
            Ok(())
        }
    }
}

pub async fn dlq(client: &Client, command: DlqCommand, format: Format) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { filter, page } => {
            let mut pairs = filter.pairs();
            pairs.push(("limit", Some(page.limit().to_string())));
            list(
                client,
                "/v1/admin/dlq",
                "dead_letters",
                pairs,
                &page,
                DEAD_LETTER_COLUMNS,
                format,
            )
            .await
        }
        DlqCommand::Show { id } => {
            let entry: Value = client
                .call(Method::GET, &format!("/v1/admin/dlq/{}", encode(&id)), None)
                .await?;
            output::print_object(format, &entry);
            Ok(())
        }
        DlqCommand::Redrive {
            all,
            id,
            filter,
            dry_run,
        } => {
            let outcome = redrive(client, all, id, filter, dry_run).await?;
            output::print_object(format, &outcome);
            Ok(())
        }
    }
}

pub async fn idempotency(
    client: &Client,
    command: IdempotencyCommand,
    format: Format,
) -> anyhow::Result<()> {
    match command {
        IdempotencyCommand::Show { event_id } => {
            let record: Value = client
                .call(
                    Method::GET,
                    &format!("/v1/admin/idempotency/{}", encode(&event_id)),
                    None,
                )
                .await?;
            output::print_object(format, &record);
        }
        IdempotencyCommand::Evict { event_id } => {
            client
                .call::<Value>(
                    Method::DELETE,
                    &format!("/v1/admin/idempotency/{}", encode(&event_id)),
                    None,
                )
                .await?;
            output::print_object(format, &json!({"event_id": event_id, "evicted": true}));
        }
    }
    Ok(())
}

/// Prints one page of a listing, or with `--all` every page (a spinner counts them); the next
/// page's cursor, if any, goes to stderr so stdout stays the rows alone.
async fn list(
    client: &Client,
    path: &str,
    member: &str,
    mut pairs: Vec<(&'static str, Option<String>)>,
    page: &PageArgs,
    columns: &[Column],
    format: Format,
) -> anyhow::Result<()> {
    let mut cursor = page.cursor.clone();
    let progress = page
        .all
        .then(|| output::spinner(&format!("listing {member}")));
    loop {
        pairs.retain(|(name, _)| *name != "cursor");
        pairs.push(("cursor", cursor.clone()));
        let answer: Value = client
            .call(Method::GET, &format!("{path}{}", query(&pairs)), None)
            .await?;
        let rows = answer[member].as_array().cloned().unwrap_or_default();
        if let Some(progress) = &progress {
            progress.inc(rows.len() as u64);
        }
        if !rows.is_empty() || !page.all {
            if let Some(progress) = &progress {
                progress.suspend(|| output::print_rows(format, columns, &rows));
            } else {
                output::print_rows(format, columns, &rows);
            }
        }
        cursor = answer["next_cursor"].as_str().map(str::to_owned);
        match (&cursor, page.all) {
            (Some(_), true) => continue,
            (Some(next), false) => eprintln!("more: --cursor {next}"),
            (None, _) => {}
        }
        break;
    }
    if let Some(progress) = progress {
        progress.finish_and_clear();
    }
    Ok(())
}

/// Dead letters moved per request: a request stays short on a large DLQ (and under a proxy's
/// timeout), and the progress bar moves.
const REDRIVE_CHUNK: u64 = 1000;

/// A redrive: a dry run counts; a real one by filter counts first, then moves the matches in
/// chunks with `until` fixed at the start, so an entry that fails again meanwhile is not
/// picked up twice and the loop always ends.
async fn redrive(
    client: &Client,
    all: bool,
    id: Option<String>,
    filter: DlqFilterArgs,
    dry_run: bool,
) -> anyhow::Result<Value> {
    let post = |body: Value| async move {
        client
            .call::<Value>(
                Method::POST,
                "/v1/admin/dlq/redrive",
                Some(Bytes::from(body.to_string())),
            )
            .await
    };
    if let Some(id) = id {
        anyhow::ensure!(
            filter.is_empty(),
            "--id redrives one dead letter; it takes no filters"
        );
        return post(json!({"id": id, "dry_run": dry_run})).await;
    }
    anyhow::ensure!(
        all || !filter.is_empty(),
        "say what to redrive: --all, --id ID, or filters such as --error-code CODE"
    );
    let mut filter = filter;
    let started = Utc::now();
    let until = match filter.until.as_deref() {
        Some(text) => Some(
            DateTime::parse_from_rfc3339(text)
                .map(|at| at.with_timezone(&Utc))
                .with_context(|| format!("--until {text:?} is not an RFC 3339 time"))?,
        ),
        None => None,
    };
    // Fixed before the first request, so every chunk moves only what had failed by then.
    let until = fluxa_queue::redrive_cutoff(until, started);
    filter.until = Some(until.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    let count = post(json!({"filter": filter.to_json(), "dry_run": true})).await?;
    if dry_run {
        return Ok(count);
    }
    let matched = count["matched"].as_u64().unwrap_or(0);
    let progress = output::bar(matched, "redriving");
    let mut redriven = 0;
    loop {
        let moved = post(json!({"filter": filter.to_json(), "limit": REDRIVE_CHUNK})).await?
            ["redriven"]
            .as_u64()
            .unwrap_or(0);
        redriven += moved;
        progress.inc(moved);
        if moved < REDRIVE_CHUNK {
            break;
        }
    }
    progress.finish_and_clear();
    Ok(json!({"matched": matched, "redriven": redriven, "dry_run": false}))
}
