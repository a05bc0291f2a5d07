//! `BlobStore::s3` against an S3 emulator: runs when `AWS_ENDPOINT_URL` is set (`./test` sets
//! it to a moto server started by `scripts/moto.sh`), and passes as a no-op otherwise.
//!
//! Each test makes its own bucket with an unsigned `PUT /<bucket>`, which moto accepts (it
//! checks no signatures); object_store cannot create buckets.

use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use fluxa_blob::{BlobStore, Error};
use fluxa_core::{BlobRef, EventId};

/// The emulator's endpoint, or `None` to skip.
fn endpoint() -> Option<String> {
    match std::env::var("AWS_ENDPOINT_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_owned()),
        _ => {
            eprintln!("AWS_ENDPOINT_URL is not set: skipping the S3 test");
            None
        }
    }
}

/// A new, empty bucket with a unique name.
async fn new_bucket(endpoint: &str) -> String {
    let bucket = format!("fluxa-blob-test-{}", uuid::Uuid::new_v4().simple());
    let response = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("the S3 emulator answers");
    assert!(
        response.status().is_success(),
        "creating bucket {bucket}: {}",
        response.status()
    );
    bucket
}

/// An object's bytes as the emulator holds them, read without Fluxa's code. moto refuses an
/// anonymous read of a private object but checks no signature, so any `Authorization` will do.
async fn raw_object(endpoint: &str, bucket: &str, key: &str) -> Option<Vec<u8>> {
    let response = reqwest::Client::new()
        .get(format!("{endpoint}/{bucket}/{key}"))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .send()
        .await
        .expect("the S3 emulator answers");
    if response.status() == 404 {
        return None;
    }
    assert!(response.status().is_success(), "{}", response.status());
    Some(response.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn a_blob_round_trips_through_s3_under_the_prefix_and_one_events_blobs_are_erased() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = new_bucket(&endpoint).await;
    let store = BlobStore::s3(&bucket, "fluxa/blobs/").unwrap();
    store.check().await.unwrap();

    // Over the inline limit, as the blob store's payloads are.
    let payload = Bytes::from(format!("\"{}\"", "x".repeat(300_000)));
    let event_id = EventId::parse("order-1").unwrap();
    let key = BlobStore::new_key(&event_id);
    let blob = store.put(&key, payload.clone()).await.unwrap();
    // What a queue message carries: the bucket and the object's whole key, prefix included,
    // so anyone reading the message finds the object.
    assert_eq!(
        blob,
        BlobRef {
            bucket: bucket.clone(),
            key: format!("fluxa/blobs/{key}")
        }
    );
    assert!(key.starts_with("events/0b/order-1/"), "{key}");
    assert_eq!(store.get(&blob).await.unwrap(), payload);
    assert_eq!(
        raw_object(&endpoint, &bucket, &blob.key).await,
        Some(payload.to_vec()),
        "the object lives at the key the message names"
    );

    // The sweeper's listing sees it, with the key a message holds.
    let later = Utc::now() + chrono::Duration::hours(1);
    assert_eq!(
        store.payload_keys_older_than(later).await.unwrap(),
        vec![blob.key.clone()]
    );
    let earlier = Utc::now() - chrono::Duration::hours(1);
    assert!(store
        .payload_keys_older_than(earlier)
        .await
        .unwrap()
        .is_empty());

    // Erasure: both uploads of the event, one written in the layout before hashed prefixes,
    // and nothing of another event.
    let second = BlobStore::new_key(&event_id);
    store.put(&second, Bytes::from_static(b"2")).await.unwrap();
    let old_layout = "events/order-1/0000.json";
    store
        .put(old_layout, Bytes::from_static(b"3"))
        .await
        .unwrap();
    let other = BlobStore::new_key(&EventId::parse("order-2").unwrap());
    let other = store.put(&other, Bytes::from_static(b"4")).await.unwrap();
    assert_eq!(store.delete_event_blobs(&event_id).await.unwrap(), 3);
    assert_eq!(
        store.payload_keys_older_than(later).await.unwrap(),
        vec![other.key.clone()]
    );
    assert!(matches!(
        store.get(&blob).await,
        Err(Error::NotFound { .. })
    ));
    store.delete(&other.key).await.unwrap();
    // Deleting a missing blob succeeds.
    store.delete(&other.key).await.unwrap();
    assert_eq!(raw_object(&endpoint, &bucket, &other.key).await, None);
}

#[tokio::test]
async fn a_missing_bucket_is_unavailable_never_a_missing_blob() {
    let Some(_endpoint) = endpoint() else { return };
    let bucket = format!("fluxa-blob-absent-{}", uuid::Uuid::new_v4().simple());
    let store = BlobStore::s3(&bucket, "").unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(store.check().await, Err(Error::Unavailable(_))));
    let blob = BlobRef {
        bucket: bucket.clone(),
        key: "events/0b/order-1/0000.json".to_owned(),
    };
    // A message whose bucket is missing must be retried, not dead-lettered as blob_missing.
    assert!(matches!(store.get(&blob).await, Err(Error::Unavailable(_))));
    assert!(matches!(
        store.delete(&blob.key).await,
        Err(Error::Unavailable(_))
    ));
    // Client errors are not retried: the answer is quick.
    assert!(started.elapsed() < Duration::from_secs(10));
}
