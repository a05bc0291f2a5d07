//! [`Producer`] and [`Consumer`] on SQS: sends in `SendMessageBatch` calls, receives with a
//! long poll, retries as visibility changes, and dead letters sent to the DLQ with their reason.

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use chrono::Utc;
use fluxa_core::FailureInfo;
use fluxa_queue::{Consumer, Delivery, Error, NewMessage, Producer, Received, Result, SendError};

use super::message::{
    attributes_size, dead_letter_attributes, message_attributes, string_attribute, ReceivedMessage,
};
use super::{
    entry_error, sdk_error, visibility_seconds, wait_seconds, SqsError, SqsQueue, MAX_BATCH_BYTES,
    MAX_BATCH_ENTRIES,
};

impl SqsQueue {
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
                    error.code = error.code.as_str(),
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
