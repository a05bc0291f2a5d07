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
        // A message written before keys carried the bucket's prefix names the blob without it.
        let referenced = queue.references_blob(&key).await?
            || match blobs.unprefixed_key(&key) {
                Some(older_form) => queue.references_blob(older_form).await?,
                None => false,
            };
        if !referenced {
            blobs.delete(&key).await?;
            n_deleted += 1;
        }
    }
    Ok(n_deleted)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use async_trait::async_trait;
    use bytes::Bytes;
    use fluxa_blob::BlobStore;
    use fluxa_core::EventId;
    use fluxa_queue::BlobReferences;

    /// A queue whose messages point at exactly these keys.
    struct Pointing(Vec<String>);

    #[async_trait]
    impl BlobReferences for Pointing {
        async fn references_blob(&self, key: &str) -> fluxa_queue::Result<bool> {
            Ok(self.0.iter().any(|k| k == key))
        }
    }

    #[tokio::test]
    async fn a_blob_an_older_message_names_without_the_prefix_is_kept_and_an_orphan_is_swept() {
        let bucket = Arc::new(object_store::memory::InMemory::new());
        let blobs = BlobStore::from_object_store(bucket, "b", "fluxa");
        let older = BlobStore::new_key(&EventId::parse("older").unwrap());
        let current = BlobStore::new_key(&EventId::parse("current").unwrap());
        let orphan = BlobStore::new_key(&EventId::parse("orphan").unwrap());
        let mut whole_keys = Vec::new();
        for key in [&older, &current, &orphan] {
            let blob = blobs.put(key, Bytes::from_static(b"1")).await.unwrap();
            whole_keys.push(blob.key);
        }
        // An upgrade: one message from before keys carried the prefix, one from after.
        let queue = Pointing(vec![older.clone(), whole_keys[1].clone()]);
        // Past the zero grace for certain: the sweep takes blobs strictly older than now.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let swept = super::sweep_orphan_blobs(&queue, &blobs, std::time::Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(swept, 1);
        let mut left = blobs
            .payload_keys_older_than(chrono::Utc::now() + chrono::Duration::hours(1))
            .await
            .unwrap();
        left.sort();
        let mut expected = whole_keys[..2].to_vec();
        expected.sort();
        assert_eq!(left, expected);
    }
}
