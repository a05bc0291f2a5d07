//! The retention pruner (contract section 8): deletes events, dead letters and orphaned
//! idempotency records past their configured retention, in bounded batches, in the background.
//!
//! It must never stall ingest or processing, so each delete is one short transaction of at most
//! `batch` rows, and after each the pruner rests twice as long as the delete took: it holds the
//! database (SQLite's single writer, or PostgreSQL's row locks) at most a third of the time,
//! however far behind it is. (Resting only as long, half the time, cost embedded ingest 21% of
//! its throughput in `fluxa-bench operate`; a third still prunes some 20k rows/s there.) The backends delete with `FOR UPDATE SKIP LOCKED` (PostgreSQL) or under
//! the single writer (SQLite), so any number of replicas may run it at once: they share the
//! work instead of contending for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use fluxa_queue::DeadLetterAdmin;
use fluxa_store::StoreAdmin;
use tokio_util::sync::CancellationToken;

/// What to prune, and how gently.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Events received longer ago than this; `None` keeps them.
    pub events: Option<Duration>,
    /// Dead letters older than this; `None` keeps them.
    pub dead_letters: Option<Duration>,
    /// Idempotency records whose event is gone, unchanged for this long; `None` keeps them.
    pub idempotency: Option<Duration>,
    /// How often a pruning pass starts.
    pub interval: Duration,
    /// Rows one delete removes at most.
    pub batch: usize,
}

impl Retention {
    /// Whether there is anything to prune at all (all three are off by default).
    pub fn enabled(&self) -> bool {
        self.events.is_some() || self.dead_letters.is_some() || self.idempotency.is_some()
    }
}

/// Rows one pass deleted, per table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    pub dead_letters: u64,
    pub idempotency: u64,
}

/// Prunes every `retention.interval` until `shutdown`; returns at once if retention is off.
pub async fn run_pruner(
    store: Arc<dyn StoreAdmin>,
    dead_letters: Arc<dyn DeadLetterAdmin>,
    retention: Retention,
    shutdown: CancellationToken,
) {
    if !retention.enabled() {
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(retention.interval) => {}
        }
        match prune_once(&*store, &*dead_letters, &retention, &shutdown).await {
            Ok(pruned) if pruned == Pruned::default() => {}
            Ok(pruned) => tracing::info!(
                n_events = pruned.events,
                n_dead_letters = pruned.dead_letters,
                n_idempotency_records = pruned.idempotency,
                "retention pruned"
            ),
            Err(e) => tracing::warn!(error.message = %e, "pruning failed; will try again"),
        }
    }
}

/// One pass: deletes everything past its retention, batch by batch, until nothing is left or
/// `shutdown` is cancelled. Events go before idempotency records, so a record whose event is
/// pruned in this pass can be pruned in the same pass.
pub async fn prune_once(
    store: &dyn StoreAdmin,
    dead_letters: &dyn DeadLetterAdmin,
    retention: &Retention,
    shutdown: &CancellationToken,
) -> anyhow::Result<Pruned> {
    let now = Utc::now();
    let mut pruned = Pruned::default();
    if let Some(keep) = retention.events {
        let before = cutoff(now, keep)?;
        pruned.events = drain("events", retention.batch, shutdown, || {
            store.prune_events(before, retention.batch)
        })
        .await?;
    }
    if let Some(keep) = retention.dead_letters {
        let before = cutoff(now, keep)?;
        pruned.dead_letters = drain("dead_letters", retention.batch, shutdown, || {
            dead_letters.prune_dead_letters(before, retention.batch)
        })
        .await?;
    }
    if let Some(keep) = retention.idempotency {
        let before = cutoff(now, keep)?;
        pruned.idempotency = drain("idempotency_records", retention.batch, shutdown, || {
            store.prune_idempotency(before, retention.batch)
        })
        .await?;
    }
    Ok(pruned)
}

fn cutoff(now: DateTime<Utc>, keep: Duration) -> anyhow::Result<DateTime<Utc>> {
    Ok(now - chrono::Duration::from_std(keep)?)
}

/// Runs `delete` until it deletes less than a full batch, resting after each twice as long as
/// it took; counts what it deleted in `fluxa_pruned_rows_total{table}`.
async fn drain<F, Fut, E>(
    table: &'static str,
    batch: usize,
    shutdown: &CancellationToken,
    mut delete: F,
) -> anyhow::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let mut total = 0;
    loop {
        let started = Instant::now();
        let deleted = delete().await?;
        total += deleted;
        metrics::counter!("fluxa_pruned_rows_total", "table" => table).increment(deleted);
        if deleted < batch as u64 {
            return Ok(total);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(total),
            () = tokio::time::sleep(started.elapsed() * 2) => {}
        }
    }
}
