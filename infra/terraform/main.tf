# Fluxa on AWS (issue 8, contract section 9): API Gateway → ingest Lambda → SQS → processor
# Lambda → RDS PostgreSQL, payloads over 256 KiB through S3, a read-only query Lambda, the
# database credentials in Secrets Manager.
#
# Two modules, split by lifetime:
# - modules/stateful: what holds data and must outlive any redeploy — the KMS key, the main
#   queue and its DLQ, the payload bucket, the database and its secret.
# - modules/stateless: what can be replaced at will — the functions, their roles, the event
#   source mapping, the HTTP API, the network plumbing of the functions, the alarms.
#
# docs/DEPLOY-AWS.md says how to build the zips and apply this; docs/RUNBOOK.md what to do when
# an alarm fires. scripts/terraform-check.sh checks it offline (terraform fmt, checkov, and the
# assertions of tests/test_terraform.py).

provider "aws" {
  region = var.aws_region

  default_tags {
    tags = merge({ Application = "fluxa", Deployment = var.name }, var.tags)
  }
}

locals {
  functions        = ["ingest", "query", "processor", "admin"]
  lambda_build_dir = var.lambda_build_dir != "" ? var.lambda_build_dir : "${path.root}/../../target/lambda"
  function_zips    = { for name in local.functions : name => "${local.lambda_build_dir}/${name}/bootstrap.zip" }
}

module "stateful" {
  source = "./modules/stateful"

  name               = var.name
  vpc_id             = var.vpc_id
  private_subnet_ids = var.private_subnet_ids

  processor_timeout_seconds         = var.processor_timeout_seconds
  processor_batching_window_seconds = var.processor_batching_window_seconds

  payload_prefix          = var.payload_prefix
  payload_expiration_days = var.payload_expiration_days
  log_retention_days      = var.log_retention_days

  db_instance_class           = var.db_instance_class
  db_engine_version           = var.db_engine_version
  db_allocated_storage_gb     = var.db_allocated_storage_gb
  db_max_allocated_storage_gb = var.db_max_allocated_storage_gb
  db_multi_az                 = var.db_multi_az
  db_backup_retention_days    = var.db_backup_retention_days
  db_max_connections          = var.db_max_connections
  db_name                     = var.db_name
  db_username                 = var.db_username
  db_iam_authentication       = var.db_iam_authentication

  tags = var.tags
}

module "stateless" {
  source = "./modules/stateless"

  name                    = var.name
  vpc_id                  = var.vpc_id
  private_subnet_ids      = var.private_subnet_ids
  private_route_table_ids = var.private_route_table_ids
  create_vpc_endpoints    = var.create_vpc_endpoints

  lambda_architecture   = var.lambda_architecture
  function_zips         = local.function_zips
  enable_admin_function = var.enable_admin_function
  function_memory_mb    = var.function_memory_mb
  api_tokens            = var.api_tokens
  ingest_max_body_bytes = var.ingest_max_body_bytes
  extra_environment     = var.extra_environment
  log_level             = var.log_level
  log_retention_days    = var.log_retention_days

  ingest_reserved_concurrency = var.ingest_reserved_concurrency
  query_reserved_concurrency  = var.query_reserved_concurrency
  admin_reserved_concurrency  = var.admin_reserved_concurrency

  processor_timeout_seconds         = var.processor_timeout_seconds
  processor_batch_size              = var.processor_batch_size
  processor_batching_window_seconds = var.processor_batching_window_seconds
  processor_max_concurrency         = var.processor_max_concurrency
  processor_drains_dlq              = var.processor_drains_dlq

  db_max_connections           = var.db_max_connections
  db_connections_per_container = var.db_connections_per_container
  db_reserved_connections      = var.db_reserved_connections

  api_throttling_burst_limit = var.api_throttling_burst_limit
  api_throttling_rate_limit  = var.api_throttling_rate_limit

  alarm_sns_topic_arn          = var.alarm_sns_topic_arn
  oldest_message_alarm_seconds = var.oldest_message_alarm_seconds

  kms_key_arn               = module.stateful.kms_key_arn
  queue_arn                 = module.stateful.queue_arn
  queue_url                 = module.stateful.queue_url
  queue_name                = module.stateful.queue_name
  dlq_arn                   = module.stateful.dlq_arn
  dlq_name                  = module.stateful.dlq_name
  max_receive_count         = module.stateful.max_receive_count
  bucket_name               = module.stateful.bucket_name
  bucket_arn                = module.stateful.bucket_arn
  payload_prefix            = var.payload_prefix
  database_secret_arn       = module.stateful.database_secret_arn
  query_database_secret_arn = var.query_database_secret_arn
  db_security_group_id      = module.stateful.db_security_group_id
  db_port                   = module.stateful.db_port

  tags = var.tags
}
