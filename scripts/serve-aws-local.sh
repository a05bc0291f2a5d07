#!/usr/bin/env bash
# Runs `fluxa serve` on the AWS backends, with a moto server standing in for AWS: the queue on
# SQS (with its DLQ, maxReceiveCount 3, 1 MiB messages), payloads in S3, and the database
# password read from Secrets Manager. The database is the local PostgreSQL (database
# `fluxa_aws_local`, created on first start).
#
#   scripts/serve-aws-local.sh [fluxa serve options…]
#
# It starts moto if AWS_ENDPOINT_URL is not set (and stops it on exit), creates the queue, the
# DLQ, the bucket and the secret if they are missing, prints the settings it uses (so `fluxa
# dlq list`, `fluxa events …` and the AWS CLI can join in from another shell), then runs the
# server in the foreground until Ctrl-C. Settings:
#   FLUXA_LOCAL_PG_URL  the PostgreSQL server (default postgres://postgres@127.0.0.1:5432)
#   FLUXA_LOCAL_NAME    the name of the queue, bucket, secret and database (default fluxa-local)
set -euo pipefail
cd "$(dirname "$0")/.."

pg_server="${FLUXA_LOCAL_PG_URL:-postgres://postgres@127.0.0.1:5432}"
name="${FLUXA_LOCAL_NAME:-fluxa-local}"

if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
    eval "$(scripts/moto.sh start)"
    trap 'scripts/moto.sh stop' EXIT
fi

# boto3 comes with moto (in .venv/moto), so no AWS CLI is needed.
settings=$(.venv/moto/bin/python - "$name" "$pg_server" <<'PY'
import json, os, sys
from urllib.parse import urlparse
import boto3

name, pg_server = sys.argv[1], sys.argv[2]
database = name.replace("-", "_")
region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
sqs, s3, secrets = (
    boto3.client(s, region_name=region, endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for s in ("sqs", "s3", "secretsmanager")
)

dlq_url = sqs.create_queue(QueueName=f"{name}-dlq",
                           Attributes={"MaximumMessageSize": "1048576"})["QueueUrl"]
dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
queue_url = sqs.create_queue(QueueName=name, Attributes={
    "MaximumMessageSize": "1048576",
    "VisibilityTimeout": "60",
    "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 3}),
})["QueueUrl"]
s3.create_bucket(Bucket=name)
server = urlparse(pg_server)
secret = {"engine": "postgres", "username": server.username or "postgres",
          "password": server.password or "unused-with-trust-authentication",
          "host": server.hostname or "127.0.0.1", "port": server.port or 5432,
          "dbname": database}
try:
    secrets.create_secret(Name=f"{name}/database", SecretString=json.dumps(secret))
except secrets.exceptions.ResourceExistsException:
    pass
print(f"export FLUXA_QUEUE_URL={queue_url}")
print(f"export FLUXA_BLOB_URL=s3://{name}/payloads")
print(f"export FLUXA_DATABASE_SECRET_ID={name}/database")
PY
)
eval "$settings"
echo "serve-aws-local: the settings (for fluxa commands in another shell):" >&2
{
    echo "$settings"
    echo "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL AWS_REGION=${AWS_REGION:-us-east-1}"
    echo "export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}"
} | sed 's/^/  /' >&2
unset FLUXA_DATABASE_URL
cargo run --locked --quiet --release -p fluxa -- serve "$@"
