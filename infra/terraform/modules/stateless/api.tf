# The API Gateway HTTP API in front of the functions. Each route goes to the one function whose
# role allows what the route does:
#
#   POST /v1/events, POST /v1/events/batch                      → ingest   (contract 1, 1b)
#   GET  /v1/events, /v1/events/{event_id}, …/{event_id}/status → query    (contract 2, read-only)
#   GET  /v1/openapi.json                                       → query    (contract 7)
#   ANY  /v1/admin/{proxy+}                                     → admin    (contract 8), only with
#                                                                 `enable_admin_function`
#
# The admin routes are not hosted by ingest, which has no database access, nor by query, which
# must stay read-only: they get a function of their own (iam.tf says what it may do). Without it
# they answer API Gateway's 404, and operators use the SQS console or CLI on the DLQ instead
# (docs/RUNBOOK.md).
#
# Authentication is Fluxa's own: scoped bearer tokens (contract section 5), checked by the
# functions from FLUXA_API_TOKENS. API Gateway adds throttling and JSON access logs.
# /healthz, /readyz and /metrics are not routed: Lambda has its own health, and metrics are
# CloudWatch EMF in the functions' logs.

locals {
  all_routes = {
    "POST /v1/events"                  = "ingest"
    "POST /v1/events/batch"            = "ingest"
    "GET /v1/events"                   = "query"
    "GET /v1/events/{event_id}"        = "query"
    "GET /v1/events/{event_id}/status" = "query"
    "GET /v1/openapi.json"             = "query"
    "ANY /v1/admin/{proxy+}"           = "admin"
  }

  routes = {
    for route, function in local.all_routes : route => function
    if function != "admin" || var.enable_admin_function
  }
}

resource "aws_apigatewayv2_api" "fluxa" {
  name          = var.name
  protocol_type = "HTTP"
  description   = "Fluxa event ingestion API"
  tags          = var.tags
}

resource "aws_cloudwatch_log_group" "api_access" {
  name              = "/aws/apigateway/${var.name}"
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn
  tags              = var.tags
}

resource "aws_apigatewayv2_stage" "default" {
  api_id      = aws_apigatewayv2_api.fluxa.id
  name        = "$default"
  auto_deploy = true

  default_route_settings {
    throttling_burst_limit = var.api_throttling_burst_limit
    throttling_rate_limit  = var.api_throttling_rate_limit
  }

  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.api_access.arn
    format = jsonencode({
      requestId        = "$context.requestId"
      requestTime      = "$context.requestTime"
      httpMethod       = "$context.httpMethod"
      routeKey         = "$context.routeKey"
      status           = "$context.status"
      responseLength   = "$context.responseLength"
      integrationError = "$context.integrationErrorMessage"
      latencyMs        = "$context.responseLatency"
      sourceIp         = "$context.identity.sourceIp"
    })
  }

  tags = var.tags
}

resource "aws_apigatewayv2_integration" "function" {
  for_each               = toset(distinct(values(local.routes)))
  api_id                 = aws_apigatewayv2_api.fluxa.id
  integration_type       = "AWS_PROXY"
  integration_uri        = aws_lambda_function.function[each.key].invoke_arn
  payload_format_version = "2.0"
  timeout_milliseconds   = 30000
}

resource "aws_apigatewayv2_route" "fluxa" {
  #checkov:skip=CKV_AWS_309:Fluxa authorizes every route itself with scoped bearer tokens (contract section 5); an API Gateway authorizer would duplicate that check.
  for_each  = local.routes
  api_id    = aws_apigatewayv2_api.fluxa.id
  route_key = each.key
  target    = "integrations/${aws_apigatewayv2_integration.function[each.value].id}"
}

resource "aws_lambda_permission" "api" {
  for_each      = toset(distinct(values(local.routes)))
  statement_id  = "AllowApiGatewayInvoke"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.function[each.key].function_name
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.fluxa.execution_arn}/*/*"
}
