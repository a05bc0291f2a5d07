//! The S3 blob store never shows the AWS secret key (contract section 5): its own binary, so
//! that it can set a recognisable secret in its environment without racing another test that
//! reads it. Runs when `AWS_ENDPOINT_URL` is set, like `s3.rs`.

use fluxa_blob::BlobStore;
use fluxa_core::BlobRef;

#[tokio::test]
async fn no_error_or_debug_output_of_the_s3_store_holds_the_secret_key() {
    if std::env::var("AWS_ENDPOINT_URL").map_or(true, |url| url.is_empty()) {
        eprintln!("AWS_ENDPOINT_URL is not set: skipping the S3 test");
        return;
    }
    // The emulator checks no signatures, so any secret will do.
    let secret = "fluxa-secret-9f8e7d6c5b4a";
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
    let bucket = format!("fluxa-blob-absent-{}", uuid::Uuid::new_v4().simple());
    let store = BlobStore::s3(&bucket, "p").unwrap();
    let blob = BlobRef {
        bucket: bucket.clone(),
        key: "events/0b/order-1/0000.json".to_owned(),
    };
    let errors = [
        store.check().await.unwrap_err(),
        store.get(&blob).await.unwrap_err(),
        store
            .put(&blob.key, bytes::Bytes::from_static(b"1"))
            .await
            .unwrap_err(),
    ];
    let mut shown = format!("{store:?}");
    for error in &errors {
        shown.push_str(&format!("{error:?}"));
        let mut source: Option<&dyn std::error::Error> = Some(error);
        while let Some(e) = source {
            shown.push_str(&e.to_string());
            source = e.source();
        }
    }
    assert!(shown.contains("NoSuchBucket"), "{shown}");
    assert!(!shown.contains(secret), "{shown}");

    // Keys given without their secret are refused without naming one.
    std::env::remove_var("AWS_SECRET_ACCESS_KEY");
    let error = BlobStore::s3(&bucket, "").unwrap_err();
    assert!(format!("{error}").contains(&bucket), "{error}");
}
