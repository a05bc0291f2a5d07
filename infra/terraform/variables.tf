# Inputs of the Fluxa AWS deployment. Required: the network (`vpc_id`, `private_subnet_ids`,
# `private_route_table_ids` when endpoints are created), `api_tokens` and `alarm_sns_topic_arn`.
# Everything else has a default that docs/DEPLOY-AWS.md explains. terraform.tfvars.example is a
# starting point.

# --- Where ---------------------------------------------------------------------------------

variable "aws_region" {
  description = "AWS region to deploy to."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Prefix of every resource name; one deployment per name and region."
  type        = string
  default     = "fluxa"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "The name must be 2 to 31 lower-case letters, digits or dashes, starting with a letter."
  }
}

variable "tags" {
  description = "Tags on every resource, on top of Application = fluxa."
  type        = map(string)
  default     = {}
}

# --- Network -------------------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC for the database and the functions."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets, in at least two availability zones, for the database and the functions' network interfaces."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "RDS needs subnets in at least two availability zones."
  }
}

variable "private_route_table_ids" {
  description = "Route tables of the private subnets (for the S3 gateway endpoint; ignored when create_vpc_endpoints is false)."
  type        = list(string)
  default     = []
}

variable "create_vpc_endpoints" {
  description = "Create SQS and Secrets Manager interface endpoints and an S3 gateway endpoint. Set false when the private subnets reach AWS through a NAT gateway or endpoints already exist."
  type        = bool
  default     = true
}

# --- Functions -----------------------------------------------------------------------------

variable "lambda_architecture" {
  description = "Instruction set of the zips: arm64 (`cargo lambda build --arm64`) or x86_64 (`--x86-64`)."
  type        = string
  default     = "arm64"

  validation {
    condition     = contains(["arm64", "x86_64"], var.lambda_architecture)
    error_message = "The architecture must be arm64 or x86_64."
  }
}

variable "lambda_build_dir" {
  description = "Folder holding <function>/bootstrap.zip as `cargo lambda build --release --output-format zip` writes them; empty: target/lambda of this repository."
  type        = string
  default     = ""
}

variable "enable_admin_function" {
  description = "Deploy the admin function and route /v1/admin/* (the operator API and `fluxa dlq … --server`) to it."
  type        = bool
  default     = false
}

variable "function_memory_mb" {
  description = "Memory of each function in MB (Lambda gives CPU in proportion)."
  type        = map(number)
  default = {
    ingest    = 512
    query     = 512
    processor = 1024
    admin     = 512
  }
}

variable "api_tokens" {
  description = "FLUXA_API_TOKENS for the HTTP functions: SCOPES=TOKEN pairs separated by commas, SCOPES joining ingest, read and admin with '+'."
  type        = string
  sensitive   = true

  validation {
    condition     = length(var.api_tokens) > 0
    error_message = "Fluxa on AWS is always reachable from the internet: give it API tokens."
  }
}

variable "ingest_max_body_bytes" {
  description = "Largest request body ingest accepts (FLUXA_MAX_BATCH_BYTES; FLUXA_MAX_PAYLOAD_BYTES is 64 KiB less). At most 2.5 MiB, so that the body, escaped inside Lambda's 6 MB invoke payload, always fits."
  type        = number
  default     = 2097152

  validation {
    condition     = var.ingest_max_body_bytes >= 327680 && var.ingest_max_body_bytes <= 2621440
    error_message = "The body limit must be between 320 KiB (room for a 256 KiB inline payload) and 2.5 MiB."
  }
}

variable "ingest_reserved_concurrency" {
  description = "Reserved concurrency of ingest: its ceiling, and capacity kept for it."
  type        = number
  default     = 50
}

variable "query_reserved_concurrency" {
  description = "Reserved concurrency of query; each container may hold db_connections_per_container database connections."
  type        = number
  default     = 20
}

variable "admin_reserved_concurrency" {
  description = "Reserved concurrency of the admin function."
  type        = number
  default     = 2
}

variable "processor_timeout_seconds" {
  description = "Processor timeout; the main queue's visibility timeout is 6 × this + the batching window, and an event id's lease lasts this long."
  type        = number
  default     = 60

  validation {
    condition     = var.processor_timeout_seconds >= 10 && var.processor_timeout_seconds <= 900
    error_message = "The processor timeout must be between 10 and 900 seconds."
  }
}

variable "processor_batch_size" {
  description = "Messages per processor invocation, stored in one transaction (Lambda also keeps a batch under its 6 MB invoke payload)."
  type        = number
  default     = 25

  validation {
    condition     = var.processor_batch_size >= 1 && var.processor_batch_size <= 1000
    error_message = "The batch size must be between 1 and 1000."
  }
}

variable "processor_batching_window_seconds" {
  description = "How long Lambda gathers messages into a batch (required > 0 when the batch size is over 10)."
  type        = number
  default     = 1

  validation {
    condition     = var.processor_batching_window_seconds >= 0 && var.processor_batching_window_seconds <= 300
    error_message = "The batching window must be between 0 and 300 seconds."
  }
}

variable "processor_max_concurrency" {
  description = "Most processor invocations at once: the event source mapping's maximum concurrency and the processor's reserved concurrency."
  type        = number
  default     = 5

  validation {
    condition     = var.processor_max_concurrency >= 2 && var.processor_max_concurrency <= 1000
    error_message = "SQS event source mappings take a maximum concurrency between 2 and 1000."
  }
}

variable "processor_drains_dlq" {
  description = "Drain the DLQ into the store: an event source mapping from the DLQ to the processor, which records each dead letter where `fluxa dlq` and the admin API see it (docs/DEPLOY-AWS.md). Off: dead letters stay only in the SQS DLQ."
  type        = bool
  default     = true
}

variable "extra_environment" {
  description = "More FLUXA_* variables by function name, e.g. { processor = { FLUXA_RETENTION_EVENTS = \"30d\" } }."
  type        = map(map(string))
  default     = {}
}

variable "log_level" {
  description = "RUST_LOG of every function."
  type        = string
  default     = "info"
}

variable "log_retention_days" {
  description = "Retention of every log group (functions, API access, database)."
  type        = number
  default     = 365
}

variable "api_throttling_burst_limit" {
  description = "API Gateway burst limit for the whole API."
  type        = number
  default     = 500
}

variable "api_throttling_rate_limit" {
  description = "API Gateway steady-state requests per second for the whole API."
  type        = number
  default     = 1000
}

# --- Payload bucket ------------------------------------------------------------------------

variable "payload_prefix" {
  description = "Key prefix of payload objects (FLUXA_BLOB_URL is s3://<bucket>/<prefix>)."
  type        = string
  default     = "payloads"

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]*$", var.payload_prefix))
    error_message = "The payload prefix must be a single path segment of lower-case letters, digits and dashes."
  }
}

variable "payload_expiration_days" {
  description = "Payload objects older than this are deleted by the bucket's lifecycle rule. Longer than the DLQ's 14-day retention, so a dead letter's payload is still there when it is redriven."
  type        = number
  default     = 15

  validation {
    condition     = var.payload_expiration_days > 14
    error_message = "Payload objects must outlive the DLQ's 14-day retention."
  }
}

# --- Database ------------------------------------------------------------------------------

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.t4g.medium"
}

variable "db_engine_version" {
  description = "PostgreSQL major version."
  type        = string
  default     = "16"
}

variable "db_allocated_storage_gb" {
  description = "Initial database storage in GiB."
  type        = number
  default     = 20
}

variable "db_max_allocated_storage_gb" {
  description = "Storage autoscaling ceiling in GiB."
  type        = number
  default     = 200
}

variable "db_multi_az" {
  description = "Keep a standby in a second availability zone."
  type        = bool
  default     = true
}

variable "db_backup_retention_days" {
  description = "Days of automated backups and point-in-time recovery."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 1 && var.db_backup_retention_days <= 35
    error_message = "Backups must be kept between 1 and 35 days."
  }
}

variable "db_max_connections" {
  description = "PostgreSQL max_connections (parameter group). Must cover the connection budget (see modules/stateless/lambda.tf)."
  type        = number
  default     = 100
}

variable "db_connections_per_container" {
  description = "Database connections one function container holds at most (the fluxa-lambda crate's pool size)."
  type        = number
  default     = 2
}

variable "db_reserved_connections" {
  description = "Connections kept for the superuser, RDS itself and operators (psql, `fluxa migrate`)."
  type        = number
  default     = 13
}

variable "db_name" {
  description = "Database name."
  type        = string
  default     = "fluxa"
}

variable "db_username" {
  description = "Database master user name."
  type        = string
  default     = "fluxa"
}

variable "db_iam_authentication" {
  description = "Enable IAM database authentication on the instance (Fluxa logs in with the secret's password either way)."
  type        = bool
  default     = true
}

variable "query_database_secret_arn" {
  description = "A secret with the credentials of a read-only database role for the query function (docs/DEPLOY-AWS.md); empty: the main secret."
  type        = string
  default     = ""
}

# --- Alarms --------------------------------------------------------------------------------

variable "alarm_sns_topic_arn" {
  description = "SNS topic every alarm notifies (when it fires and when it clears)."
  type        = string
}

variable "oldest_message_alarm_seconds" {
  description = "Alarm when the main queue's oldest message is older than this. Healthy, a message waits seconds (a transient failure's back-off is at most a minute); one whose invocation crashed or timed out waits a whole visibility timeout (6 minutes with the defaults) before its next receive."
  type        = number
  default     = 600
}
