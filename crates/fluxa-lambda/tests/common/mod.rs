//! What the Lambda tests share: a deployment's worth of resources on moto (a queue with its
//! DLQ, a bucket, the database secret) over a fresh PostgreSQL database, and the request and
//! event JSON that API Gateway and an SQS event source mapping hand a function.

#![allow(dead_code)] // Each test file uses its own part.

use std::collections::HashMap;

use aws_sdk_sqs::types::{Message, MessageSystemAttributeName, QueueAttributeName};
use fluxa_postgres::testing::ScratchDatabase;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

/// The token every test's functions accept, with every scope.
pub const TOKEN: &str = "lambda-test-token-0123456789";

/// One test's resources.
pub struct Deployment {
    /// Dropped with the deployment (the moto resources go with the emulator).
    pub database: ScratchDatabase,
    pub database_url: String,
    pub secret_id: String,
    pub secret_arn: String,
    pub bucket: String,
    pub queue_url: String,
    pub queue_arn: String,
    pub dlq_url: String,
    pub dlq_arn: String,
    pub sqs: aws_sdk_sqs::Client,
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("read a queue's ARN")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("an ARN")
}

impl Deployment {
    /// Creates everything at `AWS_ENDPOINT_URL` (moto; `./test` starts it) and on the local
    /// PostgreSQL. The queue's visibility timeout is 1 s, so a failure comes back at once.
    pub async fn create() -> Self {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let config = fluxa_aws::sdk_config().await;
        let sqs = aws_sdk_sqs::Client::new(&config);

        let database = ScratchDatabase::create().await;
        let database_url = database.url().expose_secret().to_owned();
        let url = url_parts(&database_url);
        let secret_id = format!("fluxa-lambda-test/{unique}");
        let secret_arn = aws_sdk_secretsmanager::Client::new(&config)
            .create_secret()
            .name(&secret_id)
            .secret_string(
                json!({
                    "username": url.0,
                    "password": "stand-in: the test server trusts local connections",
                    "engine": "postgres",
                    "host": url.1,
                    "port": url.2,
                    "dbname": database.name(),
                })
                .to_string(),
            )
            .send()
            .await
            .expect("create the database secret (is moto running? ./test starts it)")
            .arn()
            .expect("the secret's ARN")
            .to_owned();

        let bucket = format!("fluxa-lambda-{unique}");
        let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL (moto)");
        let created = reqwest::Client::new()
            .put(format!("{}/{bucket}", endpoint.trim_end_matches('/')))
            .send()
            .await
            .expect("create the bucket");
        assert!(
            created.status().is_success(),
            "bucket: {}",
            created.status()
        );

        let dlq_url = sqs
            .create_queue()
            .queue_name(format!("fluxa-lambda-{unique}-dlq"))
            .attributes(QueueAttributeName::MaximumMessageSize, "1048576")
            .attributes(QueueAttributeName::VisibilityTimeout, "1")
            .send()
            .await
            .expect("create the DLQ")
            .queue_url()
            .expect("a URL")
            .to_owned();
        let dlq_arn = queue_arn(&sqs, &dlq_url).await;
        let queue_url = sqs
            .create_queue()
            .queue_name(format!("fluxa-lambda-{unique}"))
            .attributes(QueueAttributeName::MaximumMessageSize, "1048576")
            .attributes(QueueAttributeName::VisibilityTimeout, "1")
            .attributes(
                QueueAttributeName::RedrivePolicy,
                json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}).to_string(),
            )
            .send()
            .await
            .expect("create the queue")
            .queue_url()
            .expect("a URL")
            .to_owned();
        let queue_arn = queue_arn(&sqs, &queue_url).await;
        Self {
            database,
            database_url,
            secret_id,
            secret_arn,
            bucket,
            queue_url,
            queue_arn,
            dlq_url,
            dlq_arn,
            sqs,
        }
    }

    /// One `FLUXA_*` environment with every role's settings at once (tokens included) and
    /// back-offs short enough for a test, for the handlers tested in-process. It is not what
    /// the Terraform gives any one function: `watch.rs` starts each binary with that instead.
    pub fn environment(&self) -> HashMap<String, String> {
        [
            ("FLUXA_DATABASE_SECRET_ID", self.secret_id.clone()),
            ("FLUXA_QUEUE_URL", self.queue_url.clone()),
            ("FLUXA_BLOB_URL", format!("s3://{}/payloads", self.bucket)),
            ("FLUXA_API_TOKENS", format!("ingest+read+admin={TOKEN}")),
            ("FLUXA_RETRY_BACKOFF", "100ms".to_owned()),
            ("FLUXA_RETRY_BACKOFF_MAX", "1s".to_owned()),
            ("FLUXA_LEASE", "30s".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    pub fn config(&self) -> fluxa_lambda::LambdaConfig {
        fluxa_lambda::LambdaConfig::from_sources(fluxa_host::Sources {
            env: self.environment(),
            ..Default::default()
        })
        .expect("a valid Lambda configuration")
    }

    pub async fn sql(&self, sql: &str) {
        let pool = sqlx::PgPool::connect(&self.database_url).await.unwrap();
        sqlx::query(sql).execute(&pool).await.expect("test SQL");
        pool.close().await;
    }

    pub async fn scalar(&self, sql: &str) -> Option<String> {
        let pool = sqlx::PgPool::connect(&self.database_url).await.unwrap();
        let value: Option<String> = sqlx::query_scalar(sql)
            .fetch_optional(&pool)
            .await
            .expect("test SQL");
        pool.close().await;
        value
    }

    /// Sends a raw body to the main queue, as a broken producer would.
    pub async fn send_raw(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .expect("send a raw message");
    }

    /// One `ReceiveMessage` of up to 10, as an event source mapping polls.
    pub async fn receive(&self, queue_url: &str) -> Vec<Message> {
        self.sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive")
            .messages()
            .to_vec()
    }

    pub async fn delete(&self, queue_url: &str, receipt: &str) {
        self.sqs
            .delete_message()
            .queue_url(queue_url)
            .receipt_handle(receipt)
            .send()
            .await
            .expect("delete");
    }
}

fn url_parts(url: &str) -> (String, String, u16) {
    let parsed = reqwest::Url::parse(url).expect("a database URL");
    (
        parsed.username().to_owned(),
        parsed.host_str().unwrap_or("127.0.0.1").to_owned(),
        parsed.port().unwrap_or(5432),
    )
}

/// The `SqsEvent` JSON Lambda builds from received messages (`eventSourceARN` names the queue
/// they came from).
pub fn sqs_event(messages: &[Message], source_arn: &str) -> Value {
    let records: Vec<Value> = messages
        .iter()
        .map(|message| {
            let attributes: serde_json::Map<String, Value> = message
                .attributes()
                .map(|a| {
                    a.iter()
                        .map(|(name, value)| (name.as_str().to_owned(), json!(value)))
                        .collect()
                })
                .unwrap_or_default();
            let message_attributes: serde_json::Map<String, Value> = message
                .message_attributes()
                .map(|a| {
                    a.iter()
                        .map(|(name, value)| {
                            (
                                name.clone(),
                                json!({
                                    "stringValue": value.string_value(),
                                    "stringListValues": [],
                                    "binaryListValues": [],
                                    "dataType": value.data_type(),
                                }),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "messageId": message.message_id(),
                "receiptHandle": message.receipt_handle(),
                "body": message.body(),
                "attributes": attributes,
                "messageAttributes": message_attributes,
                "md5OfBody": message.md5_of_body(),
                "eventSource": "aws:sqs",
                "eventSourceARN": source_arn,
                "awsRegion": "us-east-1",
            })
        })
        .collect();
    json!({ "Records": records })
}

/// An API Gateway HTTP API (payload format 2.0) request, as the ingest, query and admin
/// functions receive it.
pub fn api_request(method: &str, path: &str, body: Option<&str>) -> Value {
    let (raw_path, query) = path.split_once('?').unwrap_or((path, ""));
    let mut headers = json!({
        "authorization": format!("Bearer {TOKEN}"),
        "host": "abc123.execute-api.us-east-1.amazonaws.com",
        "user-agent": "fluxa-lambda-test",
        "x-correlation-id": "lambda-test-correlation",
    });
    if body.is_some() {
        headers["content-type"] = json!("application/json");
    }
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": raw_path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "abc123.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "abc123",
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": "192.0.2.1",
                "userAgent": "fluxa-lambda-test",
            },
            "requestId": uuid::Uuid::new_v4().to_string(),
            "routeKey": "$default",
            "stage": "$default",
            "time": "30/Nov/2026:12:00:00 +0000",
            "timeEpoch": 1_795_867_200_000_u64,
        },
        "body": body,
        "isBase64Encoded": false,
    })
}
