# What the stateless module and the operators need from the stateful one.

output "kms_key_arn" {
  description = "The deployment's KMS key."
  value       = aws_kms_key.fluxa.arn
}

output "queue_arn" {
  value = aws_sqs_queue.main.arn
}

output "queue_url" {
  value = aws_sqs_queue.main.id
}

output "queue_name" {
  value = aws_sqs_queue.main.name
}

output "dlq_arn" {
  value = aws_sqs_queue.dlq.arn
}

output "dlq_url" {
  value = aws_sqs_queue.dlq.id
}

output "dlq_name" {
  value = aws_sqs_queue.dlq.name
}

output "max_receive_count" {
  description = "The redrive policy's maxReceiveCount, which the processor's FLUXA_MAX_RECEIVES repeats."
  value       = local.max_receive_count
}

output "visibility_timeout_seconds" {
  value = local.visibility_timeout_seconds
}

output "bucket_name" {
  value = aws_s3_bucket.payloads.id
}

output "bucket_arn" {
  value = aws_s3_bucket.payloads.arn
}

output "database_secret_arn" {
  description = "The secret FLUXA_DATABASE_SECRET_ID names."
  value       = aws_secretsmanager_secret.db.arn
}

output "db_security_group_id" {
  value = aws_security_group.db.id
}

output "db_port" {
  value = local.db_port
}

output "db_address" {
  value = aws_db_instance.fluxa.address
}

output "db_instance_id" {
  value = aws_db_instance.fluxa.identifier
}
