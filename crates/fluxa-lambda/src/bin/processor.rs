//! The processor Lambda function: `SqsEvent`s from the main queue and its DLQ, through
//! `fluxa_lambda::processor`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    fluxa_lambda::processor::run().await
}
