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
//! `events/<2 hex chars of SHA-256(event_id)>/<event_id>/<uuid>.json` under the store's root
//! (the folder, or the bucket's prefix). S3 scales request rates per key prefix, so the hash
//! spreads events over 256 prefixes; the event id folder lets an erasure list one event's
//! uploads; the uuid makes every upload's key unique. Stores written before the hashed layout
//! hold `events/<event_id>/<uuid>.json`: erasure looks there too, and the sweeper lists all of
//! `events/`, so both layouts are served.
//!
//! # Keys as a message names them
//! A [`BlobRef`] names the object's whole key in its bucket, prefix included
//! (`s3://bucket/fluxa` stores at `fluxa/events/…`, and the message says `fluxa/events/…`), so
//! anyone reading a message (an operator, another consumer) finds the object where it says
//! (seed invariant 5). Messages written before that carried the key without the prefix
//! (`events/…`). Every method that takes a key takes either form: a key that starts with
//! `<prefix>/events/` is whole, any other is read below the prefix ([`BlobStore::store_path`]).
//! The two cannot be confused, because a key without the prefix starts with `events/` followed
//! by a 2-hex shard or an event id, never by the prefix and `events/` again (the pre-hash layout
//! `events/<event_id>/`, which could, predates S3 and so never had a prefix). The sweeper asks
//! the queue about both forms of a key ([`BlobStore::unprefixed_key`]), so a blob an older
//! message still points at is kept.

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
const PAYLOAD_PREFIX_FOLDER: &str = "events/";

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

/// A bucket of payload blobs. [`BlobStore::new_key`] makes a key below the store's root (the
/// local folder, or the bucket's prefix); what the store answers ([`BlobRef::key`], the
/// sweeper's listing) is the object's whole key in the bucket (see the crate's doc).
#[derive(Clone)]
pub struct BlobStore {
    /// The bucket seen from below `prefix`.
    inner: Arc<dyn ObjectStore>,
    bucket: String,
    /// The bucket's key prefix without slashes at either end, `""` for none.
    prefix: String,
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
            prefix: String::new(),
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
        Ok(Self::from_object_store(Arc::new(s3), bucket, prefix))
    }

    /// A blob store over any `object_store` backend (S3 and friends) named `bucket`, every key
    /// under `prefix` (`""` for none).
    pub fn from_object_store(
        bucket_store: Arc<dyn ObjectStore>,
        bucket: impl Into<String>,
        prefix: &str,
    ) -> Self {
        let prefix = prefix.trim_matches('/').to_owned();
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            bucket_store
        } else {
            Arc::new(PrefixStore::new(bucket_store, prefix.as_str()))
        };
        Self {
            inner,
            bucket: bucket.into(),
            prefix,
            local_root: None,
        }
    }

    /// A key no other upload will ever use, so deleting an orphan can never remove a blob that
    /// an accepted message still points at (the same event may be ingested twice):
    /// `events/<shard>/<event_id>/<uuid>.json` (see the crate's key layout).
    pub fn new_key(event_id: &EventId) -> String {
        format!("{}/{}.json", event_folder(event_id), uuid::Uuid::new_v4())
    }

    /// Stores `bytes` under `key` and returns only once they are durable. The reference names
    /// the object's whole key in the bucket.
    pub async fn put(&self, key: &str, bytes: Bytes) -> Result<BlobRef> {
        let path = self.store_path(key);
        self.inner
            .put(&Path::from(path), PutPayload::from_bytes(bytes))
            .await
            .map_err(Error::Unavailable)?;
        if let Some(root) = &self.local_root {
            sync_local_file(root.clone(), root.join(path))
                .await
                .map_err(Error::Sync)?;
        }
        Ok(BlobRef {
            bucket: self.bucket.clone(),
            key: self.bucket_key(path),
        })
    }

    /// Reads a whole blob.
    pub async fn get(&self, blob: &BlobRef) -> Result<Bytes> {
        let path = Path::from(self.store_path(&blob.key));
        let result = async { self.inner.get(&path).await?.bytes().await }.await;
        result.map_err(|e| match e {
            object_store::Error::NotFound { .. } if !is_missing_bucket(&e) => Error::NotFound {
                key: blob.key.clone(),
            },
            other => Error::Unavailable(other),
        })
    }

    /// Deletes a blob; deleting a missing blob succeeds.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.inner.delete(&Path::from(self.store_path(key))).await {
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
                keys.push(self.bucket_key(meta.location.as_ref()));
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
                    .map(|meta| self.bucket_key(meta.location.as_ref())),
            );
        }
        for key in &keys {
            self.delete(key).await?;
        }
        Ok(keys.len() as u64)
    }

    /// The path below the store's root of `key`, which is either the object's whole key in the
    /// bucket (`<prefix>/events/…`, what messages carry) or, as messages written before keys
    /// carried the prefix did, the key below the prefix (`events/…`).
    fn store_path<'k>(&self, key: &'k str) -> &'k str {
        if self.prefix.is_empty() {
            return key;
        }
        key.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|rest| rest.starts_with(PAYLOAD_PREFIX_FOLDER))
            .unwrap_or(key)
    }

    /// The whole key in the bucket of the object at `path` below the store's root.
    fn bucket_key(&self, path: &str) -> String {
        if self.prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{}/{path}", self.prefix)
        }
    }

    /// The form an older message names the blob at `key` by (the key below the prefix), when
    /// it differs from `key`: the sweeper keeps a blob either form still points at.
    pub fn unprefixed_key<'k>(&self, key: &'k str) -> Option<&'k str> {
        let path = self.store_path(key);
        (path != key).then_some(path)
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

    /// A bucket seen whole, and the blob store over it below `prefix`.
    fn prefixed(prefix: &str) -> (Arc<object_store::memory::InMemory>, BlobStore) {
        let bucket = Arc::new(object_store::memory::InMemory::new());
        let store = BlobStore::from_object_store(bucket.clone(), "b", prefix);
        (bucket, store)
    }

    #[tokio::test]
    async fn a_blob_in_a_prefixed_bucket_is_named_by_its_whole_key_in_the_bucket() {
        let (bucket, store) = prefixed("/fluxa/");
        let event_id = EventId::parse("big-1").unwrap();
        let blob = store
            .put(&BlobStore::new_key(&event_id), Bytes::from_static(b"[1]"))
            .await
            .unwrap();
        assert!(blob.key.starts_with("fluxa/events/"), "{}", blob.key);
        // Anyone with the bucket and the key finds the object, without knowing the prefix.
        let read = bucket.get(&Path::from(blob.key.as_str())).await.unwrap();
        assert_eq!(read.bytes().await.unwrap(), Bytes::from_static(b"[1]"));
        assert_eq!(store.get(&blob).await.unwrap(), Bytes::from_static(b"[1]"));
        let every_blob = Utc::now() + chrono::Duration::hours(1);
        assert_eq!(
            store.payload_keys_older_than(every_blob).await.unwrap(),
            std::slice::from_ref(&blob.key)
        );
        store.delete(&blob.key).await.unwrap();
        assert!(bucket.head(&Path::from(blob.key.as_str())).await.is_err());
    }

    #[tokio::test]
    async fn a_key_without_the_prefix_from_an_older_message_still_reads_and_deletes() {
        // "events" as the prefix too: whole keys then start with events/events/.
        for prefix in ["fluxa", "events"] {
            let (_, store) = prefixed(prefix);
            let event_id = EventId::parse("old-1").unwrap();
            let below_prefix = BlobStore::new_key(&event_id);
            let blob = store
                .put(&below_prefix, Bytes::from_static(b"2"))
                .await
                .unwrap();
            assert_eq!(blob.key, format!("{prefix}/{below_prefix}"));
            assert_eq!(store.unprefixed_key(&blob.key), Some(below_prefix.as_str()));
            assert_eq!(store.unprefixed_key(&below_prefix), None);
            let older = BlobRef {
                bucket: "b".into(),
                key: below_prefix.clone(),
            };
            assert_eq!(store.get(&older).await.unwrap(), Bytes::from_static(b"2"));
            store.delete(&below_prefix).await.unwrap();
            assert!(matches!(
                store.get(&blob).await,
                Err(Error::NotFound { .. })
            ));
        }
    }

    #[tokio::test]
    async fn erasure_in_a_prefixed_bucket_deletes_the_events_blobs() {
        let (bucket, store) = prefixed("fluxa");
        let event_id = EventId::parse("gone").unwrap();
        store
            .put(&BlobStore::new_key(&event_id), Bytes::from_static(b"1"))
            .await
            .unwrap();
        assert_eq!(store.delete_event_blobs(&event_id).await.unwrap(), 1);
        let left: Vec<_> = bucket.list(None).collect().await;
        assert!(left.is_empty(), "{left:?}");
    }
}
