//! The self-hosted worker pool: N tasks that each receive a batch, tell the store about
//! messages the queue gave up on, process the batch with [`Processor::process_batch`], settle
//! every disposition, and stop at shutdown only after finishing the batch in hand.

use std::sync::Arc;
use std::time::Duration;

use fluxa_core::{CorrelationId, EventId};
use fluxa_queue::{Consumer, Delivery};
use tokio_util::sync::CancellationToken;

use crate::{settle, Disposition, Processor};

/// How long one receive waits for a message; also the worst-case delay before a worker notices
/// shutdown while idle (we never abandon a receive midway, so no message is left hidden).
const RECEIVE_WAIT: Duration = Duration::from_millis(500);

/// Pause after a failed receive, so a down queue is not hammered.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Runs `n_workers` workers, each receiving up to `batch_size` messages at a time, until
/// `shutdown` is cancelled and each has finished its batch.
pub async fn run_workers(
    processor: Processor,
    consumer: Arc<dyn Consumer>,
    n_workers: usize,
    batch_size: usize,
    shutdown: CancellationToken,
) {
    let mut workers = tokio::task::JoinSet::new();
    let spawn = |workers: &mut tokio::task::JoinSet<usize>, worker_idx: usize| {
        let processor = processor.clone();
        let consumer = Arc::clone(&consumer);
        let shutdown = shutdown.clone();
        workers.spawn(async move {
            run_worker(
                worker_idx,
                &processor,
                consumer.as_ref(),
                batch_size,
                &shutdown,
            )
            .await;
            worker_idx
        });
    };
    for worker_idx in 0..n_workers {
        spawn(&mut workers, worker_idx);
    }
    let mut next_idx = n_workers;
    while let Some(joined) = workers.join_next().await {
        if let Err(e) = joined {
            // Processing catches its own panics, so this is a bug in the loop itself; keep the
            // pool at full strength rather than silently shrinking it.
            tracing::error!(error.message = %e, "a worker task ended abnormally");
            if !shutdown.is_cancelled() {
                spawn(&mut workers, next_idx);
                next_idx += 1;
            }
        }
    }
}

async fn run_worker(
    worker_idx: usize,
    processor: &Processor,
    consumer: &dyn Consumer,
    batch_size: usize,
    shutdown: &CancellationToken,
) {
    tracing::debug!(worker_idx, "worker started");
    while !shutdown.is_cancelled() {
        let received = match consumer.receive(batch_size, RECEIVE_WAIT).await {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(worker_idx, error.cause_chain = ?e, error.message = %e, "receive failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(RECEIVE_ERROR_PAUSE) => continue,
                }
            }
        };
        processor.record_exhausted(&received.exhausted).await;
        let deliveries = received.deliveries;
        if deliveries.is_empty() {
            continue;
        }
        let outcomes = processor.process_batch(&deliveries).await;
        let settled = settle(consumer, &deliveries, &outcomes).await;
        let mut done: Vec<&Delivery> = Vec::with_capacity(deliveries.len());
        for ((delivery, outcome), result) in deliveries.iter().zip(&outcomes).zip(settled) {
            let disposition = outcome.disposition();
            match (result, disposition) {
                (Ok(()), Disposition::Delete) => done.push(delivery),
                (Ok(()), _) => {}
                // Never silent: the message reappears after its visibility timeout and is
                // decided again (the store's idempotency absorbs the repeat), but say so.
                (Err(e), disposition) => {
                    let name = match disposition {
                        Disposition::Delete => "delete",
                        Disposition::RetryAfter { .. } => "retry",
                        Disposition::DeadLetter(_) => "dead_letter",
                    };
                    metrics::counter!("fluxa_settle_failures_total", "disposition" => name)
                        .increment(1);
                    let ids = &delivery.attributes;
                    tracing::error!(
                        worker_idx,
                        message_id = %delivery.message_id,
                        event_id = ids.event_id.as_ref().map(EventId::as_str),
                        correlation_id = ids.correlation_id.as_ref().map(CorrelationId::as_str),
                        disposition = name,
                        error.cause_chain = ?e,
                        error.message = %e,
                        "could not settle a message; it will be delivered again"
                    );
                }
            }
        }
        processor.discard_payloads(&done).await;
    }
    tracing::debug!(worker_idx, "worker stopped");
}
