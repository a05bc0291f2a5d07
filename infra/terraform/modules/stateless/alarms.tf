# The alarms docs/RUNBOOK.md explains, each sent to `alarm_sns_topic_arn` when it fires and
# when it clears:
#
# - `<name>-dead-letters`: the processor recorded dead letters drained from the DLQ (the EMF
#   metric `fluxa_dead_letters_drained_total`). Something failed permanently, or a transient
#   failure outlived its three receives. Never normal. (With `processor_drains_dlq`.)
# - `<name>-dlq-depth`: the DLQ holds messages. With the drain, only while it cannot record them
#   (the database is down), so for 5 minutes; without it, at once. Never normal.
# - `<name>-oldest-message-age`: the main queue's oldest message has waited longer than
#   `oldest_message_alarm_seconds`. The processor is failing, throttled, or the database is slow.
# - `<name>-<function>-errors`: a function invocation failed (crash, timeout, out of memory,
#   failed start). Fluxa's own error outcomes (4xx/5xx answers, batch item failures) are not
#   Lambda errors, so any error here is worth a look.
#
# Missing data (no traffic) is not breaching.

resource "aws_cloudwatch_metric_alarm" "dlq_depth" {
  alarm_name          = "${var.name}-dlq-depth"
  alarm_description   = "Fluxa: the DLQ ${var.dlq_name} holds messages. See docs/RUNBOOK.md, 'DLQ depth'."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = var.dlq_name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = var.processor_drains_dlq ? 5 : 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [var.alarm_sns_topic_arn]
  ok_actions          = [var.alarm_sns_topic_arn]
  tags                = var.tags
}

resource "aws_cloudwatch_metric_alarm" "dead_letters_recorded" {
  count               = var.processor_drains_dlq ? 1 : 0
  alarm_name          = "${var.name}-dead-letters"
  alarm_description   = "Fluxa: the processor recorded dead letters from ${var.dlq_name}. See docs/RUNBOOK.md, 'Dead letters'."
  namespace           = "Fluxa"
  metric_name         = "fluxa_dead_letters_drained_total"
  dimensions          = { function = aws_lambda_function.function["processor"].function_name }
  statistic           = "Sum"
  period              = 60
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [var.alarm_sns_topic_arn]
  ok_actions          = [var.alarm_sns_topic_arn]
  tags                = var.tags
}

resource "aws_cloudwatch_metric_alarm" "oldest_message_age" {
  alarm_name          = "${var.name}-oldest-message-age"
  alarm_description   = "Fluxa: the oldest message in ${var.queue_name} is older than ${var.oldest_message_alarm_seconds} s. See docs/RUNBOOK.md, 'Oldest message age'."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = var.queue_name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.oldest_message_alarm_seconds
  treat_missing_data  = "notBreaching"
  alarm_actions       = [var.alarm_sns_topic_arn]
  ok_actions          = [var.alarm_sns_topic_arn]
  tags                = var.tags
}

resource "aws_cloudwatch_metric_alarm" "function_errors" {
  for_each            = local.functions
  alarm_name          = "${var.name}-${each.key}-errors"
  alarm_description   = "Fluxa: the ${each.key} function failed invocations. See docs/RUNBOOK.md, 'Lambda errors'."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.function[each.key].function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [var.alarm_sns_topic_arn]
  ok_actions          = [var.alarm_sns_topic_arn]
  tags                = var.tags
}
