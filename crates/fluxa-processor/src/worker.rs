//! The self-hosted worker pool: N tasks that receive a small batch, process it message by
//! message, delete the successes in one round trip, and stop at shutdown only after finishing
//! the batch in hand.

use std::sync::Arc;
use std::time::Duration;

use fluxa_queue::Queue;
use tokio_util::sync::CancellationToken;

use crate::{settle, Outcome, Processor};

/// How long one receive waits for a message; also the worst-case delay before a worker notices
/// shutdown while idle (we never abandon a receive midway, so no message is left hidden).
const RECEIVE_WAIT: Duration = Duration::from_millis(500);

/// Messages one worker receives at once: claims and deletes are batched, and a batch is small
/// enough to finish quickly at shutdown.
const RECEIVE_BATCH: usize = 8;

/// Pause after a failed receive, so a down queue is not hammered.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Runs `n_workers` workers until `shutdown` is cancelled and each has finished its message.
pub async fn run_workers(
    processor: Processor,
    queue: Arc<dyn Queue>,
    n_workers: usize,
    shutdown: CancellationToken,
) {
    let mut workers = tokio::task::JoinSet::new();
    let spawn = |workers: &mut tokio::task::JoinSet<usize>, worker_idx: usize| {
        let processor = processor.clone();
        let queue = Arc::clone(&queue);
        let shutdown = shutdown.clone();
        workers.spawn(async move {
            run_worker(worker_idx, &processor, queue.as_ref(), &shutdown).await;
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
    queue: &dyn Queue,
    shutdown: &CancellationToken,
) {
    tracing::debug!(worker_idx, "worker started");
    while !shutdown.is_cancelled() {
        let deliveries = match queue.receive(RECEIVE_BATCH, RECEIVE_WAIT).await {
            Ok(deliveries) => deliveries,
            Err(e) => {
                tracing::warn!(worker_idx, error.cause_chain = ?e, error.message = %e, "receive failed");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(RECEIVE_ERROR_PAUSE) => continue,
                }
            }
        };
        processor.record_exhausted(queue.take_exhausted()).await;
        let mut done = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let outcome = processor.process(&delivery).await;
            if matches!(outcome, Outcome::Processed | Outcome::Duplicate) {
                done.push(delivery);
            } else {
                settle(queue, &delivery, &outcome).await;
            }
        }
        match queue.delete_many(&done).await {
            Ok(()) => {
                for delivery in &done {
                    processor.discard_payload(delivery).await;
                }
            }
            // The store already holds the outcome; redelivery will be a harmless duplicate.
            Err(e) => {
                tracing::warn!(worker_idx, error.cause_chain = ?e, error.message = %e, "batch delete failed");
            }
        }
    }
    tracing::debug!(worker_idx, "worker stopped");
}
