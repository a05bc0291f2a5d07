# One customer-managed KMS key encrypts everything Fluxa keeps: the queues, the payload bucket,
# the database and its Performance Insights, the database secret, the Lambda functions'
# environment variables and every CloudWatch log group of the deployment. One key is one place
# to audit (CloudTrail) and one switch to revoke.
#
# The key policy delegates to IAM (the account root statement), so the functions' roles get
# exactly the kms: actions their own policies name (modules/stateless/iam.tf), on this key only.
# CloudWatch Logs is a service principal and cannot use IAM, so it is named here, limited to
# this account's log groups by the encryption context.

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
data "aws_partition" "current" {}

locals {
  account_id = data.aws_caller_identity.current.account_id
  region     = data.aws_region.current.name
  partition  = data.aws_partition.current.partition
}

resource "aws_kms_key" "fluxa" {
  description             = "${var.name}: queues, payloads, database, secret, Lambda environment and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministersTheKeyThroughIam"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogsEncryptsThisAccountsLogGroups"
        Effect    = "Allow"
        Principal = { Service = "logs.${local.region}.amazonaws.com" }
        Action = [
          "kms:Encrypt*",
          "kms:Decrypt*",
          "kms:ReEncrypt*",
          "kms:GenerateDataKey*",
          "kms:Describe*",
        ]
        Resource = "*"
        Condition = {
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${local.region}:${local.account_id}:log-group:*"
          }
        }
      },
    ]
  })

  tags = var.tags
}

resource "aws_kms_alias" "fluxa" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.fluxa.key_id
}
