# One execution role per function, each allowed exactly what its function does (seed
# invariant 7 and contract section 9). infra/terraform/tests/test_terraform.py holds these
# policies to that: the query role can write nothing anywhere, ingest has no database secret.
#
# | function  | SQS                                   | S3 (payload prefix only) | secret | KMS                     |
# |-----------|---------------------------------------|--------------------------|--------|-------------------------|
# | ingest    | send + read attributes: main queue    | put, delete              | none   | encrypt + decrypt       |
# | query     | none                                  | none                     | read   | decrypt                 |
# | processor | receive, delete, change visibility,   | get, delete, list prefix | read   | encrypt + decrypt       |
# |           | read attributes: main queue;          |                          |        |                         |
# |           | send: DLQ (receive, delete too with   |                          |        |                         |
# |           | `processor_drains_dlq`)               |                          |        |                         |
# | admin     | send + read attributes: main queue    | get, delete, list prefix | read   | encrypt + decrypt       |
#
# Every role may also write to its own log group and manage the network interfaces Lambda puts
# in the VPC. No managed policy is attached: AWSLambdaVPCAccessExecutionRole would also let
# every function create and write any log group in the account. The only "Resource": "*" left
# is on the two EC2 Describe actions, which AWS allows on nothing else.
#
# Ingest reads the main queue's attributes because Fluxa refuses, at start, a queue whose
# MaximumMessageSize is below 1 MiB. The processor and admin may list the payload prefix
# because without s3:ListBucket S3 answers 403 rather than 404 for a missing object, and a
# missing blob must be told apart (a permanent `blob_missing`) from an outage.

locals {
  payload_objects_arn = "${var.bucket_arn}/${var.payload_prefix}/*"

  # What Lambda needs to attach a function to the VPC (the actions of the managed
  # AWSLambdaVPCAccessExecutionRole, without its logs:* on every log group). The two Describe
  # actions take no resource ARN, so AWS requires "Resource": "*" for them; the four that
  # change network interfaces are limited to this account's EC2 resources in this region, the
  # narrowest scope AWS documents for Lambda's network interfaces.
  network_describe_actions = [
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSubnets",
  ]
  network_interface_actions = [
    "ec2:CreateNetworkInterface",
    "ec2:DeleteNetworkInterface",
    "ec2:AssignPrivateIpAddresses",
    "ec2:UnassignPrivateIpAddresses",
  ]
  account_ec2_resources = "arn:${data.aws_partition.current.partition}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:*/*"

  query_database_secret_arn = var.query_database_secret_arn != "" ? var.query_database_secret_arn : var.database_secret_arn
}

data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_iam_policy_document" "assume_lambda" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

# ---------------------------------------------------------------------------------------------
# ingest: API Gateway → validate, hash, payload > 256 KiB to S3, message to SQS. No database.

resource "aws_iam_role" "ingest" {
  name               = "${var.name}-ingest"
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
  tags               = var.tags
}

data "aws_iam_policy_document" "ingest" {
  statement {
    sid       = "OwnLogGroup"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function["ingest"].arn}:*"]
  }

  statement {
    sid       = "DescribeVpcNetwork"
    actions   = local.network_describe_actions
    resources = ["*"]
  }

  statement {
    sid       = "ManageVpcNetworkInterfaces"
    actions   = local.network_interface_actions
    resources = [local.account_ec2_resources]
  }

  statement {
    sid       = "EnqueueEvents"
    actions   = ["sqs:SendMessage", "sqs:GetQueueAttributes"]
    resources = [var.queue_arn]
  }

  statement {
    sid       = "StoreLargePayloads"
    actions   = ["s3:PutObject", "s3:DeleteObject"]
    resources = [local.payload_objects_arn]
  }

  statement {
    sid       = "DeploymentKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role_policy" "ingest" {
  name   = "ingest"
  role   = aws_iam_role.ingest.id
  policy = data.aws_iam_policy_document.ingest.json
}

# ---------------------------------------------------------------------------------------------
# query: read-only. The database secret and the key that decrypts it; nothing that writes.

resource "aws_iam_role" "query" {
  name               = "${var.name}-query"
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
  tags               = var.tags
}

data "aws_iam_policy_document" "query" {
  statement {
    sid       = "OwnLogGroup"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function["query"].arn}:*"]
  }

  statement {
    sid       = "DescribeVpcNetwork"
    actions   = local.network_describe_actions
    resources = ["*"]
  }

  statement {
    sid       = "ManageVpcNetworkInterfaces"
    actions   = local.network_interface_actions
    resources = [local.account_ec2_resources]
  }

  statement {
    sid       = "DatabaseCredentials"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [local.query_database_secret_arn]
  }

  statement {
    sid       = "DeploymentKey"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role_policy" "query" {
  name   = "query"
  role   = aws_iam_role.query.id
  policy = data.aws_iam_policy_document.query.json
}

# ---------------------------------------------------------------------------------------------
# processor: SQS event source → store the events; permanent failures to the DLQ.

resource "aws_iam_role" "processor" {
  name               = "${var.name}-processor"
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
  tags               = var.tags
}

data "aws_iam_policy_document" "processor" {
  statement {
    sid       = "OwnLogGroup"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function["processor"].arn}:*"]
  }

  statement {
    sid       = "DescribeVpcNetwork"
    actions   = local.network_describe_actions
    resources = ["*"]
  }

  statement {
    sid       = "ManageVpcNetworkInterfaces"
    actions   = local.network_interface_actions
    resources = [local.account_ec2_resources]
  }

  statement {
    sid = "ConsumeMainQueue"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
    ]
    resources = [var.queue_arn]
  }

  statement {
    sid       = "SendPermanentFailuresToDlq"
    actions   = ["sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"]
    resources = [var.dlq_arn]
  }

  statement {
    sid       = "ReadAndDeleteLargePayloads"
    actions   = ["s3:GetObject", "s3:DeleteObject"]
    resources = [local.payload_objects_arn]
  }

  statement {
    sid       = "TellMissingPayloadsFromOutages"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.payload_prefix}/*"]
    }
  }

  statement {
    sid       = "DatabaseCredentials"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.database_secret_arn]
  }

  statement {
    sid       = "DeploymentKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role_policy" "processor" {
  name   = "processor"
  role   = aws_iam_role.processor.id
  policy = data.aws_iam_policy_document.processor.json
}

# The DLQ drain's event source mapping receives and deletes for the processor
# (`processor_drains_dlq`, on by default; docs/DEPLOY-AWS.md).
data "aws_iam_policy_document" "processor_dlq_drain" {
  count = var.processor_drains_dlq ? 1 : 0

  statement {
    sid       = "DrainDlqIntoStore"
    actions   = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"]
    resources = [var.dlq_arn]
  }
}

resource "aws_iam_role_policy" "processor_dlq_drain" {
  count  = var.processor_drains_dlq ? 1 : 0
  name   = "processor-dlq-drain"
  role   = aws_iam_role.processor.id
  policy = data.aws_iam_policy_document.processor_dlq_drain[0].json
}

# ---------------------------------------------------------------------------------------------
# admin (optional): the /v1/admin/* routes of contract section 8. It is a function of its own
# rather than a part of ingest, because the operator API reads and writes the database (dead
# letters, idempotency records, erasure) and ingest has no database access at all; and not a
# part of query, which stays read-only. Redrive re-enqueues (SQS send on the main queue) and
# erasure deletes payload blobs.

resource "aws_iam_role" "admin" {
  count              = var.enable_admin_function ? 1 : 0
  name               = "${var.name}-admin"
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
  tags               = var.tags
}

data "aws_iam_policy_document" "admin" {
  count = var.enable_admin_function ? 1 : 0

  statement {
    sid       = "OwnLogGroup"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.function["admin"].arn}:*"]
  }

  statement {
    sid       = "DescribeVpcNetwork"
    actions   = local.network_describe_actions
    resources = ["*"]
  }

  statement {
    sid       = "ManageVpcNetworkInterfaces"
    actions   = local.network_interface_actions
    resources = [local.account_ec2_resources]
  }

  statement {
    sid       = "RedriveToMainQueue"
    actions   = ["sqs:SendMessage", "sqs:GetQueueAttributes"]
    resources = [var.queue_arn]
  }

  statement {
    sid       = "ShowAndEraseLargePayloads"
    actions   = ["s3:GetObject", "s3:DeleteObject"]
    resources = [local.payload_objects_arn]
  }

  statement {
    sid       = "TellMissingPayloadsFromOutages"
    actions   = ["s3:ListBucket"]
    resources = [var.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.payload_prefix}/*"]
    }
  }

  statement {
    sid       = "DatabaseCredentials"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.database_secret_arn]
  }

  statement {
    sid       = "DeploymentKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

resource "aws_iam_role_policy" "admin" {
  count  = var.enable_admin_function ? 1 : 0
  name   = "admin"
  role   = aws_iam_role.admin[0].id
  policy = data.aws_iam_policy_document.admin[0].json
}
