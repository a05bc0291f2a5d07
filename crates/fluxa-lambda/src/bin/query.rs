//! The query Lambda function: `fluxa_lambda::run_http` with the query routes.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    fluxa_lambda::run_http(fluxa_lambda::Role::Query).await
}
