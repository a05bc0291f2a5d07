//! Opening a queue: the checks that make an SQS queue one Fluxa can use (1 MiB messages, a
//! `RedrivePolicy` whose dead-letter queue exists), read once per process or container.

use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;

use super::SqsQueue;

/// The smallest `MaximumMessageSize` Fluxa accepts: an inline payload may be 256 KiB plus its
/// envelope, and a message is never larger than the queue allows.
pub const MIN_MAXIMUM_MESSAGE_SIZE: u64 = 1024 * 1024;

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
}

/// A queue's `RedrivePolicy`, as Fluxa uses it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RedrivePolicy {
    pub(super) dead_letter_arn: String,
    pub(super) dead_letter_name: String,
    pub(super) dead_letter_account: String,
    pub(super) max_receives: u32,
}

impl RedrivePolicy {
    /// Parses `{"deadLetterTargetArn": "arn:aws:sqs:region:account:name", "maxReceiveCount": n}`
    /// (`n` a number, or a string holding one).
    pub(super) fn parse(policy: &str) -> Result<Self, &'static str> {
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
