# Inputs of the stateful module: everything that holds data (queues, bucket, database, secret,
# and the KMS key that encrypts them). The root module (../../main.tf) passes these through from
# its own variables, whose descriptions are the documentation (../../variables.tf).

variable "name" {
  description = "Prefix of every resource name."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the database."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets (at least two, in different availability zones) for the database."
  type        = list(string)
}

variable "processor_timeout_seconds" {
  description = "Timeout of the processor function; the main queue's visibility timeout is six times this plus the batching window."
  type        = number
}

variable "processor_batching_window_seconds" {
  description = "The event source mapping's maximum batching window."
  type        = number
}

variable "payload_prefix" {
  description = "Key prefix of payload objects in the bucket (no leading or trailing slash)."
  type        = string
}

variable "payload_expiration_days" {
  description = "Payload objects older than this are expired by the bucket's lifecycle rule."
  type        = number
}

variable "log_retention_days" {
  description = "Retention of the database's CloudWatch log groups."
  type        = number
}

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
}

variable "db_engine_version" {
  description = "PostgreSQL major version (e.g. \"16\")."
  type        = string
}

variable "db_allocated_storage_gb" {
  description = "Initial storage in GiB."
  type        = number
}

variable "db_max_allocated_storage_gb" {
  description = "Storage autoscaling ceiling in GiB."
  type        = number
}

variable "db_multi_az" {
  description = "Run a standby in a second availability zone."
  type        = bool
}

variable "db_backup_retention_days" {
  description = "Days of automated backups (point-in-time recovery window)."
  type        = number
}

variable "db_max_connections" {
  description = "PostgreSQL max_connections, set in the parameter group."
  type        = number
}

variable "db_name" {
  description = "Database name."
  type        = string
}

variable "db_username" {
  description = "Master user name."
  type        = string
}

variable "db_iam_authentication" {
  description = "Enable IAM database authentication (Fluxa itself logs in with the secret's password)."
  type        = bool
}

variable "tags" {
  description = "Tags added to every resource (on top of the provider's default tags)."
  type        = map(string)
}
