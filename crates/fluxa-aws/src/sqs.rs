//! The queue on Amazon SQS (`FLUXA_QUEUE_URL`, contract section 9): Fluxa's [`Producer`] and
//! [`Consumer`] over a standard queue and the dead-letter queue its `RedrivePolicy` names.
//!
//! The same traits are implemented over SQLite (`fluxa-sqlite`) and PostgreSQL
//! (`fluxa-postgres`); this backend keeps the promises the core conformance checks hold every
//! backend to, and maps them onto SQS like this:
//! - A queue message's body is the event message (UTF-8 JSON); `correlation_id`, `event_id`,
//!   `payload_mode` (`INLINE`, or `S3` when only a blob key travels), `schema` (`event.v1`),
//!   `blob_key` and `event_type` travel as String message attributes.
//! - Sends use `SendMessageBatch`, at most 10 entries and 1 MiB per call, and report per
//!   message ([`SendError::sent`]).
//! - `ApproximateReceiveCount` is the receive count, and the queue's own `RedrivePolicy`
//!   (`maxReceiveCount`) says how many receives a message gets. [`SqsQueue::open`] refuses a
//!   queue without one, and a queue (or DLQ) whose `MaximumMessageSize` is below 1 MiB.
//! - A transient failure changes the message's visibility to its back-off (at most 12 hours,
//!   the SQS limit). SQS keeps no record of the failure itself.
//! - A permanent failure is sent to the DLQ with its reason as message attributes, then
//!   deleted from the queue. If that delete fails the message comes back and is dead-lettered
//!   again, so the DLQ may hold a permanent failure twice (SQS standard queues are at least once
//!   anyway).
//! - SQS moves an exhausted message to the DLQ silently, on the receive that meets it, so
//!   [`Received::exhausted`] stays empty here: the DLQ drain learns of those messages instead.
//! - SQS makes the weaker promise on stale receipts (a late receiver's delete may still
//!   delete), which the core conformance checks allow.
//!
//! What this backend does not implement: [`fluxa_queue::DeadLetterAdmin`] (dead letters on SQS
//! are operated through the DLQ recorded in the store, which a drain of the SQS DLQ fills) and
//! [`fluxa_queue::BlobReferences`] (SQS cannot say whether a message points at a blob, so blob
//! orphans are left to the bucket's lifecycle rule).
//!
//! No error from here quotes a message body or a credential: errors carry the operation, the
//! service's error code and message, or why no answer came.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::{
    error::{ProvideErrorMetadata, SdkError},
    types::{
        DeleteMessageBatchRequestEntry, Message, MessageAttributeValue, MessageSystemAttributeName,
        QueueAttributeName, SendMessageBatchRequestEntry,
    },
    Client,
};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use fluxa_core::{ErrorCode, FailureClass, FailureInfo};
use fluxa_queue::{
    Consumer, DeadLetter, Delivery, Error, MessageAttributes, NewMessage, Producer, Received,
    Result, SendError,
};

/// The smallest `MaximumMessageSize` Fluxa accepts: an inline payload may be 256 KiB plus its
/// envelope, and a message is never larger than the queue allows.
pub const MIN_MAXIMUM_MESSAGE_SIZE: u64 = 1024 * 1024;

/// The value of the `schema` attribute on every message Fluxa sends.
pub const SCHEMA: &str = "event.v1";

/// SQS's limits on one `SendMessageBatch` (or `DeleteMessageBatch`) call.
const MAX_BATCH_ENTRIES: usize = 10;
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// The longest long poll SQS allows.
const MAX_WAIT_SECONDS: u64 = 20;
/// The longest visibility timeout SQS allows (12 hours).
const MAX_VISIBILITY_SECONDS: u64 = 43_200;
/// SQS refuses a message with more message attributes than this.
const MAX_MESSAGE_ATTRIBUTES: usize = 10;
/// An error message longer than this is cut on the DLQ (attributes count towards the message's
/// size).
const MAX_ERROR_MESSAGE_CHARS: usize = 4096;

/// Why [`SqsQueue::open`] refused a queue. Messages name the queue and the offending value.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// GetQueueAttributes failed (no such queue, no access, no endpoint).
    #[error("could not read the attributes of the SQS queue {queue_url}: {reason}")]
    Attributes { queue_url: String, reason: String },
    #[error(
        "the SQS queue {queue_url} has MaximumMessageSize {size}; Fluxa needs at least 1048576 \
         (1 MiB), since an inline payload may be 256 KiB plus its envelope: raise the queue's \
         MaximumMessageSize"
    )]
    /// The queue (or its DLQ) may hold only messages smaller than 1 MiB.
    MessageSizeTooSmall { queue_url: String, size: String },
    #[error(
        "the SQS queue {queue_url} has no RedrivePolicy; Fluxa needs one (a deadLetterTargetArn \
         and a maxReceiveCount) to dead-letter a message whose retries are exhausted"
    )]
    /// Without a redrive policy a failing message would be retried forever.
    NoRedrivePolicy { queue_url: String },
    /// The policy is not JSON, or lacks a queue ARN or a positive maxReceiveCount.
    #[error("the SQS queue {queue_url} has a RedrivePolicy Fluxa cannot use ({policy}): {detail}")]
    BadRedrivePolicy {
        queue_url: String,
        policy: String,
        detail: String,
    },
    #[error(
        "the dead-letter queue {dead_letter_arn} of the SQS queue {queue_url} cannot be found: \
         {reason}"
    )]
    /// GetQueueUrl could not find the queue the policy names.
    DeadLetterQueue {
        queue_url: String,
        dead_letter_arn: String,
        reason: String,
    },
}

/// An SQS queue and its dead-letter queue, read once at [`SqsQueue::open`]. Cheap to clone
/// (the SDK client is shared); build it once per process or Lambda container.
#[derive(Clone, Debug)]
pub struct SqsQueue {
    client: Client,
    queue_url: String,
    dead_letter_queue_url: String,
    /// The DLQ's ARN, from the `RedrivePolicy` (a Lambda event's records name their queue by
    /// ARN).
    dead_letter_arn: String,
    /// The `maxReceiveCount` of the queue's `RedrivePolicy`.
    max_receives: u32,
    /// The visibility timeout each receive asks for; `None` leaves the queue's own.
    visibility_timeout: Option<Duration>,
    /// Tests only: (message index, DelaySeconds) to put on one entry of each send.
    entry_delay: Option<(usize, i32)>,
}

/// A received SQS message as Fluxa reads it, whichever API delivered it: `ReceiveMessage`, or
/// a Lambda event source mapping's `SqsEvent` record (the processor function builds these from
/// its records, so both hosts read a message alike).
#[derive(Clone, Debug, Default)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub receipt: String,
    pub body: String,
    /// `ApproximateReceiveCount`.
    pub receive_count: Option<String>,
    /// `SentTimestamp`, in milliseconds since the epoch.
    pub sent_timestamp: Option<String>,
    /// The String message attributes, by name.
    pub attributes: std::collections::HashMap<String, String>,
}

impl ReceivedMessage {
    fn of(message: &Message) -> Result<Self> {
        let malformed = |what: &str| {
            Error::unavailable(SqsError {
                operation: "ReceiveMessage",
                detail: format!("a received message has no {what}"),
            })
        };
        let system = |name: MessageSystemAttributeName| {
            message
                .attributes()
                .and_then(|a| a.get(&name))
                .map(String::to_owned)
        };
        Ok(Self {
            message_id: message
                .message_id()
                .ok_or_else(|| malformed("message id"))?
                .to_owned(),
            receipt: message
                .receipt_handle()
                .ok_or_else(|| malformed("receipt handle"))?
                .to_owned(),
            body: message.body().unwrap_or_default().to_owned(),
            receive_count: system(MessageSystemAttributeName::ApproximateReceiveCount),
            sent_timestamp: system(MessageSystemAttributeName::SentTimestamp),
            attributes: message
                .message_attributes()
                .map(|attributes| {
                    attributes
                        .iter()
                        .filter_map(|(name, value)| {
                            Some((name.clone(), value.string_value()?.to_owned()))
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    fn attribute(&self, name: &str) -> Option<String> {
        self.attributes.get(name).filter(|v| !v.is_empty()).cloned()
    }

    fn ids(&self) -> MessageAttributes {
        MessageAttributes {
            event_id: self.attribute("event_id"),
            correlation_id: self.attribute("correlation_id"),
            blob_key: self.attribute("blob_key"),
            event_type: self.attribute("event_type"),
        }
    }

    fn receive_count(&self) -> u32 {
        self.receive_count
            .as_deref()
            .and_then(|count| count.parse::<u32>().ok())
            .unwrap_or(1)
    }

    fn sent_at(&self) -> Option<DateTime<Utc>> {
        self.sent_timestamp
            .as_deref()
            .and_then(|millis| millis.parse::<i64>().ok())
            .and_then(DateTime::<Utc>::from_timestamp_millis)
    }

    /// This message, received from the dead-letter queue, as the dead letter it records.
    ///
    /// A message Fluxa dead-lettered carries its reason as attributes (`error_class`
    /// `permanent`). One without them was moved by the queue's `RedrivePolicy` after
    /// `max_receives` receives: its last receiver gave up or died, so it is
    /// `retries_exhausted`. SQS keeps no earlier failure times, so those fall back to
    /// `now`, the time the drain read it.
    pub fn dead_letter(&self, max_receives: u32, now: DateTime<Utc>) -> DeadLetter {
        let time = |name: &str| {
            self.attribute(name)
                .and_then(|text| DateTime::parse_from_rfc3339(&text).ok())
                .map(|at| at.with_timezone(&Utc))
        };
        let permanent = self.attribute("error_class").as_deref() == Some("permanent");
        let (error_class, error, receive_count) = if permanent {
            (
                FailureClass::Permanent,
                FailureInfo {
                    code: self
                        .attribute("error_code")
                        .unwrap_or_else(|| ErrorCode::Internal.as_str().to_owned()),
                    message: self.attribute("error_message").unwrap_or_default(),
                },
                self.attribute("receive_count")
                    .and_then(|count| count.parse().ok())
                    .unwrap_or(1),
            )
        } else {
            (
                FailureClass::RetriesExhausted,
                FailureInfo::new(
                    ErrorCode::RetriesExhausted,
                    format!(
                        "the SQS queue moved the message to its dead-letter queue after \
                         {max_receives} receives"
                    ),
                ),
                max_receives,
            )
        };
        let dead_lettered_at = time("dead_lettered_at").unwrap_or(now);
        DeadLetter {
            id: self.message_id.clone(),
            attributes: self.ids(),
            error_class,
            error,
            receive_count,
            enqueued_at: self.sent_at().unwrap_or(now).min(dead_lettered_at),
            first_failure_at: time("first_failure_at").unwrap_or(dead_lettered_at),
            last_failure_at: dead_lettered_at,
            dead_lettered_at,
            body: self.body.clone().into_bytes(),
        }
    }
}

/// A dead letter read from the SQS dead-letter queue, with the receipt that deletes it there
/// once it is recorded.
#[derive(Clone, Debug)]
pub struct DrainedDeadLetter {
    pub dead_letter: DeadLetter,
    pub receipt: String,
}

impl SqsQueue {
    /// Reads the queue's attributes once and checks that Fluxa can use it: a
    /// `MaximumMessageSize` of at least 1 MiB, and a `RedrivePolicy` whose dead-letter queue
    /// exists (its URL is found by name and owner account from the policy's ARN) and also takes
    /// 1 MiB messages.
    pub async fn open(client: Client, queue_url: String) -> Result<Self, OpenError> {
        Self::open_as(client, queue_url, true).await
    }

    /// [`SqsQueue::open`] for a host that only sends to the main queue (the ingest and admin
    /// functions, whose roles may read the main queue's attributes and nothing of the DLQ): the
    /// same checks of the main queue, and no look at the DLQ. Only [`Producer`] and
    /// [`SqsQueue::approximate_counts`] work on what it returns.
    pub async fn open_sender(client: Client, queue_url: String) -> Result<Self, OpenError> {
        Self::open_as(client, queue_url, false).await
    }

    async fn open_as(client: Client, queue_url: String, consumer: bool) -> Result<Self, OpenError> {
        let attributes = client
            .get_queue_attributes()
            .queue_url(&queue_url)
            .attribute_names(QueueAttributeName::MaximumMessageSize)
            .attribute_names(QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| OpenError::Attributes {
                queue_url: queue_url.clone(),
                reason: crate::error_detail(&e),
            })?;
        let attributes = attributes.attributes();
        let attribute =
            |name: &QueueAttributeName| attributes.and_then(|a| a.get(name)).map(String::as_str);
        check_message_size(
            &queue_url,
            attribute(&QueueAttributeName::MaximumMessageSize),
        )?;

        let Some(policy) = attribute(&QueueAttributeName::RedrivePolicy).filter(|p| !p.is_empty())
        else {
            return Err(OpenError::NoRedrivePolicy { queue_url });
        };
        let redrive =
            RedrivePolicy::parse(policy).map_err(|detail| OpenError::BadRedrivePolicy {
                queue_url: queue_url.clone(),
                policy: policy.to_owned(),
                detail: detail.to_owned(),
            })?;
        if !consumer {
            return Ok(Self {
                client,
                queue_url,
                dead_letter_queue_url: String::new(),
                dead_letter_arn: redrive.dead_letter_arn,
                max_receives: redrive.max_receives,
                visibility_timeout: None,
                entry_delay: None,
            });
        }
        let dead_letter_error = |reason: String| OpenError::DeadLetterQueue {
            queue_url: queue_url.clone(),
            dead_letter_arn: redrive.dead_letter_arn.clone(),
            reason,
        };
        let found = client
            .get_queue_url()
            .queue_name(&redrive.dead_letter_name)
            .queue_owner_aws_account_id(&redrive.dead_letter_account)
            .send()
            .await
            .map_err(|e| dead_letter_error(crate::error_detail(&e)))?;
        let dead_letter_queue_url = found
            .queue_url()
            .ok_or_else(|| dead_letter_error("GetQueueUrl answered without a URL".into()))?
            .to_owned();
        let dead_letter_attributes = client
            .get_queue_attributes()
            .queue_url(&dead_letter_queue_url)
            .attribute_names(QueueAttributeName::MaximumMessageSize)
            .send()
            .await
            .map_err(|e| OpenError::Attributes {
                queue_url: dead_letter_queue_url.clone(),
                reason: crate::error_detail(&e),
            })?;
        check_message_size(
            &dead_letter_queue_url,
            dead_letter_attributes
                .attributes()
                .and_then(|a| a.get(&QueueAttributeName::MaximumMessageSize))
                .map(String::as_str),
        )?;
        tracing::info!(
            queue_url,
            dead_letter_queue_url,
            max_receives = redrive.max_receives,
            "SQS queue opened"
        );
        Ok(Self {
            client,
            queue_url,
            dead_letter_queue_url,
            dead_letter_arn: redrive.dead_letter_arn,
            max_receives: redrive.max_receives,
            visibility_timeout: None,
            entry_delay: None,
        })
    }

    /// [`SqsQueue::open`] with a client built from the standard AWS settings
    /// ([`crate::sdk_config`]).
    pub async fn connect(queue_url: String) -> Result<Self, OpenError> {
        let client = Client::new(&crate::sdk_config().await);
        Self::open(client, queue_url).await
    }

    /// The main queue's URL (`FLUXA_QUEUE_URL`).
    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    /// The ARN of the queue's dead-letter queue, from its `RedrivePolicy`.
    pub fn dead_letter_arn(&self) -> &str {
        &self.dead_letter_arn
    }

    /// The URL of the queue's dead-letter queue, from its `RedrivePolicy`.
    pub fn dead_letter_queue_url(&self) -> &str {
        &self.dead_letter_queue_url
    }

    /// How many receives a message gets before the queue's redrive dead-letters it
    /// (`maxReceiveCount`).
    pub fn max_receives(&self) -> u32 {
        self.max_receives
    }

    /// Has every receive hide its messages for `timeout` (whole seconds, at most 12 hours)
    /// rather than for the queue's own visibility timeout: `fluxa serve` passes its
    /// `visibility_timeout` setting, so it means the same on every queue backend.
    pub fn with_visibility_timeout(mut self, timeout: Duration) -> Self {
        self.visibility_timeout = Some(timeout);
        self
    }

    /// Counts of the main queue, from its approximate attributes: waiting (visible or
    /// delayed) and in flight.
    pub async fn approximate_counts(&self) -> Result<(u64, u64)> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", &e))?;
        let count = |name: QueueAttributeName| {
            output
                .attributes()
                .and_then(|a| a.get(&name))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((
            count(QueueAttributeName::ApproximateNumberOfMessages)
                + count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
            count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        ))
    }

    /// Receives up to 10 messages from the dead-letter queue, long-polling up to `wait`, as
    /// dead letters (the drain that records them in the store).
    pub async fn receive_dead_letters(&self, wait: Duration) -> Result<Vec<DrainedDeadLetter>> {
        let output = self
            .client
            .receive_message()
            .queue_url(&self.dead_letter_queue_url)
            .max_number_of_messages(MAX_BATCH_ENTRIES as i32)
            .wait_time_seconds(wait_seconds(wait))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| sdk_error("ReceiveMessage (from the dead-letter queue)", &e))?;
        let now = Utc::now();
        output
            .messages()
            .iter()
            .map(|message| {
                let message = ReceivedMessage::of(message)?;
                Ok(DrainedDeadLetter {
                    dead_letter: message.dead_letter(self.max_receives, now),
                    receipt: message.receipt,
                })
            })
            .collect()
    }

    /// Deletes drained messages from the dead-letter queue, in calls of 10.
    pub async fn delete_dead_letters(&self, receipts: &[&str]) -> Result<()> {
        self.delete_receipts(&self.dead_letter_queue_url, receipts)
            .await
    }

    /// A message received from this queue (by `ReceiveMessage` or a Lambda event) as a
    /// delivery.
    pub fn delivery_of(&self, message: ReceivedMessage) -> Delivery {
        let receive_count = message.receive_count();
        Delivery {
            attributes: message.ids(),
            enqueued_at: message.sent_at().unwrap_or_else(Utc::now),
            message_id: message.message_id,
            receipt: message.receipt,
            body: Bytes::from(message.body),
            receive_count,
            receives_left: self.max_receives.saturating_sub(receive_count),
        }
    }

    /// `DeleteMessageBatch` on `queue_url` in calls of 10; every call is made, and the first
    /// failed entry (or call) is the error.
    async fn delete_receipts(&self, queue_url: &str, receipts: &[&str]) -> Result<()> {
        let mut first_failure = None;
        for chunk in receipts.chunks(MAX_BATCH_ENTRIES) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(entry_idx, receipt)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(entry_idx.to_string())
                        .receipt_handle(*receipt)
                        .build()
                        .map_err(Error::rejected)
                })
                .collect::<Result<Vec<_>>>()?;
            let failure = match self
                .client
                .delete_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(output) => output
                    .failed()
                    .first()
                    .map(|entry| entry_error("DeleteMessageBatch", entry)),
                Err(e) => Some(sdk_error("DeleteMessageBatch", &e)),
            };
            if let Some(failure) = failure {
                first_failure.get_or_insert(failure);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// Tests only: every send puts `DelaySeconds = delay_seconds` on its message number
    /// `message_idx` (an out-of-range delay makes SQS fail that entry alone).
    #[doc(hidden)]
    pub fn with_entry_delay_for_tests(mut self, message_idx: usize, delay_seconds: i32) -> Self {
        self.entry_delay = Some((message_idx, delay_seconds));
        self
    }

    /// Sends one batch call's entries, filling `sent` for those that succeeded; returns the
    /// first failure.
    async fn send_batch(
        &self,
        entries: Vec<SendMessageBatchRequestEntry>,
        sent: &mut [Option<String>],
    ) -> Option<Error> {
        let entry_idxs: Vec<usize> = entries
            .iter()
            .filter_map(|entry| entry.id().parse().ok())
            .collect();
        let output = match self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
        {
            Ok(output) => output,
            Err(e) => return Some(sdk_error("SendMessageBatch", &e)),
        };
        let mut failure = None;
        for entry in output.successful() {
            if let Some(slot) = entry
                .id()
                .parse::<usize>()
                .ok()
                .and_then(|i| sent.get_mut(i))
            {
                *slot = Some(entry.message_id().to_owned());
            }
        }
        if let Some(entry) = output.failed().first() {
            failure = Some(entry_error("SendMessageBatch", entry));
        }
        if failure.is_none() && entry_idxs.iter().any(|&i| sent[i].is_none()) {
            failure = Some(Error::unavailable(SqsError {
                operation: "SendMessageBatch",
                detail: "the answer did not account for every entry".into(),
            }));
        }
        failure
    }
}

#[async_trait]
impl Producer for SqsQueue {
    async fn send(&self, messages: Vec<NewMessage>) -> Result<Vec<String>, SendError> {
        let n_messages = messages.len();
        let mut sent: Vec<Option<String>> = vec![None; n_messages];
        // Checked before anything is sent: a body SQS cannot carry is the caller's mistake,
        // not a partial send.
        if messages
            .iter()
            .any(|message| std::str::from_utf8(&message.body).is_err())
        {
            return Err(SendError {
                sent,
                source: Error::rejected(SqsError {
                    operation: "SendMessageBatch",
                    detail: "a message body is not UTF-8 text".into(),
                }),
            });
        }

        let mut first_failure: Option<Error> = None;
        let mut batch: Vec<SendMessageBatchRequestEntry> = Vec::with_capacity(MAX_BATCH_ENTRIES);
        let mut batch_bytes = 0;
        for (message_idx, message) in messages.into_iter().enumerate() {
            let attributes = message_attributes(&message.attributes);
            let entry_bytes = message.body.len() + attributes_size(&attributes);
            if !batch.is_empty()
                && (batch.len() == MAX_BATCH_ENTRIES || batch_bytes + entry_bytes > MAX_BATCH_BYTES)
            {
                if let Some(e) = self.send_batch(std::mem::take(&mut batch), &mut sent).await {
                    first_failure.get_or_insert(e);
                }
                batch_bytes = 0;
            }
            let body = String::from_utf8(message.body).expect("checked above");
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(message_idx.to_string())
                .message_body(body)
                .set_message_attributes(Some(
                    attributes
                        .into_iter()
                        .map(|(name, value)| (name.to_owned(), string_attribute(value)))
                        .collect(),
                ));
            if let Some((delayed_idx, delay_seconds)) = self.entry_delay {
                if delayed_idx == message_idx {
                    entry = entry.delay_seconds(delay_seconds);
                }
            }
            batch.push(entry.build().map_err(|e| SendError {
                sent: sent.clone(),
                source: Error::rejected(e),
            })?);
            batch_bytes += entry_bytes;
        }
        if !batch.is_empty() {
            if let Some(e) = self.send_batch(batch, &mut sent).await {
                first_failure.get_or_insert(e);
            }
        }
        match first_failure {
            None => Ok(sent.into_iter().map(Option::unwrap_or_default).collect()),
            Some(source) => Err(SendError { sent, source }),
        }
    }

    async fn ping(&self) -> Result<()> {
        self.client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| sdk_error("GetQueueAttributes", &e))?;
        Ok(())
    }
}

#[async_trait]
impl Consumer for SqsQueue {
    /// One `ReceiveMessage` of up to 10 messages (SQS's limit), long-polling up to `wait`
    /// (whole seconds, at most 20); only when that call returns a full 10 and more are wanted
    /// do further calls follow, without waiting.
    async fn receive(&self, max_messages: usize, wait: Duration) -> Result<Received> {
        let mut received = Received::default();
        let mut wait_seconds = wait_seconds(wait);
        while received.deliveries.len() < max_messages {
            let wanted = (max_messages - received.deliveries.len()).min(MAX_BATCH_ENTRIES);
            let output = self
                .client
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(wanted as i32)
                .wait_time_seconds(wait_seconds)
                .set_visibility_timeout(self.visibility_timeout.map(visibility_seconds))
                .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
                .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
                .message_attribute_names("All")
                .send()
                .await;
            let output = match output {
                Ok(output) => output,
                Err(e) if received.deliveries.is_empty() => {
                    return Err(sdk_error("ReceiveMessage", &e))
                }
                // What the first calls got is hidden already: hand it over.
                Err(e) => {
                    tracing::debug!(
                        error.message = %sdk_error("ReceiveMessage", &e),
                        "a follow-up receive failed"
                    );
                    break;
                }
            };
            let messages = output.messages();
            for message in messages {
                received
                    .deliveries
                    .push(self.delivery_of(ReceivedMessage::of(message)?));
            }
            if messages.len() < wanted {
                break;
            }
            wait_seconds = 0;
        }
        Ok(received)
    }

    /// `DeleteMessageBatch` in calls of 10; every call is made, and the first failed entry (or
    /// call) is the error.
    async fn delete_many(&self, deliveries: &[&Delivery]) -> Result<()> {
        let receipts: Vec<&str> = deliveries.iter().map(|d| d.receipt.as_str()).collect();
        self.delete_receipts(&self.queue_url, &receipts).await
    }

    /// Changes the message's visibility to `delay` (rounded up to whole seconds, at most 12
    /// hours). SQS keeps no record of `error`; a message no longer in flight (visible again
    /// already) is left as it is.
    async fn retry_later(
        &self,
        delivery: &Delivery,
        delay: Duration,
        error: &FailureInfo,
    ) -> Result<()> {
        let result = self
            .client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(&delivery.receipt)
            .visibility_timeout(visibility_seconds(delay))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("AWS.SimpleQueueService.MessageNotInflight") => {
                tracing::debug!(
                    message_id = delivery.message_id,
                    error.code = error.code,
                    "message visible again before its retry was scheduled"
                );
                Ok(())
            }
            Err(e) => Err(sdk_error("ChangeMessageVisibility", &e)),
        }
    }

    /// Sends the original body to the DLQ with the original ids and the reason as attributes,
    /// then deletes the message from the queue. A failed send deletes nothing (the message
    /// comes back and is retried).
    async fn dead_letter(&self, delivery: &Delivery, error: &FailureInfo) -> Result<()> {
        let body = std::str::from_utf8(&delivery.body).map_err(|_| {
            Error::rejected(SqsError {
                operation: "SendMessage",
                detail: "the delivery's body is not UTF-8 text".into(),
            })
        })?;
        let attributes = dead_letter_attributes(
            &delivery.attributes,
            error,
            delivery.receive_count,
            Utc::now(),
        );
        self.client
            .send_message()
            .queue_url(&self.dead_letter_queue_url)
            .message_body(body)
            .set_message_attributes(Some(
                attributes
                    .into_iter()
                    .map(|(name, value)| (name.to_owned(), string_attribute(value)))
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| sdk_error("SendMessage (to the dead-letter queue)", &e))?;
        self.client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(&delivery.receipt)
            .send()
            .await
            .map_err(|e| sdk_error("DeleteMessage", &e))?;
        Ok(())
    }
}

/// A queue's `RedrivePolicy`, as Fluxa uses it.
#[derive(Debug, PartialEq, Eq)]
struct RedrivePolicy {
    dead_letter_arn: String,
    dead_letter_name: String,
    dead_letter_account: String,
    max_receives: u32,
}

impl RedrivePolicy {
    /// Parses `{"deadLetterTargetArn": "arn:aws:sqs:region:account:name", "maxReceiveCount": n}`
    /// (`n` a number, or a string holding one).
    fn parse(policy: &str) -> Result<Self, &'static str> {
        let policy: serde_json::Value =
            serde_json::from_str(policy).map_err(|_| "it is not JSON")?;
        let dead_letter_arn = policy
            .get("deadLetterTargetArn")
            .and_then(|arn| arn.as_str())
            .ok_or("it has no deadLetterTargetArn")?;
        let max_receives = match policy.get("maxReceiveCount") {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .and_then(|n| u32::try_from(n).ok())
        .filter(|&n| n >= 1)
        .ok_or("its maxReceiveCount is not a positive whole number")?;
        // arn:partition:sqs:region:account-id:queue-name
        let parts: Vec<&str> = dead_letter_arn.splitn(6, ':').collect();
        let [arn, _partition, service, _region, account, name] = parts[..] else {
            return Err("its deadLetterTargetArn is not an SQS queue ARN");
        };
        if arn != "arn" || service != "sqs" || account.is_empty() || name.is_empty() {
            return Err("its deadLetterTargetArn is not an SQS queue ARN");
        }
        Ok(Self {
            dead_letter_arn: dead_letter_arn.to_owned(),
            dead_letter_name: name.to_owned(),
            dead_letter_account: account.to_owned(),
            max_receives,
        })
    }
}

/// Refuses a queue whose `MaximumMessageSize` is missing or below 1 MiB.
fn check_message_size(queue_url: &str, size: Option<&str>) -> Result<(), OpenError> {
    match size.map(|s| (s, s.trim().parse::<u64>())) {
        Some((_, Ok(bytes))) if bytes >= MIN_MAXIMUM_MESSAGE_SIZE => Ok(()),
        Some((size, _)) => Err(OpenError::MessageSizeTooSmall {
            queue_url: queue_url.to_owned(),
            size: size.to_owned(),
        }),
        None => Err(OpenError::MessageSizeTooSmall {
            queue_url: queue_url.to_owned(),
            size: "(not reported)".to_owned(),
        }),
    }
}

/// The message attributes of a message Fluxa sends, absent and empty ones left out (SQS
/// refuses an empty value).
fn message_attributes(attributes: &MessageAttributes) -> Vec<(&'static str, String)> {
    let payload_mode = if attributes.blob_key.is_some() {
        "S3"
    } else {
        "INLINE"
    };
    let mut out = vec![
        ("payload_mode", payload_mode.to_owned()),
        ("schema", SCHEMA.to_owned()),
    ];
    push_ids(&mut out, attributes);
    out
}

/// The ids of a message, absent and empty ones left out.
fn push_ids(out: &mut Vec<(&'static str, String)>, attributes: &MessageAttributes) {
    for (name, value) in [
        ("correlation_id", &attributes.correlation_id),
        ("event_id", &attributes.event_id),
        ("blob_key", &attributes.blob_key),
        ("event_type", &attributes.event_type),
    ] {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            out.push((name, sqs_text(value)));
        }
    }
}

/// The attributes of a dead letter sent to the DLQ: the message's ids and the reason.
///
/// SQS allows 10 message attributes, and the ids (4) plus the reason (6) already make 10, so
/// `payload_mode` and `schema` are left out: `payload_mode` is `S3` exactly when `blob_key` is
/// there, and the schema is in the body. SQS keeps no record of earlier transient failures, so
/// `first_failure_at` is this failure's time, like `dead_lettered_at`.
fn dead_letter_attributes(
    attributes: &MessageAttributes,
    error: &FailureInfo,
    receive_count: u32,
    now: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    let now = now.to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut out = Vec::with_capacity(MAX_MESSAGE_ATTRIBUTES);
    push_ids(&mut out, attributes);
    let error_message: String = error
        .message
        .chars()
        .take(MAX_ERROR_MESSAGE_CHARS)
        .collect();
    out.push(("error_code", sqs_text(&error.code)));
    // An empty value is refused; an empty message says so.
    out.push((
        "error_message",
        if error_message.is_empty() {
            "(none)".to_owned()
        } else {
            sqs_text(&error_message)
        },
    ));
    out.push(("error_class", "permanent".to_owned()));
    out.push(("receive_count", receive_count.to_string()));
    out.push(("first_failure_at", now.clone()));
    out.push(("dead_lettered_at", now));
    debug_assert!(out.len() <= MAX_MESSAGE_ATTRIBUTES);
    out
}

fn string_attribute(value: String) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .expect("a String attribute with a value is complete")
}

/// What message attributes add to a message's size as SQS counts it (name, type, value).
fn attributes_size(attributes: &[(&'static str, String)]) -> usize {
    attributes
        .iter()
        .map(|(name, value)| name.len() + "String".len() + value.len())
        .sum()
}

/// `text` with every character SQS refuses in an attribute value replaced by U+FFFD (SQS takes
/// tab, newline, carriage return, and U+0020 to U+10FFFF except surrogates, U+FFFE and
/// U+FFFF).
fn sqs_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' => c,
            '\u{10000}'..='\u{10FFFF}' => c,
            _ => '\u{FFFD}',
        })
        .collect()
}

/// A long poll's wait in whole seconds (rounded to the nearest), at most 20.
fn wait_seconds(wait: Duration) -> i32 {
    let rounded = (wait.as_millis() + 500) / 1000;
    rounded.min(u128::from(MAX_WAIT_SECONDS)) as i32
}

/// A visibility timeout of at least `delay`, in whole seconds, at most 12 hours.
fn visibility_seconds(delay: Duration) -> i32 {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    seconds.min(MAX_VISIBILITY_SECONDS) as i32
}

/// An SQS call that failed, described without the request or response bodies.
#[derive(Debug, thiserror::Error)]
#[error("SQS {operation} failed: {detail}")]
struct SqsError {
    operation: &'static str,
    detail: String,
}

/// A failed call: a request SQS refused (a 4xx other than throttling, or one the SDK could not
/// build) is `Rejected`; no answer, a throttle or a service fault (5xx) is `Unavailable`.
fn sdk_error<E>(operation: &'static str, error: &SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let refused = match error {
        SdkError::ConstructionFailure(_) => true,
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let throttled = status == 429
                || error.code().is_some_and(|code| {
                    code.contains("Throttl") || code.contains("RequestThrottled")
                });
            (400..500).contains(&status) && !throttled
        }
        _ => false,
    };
    let failure = SqsError {
        operation,
        detail: crate::error_detail(error),
    };
    if refused {
        Error::rejected(failure)
    } else {
        Error::unavailable(failure)
    }
}

/// A failed batch entry: the sender's fault is `Rejected`, the service's `Unavailable`.
fn entry_error(
    operation: &'static str,
    entry: &aws_sdk_sqs::types::BatchResultErrorEntry,
) -> Error {
    let failure = SqsError {
        operation,
        detail: match entry.message() {
            Some(message) => format!("entry {}: {}: {message}", entry.id(), entry.code()),
            None => format!("entry {}: {}", entry.id(), entry.code()),
        },
    };
    if entry.sender_fault() {
        Error::rejected(failure)
    } else {
        Error::unavailable(failure)
    }
}

#[cfg(test)]
mod tests {
    use fluxa_core::ErrorCode;

    use super::*;

    #[test]
    fn a_batch_entry_the_service_failed_is_an_outage_and_one_it_refused_is_a_refusal() {
        let entry = |sender_fault| {
            aws_sdk_sqs::types::BatchResultErrorEntry::builder()
                .id("3")
                .code("InternalError")
                .sender_fault(sender_fault)
                .build()
                .unwrap()
        };
        // Ingest answers the item 503 (retry it) for the first and 500 for the second.
        assert!(matches!(
            entry_error("SendMessageBatch", &entry(false)),
            Error::Unavailable(_)
        ));
        assert!(matches!(
            entry_error("SendMessageBatch", &entry(true)),
            Error::Rejected(_)
        ));
    }

    #[test]
    fn a_redrive_policy_gives_the_dead_letter_queue_and_the_receive_limit() {
        let policy = RedrivePolicy::parse(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:eu-west-1:123456789012:fluxa-dlq","maxReceiveCount":3}"#,
        )
        .unwrap();
        assert_eq!(
            policy,
            RedrivePolicy {
                dead_letter_arn: "arn:aws:sqs:eu-west-1:123456789012:fluxa-dlq".into(),
                dead_letter_name: "fluxa-dlq".into(),
                dead_letter_account: "123456789012".into(),
                max_receives: 3,
            }
        );
        let as_string = RedrivePolicy::parse(
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:q","maxReceiveCount":"5"}"#,
        )
        .unwrap();
        assert_eq!(as_string.max_receives, 5);
        for bad in [
            "not json",
            r#"{"maxReceiveCount":3}"#,
            r#"{"deadLetterTargetArn":"arn:aws:sns:us-east-1:1:q","maxReceiveCount":3}"#,
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:1:q","maxReceiveCount":0}"#,
        ] {
            assert!(RedrivePolicy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_dead_letter_with_every_id_stays_within_the_sqs_attribute_limit() {
        let attributes = MessageAttributes {
            event_id: Some("e-1".into()),
            correlation_id: Some("c-1".into()),
            blob_key: Some("events/e-1".into()),
            event_type: Some("order.created".into()),
        };
        let error = FailureInfo::new(ErrorCode::HashMismatch, "x".repeat(10_000));
        let dead = dead_letter_attributes(&attributes, &error, 2, Utc::now());
        assert_eq!(dead.len(), MAX_MESSAGE_ATTRIBUTES);
        let message = &dead.iter().find(|(n, _)| *n == "error_message").unwrap().1;
        assert_eq!(message.len(), MAX_ERROR_MESSAGE_CHARS);
        assert!(message_attributes(&attributes).len() <= MAX_MESSAGE_ATTRIBUTES);
    }

    #[test]
    fn waits_and_delays_become_the_whole_seconds_sqs_takes() {
        assert_eq!(wait_seconds(Duration::ZERO), 0);
        assert_eq!(wait_seconds(Duration::from_millis(1_499)), 1);
        assert_eq!(wait_seconds(Duration::from_secs(60)), 20);
        assert_eq!(visibility_seconds(Duration::ZERO), 0);
        assert_eq!(visibility_seconds(Duration::from_millis(1_001)), 2);
        assert_eq!(visibility_seconds(Duration::from_secs(86_400)), 43_200);
    }

    #[test]
    fn characters_sqs_refuses_are_replaced_in_attribute_values() {
        assert_eq!(sqs_text("a\u{1}b\u{FFFF}\tc"), "a\u{FFFD}b\u{FFFD}\tc");
    }
}
