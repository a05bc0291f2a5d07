# The Lambda functions (thin adapters over the same library code as `fluxa serve`; STYLE.md
# points 5 and 14) and the event source mapping that feeds the processor.
#
# Each function's environment holds only what it uses (contract section 9 names):
# - ingest:    FLUXA_QUEUE_URL, FLUXA_BLOB_URL, FLUXA_API_TOKENS and the body limits;
# - query:     FLUXA_DATABASE_SECRET_ID, FLUXA_API_TOKENS;
# - processor: FLUXA_DATABASE_SECRET_ID, FLUXA_QUEUE_URL, FLUXA_BLOB_URL, FLUXA_MAX_RECEIVES,
#              FLUXA_LEASE;
# - admin:     FLUXA_DATABASE_SECRET_ID, FLUXA_QUEUE_URL, FLUXA_BLOB_URL, FLUXA_API_TOKENS;
# plus RUST_LOG and whatever `extra_environment` adds (retention settings, say). The variables
# are encrypted with the deployment's KMS key.
#
# Database connections. RDS's max_connections is set in the parameter group
# (`db_max_connections`, default 100). Every function that reaches the database holds at most
# `db_connections_per_container` (default 2) connections per container, and a container serves
# one invocation at a time, so the worst case is, with the defaults:
#
#   processor  maximum_concurrency 5  × 2 = 10   (the event source mapping never runs more
#                                                 containers than its maximum concurrency, and
#                                                 reserved concurrency caps direct invocations)
#   query      reserved concurrency 20 × 2 = 40
#   admin      reserved concurrency 2  × 2 =  4
#   ingest     no database                  =  0
#   reserved   superuser, RDS, operators   = 13   (`db_reserved_connections`)
#   total                                   = 67  ≤ 100
#
# `local.db_connection_budget` below adds it up from the variables, the
# `database_connection_budget` output shows it, and tests/test_terraform.py fails if the
# defaults ever add up to more than max_connections. A batch of `processor_batch_size` (25)
# messages is stored in one transaction, so five containers store up to 125 events per round
# trip without more connections. Raise throughput with the batch size first, concurrency second.

locals {
  log_group_prefix = "/aws/lambda/${var.name}-"

  blob_url = "s3://${var.bucket_name}/${var.payload_prefix}"

  # Lambda's synchronous invoke payload is at most 6 MB, and API Gateway puts the request body
  # into that payload as a JSON string, where every quote and backslash of the body is escaped
  # (two bytes for one). A body of `ingest_max_body_bytes` (default 2 MiB) therefore always
  # fits, whatever it holds; the payload limit leaves 64 KiB of it for the event's envelope.
  ingest_max_payload_bytes = var.ingest_max_body_bytes - 65536

  common_environment = {
    RUST_LOG = var.log_level
  }

  function_environment = {
    ingest = {
      FLUXA_QUEUE_URL         = var.queue_url
      FLUXA_BLOB_URL          = local.blob_url
      FLUXA_API_TOKENS        = var.api_tokens
      FLUXA_MAX_PAYLOAD_BYTES = tostring(local.ingest_max_payload_bytes)
      FLUXA_MAX_BATCH_BYTES   = tostring(var.ingest_max_body_bytes)
    }
    query = {
      FLUXA_DATABASE_SECRET_ID = local.query_database_secret_arn
      FLUXA_API_TOKENS         = var.api_tokens
    }
    processor = {
      FLUXA_DATABASE_SECRET_ID = var.database_secret_arn
      FLUXA_QUEUE_URL          = var.queue_url
      FLUXA_BLOB_URL           = local.blob_url
      # The same number as the queue's redrive policy.
      FLUXA_MAX_RECEIVES = tostring(var.max_receive_count)
      # A claim on an event id lasts as long as the invocation holding it can.
      FLUXA_LEASE = "${var.processor_timeout_seconds}s"
    }
    admin = {
      FLUXA_DATABASE_SECRET_ID = var.database_secret_arn
      FLUXA_QUEUE_URL          = var.queue_url
      FLUXA_BLOB_URL           = local.blob_url
      FLUXA_API_TOKENS         = var.api_tokens
    }
  }

  all_functions = {
    ingest = {
      description = "Fluxa ingest: POST /v1/events and /v1/events/batch"
      role_arn    = aws_iam_role.ingest.arn
      timeout     = 15
      reserved    = var.ingest_reserved_concurrency
    }
    query = {
      description = "Fluxa query: read-only GET /v1/events routes"
      role_arn    = aws_iam_role.query.arn
      timeout     = 10
      reserved    = var.query_reserved_concurrency
    }
    processor = {
      description = "Fluxa processor: SQS batches into PostgreSQL"
      role_arn    = aws_iam_role.processor.arn
      timeout     = var.processor_timeout_seconds
      reserved    = var.processor_max_concurrency
    }
    admin = {
      description = "Fluxa admin: /v1/admin/* operator API"
      role_arn    = one(aws_iam_role.admin[*].arn)
      timeout     = 29
      reserved    = var.admin_reserved_concurrency
    }
  }

  functions = {
    for name, function in local.all_functions : name => function
    if name != "admin" || var.enable_admin_function
  }

  # The DLQ drain's mapping invokes the processor too, in at most this many containers.
  dlq_drain_max_concurrency = var.processor_drains_dlq ? 2 : 0

  db_connection_budget = {
    processor = (var.processor_max_concurrency + local.dlq_drain_max_concurrency) * var.db_connections_per_container
    query     = var.query_reserved_concurrency * var.db_connections_per_container
    admin     = var.enable_admin_function ? var.admin_reserved_concurrency * var.db_connections_per_container : 0
    reserved  = var.db_reserved_connections
  }
}

resource "aws_cloudwatch_log_group" "function" {
  for_each          = local.functions
  name              = "${local.log_group_prefix}${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_lambda_function" "function" {
  #checkov:skip=CKV_AWS_50:No X-Ray tracing: Fluxa traces with correlation ids in its JSON logs and EMF metrics; X-Ray would need the SDK's tracing layer and more IAM.
  #checkov:skip=CKV_AWS_272:No code signing: the zips are built by `cargo lambda build` in CI and uploaded by Terraform; a signing profile is an organisation-level choice.
  #checkov:skip=CKV_AWS_116:No Lambda DLQ: that setting applies to asynchronous invocations only; ingest and query are invoked synchronously by API Gateway and the processor by the event source mapping, whose failures the SQS redrive policy dead-letters.
  for_each = local.functions

  function_name = "${var.name}-${each.key}"
  description   = each.value.description
  role          = each.value.role_arn

  runtime       = "provided.al2023"
  handler       = "bootstrap"
  architectures = [var.lambda_architecture]

  filename         = var.function_zips[each.key]
  source_code_hash = filebase64sha256(var.function_zips[each.key])

  memory_size                    = lookup(var.function_memory_mb, each.key, 512)
  timeout                        = each.value.timeout
  reserved_concurrent_executions = each.value.reserved
  kms_key_arn                    = var.kms_key_arn

  environment {
    variables = merge(
      local.common_environment,
      local.function_environment[each.key],
      try(var.extra_environment[each.key], {}),
    )
  }

  vpc_config {
    subnet_ids         = var.private_subnet_ids
    security_group_ids = [aws_security_group.functions.id]
  }

  tags = var.tags

  # The roles may write to their log group but not create it, so it must exist first.
  depends_on = [
    aws_cloudwatch_log_group.function,
    aws_iam_role_policy.ingest,
    aws_iam_role_policy.query,
    aws_iam_role_policy.processor,
    aws_iam_role_policy.admin,
    aws_iam_role_policy.processor_dlq_drain,
  ]
}

# The processor reads the main queue through Lambda's poller. ReportBatchItemFailures makes a
# partial batch failure possible: the processor returns the ids of the transient failures only,
# Lambda deletes the rest, and the failures come back after their visibility timeout until the
# redrive policy moves them to the DLQ on their third receive. Permanent failures are sent to the
# DLQ by Fluxa itself and reported as successes (contract section 9).
resource "aws_lambda_event_source_mapping" "processor" {
  event_source_arn                   = var.queue_arn
  function_name                      = aws_lambda_function.function["processor"].arn
  batch_size                         = var.processor_batch_size
  maximum_batching_window_in_seconds = var.processor_batching_window_seconds
  function_response_types            = ["ReportBatchItemFailures"]

  scaling_config {
    maximum_concurrency = var.processor_max_concurrency
  }
}

# The DLQ drain (docs/DEPLOY-AWS.md, "Dead letters on AWS"): the same function takes the DLQ's
# messages and records them in the store, where `fluxa dlq …` and the admin API see them, and
# marks a retries_exhausted event failed. A record the store cannot take is a batch item
# failure and stays in the DLQ, which has no redrive policy of its own: it is retried until the
# store is back or its 14-day retention ends. Two containers at most: a burst of dead letters
# must not take the processor's connections.
resource "aws_lambda_event_source_mapping" "processor_dlq_drain" {
  count = var.processor_drains_dlq ? 1 : 0

  event_source_arn                   = var.dlq_arn
  function_name                      = aws_lambda_function.function["processor"].arn
  batch_size                         = 10
  maximum_batching_window_in_seconds = 5
  function_response_types            = ["ReportBatchItemFailures"]

  scaling_config {
    maximum_concurrency = local.dlq_drain_max_concurrency
  }
}
