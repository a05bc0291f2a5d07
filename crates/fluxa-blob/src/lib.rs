//! The blob store that holds payloads too large to travel inside a queue message (seed
//! invariant 5).
//!
//! The backend trait is `object_store::ObjectStore`, the field's standard for "a bucket of
//! bytes": a local folder in embedded mode, S3 (or any S3-compatible store) elsewhere. This crate
//! adds what Fluxa needs on top: durable local writes, unique keys, and a two-variant error that
//! says whether a failure is permanent (the blob is gone) or transient.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fluxa_core::{BlobRef, EventId};
use futures::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};

/// Where payload blobs live in the bucket.
const PAYLOAD_PREFIX: &str = "events";

/// Blob store failures, split the way the processor needs them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key does not exist: a message that points at it can never succeed.
    #[error("blob {key} does not exist")]
    NotFound { key: String },
    /// The store failed or could not be reached; worth retrying.
    #[error("blob store unavailable")]
    Unavailable(#[source] object_store::Error),
    /// A local write could not be made durable.
    #[error("blob store could not sync a local write")]
    Sync(#[source] std::io::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A bucket of payload blobs.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    bucket: String,
    /// Set for the local backend, whose writes we fsync ourselves (object_store renames a
    /// temporary file into place but does not sync it).
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl BlobStore {
    /// A blob store in a local folder, created if missing.
    pub fn local(root: &FsPath) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let inner = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(inner),
            bucket: "local".to_owned(),
            local_root: Some(root),
        })
    }

    /// A blob store over any `object_store` backend (S3 and friends) named `bucket`.
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, bucket: impl Into<String>) -> Self {
        Self {
            inner,
            bucket: bucket.into(),
            local_root: None,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// A key no other upload will ever use, so deleting an orphan can never remove a blob that
    /// an accepted message still points at (the same event may be ingested twice).
    pub fn new_key(event_id: &EventId) -> String {
        format!(
            "{PAYLOAD_PREFIX}/{}/{}.json",
            event_id,
            uuid::Uuid::new_v4()
        )
    }

    /// Stores `bytes` under `key` and returns only once they are durable.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<BlobRef> {
        self.inner
            .put(&Path::from(key), PutPayload::from_bytes(bytes))
            .await
            .map_err(Error::Unavailable)?;
        if let Some(root) = &self.local_root {
            sync_local_file(root.clone(), root.join(key))
                .await
                .map_err(Error::Sync)?;
        }
        Ok(BlobRef {
            bucket: self.bucket.clone(),
            key: key.to_owned(),
        })
    }

    /// Reads a whole blob.
    pub async fn get(&self, blob: &BlobRef) -> Result<Bytes> {
        let result = async {
            self.inner
                .get(&Path::from(blob.key.as_str()))
                .await?
                .bytes()
                .await
        }
        .await;
        result.map_err(|e| match e {
            object_store::Error::NotFound { .. } => Error::NotFound {
                key: blob.key.clone(),
            },
            other => Error::Unavailable(other),
        })
    }

    /// Deletes a blob; deleting a missing blob succeeds.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::Unavailable(e)),
        }
    }

    /// Keys of payload blobs last written before `cutoff` (candidates for the orphan sweep).
    pub async fn payload_keys_older_than(&self, cutoff: DateTime<Utc>) -> Result<Vec<String>> {
        let prefix = Path::from(PAYLOAD_PREFIX);
        let mut listing = self.inner.list(Some(&prefix));
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(Error::Unavailable)?;
            if meta.last_modified < cutoff {
                keys.push(meta.location.to_string());
            }
        }
        Ok(keys)
    }

    /// Deletes every payload blob ever written for `event_id` (an erasure), whichever upload
    /// wrote it; returns how many. Keys are `<prefix>/<event_id>/<unique>.json`, so this lists
    /// one folder, never the whole store.
    pub async fn delete_event_blobs(&self, event_id: &EventId) -> Result<u64> {
        let folder = Path::from(format!("{PAYLOAD_PREFIX}/{event_id}"));
        let mut listing = self.inner.list(Some(&folder));
        let mut keys = Vec::new();
        while let Some(meta) = listing.next().await {
            keys.push(meta.map_err(Error::Unavailable)?.location.to_string());
        }
        for key in &keys {
            self.delete(key).await?;
        }
        Ok(keys.len() as u64)
    }

    /// Readiness: the store answers (a missing probe key is an answer).
    pub async fn check(&self) -> Result<()> {
        match self.inner.head(&Path::from("_fluxa/readiness-probe")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::Unavailable(e)),
        }
    }
}

/// Makes a new file and its name durable: the file, then every directory from its own up to
/// the blob root, since any of them may have just gained an entry (`events/<event_id>/` is
/// created by the write), and POSIX makes a new entry durable only once its directory is
/// fsynced. A journaling filesystem usually does this anyway; ext4 without a journal does not.
async fn sync_local_file(root: PathBuf, path: PathBuf) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || {
        std::fs::File::open(&path)?.sync_all()?;
        for dir in path.ancestors().skip(1) {
            std::fs::File::open(dir)?.sync_all()?;
            if dir == root {
                break;
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stored_blob_reads_back_and_a_deleted_one_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let key = BlobStore::new_key(&EventId::parse("e-1").unwrap());
        let blob = store
            .put(&key, Bytes::from_static(b"[1,2,3]"))
            .await
            .unwrap();
        assert_eq!(
            store.get(&blob).await.unwrap(),
            Bytes::from_static(b"[1,2,3]")
        );
        store.delete(&key).await.unwrap();
        assert!(matches!(
            store.get(&blob).await,
            Err(Error::NotFound { .. })
        ));
        store.delete(&key).await.unwrap();
        store.check().await.unwrap();
    }

    #[tokio::test]
    async fn erasing_an_events_blobs_deletes_all_of_its_uploads_and_no_other_events() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let erased = EventId::parse("e").unwrap();
        let kept = EventId::parse("e-1").unwrap();
        for event_id in [&erased, &erased, &kept] {
            let key = BlobStore::new_key(event_id);
            store.put(&key, Bytes::from_static(b"1")).await.unwrap();
        }
        assert_eq!(store.delete_event_blobs(&erased).await.unwrap(), 2);
        assert_eq!(store.delete_event_blobs(&erased).await.unwrap(), 0);
        assert_eq!(store.delete_event_blobs(&kept).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn only_blobs_older_than_the_cutoff_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let key = BlobStore::new_key(&EventId::parse("e").unwrap());
        store.put(&key, Bytes::from_static(b"1")).await.unwrap();
        let past = Utc::now() - chrono::Duration::hours(1);
        assert!(store
            .payload_keys_older_than(past)
            .await
            .unwrap()
            .is_empty());
        let future = Utc::now() + chrono::Duration::hours(1);
        assert_eq!(
            store.payload_keys_older_than(future).await.unwrap(),
            vec![key]
        );
    }

    #[test]
    fn two_keys_for_the_same_event_never_collide() {
        let id = EventId::parse("e").unwrap();
        assert_ne!(BlobStore::new_key(&id), BlobStore::new_key(&id));
    }
}
