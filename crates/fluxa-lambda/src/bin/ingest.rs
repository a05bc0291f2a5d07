//! The ingest Lambda function: `fluxa_lambda::run_http` with the ingest routes.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    fluxa_lambda::run_http(fluxa_lambda::Role::Ingest).await
}
