//! Fluxa's AWS glue, behind the same seams as every other backend.
//!
//! - [`secrets`]: the database credentials named by `FLUXA_DATABASE_SECRET_ID`, fetched from
//!   Secrets Manager once at start and never logged or shown in an error.
//!
//! Clients are built with [`sdk_config`], which honours the standard AWS settings
//! (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL` for an S3/SQS-compatible endpoint such as
//! moto in the tests) exactly as the SDK does.

pub mod secrets;

/// The SDK configuration from the environment (region, credentials, endpoint), loaded the way
/// every AWS SDK does; build it once per process (or Lambda container) and share it.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .load()
        .await
}
