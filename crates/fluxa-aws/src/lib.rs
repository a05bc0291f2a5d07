//! Fluxa's AWS glue, behind the same seams as every other backend.
//!
//! - [`secrets`]: the database credentials named by `FLUXA_DATABASE_SECRET_ID`, fetched from
//!   Secrets Manager once at start and never logged or shown in an error.
//! - [`sqs`]: the queue on SQS (`FLUXA_QUEUE_URL`), Fluxa's producer and consumer over a
//!   standard queue and the dead-letter queue its `RedrivePolicy` names.
//!
//! Clients are built with [`sdk_config`], which honours the standard AWS settings
//! (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL` for an S3/SQS-compatible endpoint such as
//! moto in the tests) exactly as the SDK does.

pub mod secrets;
pub mod sqs;

/// The SDK configuration from the environment (region, credentials, endpoint), loaded the way
/// every AWS SDK does; build it once per process (or Lambda container) and share it. Its HTTP
/// client is hyper + rustls with ring's crypto, the TLS stack the rest of Fluxa uses.
pub async fn sdk_config() -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls;
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http_client)
        .load()
        .await
}

/// An SDK call's failure in words: the service's error code and message, or why no answer came
/// (no endpoint, no credentials, a timeout). Never the raw response, which the SDK's full error
/// would print and which may hold message bodies. (Every `aws-sdk-*` crate re-exports the same
/// smithy error types, so this serves them all.)
pub(crate) fn error_detail<E, R>(error: &aws_sdk_sqs::error::SdkError<E, R>) -> String
where
    E: aws_sdk_sqs::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata};
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(error).to_string(),
    }
}
