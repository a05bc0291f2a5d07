# The functions run in the VPC's private subnets, so that they reach the database, which has no
# public address. From there they need a way to SQS, S3 and Secrets Manager: either the NAT
# gateway the VPC already has, or the endpoints created here (`create_vpc_endpoints`), which
# keep that traffic inside AWS's network. CloudWatch Logs and KMS (for the environment) are
# reached by the Lambda service itself, not from inside the VPC.

data "aws_region" "current" {}

resource "aws_security_group" "functions" {
  name        = "${var.name}-functions"
  description = "Fluxa Lambda functions: out to PostgreSQL and to AWS APIs over HTTPS, nothing in"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_security_group_rule" "functions_to_db" {
  type                     = "egress"
  description              = "PostgreSQL"
  security_group_id        = aws_security_group.functions.id
  protocol                 = "tcp"
  from_port                = var.db_port
  to_port                  = var.db_port
  source_security_group_id = var.db_security_group_id
}

resource "aws_security_group_rule" "functions_to_https" {
  type              = "egress"
  description       = "AWS APIs (SQS, S3, Secrets Manager) through the VPC endpoints or the NAT gateway"
  security_group_id = aws_security_group.functions.id
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "db_from_functions" {
  type                     = "ingress"
  description              = "PostgreSQL from the Fluxa functions"
  security_group_id        = var.db_security_group_id
  protocol                 = "tcp"
  from_port                = var.db_port
  to_port                  = var.db_port
  source_security_group_id = aws_security_group.functions.id
}

resource "aws_security_group" "endpoints" {
  count       = var.create_vpc_endpoints ? 1 : 0
  name        = "${var.name}-endpoints"
  description = "Fluxa VPC interface endpoints: HTTPS from the Fluxa functions"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_security_group_rule" "endpoints_from_functions" {
  count                    = var.create_vpc_endpoints ? 1 : 0
  type                     = "ingress"
  description              = "HTTPS from the Fluxa functions"
  security_group_id        = aws_security_group.endpoints[0].id
  protocol                 = "tcp"
  from_port                = 443
  to_port                  = 443
  source_security_group_id = aws_security_group.functions.id
}

resource "aws_vpc_endpoint" "interface" {
  for_each            = var.create_vpc_endpoints ? toset(["sqs", "secretsmanager"]) : toset([])
  vpc_id              = var.vpc_id
  service_name        = "com.amazonaws.${data.aws_region.current.name}.${each.key}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = var.private_subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
  tags                = merge(var.tags, { Name = "${var.name}-${each.key}" })
}

resource "aws_vpc_endpoint" "s3" {
  count             = var.create_vpc_endpoints ? 1 : 0
  vpc_id            = var.vpc_id
  service_name      = "com.amazonaws.${data.aws_region.current.name}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = var.private_route_table_ids
  tags              = merge(var.tags, { Name = "${var.name}-s3" })
}
