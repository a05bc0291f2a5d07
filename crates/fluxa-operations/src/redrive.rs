//! [`redrive`]: dead letters back to the queue (contract section 8), one by id or every one a
//! filter selects, under the one cutoff rule ([`fluxa_queue::redrive_cutoff`]).

use chrono::Utc;
use fluxa_queue::{DeadLetterAdmin, RedriveSelector};

/// How a redrive runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedriveOptions {
    /// Only count what would move.
    pub dry_run: bool,
    /// Move at most this many in this call (a client loops, with its own cutoff, to show
    /// progress); `None` moves every match, in bounded transactions.
    pub limit: Option<u64>,
}

/// What a redrive matched when it began, and what it moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedriveReport {
    pub matched: u64,
    pub redriven: u64,
}

/// Redrives what `selector` names. A filter is taken as of now, once, for the count and the
/// moves alike, so the two agree and an entry that fails again meanwhile is not moved twice;
/// the moves run in transactions of [`fluxa_queue::REDRIVE_BATCH`], so a redrive of a large
/// DLQ holds no long lock and may be repeated safely.
pub async fn redrive(
    dead_letters: &dyn DeadLetterAdmin,
    selector: &RedriveSelector,
    options: RedriveOptions,
) -> fluxa_queue::Result<RedriveReport> {
    let report = match selector {
        RedriveSelector::Id(id) => {
            let matched = u64::from(dead_letters.get_dead_letter(id).await?.is_some());
            let redriven = if options.dry_run || matched == 0 {
                0
            } else {
                dead_letters.redrive(selector, 1).await?
            };
            RedriveReport { matched, redriven }
        }
        RedriveSelector::Filter(filter) => {
            let filter = filter.as_of(Utc::now());
            let matched = dead_letters.count_dead_letters(&filter).await?;
            let redriven = match (options.dry_run || matched == 0, options.limit) {
                (true, _) => 0,
                (false, None) => {
                    fluxa_queue::redrive_in_batches(
                        dead_letters,
                        &filter,
                        fluxa_queue::REDRIVE_BATCH,
                        |_| {},
                    )
                    .await?
                }
                (false, Some(limit)) => {
                    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
                    dead_letters
                        .redrive(&RedriveSelector::Filter(filter), limit)
                        .await?
                }
            };
            RedriveReport { matched, redriven }
        }
    };
    tracing::info!(
        target: "fluxa::audit",
        action = "dlq.redrive",
        selector = ?selector,
        dry_run = options.dry_run,
        limit = options.limit,
        matched = report.matched,
        redriven = report.redriven,
        "operator action"
    );
    Ok(report)
}
