# Inputs of the stateless module: the HTTP API, the functions, their roles, the event source
# mapping and the alarms. The root module passes these from its own variables (documented in
# ../../variables.tf) and from the stateful module's outputs.

variable "name" {
  description = "Prefix of every resource name."
  type        = string
}

variable "vpc_id" {
  description = "VPC the functions run in."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets the functions' network interfaces go in."
  type        = list(string)
}

variable "private_route_table_ids" {
  description = "Route tables of the private subnets, for the S3 gateway endpoint."
  type        = list(string)
}

variable "create_vpc_endpoints" {
  description = "Create SQS, Secrets Manager (interface) and S3 (gateway) endpoints for the private subnets."
  type        = bool
}

variable "lambda_architecture" {
  description = "arm64 or x86_64."
  type        = string
}

variable "function_zips" {
  description = "Path of each function's bootstrap.zip, by function name."
  type        = map(string)
}

variable "enable_admin_function" {
  description = "Deploy the admin function and route /v1/admin/* to it."
  type        = bool
}

variable "function_memory_mb" {
  description = "Memory of each function, by function name."
  type        = map(number)
}

variable "api_tokens" {
  description = "FLUXA_API_TOKENS of the HTTP functions."
  type        = string
  sensitive   = true
}

variable "ingest_max_body_bytes" {
  description = "Largest request body ingest accepts."
  type        = number
}

variable "ingest_reserved_concurrency" {
  type = number
}

variable "query_reserved_concurrency" {
  type = number
}

variable "admin_reserved_concurrency" {
  type = number
}

variable "processor_timeout_seconds" {
  type = number
}

variable "processor_batch_size" {
  type = number
}

variable "processor_batching_window_seconds" {
  type = number
}

variable "processor_max_concurrency" {
  type = number
}

variable "processor_drains_dlq" {
  description = "Let the processor receive and delete from the DLQ (for a DLQ drain into the store)."
  type        = bool
}

variable "db_max_connections" {
  type = number
}

variable "db_connections_per_container" {
  type = number
}

variable "db_reserved_connections" {
  type = number
}

variable "extra_environment" {
  description = "More FLUXA_* variables, by function name."
  type        = map(map(string))
}

variable "log_level" {
  description = "RUST_LOG of every function."
  type        = string
}

variable "log_retention_days" {
  type = number
}

variable "api_throttling_burst_limit" {
  type = number
}

variable "api_throttling_rate_limit" {
  type = number
}

variable "alarm_sns_topic_arn" {
  description = "SNS topic the alarms notify."
  type        = string
}

variable "oldest_message_alarm_seconds" {
  type = number
}

# From the stateful module.

variable "kms_key_arn" {
  type = string
}

variable "queue_arn" {
  type = string
}

variable "queue_url" {
  type = string
}

variable "queue_name" {
  type = string
}

variable "dlq_arn" {
  type = string
}

variable "dlq_name" {
  type = string
}

variable "max_receive_count" {
  type = number
}

variable "bucket_name" {
  type = string
}

variable "bucket_arn" {
  type = string
}

variable "payload_prefix" {
  type = string
}

variable "database_secret_arn" {
  type = string
}

variable "query_database_secret_arn" {
  description = "A secret with read-only credentials for the query function; empty: the main secret."
  type        = string
}

variable "db_security_group_id" {
  type = string
}

variable "db_port" {
  type = number
}

variable "tags" {
  type = map(string)
}
