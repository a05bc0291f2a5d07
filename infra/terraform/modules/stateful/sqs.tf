# The main queue (ingest → processor) and its dead-letter queue.
#
# - maxReceiveCount = 3 is the contract's (section 3): after 3 receives a transient failure is
#   moved here by SQS as `retries_exhausted`. Fluxa reads it back from the RedrivePolicy, and the
#   processor's FLUXA_MAX_RECEIVES is set from the same local so the two cannot disagree.
# - 1 MiB messages: an inline payload may be 256 KiB plus its envelope and attributes, and Fluxa
#   refuses to start on a queue whose MaximumMessageSize is smaller (contract section 9).
# - Visibility timeout ≥ 6 × the processor's timeout (+ the batching window), as AWS advises for
#   Lambda event sources: a batch whose invocation is retried after a throttle or a timeout is
#   not delivered a second time while the first invocation may still be running.
# - The DLQ keeps messages for the SQS maximum, 14 days, and the bucket keeps payload objects
#   longer than that (s3.tf), so a dead letter's large payload is still there to redrive.

locals {
  max_receive_count          = 3
  max_message_size_bytes     = 1048576
  visibility_timeout_seconds = 6 * var.processor_timeout_seconds + var.processor_batching_window_seconds
  dlq_retention_seconds      = 1209600
}

resource "aws_sqs_queue" "dlq" {
  name                              = "${var.name}-events-dlq"
  message_retention_seconds         = local.dlq_retention_seconds
  max_message_size                  = local.max_message_size_bytes
  kms_master_key_id                 = aws_kms_key.fluxa.arn
  kms_data_key_reuse_period_seconds = 300
  tags                              = var.tags
}

resource "aws_sqs_queue" "main" {
  name                              = "${var.name}-events"
  max_message_size                  = local.max_message_size_bytes
  visibility_timeout_seconds        = local.visibility_timeout_seconds
  message_retention_seconds         = 345600
  receive_wait_time_seconds         = 20
  kms_master_key_id                 = aws_kms_key.fluxa.arn
  kms_data_key_reuse_period_seconds = 300

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq.arn
    maxReceiveCount     = local.max_receive_count
  })

  tags = var.tags
}

# Only the main queue may move messages into the DLQ.
resource "aws_sqs_queue_redrive_allow_policy" "dlq" {
  queue_url = aws_sqs_queue.dlq.id

  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.main.arn]
  })
}
