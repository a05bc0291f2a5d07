# What an operator needs after `terraform apply`: where the API is, the queues, the bucket, the
# secret, and the names to look for in CloudWatch (docs/RUNBOOK.md uses them).

output "api_endpoint" {
  description = "Base URL of the HTTP API: the `--server` of `fluxa events …` and `fluxa dlq …`."
  value       = module.stateless.api_endpoint
}

output "queue_url" {
  description = "The main queue (FLUXA_QUEUE_URL)."
  value       = module.stateful.queue_url
}

output "dlq_url" {
  description = "The dead-letter queue."
  value       = module.stateful.dlq_url
}

output "blob_url" {
  description = "FLUXA_BLOB_URL of the functions."
  value       = "s3://${module.stateful.bucket_name}/${var.payload_prefix}"
}

output "database_secret_arn" {
  description = "FLUXA_DATABASE_SECRET_ID: the database credentials."
  value       = module.stateful.database_secret_arn
}

output "database_address" {
  description = "Host name of the database (private)."
  value       = module.stateful.db_address
}

output "kms_key_arn" {
  description = "The deployment's KMS key."
  value       = module.stateful.kms_key_arn
}

output "function_names" {
  description = "Lambda function names by role."
  value       = module.stateless.function_names
}

output "log_groups" {
  description = "CloudWatch log groups by function (and `api` for the access log)."
  value       = module.stateless.log_groups
}

output "functions_security_group_id" {
  description = "Security group of the functions (give a bastion the same reach to run `fluxa migrate`)."
  value       = module.stateless.functions_security_group_id
}

output "database_connection_budget" {
  description = "Worst-case database connections by user, their total, and max_connections."
  value       = module.stateless.database_connection_budget
}
