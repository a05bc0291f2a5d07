//! `TestApp`: spawns `fluxa serve` on port 0, captures its JSON logs, and offers typed request
//! helpers plus the few backend-level hooks black-box tests need (peeking at the queue,
//! injecting a fault into the store, reading and tampering with the blob store's payloads
//! whichever backend holds them).

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fluxa_postgres::testing::ScratchDatabase;
use fluxa_queue::{Consumer, DeadLetterAdmin, Producer};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a test waits for something asynchronous (processing, redelivery) before failing.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The backends a test run targets. One switch for the whole suite: env `FLUXA_TEST_BACKEND`
/// (`embedded`, the default, `postgres`, `postgres-s3` or `sqs-s3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite store and queue, local-folder blobs.
    Embedded,
    /// PostgreSQL store and queue (a fresh database per test), local-folder blobs.
    Postgres,
    /// PostgreSQL store and queue, blobs in S3 at `AWS_ENDPOINT_URL` (a moto server started by
    /// `scripts/moto.sh`), a fresh bucket per test.
    PostgresS3,
    /// PostgreSQL store, the queue on SQS and blobs in S3, both at `AWS_ENDPOINT_URL` (moto):
    /// a fresh queue with its DLQ (maxReceiveCount 3) and a fresh bucket per test.
    SqsS3,
}

impl Backend {
    /// Whether blobs live in S3.
    pub fn is_s3() -> bool {
        matches!(Self::from_env(), Self::PostgresS3 | Self::SqsS3)
    }

    pub fn from_env() -> Self {
        match std::env::var("FLUXA_TEST_BACKEND").as_deref() {
            Ok("embedded") | Ok("sqlite") | Ok("") | Err(_) => Self::Embedded,
            Ok("postgres") => Self::Postgres,
            Ok("postgres-s3") => Self::PostgresS3,
            Ok("sqs-s3") => Self::SqsS3,
            Ok(other) => panic!("unknown FLUXA_TEST_BACKEND {other:?}"),
        }
    }
}

/// The key prefix servers of an S3 test keep their blobs under.
const S3_PREFIX: &str = "fluxa";

/// Creates an empty bucket with a unique name at the S3 emulator `AWS_ENDPOINT_URL` names.
/// object_store cannot create buckets, and moto checks no signatures, so a plain
/// `PUT /<bucket>` does. Servers and the test process reach the bucket with the `AWS_*`
/// settings the suite runs with (`scripts/moto.sh` prints them).
async fn create_test_bucket() -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .expect(
            "FLUXA_TEST_BACKEND=postgres-s3 needs an S3 emulator: run \
             `eval \"$(scripts/moto.sh start)\"` first (./test does)",
        );
    let bucket = format!("fluxa-test-{}", uuid::Uuid::new_v4().simple());
    let response = reqwest::Client::new()
        .put(format!("{}/{bucket}", endpoint.trim_end_matches('/')))
        .send()
        .await
        .expect("the S3 emulator at AWS_ENDPOINT_URL is not reachable");
    assert!(
        response.status().is_success(),
        "creating bucket {bucket}: {}",
        response.status()
    );
    bucket
}

async fn sqs_client() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&fluxa_aws::sdk_config().await)
}

/// Creates an SQS queue and its dead-letter queue (maxReceiveCount 3, 1 MiB messages) at the
/// emulator `AWS_ENDPOINT_URL` names; returns the main queue's URL.
pub async fn create_test_queue() -> String {
    use aws_sdk_sqs::types::QueueAttributeName;
    let client = sqs_client().await;
    let name = format!("fluxa-test-{}", uuid::Uuid::new_v4().simple());
    let dlq = client
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .attributes(QueueAttributeName::MaximumMessageSize, "1048576")
        .send()
        .await
        .expect("create the test DLQ (is moto running? ./test starts it)");
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(dlq.queue_url().expect("a DLQ URL"))
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .expect("read the DLQ's ARN")
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .expect("an ARN");
    let queue = client
        .create_queue()
        .queue_name(&name)
        .attributes(QueueAttributeName::MaximumMessageSize, "1048576")
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .attributes(
            QueueAttributeName::RedrivePolicy,
            serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}).to_string(),
        )
        .send()
        .await
        .expect("create the test queue");
    queue.queue_url().expect("a queue URL").to_owned()
}

/// Creates a Secrets Manager secret holding `value` at the emulator `AWS_ENDPOINT_URL` names,
/// through its JSON API (moto checks no signatures); returns its name.
pub async fn create_test_secret(value: &str) -> String {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("a moto server (./test starts one)");
    let name = format!("fluxa-test/db-{}", uuid::Uuid::new_v4().simple());
    let response = reqwest::Client::new()
        .post(endpoint.trim_end_matches('/'))
        .header("X-Amz-Target", "secretsmanager.CreateSecret")
        // moto picks the service (and region) from the credential scope; the signature
        // itself is never checked.
        .header(
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=test/20261130/us-east-1/secretsmanager/aws4_request, \
             SignedHeaders=host, Signature=0",
        )
        .header("Content-Type", "application/x-amz-json-1.1")
        .body(serde_json::json!({"Name": name, "SecretString": value}).to_string())
        .send()
        .await
        .expect("the emulator at AWS_ENDPOINT_URL is not reachable");
    assert!(
        response.status().is_success(),
        "creating secret {name}: {}",
        response.status()
    );
    name
}

/// A data directory (and, for PostgreSQL, a database; for S3, a bucket) shared by the server
/// processes of one test, dropped with it (the bucket goes with the emulator).
pub struct TestData {
    pub dir: tempfile::TempDir,
    database: Option<ScratchDatabase>,
    bucket: Option<String>,
    queue_url: Option<String>,
    /// A Secrets Manager secret holding the database's credentials, which servers then read
    /// instead of a URL (the `sqs-s3` run: the whole AWS setup).
    database_secret: Option<String>,
    /// Opened on first use and kept: each opening holds database connections.
    backends: tokio::sync::OnceCell<fluxa_host::Backends>,
    pg_pool: tokio::sync::OnceCell<sqlx::PgPool>,
}

impl TestData {
    pub async fn new() -> Self {
        Self::with_backend(Backend::from_env()).await
    }

    /// A test's own data directory with no database (for tests that bring their own).
    #[allow(dead_code)] // Used by tests/postgres_outage.rs, which shares this module.
    pub async fn new_embedded() -> Self {
        Self::with_backend(Backend::Embedded).await
    }

    /// A test's own data directory inside `parent` (a small filesystem a test fills up), on
    /// the embedded backend.
    #[allow(dead_code)] // Unused by tests/postgres_outage.rs, which shares this module.
    pub async fn new_embedded_in(parent: &Path) -> Self {
        Self {
            dir: tempfile::tempdir_in(parent).expect("temp dir"),
            database: None,
            bucket: None,
            queue_url: None,
            database_secret: None,
            backends: tokio::sync::OnceCell::new(),
            pg_pool: tokio::sync::OnceCell::new(),
        }
    }

    async fn with_backend(backend: Backend) -> Self {
        let database = match backend {
            Backend::Embedded => None,
            Backend::Postgres | Backend::PostgresS3 | Backend::SqsS3 => {
                Some(ScratchDatabase::create().await)
            }
        };
        let bucket = match backend {
            Backend::PostgresS3 | Backend::SqsS3 => Some(create_test_bucket().await),
            Backend::Embedded | Backend::Postgres => None,
        };
        let queue_url = match backend {
            Backend::SqsS3 => Some(create_test_queue().await),
            Backend::Embedded | Backend::Postgres | Backend::PostgresS3 => None,
        };
        let database_secret = match (backend, &database) {
            (Backend::SqsS3, Some(database)) => {
                let url = url::Url::parse(database.url().expose_secret()).expect("a database URL");
                // The suite's PostgreSQL trusts local connections: the password is a stand-in.
                let secret = serde_json::json!({
                    "username": url.username(),
                    "password": "test-password-from-secrets-manager",
                    "engine": "postgres",
                    "host": url.host_str().unwrap_or("127.0.0.1"),
                    "port": url.port().unwrap_or(5432),
                    "dbname": database.name(),
                });
                Some(create_test_secret(&secret.to_string()).await)
            }
            _ => None,
        };
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            database,
            bucket,
            queue_url,
            database_secret,
            backends: tokio::sync::OnceCell::new(),
            pg_pool: tokio::sync::OnceCell::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The database URL servers of this test use, if any.
    pub fn database_url(&self) -> Option<String> {
        self.database
            .as_ref()
            .map(|database| database.url().expose_secret().to_owned())
    }

    /// The blob store URL servers of this test use, if not the default folder.
    pub fn blob_url(&self) -> Option<String> {
        self.bucket
            .as_ref()
            .map(|bucket| format!("s3://{bucket}/{S3_PREFIX}"))
    }

    /// The SQS queue URL servers of this test use, if the queue is SQS.
    pub fn queue_url(&self) -> Option<String> {
        self.queue_url.clone()
    }

    /// The backend settings of this test's servers beside the database URL: the database
    /// secret's, the blob store's and the queue's.
    fn location_envs(&self) -> Vec<(&'static str, String)> {
        let mut envs = Vec::new();
        if let Some(secret) = &self.database_secret {
            envs.push(("FLUXA_DATABASE_SECRET_ID", secret.clone()));
        }
        if let Some(url) = self.blob_url() {
            envs.push(("FLUXA_BLOB_URL", url));
        }
        if let Some(url) = self.queue_url() {
            envs.push(("FLUXA_QUEUE_URL", url));
        }
        envs
    }

    /// Starts a server on this data with the suite's fast defaults plus `args`.
    pub async fn spawn(&self, args: &[&str]) -> TestApp {
        self.spawn_with_env(args, &[]).await
    }

    pub async fn spawn_with_env(&self, args: &[&str], envs: &[(&str, &str)]) -> TestApp {
        let database_url = self
            .database_url()
            .filter(|_| self.database_secret.is_none());
        let locations = self.location_envs();
        let mut all_envs: Vec<(&str, &str)> = envs.to_vec();
        if let Some(url) = &database_url {
            // The environment, not the command line: that is where a DSN belongs.
            all_envs.push(("FLUXA_DATABASE_URL", url));
        }
        all_envs.extend(locations.iter().map(|(name, url)| (*name, url.as_str())));
        TestApp::start(&[], self.path(), args, &all_envs).await
    }

    /// Starts a server as [`TestData::spawn`] does, but with the database credentials in the
    /// Secrets Manager secret `secret_id` (`FLUXA_DATABASE_SECRET_ID`) instead of
    /// `FLUXA_DATABASE_URL`.
    pub async fn spawn_with_secret(&self, secret_id: &str, args: &[&str]) -> TestApp {
        let locations = self.location_envs();
        let mut envs = vec![("FLUXA_DATABASE_SECRET_ID", secret_id)];
        envs.extend(
            locations
                .iter()
                .filter(|(name, _)| *name != "FLUXA_DATABASE_SECRET_ID")
                .map(|(name, url)| (*name, url.as_str())),
        );
        TestApp::start(&[], self.path(), args, &envs).await
    }

    /// Starts a server as [`TestData::spawn`] does, but through `launcher`, a command that sets
    /// something up and then execs `fluxa` (`prlimit --nofile=256:256`), so the server keeps the
    /// launcher's pid and [`TestApp::terminate`] still reaches it.
    pub async fn spawn_under(&self, launcher: &[&str], args: &[&str]) -> TestApp {
        let database_url = self
            .database_url()
            .filter(|_| self.database_secret.is_none());
        let locations = self.location_envs();
        let mut envs: Vec<(&str, &str)> = database_url
            .iter()
            .map(|url| ("FLUXA_DATABASE_URL", url.as_str()))
            .collect();
        envs.extend(locations.iter().map(|(name, url)| (*name, url.as_str())));
        TestApp::start(launcher, self.path(), args, &envs).await
    }

    /// `fluxa` with this test's backend selected (for CLI commands).
    pub fn command(&self) -> Command {
        let mut command = fluxa_command();
        command.env_remove("FLUXA_DATABASE_URL");
        command.env_remove("FLUXA_BLOB_URL");
        command.env_remove("FLUXA_QUEUE_URL");
        command.env_remove("FLUXA_DATABASE_SECRET_ID");
        if let Some(url) = self
            .database_url()
            .filter(|_| self.database_secret.is_none())
        {
            command.env("FLUXA_DATABASE_URL", url);
        }
        command.envs(self.location_envs());
        command
    }

    fn config(&self) -> fluxa_host::Config {
        let mut config = fluxa_host::Config::with_data_dir(self.path());
        config.database_url = self.database_url().map(secrecy::SecretString::from);
        config.blob_url = self.blob_url();
        config.queue_url = self.queue_url();
        config.visibility_timeout = Duration::from_secs(1);
        config
    }

    async fn backends(&self) -> &fluxa_host::Backends {
        self.backends
            .get_or_init(|| async {
                // Validated as a server's would be, so the test opens what a server opens.
                let config = self
                    .config()
                    .validate()
                    .expect("a valid test configuration");
                fluxa_host::open_validated(&config)
                    .await
                    .expect("open backends")
            })
            .await
    }

    async fn pg_pool(&self, url: &str) -> &sqlx::PgPool {
        self.pg_pool
            .get_or_init(|| async {
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(url)
                    .await
                    .expect("connect")
            })
            .await
    }

    /// The queue's ingest side, opened from the test process.
    pub async fn producer(&self) -> Arc<dyn Producer> {
        Arc::clone(&self.backends().await.queue.producer)
    }

    /// The queue's worker side, opened from the test process with a 1 s visibility timeout.
    pub async fn consumer(&self) -> Arc<dyn Consumer> {
        Arc::clone(&self.backends().await.queue.consumer)
    }

    /// The queue's operator side, opened from the test process.
    pub async fn dead_letters(&self) -> Arc<dyn DeadLetterAdmin> {
        Arc::clone(&self.backends().await.queue.dead_letters)
    }

    /// Up to `limit` messages waiting in the queue, left there. SQS cannot peek: there they
    /// are received with a visibility timeout of 0, which counts towards each message's
    /// receive limit, so tests look once or twice, before any worker receives.
    pub async fn pending(&self, limit: usize) -> Vec<fluxa_queue::PendingMessage> {
        if self.queue_url.is_none() {
            return self.dead_letters().await.peek(limit).await.unwrap();
        }
        self.sqs_peek(limit)
            .await
            .into_iter()
            .map(
                |(message_id, body, attributes)| fluxa_queue::PendingMessage {
                    message_id,
                    body,
                    attributes: fluxa_queue::MessageAttributes::parse_lenient(
                        attributes.get("event_id").map(String::as_str),
                        attributes.get("correlation_id").map(String::as_str),
                        attributes.get("blob_key").cloned(),
                        attributes.get("event_type").map(String::as_str),
                    ),
                    receive_count: 0,
                    enqueued_at: chrono::Utc::now(),
                },
            )
            .collect()
    }

    /// Whether the queue holds no message, waiting or in flight.
    pub async fn queue_is_empty(&self) -> bool {
        let Some(queue_url) = &self.queue_url else {
            return self.dead_letters().await.peek(1).await.unwrap().is_empty();
        };
        use aws_sdk_sqs::types::QueueAttributeName as Name;
        let output = sqs_client()
            .await
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(Name::ApproximateNumberOfMessages)
            .attribute_names(Name::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(Name::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .expect("read the test queue's counts");
        output
            .attributes()
            .map(|a| a.values().all(|n| n == "0"))
            .unwrap_or(true)
    }

    /// Sets one attribute of the test's SQS queue (a fault a test injects).
    pub async fn sqs_set_queue_attribute(&self, name: &str, value: &str) {
        let queue_url = self.queue_url.as_ref().expect("an SQS test");
        sqs_client()
            .await
            .set_queue_attributes()
            .queue_url(queue_url)
            .attributes(aws_sdk_sqs::types::QueueAttributeName::from(name), value)
            .send()
            .await
            .expect("set a queue attribute");
    }

    /// The SQS queue's waiting messages as (message id, body, String attributes), received
    /// with a visibility timeout of 0.
    pub async fn sqs_peek(
        &self,
        limit: usize,
    ) -> Vec<(String, Vec<u8>, std::collections::HashMap<String, String>)> {
        let queue_url = self.queue_url.as_ref().expect("an SQS test");
        let client = sqs_client().await;
        let mut seen = std::collections::HashMap::new();
        // One receive only: each counts towards the messages' limit of 3.
        {
            let output = client
                .receive_message()
                .queue_url(queue_url)
                .max_number_of_messages(limit.min(10) as i32)
                .visibility_timeout(0)
                .wait_time_seconds(1)
                .message_attribute_names("All")
                .send()
                .await
                .expect("receive from the test queue");
            for message in output.messages() {
                let attributes = message
                    .message_attributes()
                    .map(|a| {
                        a.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.string_value()?.to_owned())))
                            .collect()
                    })
                    .unwrap_or_default();
                seen.insert(
                    message.message_id().unwrap_or_default().to_owned(),
                    (
                        message.body().unwrap_or_default().as_bytes().to_vec(),
                        attributes,
                    ),
                );
            }
        }
        seen.into_iter()
            .take(limit)
            .map(|(id, (body, attributes))| (id, body, attributes))
            .collect()
    }

    /// The store's processor side, opened from the test process.
    pub async fn store(&self) -> Arc<dyn fluxa_store::Store> {
        Arc::clone(&self.backends().await.store)
    }

    /// Runs one SQL statement against the store's database, to inject faults.
    pub async fn store_sql(&self, sql: &str) {
        self.sql_on("store.db", sql).await;
    }

    /// Runs `sql` on the queue's database (`queue.db` when embedded; the one database on
    /// PostgreSQL).
    pub async fn queue_sql(&self, sql: &str) {
        self.sql_on("queue.db", sql).await;
    }

    async fn sql_on(&self, sqlite_file: &str, sql: &str) {
        match &self.database_url() {
            None => {
                let url = format!("sqlite://{}", self.path().join(sqlite_file).display());
                let pool = sqlx::SqlitePool::connect(&url)
                    .await
                    .expect("connect to the SQLite file");
                sqlx::query(sql).execute(&pool).await.expect("test SQL");
                pool.close().await;
            }
            Some(url) => {
                let pool = self.pg_pool(url).await;
                sqlx::query(sql).execute(pool).await.expect("test SQL");
            }
        }
    }

    /// Counts rows in the events table for `event_id`, straight from the database.
    pub async fn count_event_rows(&self, event_id: &str) -> i64 {
        self.count(
            "SELECT COUNT(*) FROM events WHERE event_id = $1",
            Some(event_id),
        )
        .await
    }

    /// Runs a `SELECT COUNT(*)` with an optional single text parameter (`$1`).
    pub async fn count(&self, sql: &str, param: Option<&str>) -> i64 {
        match &self.database_url() {
            None => {
                let url = format!(
                    "sqlite://{}?mode=ro",
                    self.path().join("store.db").display()
                );
                let pool = sqlx::SqlitePool::connect(&url)
                    .await
                    .expect("connect store.db");
                let n = sqlx::query_scalar(&sql.replace("$1", "?1"))
                    .bind(param)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
                pool.close().await;
                n
            }
            Some(url) => {
                let pool = self.pg_pool(url).await;
                let mut query = sqlx::query_scalar(sql);
                if param.is_some() {
                    query = query.bind(param);
                }
                query.fetch_one(pool).await.expect("count")
            }
        }
    }

    /// The blob store servers of this test use, opened from the test process by the server's
    /// own opener: the folder `<data dir>/blobs`, or this test's bucket.
    fn blob_backend(&self) -> fluxa_host::BlobBackend {
        match &self.bucket {
            Some(bucket) => fluxa_host::BlobBackend::S3 {
                bucket: bucket.clone(),
                prefix: S3_PREFIX.to_owned(),
            },
            None => fluxa_host::BlobBackend::Fs {
                root: self.path().join("blobs"),
            },
        }
    }

    /// The bucket name a queue message's blob reference carries (`local` for a folder).
    pub fn blob_bucket(&self) -> String {
        self.bucket.clone().unwrap_or_else(|| "local".to_owned())
    }

    /// Where payload keys start: `events/` in the folder, `<prefix>/events/` in the bucket.
    pub fn blob_key_start(&self) -> String {
        match &self.bucket {
            Some(_) => format!("{S3_PREFIX}/events/"),
            None => "events/".to_owned(),
        }
    }

    /// The bytes of the object at exactly `key` in the bucket (or the folder), read with no
    /// knowledge of Fluxa's prefix, as an operator or another consumer of a message would.
    pub async fn read_object(&self, key: &str) -> Vec<u8> {
        let backend = match self.blob_backend() {
            fluxa_host::BlobBackend::S3 { bucket, .. } => fluxa_host::BlobBackend::S3 {
                bucket,
                prefix: String::new(),
            },
            folder => folder,
        };
        let blobs = fluxa_host::open_blobs(&backend).expect("open the bucket");
        let blob = fluxa_core::BlobRef {
            bucket: self.blob_bucket(),
            key: key.to_owned(),
        };
        blobs
            .get(&blob)
            .await
            .expect("the object a message names")
            .to_vec()
    }

    /// Keys of the payload blobs currently in the blob store (as a message names them: whole
    /// keys in the bucket, prefix included), sorted.
    pub async fn blob_keys(&self) -> Vec<String> {
        let blobs = fluxa_host::open_blobs(&self.blob_backend()).expect("open the blob store");
        let every_blob = chrono::Utc::now() + chrono::Duration::days(1);
        let mut keys = blobs
            .payload_keys_older_than(every_blob)
            .await
            .expect("list the blob store");
        keys.sort();
        keys
    }

    /// The bytes of the blob at `key`.
    pub async fn read_blob(&self, key: &str) -> Vec<u8> {
        let blobs = fluxa_host::open_blobs(&self.blob_backend()).expect("open the blob store");
        let blob = fluxa_core::BlobRef {
            bucket: self.blob_bucket(),
            key: key.to_owned(),
        };
        blobs.get(&blob).await.expect("read a blob").to_vec()
    }

    /// Whether a blob exists at `key`.
    pub async fn blob_exists(&self, key: &str) -> bool {
        self.blob_keys().await.iter().any(|k| k == key)
    }

    /// Writes `bytes` at `key`, replacing any blob there (to corrupt one, or plant an orphan),
    /// and returns the whole key it was written at.
    pub async fn write_blob(&self, key: &str, bytes: Vec<u8>) -> String {
        let blobs = fluxa_host::open_blobs(&self.blob_backend()).expect("open the blob store");
        blobs
            .put(key, bytes.into())
            .await
            .expect("write a blob")
            .key
    }

    /// Deletes the blob at `key`.
    pub async fn remove_blob(&self, key: &str) {
        let blobs = fluxa_host::open_blobs(&self.blob_backend()).expect("open the blob store");
        blobs.delete(key).await.expect("delete a blob");
    }
}

/// A running `fluxa serve` process.
pub struct TestApp {
    pub addr: String,
    pub client: reqwest::Client,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn collect_lines(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    echo: bool,
) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if echo {
                eprintln!("[fluxa] {line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

pub fn fluxa_command() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fluxa"))
}

impl TestApp {
    async fn start(
        launcher: &[&str],
        data_dir: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> TestApp {
        let mut command = match launcher.split_first() {
            None => fluxa_command(),
            Some((program, launcher_args)) => {
                let mut command = Command::new(program);
                command.args(launcher_args).arg(env!("CARGO_BIN_EXE_fluxa"));
                command
            }
        };
        command.arg("serve");
        if !args.contains(&"--bind") {
            command.args(["--bind", "127.0.0.1:0"]);
        }
        command
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--retry-backoff", "100ms", "--retry-backoff-max", "1s"])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("FLUXA_DATABASE_URL")
            .env_remove("FLUXA_DATABASE_SECRET_ID")
            .env_remove("FLUXA_BLOB_URL")
            .env_remove("FLUXA_QUEUE_URL")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn fluxa");
        let echo = std::env::var_os("TEST_LOG").is_some();
        let stdout = collect_lines(child.stdout.take().unwrap(), echo);
        let stderr = collect_lines(child.stderr.take().unwrap(), echo);
        let deadline = Instant::now() + PATIENCE;
        let addr = loop {
            let started = stdout.lock().unwrap().iter().find_map(|line| {
                let value: Value = serde_json::from_str(line).ok()?;
                (value["message"] == "fluxa started")
                    .then(|| value["addr"].as_str().unwrap().to_owned())
            });
            if let Some(addr) = started {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "fluxa exited with {status} before starting; stderr: {:?}",
                    stderr.lock().unwrap()
                );
            }
            assert!(Instant::now() < deadline, "fluxa did not start in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        TestApp {
            addr,
            client: reqwest::Client::new(),
            child,
            stdout,
            stderr,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// POSTs a JSON value as an event.
    pub async fn post_event(&self, event: &Value) -> reqwest::Response {
        self.post_raw(
            "/v1/events",
            serde_json::to_vec(event).unwrap(),
            Some("application/json"),
        )
        .await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        content_type: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.client.post(self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request")
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let response = self.get(path).await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the event's status is `status` and returns the status body.
    #[track_caller]
    pub fn wait_for_status<'a>(
        &'a self,
        event_id: &'a str,
        status: &'a str,
    ) -> impl std::future::Future<Output = Value> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let (code, body) = self
                    .get_json(&format!("/v1/events/{event_id}/status"))
                    .await;
                if code == 200 && body["status"] == status {
                    return body;
                }
                assert!(
                    Instant::now() < deadline,
                    "{caller}: event {event_id} never reached {status}; last: {code} {body}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }

    /// Waits until the DLQ holds an entry for `event_id` and returns it.
    pub async fn wait_for_dead_letter(&self, event_id: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, body) = self
                .get_json(&format!("/v1/admin/dlq?event_id={event_id}"))
                .await;
            if let Some(entry) = body["dead_letters"].as_array().and_then(|a| a.first()) {
                return entry.clone();
            }
            assert!(Instant::now() < deadline, "no dead letter for {event_id}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The value of an unlabelled metric (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                (key == name).then(|| value.parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    /// Everything the process wrote to stdout so far, one JSON log line each.
    pub fn log_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Parsed log lines whose top-level `key` equals `value`.
    pub fn logs_with(&self, key: &str, value: &str) -> Vec<Value> {
        self.log_lines()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|v| v[key] == value)
            .collect()
    }

    /// Sends SIGTERM and waits for the exit code.
    pub async fn terminate(mut self) -> Exited {
        let pid = self.child.id().expect("running") as i32;
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("fluxa did not stop after SIGTERM")
            .expect("wait");
        // Let the line collectors drain.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Exited {
            code: exit.code().unwrap_or(-1),
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr.lock().unwrap().clone(),
        }
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }
}

/// How a server process ended.
pub struct Exited {
    pub code: i32,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// A minimal valid event.
pub fn event(event_id: &str, payload: Value) -> Value {
    serde_json::json!({
        "event_id": event_id,
        "event_type": "order.created",
        "payload": payload,
    })
}

/// SHA-256 of bytes as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Request helpers the operator tests (`operator.rs`) added: admin calls that delete, post a
/// JSON body to a path other than ingest, or wait on a counter.
impl TestApp {
    /// DELETEs `path`.
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// POSTs `body` as JSON to `path` and returns the status and the parsed answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .post_raw(
                path,
                serde_json::to_vec(body).unwrap(),
                Some("application/json"),
            )
            .await;
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the metric `name` (labels included, as `/metrics` prints them, e.g.
    /// `fluxa_pruned_rows_total{table="events"}`) is at least `at_least`; returns its value.
    #[track_caller]
    pub fn wait_for_metric<'a>(
        &'a self,
        name: &'a str,
        at_least: f64,
    ) -> impl std::future::Future<Output = f64> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let value = self.metric(name).await;
                if value >= at_least {
                    return value;
                }
                assert!(
                    Instant::now() < deadline,
                    "{caller}: {name} never reached {at_least}; last: {value}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}
