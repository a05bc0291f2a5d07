# RDS PostgreSQL, the store (events, idempotency records, dead letters), and the Secrets Manager
# secret its credentials live in.
#
# The secret is one this module creates rather than RDS's own managed master secret, because
# Fluxa reads FLUXA_DATABASE_SECRET_ID as the JSON of contract section 9 (`username`,
# `password`, `host`, `port`, `dbname`), and an RDS-managed secret holds only the user name and
# the password. The password is generated here, so it is in the Terraform state: keep the state
# in an encrypted, access-controlled backend (docs/DEPLOY-AWS.md).
#
# The instance is encrypted, private (no public address, private subnets, reachable only from
# the functions' security group), protected from deletion, backed up daily with point-in-time
# recovery, and refuses connections without TLS (rds.force_ssl).

locals {
  db_identifier = "${var.name}-db"
  db_port       = 5432
  db_family     = "postgres${split(".", var.db_engine_version)[0]}"
}

resource "random_password" "db" {
  length = 40
  # Letters and digits only: the password also travels inside postgres:// URLs, where other
  # characters would need percent-encoding.
  special = false
}

resource "aws_db_subnet_group" "fluxa" {
  name       = "${var.name}-db"
  subnet_ids = var.private_subnet_ids
  tags       = var.tags
}

resource "aws_security_group" "db" {
  name        = "${var.name}-db"
  description = "Fluxa PostgreSQL: ingress only from the Fluxa functions (rules in the stateless module)"
  vpc_id      = var.vpc_id
  tags        = var.tags
}

resource "aws_db_parameter_group" "fluxa" {
  name   = "${var.name}-${local.db_family}"
  family = local.db_family

  # Connections without TLS are refused.
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  # The connection budget of modules/stateless/lambda.tf is computed against this number.
  parameter {
    name         = "max_connections"
    value        = tostring(var.db_max_connections)
    apply_method = "pending-reboot"
  }

  # Query logging: schema changes, and statements slower than a second. Bind parameters are
  # never logged (they carry payloads, which must not reach the logs).
  parameter {
    name  = "log_statement"
    value = "ddl"
  }

  parameter {
    name  = "log_min_duration_statement"
    value = "1000"
  }

  parameter {
    name  = "log_parameter_max_length"
    value = "0"
  }

  parameter {
    name  = "log_parameter_max_length_on_error"
    value = "0"
  }

  tags = var.tags

  lifecycle {
    create_before_destroy = true
  }
}

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${var.name}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

# Created before the instance so that they get a retention and the deployment's key (RDS would
# otherwise create them without either).
resource "aws_cloudwatch_log_group" "db" {
  for_each          = toset(["postgresql", "upgrade"])
  name              = "/aws/rds/instance/${local.db_identifier}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.fluxa.arn
  tags              = var.tags
}

resource "aws_db_instance" "fluxa" {
  identifier     = local.db_identifier
  engine         = "postgres"
  engine_version = var.db_engine_version
  instance_class = var.db_instance_class
  db_name        = var.db_name
  port           = local.db_port

  username = var.db_username
  password = random_password.db.result

  allocated_storage     = var.db_allocated_storage_gb
  max_allocated_storage = var.db_max_allocated_storage_gb
  storage_type          = "gp3"
  storage_encrypted     = true
  kms_key_id            = aws_kms_key.fluxa.arn

  db_subnet_group_name   = aws_db_subnet_group.fluxa.name
  vpc_security_group_ids = [aws_security_group.db.id]
  publicly_accessible    = false
  multi_az               = var.db_multi_az
  parameter_group_name   = aws_db_parameter_group.fluxa.name

  iam_database_authentication_enabled = var.db_iam_authentication

  backup_retention_period   = var.db_backup_retention_days
  backup_window             = "03:00-04:00"
  maintenance_window        = "sun:04:30-sun:05:30"
  copy_tags_to_snapshot     = true
  deletion_protection       = true
  skip_final_snapshot       = false
  final_snapshot_identifier = "${local.db_identifier}-final"

  auto_minor_version_upgrade  = true
  allow_major_version_upgrade = false
  apply_immediately           = false

  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  monitoring_interval                   = 60
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.fluxa.arn
  performance_insights_retention_period = 7

  tags = var.tags

  depends_on = [aws_cloudwatch_log_group.db]
}

resource "aws_secretsmanager_secret" "db" {
  #checkov:skip=CKV2_AWS_57:No automatic rotation yet: Fluxa fetches the secret once per process (contract section 9), so a rotation needs a rotation function and a restart of every function; see docs/RUNBOOK.md for the manual rotation.
  name_prefix             = "${var.name}/database-"
  description             = "Fluxa database credentials (username, password, host, port, dbname): FLUXA_DATABASE_SECRET_ID"
  kms_key_id              = aws_kms_key.fluxa.arn
  recovery_window_in_days = 7
  tags                    = var.tags
}

resource "aws_secretsmanager_secret_version" "db" {
  secret_id = aws_secretsmanager_secret.db.id
  secret_string = jsonencode({
    engine   = "postgres"
    username = var.db_username
    password = random_password.db.result
    host     = aws_db_instance.fluxa.address
    port     = local.db_port
    dbname   = var.db_name
  })
}
