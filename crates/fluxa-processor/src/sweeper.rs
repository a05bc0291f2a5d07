//! The blob sweeper: deletes payload blobs that no message points at any more. Processing
//! deletes a blob as soon as its event is stored; what is left for the sweeper are blobs whose
//! ingest died between writing the blob and enqueuing its message, and deletions that failed.
//!
//! A blob younger than the grace period is never touched, because its ingest request may still
//! be about to enqueue the message that references it.

use std::sync::Arc;
use std::time::Duration;

use fluxa_blob::BlobStore;
use fluxa_queue::BlobReferences;
use tokio_util::sync::CancellationToken;

/// Sweeps every `every` until `shutdown`.
pub async fn run_blob_sweeper(
    queue: Arc<dyn BlobReferences>,
    blobs: BlobStore,
    every: Duration,
    grace: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match sweep_orphan_blobs(queue.as_ref(), &blobs, grace).await {
            Ok(0) => {}
            Ok(n_deleted) => tracing::info!(n_deleted, "orphaned payload blobs deleted"),
            Err(e) => tracing::warn!(error.message = %e, "blob sweep failed; will try again"),
        }
    }
}

/// One sweep: deletes the blobs older than `grace` that no queued or dead-lettered message
/// references, and returns how many it deleted.
pub async fn sweep_orphan_blobs(
    queue: &dyn BlobReferences,
    blobs: &BlobStore,
    grace: Duration,
) -> anyhow::Result<usize> {
    let cutoff = chrono::Utc::now() - chrono::Duration::from_std(grace)?;
    let mut n_deleted = 0;
    for key in blobs.payload_keys_older_than(cutoff).await? {
        if !queue.references_blob(&key).await? {
            blobs.delete(&key).await?;
            n_deleted += 1;
        }
    }
    Ok(n_deleted)
}
