# The payload bucket: where ingest puts a payload larger than 256 KiB before it enqueues the
# message that points at it (contract section 1, seed invariant 5). Blobs are transport, not
# storage: the processor deletes a blob once its event is stored (the payload then lives in the
# database), so an object older than a few minutes is either waiting in a queue or orphaned by
# an ingest that died before enqueuing.
#
# - Encrypted with the deployment's KMS key (bucket keys on, to keep KMS calls per object low).
# - All public access blocked, and a bucket policy that refuses any request not made over TLS
#   1.2 or later.
# - Not versioned, on purpose: erasure (contract section 8) must remove a payload's bytes, and a
#   versioned bucket would keep every deleted payload as a noncurrent version. The bucket holds
#   nothing that cannot be re-sent: the source of truth for a stored event is the database.
# - A lifecycle rule expires objects under the payload prefix after `payload_expiration_days`
#   (more than the DLQ's 14-day retention, so a dead letter's payload outlives the dead letter
#   in SQS) and aborts incomplete multipart uploads after a day.

resource "aws_s3_bucket" "payloads" {
  #checkov:skip=CKV_AWS_21:Not versioned on purpose: erasure must delete payload bytes, and blobs are transport (the database holds the stored event).
  #checkov:skip=CKV_AWS_144:No cross-region replication: payload blobs are transient transport, and a replica would keep erased payloads.
  #checkov:skip=CKV_AWS_18:No server access logging: it needs a second bucket; audit object access with CloudTrail S3 data events at the account level instead.
  #checkov:skip=CKV2_AWS_62:No event notifications: nothing consumes bucket events; the queue message is the notification.
  bucket_prefix = "${var.name}-payloads-"
  force_destroy = false
  tags          = var.tags
}

resource "aws_s3_bucket_ownership_controls" "payloads" {
  bucket = aws_s3_bucket.payloads.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "payloads" {
  bucket                  = aws_s3_bucket.payloads.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "payloads" {
  bucket = aws_s3_bucket.payloads.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.fluxa.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "payloads" {
  bucket = aws_s3_bucket.payloads.id

  versioning_configuration {
    status = "Disabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "payloads" {
  bucket = aws_s3_bucket.payloads.id

  rule {
    id     = "expire-orphaned-payloads"
    status = "Enabled"

    filter {
      prefix = "${var.payload_prefix}/"
    }

    expiration {
      days = var.payload_expiration_days
    }
  }

  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "payloads_bucket" {
  statement {
    sid     = "DenyRequestsWithoutTls"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.payloads.arn,
      "${aws_s3_bucket.payloads.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid     = "DenyTlsOlderThan12"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.payloads.arn,
      "${aws_s3_bucket.payloads.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "payloads" {
  bucket = aws_s3_bucket.payloads.id
  policy = data.aws_iam_policy_document.payloads_bucket.json

  # A bucket policy is refused while the public access block is being created.
  depends_on = [aws_s3_bucket_public_access_block.payloads]
}
