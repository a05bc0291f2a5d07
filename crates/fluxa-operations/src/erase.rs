//! [`erase`]: an operator's erasure of one event (contract section 8): its dead letters, its
//! row (or an `erased` tombstone that keeps a late redelivery from bringing it back) and every
//! blob it ever had.

use fluxa_blob::BlobStore;
use fluxa_core::EventId;
use fluxa_queue::DeadLetterAdmin;
use fluxa_store::StoreAdmin;

/// What an erasure found and removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErasureReport {
    /// An event row was deleted.
    pub event_deleted: bool,
    /// An idempotency record existed (it is now an `erased` tombstone).
    pub had_record: bool,
    pub dead_letters_deleted: u64,
    /// Messages of the event still waiting in the queue; their delivery finds it erased.
    pub messages_queued: u64,
    pub blobs_deleted: u64,
}

impl ErasureReport {
    /// Whether anything of the event existed (otherwise the id named nothing: a 404).
    pub fn found_anything(&self) -> bool {
        self.event_deleted
            || self.had_record
            || self.dead_letters_deleted > 0
            || self.messages_queued > 0
            || self.blobs_deleted > 0
    }
}

/// Which part an erasure could not finish; what was done before it stays done, and repeating
/// the erasure is safe.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("the dead letters could not be purged")]
    Queue(#[source] fluxa_queue::Error),
    #[error("the event could not be erased from the store")]
    Store(#[source] fluxa_store::Error),
    #[error("the event's blobs could not be deleted")]
    BlobStore(#[source] fluxa_blob::Error),
}

/// Erases `event_id`. The dead letters go first, so that what remains of the event in the
/// queue is known when the store decides whether a tombstone is needed: a message still
/// queued (or a queue that cannot be searched, SQS) would otherwise store the event again.
pub async fn erase(
    dead_letters: &dyn DeadLetterAdmin,
    store: &dyn StoreAdmin,
    blobs: &BlobStore,
    event_id: &EventId,
) -> Result<ErasureReport, EraseError> {
    let purge = dead_letters
        .purge_event(event_id.as_str())
        .await
        .map_err(EraseError::Queue)?;
    let in_queue = purge.dead_letters > 0 || purge.queued > 0;
    let erasure = store
        .erase(event_id, in_queue || purge.queue_unsearchable)
        .await
        .map_err(EraseError::Store)?;
    let blobs_deleted = blobs
        .delete_event_blobs(event_id)
        .await
        .map_err(EraseError::BlobStore)?;
    let report = ErasureReport {
        event_deleted: erasure.event_deleted,
        had_record: erasure.had_record,
        dead_letters_deleted: purge.dead_letters,
        messages_queued: purge.queued,
        blobs_deleted,
    };
    tracing::info!(
        target: "fluxa::audit",
        action = "event.erase",
        event_id = event_id.as_str(),
        event_deleted = report.event_deleted,
        had_record = report.had_record,
        dead_letters_deleted = report.dead_letters_deleted,
        messages_queued = report.messages_queued,
        blobs_deleted = report.blobs_deleted,
        "operator action"
    );
    Ok(report)
}
