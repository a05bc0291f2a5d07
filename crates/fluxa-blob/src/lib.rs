//! The blob store that holds payloads too large to travel inside a queue message (seed
//! invariant 5).
//!
//! The backend trait is `object_store::ObjectStore`, the field's standard for "a bucket of
//! bytes": a local folder in embedded mode (`BlobStore::local`), an S3 bucket (or any
//! S3-compatible store) elsewhere (`BlobStore::s3`, `FLUXA_BLOB_URL=s3://bucket/prefix`). This
//! crate adds what Fluxa needs on top: durable local writes, unique keys spread over hashed
//! prefixes, erasure of one event's blobs, and a two-variant error that says whether a failure
//! is permanent (the blob is gone) or transient.
//!
//! # Key layout
//!
//! `events/<2 hex chars of SHA-256(event_id)>/<event_id>/<uuid>.json`, relative to the store's
//! root (the folder, or the bucket's prefix). S3 scales request rates per key prefix, so the
//! hash spreads events over 256 prefixes; the event id folder lets an erasure list one event's
//! uploads; the uuid makes every upload's key unique. Stores written before the hashed layout
//! hold `events/<event_id>/<uuid>.json`: erasure looks there too, and the sweeper lists all of
//! `events/`, so both layouts are served.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use fluxa_core::{BlobRef, EventId};
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, PutPayload, RetryConfig};
use sha2::{Digest, Sha256};

/// Where payload blobs live in the bucket.
const PAYLOAD_PREFIX: &str = "events";

/// The key readiness lists: nothing is ever written there, so the answer is always empty.
const READINESS_PROBE: &str = "_fluxa/readiness-probe";

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
    /// The S3 client could not be built from the bucket and the AWS settings. Neither this
    /// message nor its source ever holds a credential.
    #[error("the S3 blob store for bucket {bucket} could not be configured")]
    Config {
        bucket: String,
        #[source]
        source: object_store::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A bucket of payload blobs. Keys (`new_key`, `BlobRef::key`, the sweeper's listing) are
/// relative to the store's root: the local folder, or the bucket's prefix.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    bucket: String,
    /// Set for the local backend, whose writes we fsync ourselves (object_store renames a
    /// temporary file into place but does not sync it).
    local_root: Option<PathBuf>,
}

/// Shows the bucket only: the inner client holds credentials.
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

    /// A blob store in the S3 bucket `bucket`, every key under `prefix` (`""` for none), with
    /// the credentials, region and endpoint of the standard AWS settings.
    ///
    /// S3 goes through object_store's `AmazonS3` rather than aws-sdk-s3: the blob store is
    /// already an `object_store::ObjectStore`, so the same `BlobStore` code serves the local
    /// folder and the bucket (and the same tests hold both), and it runs on the reqwest/rustls
    /// HTTP stack the workspace already has instead of adding the smithy one.
    ///
    /// `AmazonS3Builder::from_env` reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION` (default `us-east-1`) and
    /// `AWS_ENDPOINT_URL` / `AWS_ENDPOINT`; without static keys it asks the web identity, ECS
    /// container or instance metadata providers, as the SDK would. `AWS_ENDPOINT_URL_S3`, the
    /// SDK's S3-only endpoint, wins over `AWS_ENDPOINT_URL`. With an endpoint (an S3-compatible
    /// store, or an emulator) requests are path-style (`<endpoint>/<bucket>/<key>`), and plain
    /// HTTP is allowed only when the endpoint itself is `http://`. Nothing here logs or
    /// returns a credential.
    pub fn s3(bucket: &str, prefix: &str) -> Result<Self> {
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Bounded, so that an S3 outage answers an ingest with a 503 within seconds instead
            // of object_store's default of 10 retries over up to 3 minutes.
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 3,
                retry_timeout: Duration::from_secs(15),
            });
        if let Some(endpoint) = std::env::var("AWS_ENDPOINT_URL_S3")
            .ok()
            .filter(|e| !e.is_empty())
        {
            builder = builder.with_endpoint(endpoint);
        }
        let endpoint = builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .filter(|e| !e.is_empty());
        builder = match &endpoint {
            Some(endpoint) => builder
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://")),
            // AWS itself: `<bucket>.s3.<region>.amazonaws.com`, except for a bucket with a dot,
            // which the wildcard certificate does not cover.
            None => builder.with_virtual_hosted_style_request(!bucket.contains('.')),
        };
        let s3 = builder.build().map_err(|source| Error::Config {
            bucket: bucket.to_owned(),
            source,
        })?;
        let prefix = prefix.trim_matches('/');
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(s3)
        } else {
            Arc::new(PrefixStore::new(s3, prefix))
        };
        Ok(Self::from_object_store(inner, bucket))
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
    /// an accepted message still points at (the same event may be ingested twice):
    /// `events/<shard>/<event_id>/<uuid>.json` (see the crate's key layout).
    pub fn new_key(event_id: &EventId) -> String {
        format!("{}/{}.json", event_folder(event_id), uuid::Uuid::new_v4())
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
            object_store::Error::NotFound { .. } if !is_missing_bucket(&e) => Error::NotFound {
                key: blob.key.clone(),
            },
            other => Error::Unavailable(other),
        })
    }

    /// Deletes a blob; deleting a missing blob succeeds.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&Path::from(key)).await {
            Ok(()) => Ok(()),
            Err(e @ object_store::Error::NotFound { .. }) if !is_missing_bucket(&e) => Ok(()),
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
    /// wrote it; returns how many. This lists the event's own folder, never the whole store:
    /// `events/<shard>/<event_id>/`, and `events/<event_id>/` for blobs written before the
    /// hashed layout. Each folder is listed one level deep only, so the old-layout folder of an
    /// event whose id looks like a shard (`ab`) never reaches the new-layout folders of other
    /// events below `events/ab/`.
    pub async fn delete_event_blobs(&self, event_id: &EventId) -> Result<u64> {
        let folders = [
            event_folder(event_id),
            format!("{PAYLOAD_PREFIX}/{event_id}"),
        ];
        let mut keys = Vec::new();
        for folder in folders {
            let listing = self
                .inner
                .list_with_delimiter(Some(&Path::from(folder)))
                .await
                .map_err(Error::Unavailable)?;
            keys.extend(
                listing
                    .objects
                    .into_iter()
                    .map(|meta| meta.location.to_string()),
            );
        }
        for key in &keys {
            self.delete(key).await?;
        }
        Ok(keys.len() as u64)
    }

    /// Readiness: the store answers. It lists a prefix nothing is written to, so an empty
    /// answer is the healthy one; unlike a HEAD of a missing key (a bodiless 404 either way),
    /// a listing also fails when the bucket does not exist or the credentials may not list it,
    /// which the sweeper and erasure need.
    pub async fn check(&self) -> Result<()> {
        self.inner
            .list_with_delimiter(Some(&Path::from(READINESS_PROBE)))
            .await
            .map(drop)
            .map_err(Error::Unavailable)
    }
}

/// `events/<shard>/<event_id>`: the folder every upload of one event goes to. The shard is the
/// first byte of SHA-256(event id) in hex, so events spread evenly over 256 prefixes.
fn event_folder(event_id: &EventId) -> String {
    let digest = Sha256::digest(event_id.as_str().as_bytes());
    format!("{PAYLOAD_PREFIX}/{:02x}/{event_id}", digest[0])
}

/// Whether a "not found" from the store means the bucket, not the key, is missing. S3 answers
/// both with a 404 and tells them apart only in its error body (`NoSuchBucket`), which
/// object_store keeps in the error's source chain. A missing bucket is a misconfiguration or an
/// outage to retry, never proof that a blob is gone.
fn is_missing_bucket(error: &object_store::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        if e.to_string().contains("NoSuchBucket") {
            return true;
        }
        source = e.source();
    }
    false
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
    async fn erasure_also_finds_blobs_of_the_layout_before_hashed_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let erased = EventId::parse("old-event").unwrap();
        store
            .put("events/old-event/0000.json", Bytes::from_static(b"\"old\""))
            .await
            .unwrap();
        store
            .put(&BlobStore::new_key(&erased), Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(store.delete_event_blobs(&erased).await.unwrap(), 2);
        assert!(store
            .payload_keys_older_than(Utc::now() + chrono::Duration::hours(1))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn erasing_an_old_event_named_like_a_shard_keeps_the_new_events_in_that_shard() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(dir.path()).unwrap();
        let kept = EventId::parse("e").unwrap();
        let kept_key = BlobStore::new_key(&kept);
        store
            .put(&kept_key, Bytes::from_static(b"1"))
            .await
            .unwrap();
        // An event of the old layout whose id is exactly the new blob's shard.
        let shard = kept_key.split('/').nth(1).unwrap();
        let old_key = format!("events/{shard}/0000.json");
        store.put(&old_key, Bytes::from_static(b"2")).await.unwrap();
        let erased = EventId::parse(shard).unwrap();
        assert_eq!(store.delete_event_blobs(&erased).await.unwrap(), 1);
        let left = store
            .payload_keys_older_than(Utc::now() + chrono::Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(left, vec![kept_key]);
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
    fn keys_spread_over_prefixes_hashed_from_the_event_id() {
        let key = BlobStore::new_key(&EventId::parse("order-1").unwrap());
        // SHA-256("order-1") begins 0x0b.
        let parts: Vec<&str> = key.split('/').collect();
        assert_eq!(parts.len(), 4, "{key}");
        assert_eq!(&parts[..3], ["events", "0b", "order-1"], "{key}");
        assert!(parts[3].ends_with(".json"), "{key}");
        let shards: std::collections::BTreeSet<String> = (0..2000)
            .map(|i| {
                let key = BlobStore::new_key(&EventId::parse(&format!("e-{i}")).unwrap());
                key.split('/').nth(1).unwrap().to_owned()
            })
            .collect();
        assert_eq!(shards.len(), 256, "2000 ids cover every shard");
    }

    #[test]
    fn two_keys_for_the_same_event_never_collide() {
        let id = EventId::parse("e").unwrap();
        assert_ne!(BlobStore::new_key(&id), BlobStore::new_key(&id));
    }
}
