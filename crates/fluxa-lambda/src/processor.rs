//! The processor function: an `SqsEvent` in, an `SqsBatchResponse` out.
//!
//! Records from the main queue are processed as one batch by `Processor::process_batch`, the
//! same function `fluxa serve`'s workers call, and each outcome is carried out as the contract
//! says:
//! - processed, duplicate or erased: success (the event source mapping deletes the message),
//!   and its payload blob is deleted;
//! - transient: its visibility becomes its back-off, and it is reported as a batch item
//!   failure, so it comes back (and after `maxReceiveCount` receives SQS moves it to the DLQ);
//! - permanent: sent to the DLQ with its reason and deleted; reported as a failure only when
//!   that send failed, so it comes back rather than being lost.
//!
//! Records from the DLQ (a second event source mapping, `processor_drains_dlq`) are recorded in
//! the store's DLQ, where `fluxa dlq …` and the admin API see them, and a `retries_exhausted`
//! event's record is marked `failed` ([`fluxa_host::sqs::record_dead_letters`]). If the
//! store cannot take them they are all failures, and stay in the SQS DLQ.

use std::sync::Arc;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent, SqsMessage};
use chrono::Utc;
use fluxa_aws::sqs::{ReceivedMessage, SqsQueue};
use fluxa_core::{CorrelationId, EventId};
use fluxa_postgres::DeadLetterTable;
use fluxa_processor::{Disposition, Processor, ProcessorConfig};
use fluxa_queue::{Consumer, Delivery};
use fluxa_store::{Store, StoreAdmin};

use crate::LambdaConfig;

/// Everything an invocation uses, opened once per container.
#[derive(Clone)]
pub struct ProcessorFunction {
    processor: Processor,
    queue: SqsQueue,
    table: DeadLetterTable,
    store: Arc<dyn Store>,
    admin: Arc<dyn StoreAdmin>,
}

impl std::fmt::Debug for ProcessorFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorFunction")
            .field("queue", &self.queue.queue_url())
            .finish()
    }
}

impl ProcessorFunction {
    /// Opens the store (migrating it: the processor is the function that writes), the queue
    /// and its DLQ, and the bucket.
    pub async fn open(config: &LambdaConfig) -> anyhow::Result<Self> {
        let store = config.open_store().await?;
        let client = aws_sdk_sqs::Client::new(&fluxa_aws::sdk_config().await);
        let queue = SqsQueue::open(client, config.queue_url()?).await?;
        let store_arc = Arc::new(store.store);
        let processor = Processor::new(
            store_arc.clone(),
            config.blobs()?,
            ProcessorConfig::from(&config.config),
        );
        Ok(Self {
            processor,
            queue,
            table: store.dead_letters,
            store: store_arc.clone(),
            admin: store_arc,
        })
    }

    /// Handles one event: the records of the main queue and of its DLQ, told apart by their
    /// `eventSourceARN`. Never fails as a whole: every problem is some records' failure.
    pub async fn handle(&self, event: SqsEvent) -> SqsBatchResponse {
        let (dead, main): (Vec<SqsMessage>, Vec<SqsMessage>) = event
            .records
            .into_iter()
            .partition(|record| record.event_source_arn.as_deref() == Some(self.dead_letter_arn()));
        let mut failures = self.process(main).await;
        failures.extend(self.record_dead_letters(dead).await);
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = failures
            .into_iter()
            .map(|message_id| {
                let mut failure = BatchItemFailure::default();
                failure.item_identifier = message_id;
                failure
            })
            .collect();
        response
    }

    fn dead_letter_arn(&self) -> &str {
        self.queue.dead_letter_arn()
    }

    /// Processes the main queue's records; returns the ids of those that must come back.
    async fn process(&self, records: Vec<SqsMessage>) -> Vec<String> {
        if records.is_empty() {
            return Vec::new();
        }
        let deliveries: Vec<Delivery> = records
            .into_iter()
            .map(|record| self.queue.delivery_of(received(record)))
            .collect();
        metrics::counter!("fluxa_lambda_records_total", "source" => "queue")
            .increment(deliveries.len() as u64);
        let outcomes = self.processor.process_batch(&deliveries).await;
        let mut failures = Vec::new();
        let mut done: Vec<&Delivery> = Vec::new();
        for (delivery, outcome) in deliveries.iter().zip(&outcomes) {
            match outcome.disposition() {
                Disposition::Delete => done.push(delivery),
                Disposition::RetryAfter { delay, error } => {
                    // Best effort: without it the message comes back after the queue's own
                    // visibility timeout instead of its back-off.
                    if let Err(e) = self.queue.retry_later(delivery, delay, &error).await {
                        tracing::warn!(
                            message_id = %delivery.message_id,
                            error.message = %e,
                            "could not set a message's back-off"
                        );
                    }
                    failures.push(delivery.message_id.clone());
                }
                Disposition::DeadLetter(error) => {
                    if let Err(e) = self.queue.dead_letter(delivery, &error).await {
                        let ids = &delivery.attributes;
                        tracing::error!(
                            message_id = %delivery.message_id,
                            event_id = ids.event_id.as_ref().map(EventId::as_str),
                            correlation_id = ids.correlation_id.as_ref().map(CorrelationId::as_str),
                            error.message = %e,
                            "could not dead-letter a message; it will be delivered again"
                        );
                        failures.push(delivery.message_id.clone());
                    }
                }
            }
        }
        self.processor.discard_payloads(&done).await;
        failures
    }

    /// Records the DLQ's records in the store; returns the ids of those that must come back.
    async fn record_dead_letters(&self, records: Vec<SqsMessage>) -> Vec<String> {
        if records.is_empty() {
            return Vec::new();
        }
        metrics::counter!("fluxa_lambda_records_total", "source" => "dead_letter_queue")
            .increment(records.len() as u64);
        let now = Utc::now();
        let max_receives = self.queue.max_receives();
        let mut dead_letters: Vec<fluxa_queue::DeadLetter> = Vec::with_capacity(records.len());
        // Records that cannot be read as dead letters come back (and stay in the SQS DLQ, its
        // safety net) rather than failing their neighbours.
        let mut unreadable: Vec<String> = Vec::new();
        for record in records {
            let message = received(record);
            match message.dead_letter(max_receives, now) {
                Ok(dead_letter) => dead_letters.push(dead_letter),
                Err(e) => {
                    tracing::error!(
                        error.message = %e,
                        message_id = message.message_id,
                        "a dead-letter queue record cannot be read as a dead letter"
                    );
                    unreadable.push(message.message_id);
                }
            }
        }
        let ids: Vec<String> = dead_letters.iter().map(|d| d.id.to_string()).collect();
        let recorded = match fluxa_host::sqs::record_dead_letters(
            &self.table,
            &*self.store,
            &*self.admin,
            dead_letters,
        )
        .await
        {
            Ok(_) => Vec::new(),
            Err(e) => {
                tracing::error!(
                    error.cause_chain = ?e,
                    error.message = %e,
                    n_records = ids.len(),
                    "could not record dead letters; they stay in the SQS dead-letter queue"
                );
                ids
            }
        };
        unreadable.into_iter().chain(recorded).collect()
    }
}

/// A Lambda SQS record as the message Fluxa reads.
fn received(record: SqsMessage) -> ReceivedMessage {
    ReceivedMessage {
        message_id: record.message_id.unwrap_or_default(),
        receipt: record.receipt_handle.unwrap_or_default(),
        body: record.body.unwrap_or_default(),
        receive_count: record.attributes.get("ApproximateReceiveCount").cloned(),
        sent_timestamp: record.attributes.get("SentTimestamp").cloned(),
        attributes: record
            .message_attributes
            .into_iter()
            .filter_map(|(name, value)| Some((name, value.string_value?)))
            .collect(),
    }
}

/// The whole `main` of the processor function.
pub async fn run() -> Result<(), lambda_runtime::Error> {
    crate::init_logging();
    let metrics = crate::init_metrics()?;
    let config = LambdaConfig::from_env()?;
    let function = ProcessorFunction::open(&config).await?;
    tracing::info!(
        queue_url = function.queue.queue_url(),
        "fluxa processor ready"
    );
    metrics_cloudwatch_embedded::lambda::handler::run(
        metrics,
        |event: lambda_runtime::LambdaEvent<SqsEvent>| {
            let function = function.clone();
            async move { Ok::<_, lambda_runtime::Error>(function.handle(event.payload).await) }
        },
    )
    .await
}
