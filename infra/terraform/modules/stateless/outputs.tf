# What operators need from the stateless module.

output "api_endpoint" {
  description = "Base URL of the HTTP API (the `--server` of the fluxa CLI)."
  value       = aws_apigatewayv2_api.fluxa.api_endpoint
}

output "function_names" {
  value = { for name, function in aws_lambda_function.function : name => function.function_name }
}

output "log_groups" {
  value = merge(
    { for name, group in aws_cloudwatch_log_group.function : name => group.name },
    { api = aws_cloudwatch_log_group.api_access.name },
  )
}

output "functions_security_group_id" {
  value = aws_security_group.functions.id
}

output "database_connection_budget" {
  description = "Worst-case database connections by user, and their total (see lambda.tf)."
  value = merge(local.db_connection_budget, {
    total           = sum(values(local.db_connection_budget))
    max_connections = var.db_max_connections
  })
}
