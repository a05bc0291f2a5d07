"""Offline assertions over the Fluxa Terraform configuration (infra/terraform).

No Terraform provider can be downloaded here, so `terraform validate` and `terraform plan` are
impossible. tfparse (the HCL evaluator behind Cloud Custodian's Terraform support) loads the root
module and its child modules instead, evaluates every expression it can from the variables'
defaults, and gives each block an id; a reference to another block's attribute (`aws_sqs_queue.
dlq.arn`, say) becomes that block's id, so the tests can follow references: from a role to its
policies, from the event source mapping to the queue and the function.

Each test runs twice: on the defaults (what `terraform apply` deploys when only the required
variables are given) and with tests/all-features.tfvars (every optional part switched on: the
admin function, the DLQ drain permission, the VPC endpoints).

scripts/terraform-check.sh runs this file after `terraform fmt -check` and checkov.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tfparse

TERRAFORM_DIR = Path(__file__).resolve().parent.parent

# The contract's numbers (sections 3 and 9).
MAX_RECEIVE_COUNT = 3
MAX_MESSAGE_SIZE = 1048576
VISIBILITY_TIMEOUT_FACTOR = 6

# An action whose verb starts with one of these changes something. It is written as a list of
# verb prefixes, not of actions, so that an action added later is caught whatever its service.
WRITE_VERB_PREFIXES = (
    "Abort", "Add", "Assign", "Associate", "Attach", "Batch", "Cancel", "Change", "Complete",
    "Copy", "Create", "Delete", "Deregister", "Detach", "Disable", "Disassociate", "Enable",
    "Encrypt", "Execute", "Generate", "Import", "Initiate", "Invoke", "Modify", "Publish",
    "Purge", "Put", "ReEncrypt", "Reboot", "Register", "Reject", "Remove", "Replace", "Reset",
    "Restore", "Retire", "Revoke", "Rotate", "Run", "Schedule", "Send", "Set", "Sign", "Start",
    "Stop", "Tag", "Terminate", "Unassign", "Untag", "Update", "Upload", "Write",
)
# Services whose every action is out of bounds for a read-only function: a data store other
# than the one Fluxa reads through its connection, or the management of the database itself.
FORBIDDEN_SERVICES_FOR_QUERY = ("dynamodb", "rds", "rds-data", "sqs", "s3", "sns", "lambda", "iam")

# Writes that Lambda itself needs from every execution role: its own log streams, and the
# network interfaces that put a function in the VPC.
LOG_ACTIONS = {"logs:CreateLogStream", "logs:PutLogEvents"}
NETWORK_INTERFACE_ACTIONS = {
    "ec2:CreateNetworkInterface",
    "ec2:DeleteNetworkInterface",
    "ec2:AssignPrivateIpAddresses",
    "ec2:UnassignPrivateIpAddresses",
}
# The only actions AWS accepts solely on "Resource": "*" among those the functions need.
STAR_RESOURCE_ACTIONS = {"ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets"}

CONFIGURATIONS = {
    "defaults": [],
    "all-features": ["tests/all-features.tfvars"],
}


class Config:
    """One evaluation of the configuration, with lookups by path and by id."""

    def __init__(self, parsed: dict):
        self.parsed = parsed
        self.by_id: dict[str, dict] = {}
        for blocks in parsed.values():
            for block in blocks:
                if isinstance(block, dict) and "id" in block:
                    self.by_id[block["id"]] = block

    def blocks(self, block_type: str) -> list[dict]:
        return self.parsed.get(block_type, [])

    def block(self, block_type: str, path_suffix: str) -> dict:
        matches = [b for b in self.blocks(block_type) if b["__tfmeta"]["path"].endswith(path_suffix)]
        assert len(matches) == 1, f"expected one {block_type} at *{path_suffix}, found {len(matches)}"
        return matches[0]

    def maybe_block(self, block_type: str, path_suffix: str) -> dict | None:
        matches = [b for b in self.blocks(block_type) if b["__tfmeta"]["path"].endswith(path_suffix)]
        return matches[0] if matches else None

    def root_variable_default(self, name: str):
        matches = [b for b in self.blocks("variable") if b["__tfmeta"]["path"] == f"variable.{name}"]
        assert len(matches) == 1, name
        return matches[0]["default"]

    def function(self, name: str) -> dict:
        return self.block("aws_lambda_function", f'aws_lambda_function.function["{name}"]')

    def function_names(self) -> list[str]:
        names = []
        for block in self.blocks("aws_lambda_function"):
            match = re.search(r'\["([a-z]+)"\]$', block["__tfmeta"]["path"])
            assert match, block["__tfmeta"]["path"]
            names.append(match.group(1))
        return sorted(names)


@pytest.fixture(scope="module", params=sorted(CONFIGURATIONS), ids=sorted(CONFIGURATIONS))
def config(request) -> Config:
    parsed = tfparse.load_from_path(
        str(TERRAFORM_DIR), stop_on_hcl_error=True, vars_paths=CONFIGURATIONS[request.param]
    )
    return Config(parsed)


def as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def statements_of(config: Config, policy) -> list[dict]:
    """The statements of a policy given as an aws_iam_policy_document id or as JSON text, in
    one shape: {effect, actions, not_actions, resources, not_resources}."""
    if isinstance(policy, str) and policy in config.by_id:
        document = config.by_id[policy]
        assert document["__tfmeta"]["label"] == "aws_iam_policy_document", document["__tfmeta"]
        assert "source_policy_documents" not in document and "override_policy_documents" not in document
        return [
            {
                "effect": statement.get("effect", "Allow"),
                "actions": as_list(statement.get("actions")),
                "not_actions": as_list(statement.get("not_actions")),
                "resources": as_list(statement.get("resources")),
                "not_resources": as_list(statement.get("not_resources")),
            }
            for statement in as_list(document.get("statement"))
        ]
    if isinstance(policy, str) and policy.lstrip().startswith("{"):
        document = json.loads(policy)
        return [
            {
                "effect": statement.get("Effect", "Allow"),
                "actions": as_list(statement.get("Action")),
                "not_actions": as_list(statement.get("NotAction")),
                "resources": as_list(statement.get("Resource")),
                "not_resources": as_list(statement.get("NotResource")),
            }
            for statement in as_list(document.get("Statement"))
        ]
    raise AssertionError(f"cannot read the policy {policy!r}: neither a policy document nor JSON")


def role_allow_statements(config: Config, role_name: str) -> list[dict]:
    """Every Allow statement that reaches a function's role, however it is attached. A managed
    policy cannot be read offline, so attaching one fails the test instead."""
    # The optional admin role is counted (`count = 1`), the others are single.
    suffix = "aws_iam_role.admin[0]" if role_name == "admin" else f"aws_iam_role.{role_name}"
    role = config.block("aws_iam_role", suffix)
    # A reference to the role is its block id, or its name where the name is known.
    role_refs = {role["id"], role.get("name")} - {None}
    assert not role.get("managed_policy_arns"), f"{role_name}: managed policies cannot be checked offline"
    statements = []
    for inline in as_list(role.get("inline_policy")):
        statements += statements_of(config, inline.get("policy"))
    attachments = [
        a for a in config.blocks("aws_iam_role_policy_attachment") if a.get("role") in role_refs
    ] + [
        a for a in config.blocks("aws_iam_policy_attachment") if role_refs & set(as_list(a.get("roles")))
    ]
    assert not attachments, f"{role_name}: attached policies {[a['__tfmeta']['path'] for a in attachments]}"
    policies = [p for p in config.blocks("aws_iam_role_policy") if p.get("role") in role_refs]
    assert policies, f"{role_name}: no policy found for the role"
    for policy in policies:
        statements += statements_of(config, policy["policy"])
    for statement in statements:
        assert not statement["not_actions"] and not statement["not_resources"], (
            f"{role_name}: NotAction/NotResource cannot be reasoned about: {statement}"
        )
    return [s for s in statements if s["effect"] == "Allow"]


# Verbs that only read: a wildcard action is a read only when what precedes its first wildcard
# is one of these ("s3:Get*"); any other wildcard ("s3:*", "sqs:Send*", "s3:P*") may match a
# write and counts as one.
READ_VERB_PREFIXES = ("Get", "List", "Describe", "Head")


def is_write_action(action: str) -> bool:
    if action == "*":
        return True
    _service, _, verb = action.partition(":")
    literal = re.split(r"[*?]", verb, maxsplit=1)[0]
    if literal != verb:
        return not literal.startswith(READ_VERB_PREFIXES)
    return verb.startswith(WRITE_VERB_PREFIXES)


def log_group_id(config: Config, function: str) -> str:
    return config.block("aws_cloudwatch_log_group", f'aws_cloudwatch_log_group.function["{function}"]')["id"]


def required_writes_of(config: Config, function: str, statement: dict) -> bool:
    """Whether a statement is one of the writes Lambda requires from every execution role."""
    actions = set(statement["actions"])
    if actions <= LOG_ACTIONS:
        return statement["resources"] == [f"{log_group_id(config, function)}:*"]
    if actions <= NETWORK_INTERFACE_ACTIONS:
        # An ARN built from data sources (account, region) stays unknown offline: None.
        return "*" not in statement["resources"]
    return False


# --- The queues -----------------------------------------------------------------------------


def test_the_main_queue_dead_letters_after_three_receives(config):
    main = config.block("aws_sqs_queue", "aws_sqs_queue.main")
    dlq = config.block("aws_sqs_queue", "aws_sqs_queue.dlq")
    redrive = json.loads(main["redrive_policy"])
    assert redrive["maxReceiveCount"] == MAX_RECEIVE_COUNT
    assert redrive["deadLetterTargetArn"] == dlq["id"]


def test_the_processor_counts_receives_like_the_redrive_policy(config):
    environment = config.function("processor")["environment"]["variables"]
    assert environment["FLUXA_MAX_RECEIVES"] == str(MAX_RECEIVE_COUNT)


def test_the_queues_take_1_mib_messages(config):
    for name in ("main", "dlq"):
        queue = config.block("aws_sqs_queue", f"aws_sqs_queue.{name}")
        assert queue["max_message_size"] == MAX_MESSAGE_SIZE, name


def test_the_queues_are_encrypted(config):
    for name in ("main", "dlq"):
        queue = config.block("aws_sqs_queue", f"aws_sqs_queue.{name}")
        assert queue.get("kms_master_key_id") or queue.get("sqs_managed_sse_enabled") is True, name


def test_the_visibility_timeout_is_at_least_six_processor_timeouts(config):
    main = config.block("aws_sqs_queue", "aws_sqs_queue.main")
    mapping = config.block("aws_lambda_event_source_mapping", "aws_lambda_event_source_mapping.processor")
    processor_timeout = config.function("processor")["timeout"]
    window = mapping.get("maximum_batching_window_in_seconds", 0)
    assert main["visibility_timeout_seconds"] >= VISIBILITY_TIMEOUT_FACTOR * processor_timeout + window


def test_a_dead_letter_outlives_the_message_it_was(config):
    main = config.block("aws_sqs_queue", "aws_sqs_queue.main")
    dlq = config.block("aws_sqs_queue", "aws_sqs_queue.dlq")
    # SQS keeps a dead letter's original enqueue time, so the DLQ must keep messages longer.
    assert dlq["message_retention_seconds"] > main["message_retention_seconds"]


# --- The event source mapping and the database connections ---------------------------------


def test_the_processor_reports_batch_item_failures(config):
    mapping = config.block("aws_lambda_event_source_mapping", "aws_lambda_event_source_mapping.processor")
    assert "ReportBatchItemFailures" in mapping["function_response_types"]
    assert mapping["event_source_arn"] == config.block("aws_sqs_queue", "aws_sqs_queue.main")["id"]
    assert mapping["function_name"] == config.function("processor")["id"]
    if mapping["batch_size"] > 10:
        assert mapping["maximum_batching_window_in_seconds"] > 0


def test_the_processor_concurrency_is_bounded(config):
    mapping = config.block("aws_lambda_event_source_mapping", "aws_lambda_event_source_mapping.processor")
    maximum = mapping["scaling_config"]["maximum_concurrency"]
    reserved = config.function("processor")["reserved_concurrent_executions"]
    assert 2 <= maximum <= reserved


def test_the_database_connections_fit_in_max_connections(config):
    parameters = {
        p["name"]: p["value"]
        for p in config.block("aws_db_parameter_group", "aws_db_parameter_group.fluxa")["parameter"]
    }
    max_connections = int(parameters["max_connections"])
    per_container = config.root_variable_default("db_connections_per_container")
    reserved = config.root_variable_default("db_reserved_connections")
    mapping = config.block("aws_lambda_event_source_mapping", "aws_lambda_event_source_mapping.processor")

    budget = {"processor": mapping["scaling_config"]["maximum_concurrency"] * per_container}
    drain = config.maybe_block(
        "aws_lambda_event_source_mapping", "aws_lambda_event_source_mapping.processor_dlq_drain[0]"
    )
    if drain is not None:
        budget["processor"] += drain["scaling_config"]["maximum_concurrency"] * per_container
    for name in config.function_names():
        environment = config.function(name)["environment"]["variables"]
        if name == "processor" or "FLUXA_DATABASE_SECRET_ID" not in environment:
            continue
        concurrency = config.function(name).get("reserved_concurrent_executions")
        assert concurrency is not None and concurrency >= 0, f"{name} reaches the database unbounded"
        budget[name] = concurrency * per_container
    assert sum(budget.values()) + reserved <= max_connections, budget


# --- The functions --------------------------------------------------------------------------


def test_every_function_runs_the_rust_bootstrap_in_the_vpc_with_encrypted_environment(config):
    names = config.function_names()
    assert {"ingest", "query", "processor"} <= set(names)
    for name in names:
        function = config.function(name)
        assert function["runtime"] == "provided.al2023", name
        assert function["handler"] == "bootstrap", name
        assert function["architectures"][0] in ("arm64", "x86_64"), name
        assert function["filename"].endswith(f"/{name}/bootstrap.zip"), name
        assert function["vpc_config"]["security_group_ids"], name
        assert function.get("kms_key_arn"), name


def test_each_function_has_only_the_configuration_it_needs(config):
    environment = {name: set(config.function(name)["environment"]["variables"]) for name in config.function_names()}
    assert "FLUXA_DATABASE_SECRET_ID" not in environment["ingest"]
    assert not environment["query"] & {"FLUXA_QUEUE_URL", "FLUXA_BLOB_URL"}
    assert "FLUXA_API_TOKENS" not in environment["processor"]
    assert {"FLUXA_DATABASE_SECRET_ID", "FLUXA_QUEUE_URL", "FLUXA_BLOB_URL"} <= environment["processor"]


def test_ingest_bodies_fit_in_a_lambda_invoke_even_fully_escaped(config):
    environment = config.function("ingest")["environment"]["variables"]
    # A JSON body escaped inside the invoke payload's JSON at most doubles.
    assert 2 * int(environment["FLUXA_MAX_BATCH_BYTES"]) < 6_000_000 - 64 * 1024
    assert int(environment["FLUXA_MAX_PAYLOAD_BYTES"]) < int(environment["FLUXA_MAX_BATCH_BYTES"])
    assert int(environment["FLUXA_MAX_PAYLOAD_BYTES"]) > 262144


def test_every_function_has_an_error_alarm_and_a_log_group_with_retention(config):
    for name in config.function_names():
        alarm = config.block("aws_cloudwatch_metric_alarm", f'aws_cloudwatch_metric_alarm.function_errors["{name}"]')
        assert alarm["namespace"] == "AWS/Lambda" and alarm["metric_name"] == "Errors"
        assert alarm["dimensions"]["FunctionName"] == config.function(name)["function_name"]
        group = config.block("aws_cloudwatch_log_group", f'aws_cloudwatch_log_group.function["{name}"]')
        assert group["name"] == f"/aws/lambda/{config.function(name)['function_name']}"
        assert group["retention_in_days"] > 0


def test_the_queue_alarms_watch_the_dlq_depth_and_the_oldest_message(config):
    dlq = config.block("aws_cloudwatch_metric_alarm", "aws_cloudwatch_metric_alarm.dlq_depth")
    assert dlq["metric_name"] == "ApproximateNumberOfMessagesVisible"
    assert dlq["dimensions"]["QueueName"] == config.block("aws_sqs_queue", "aws_sqs_queue.dlq")["name"]
    assert dlq["comparison_operator"] == "GreaterThanThreshold" and dlq["threshold"] == 0
    oldest = config.block("aws_cloudwatch_metric_alarm", "aws_cloudwatch_metric_alarm.oldest_message_age")
    assert oldest["metric_name"] == "ApproximateAgeOfOldestMessage"
    assert oldest["dimensions"]["QueueName"] == config.block("aws_sqs_queue", "aws_sqs_queue.main")["name"]
    for alarm in config.blocks("aws_cloudwatch_metric_alarm"):
        assert alarm["alarm_actions"], alarm["alarm_name"]


def test_routes_go_to_the_function_whose_role_allows_them(config):
    integrations = {}
    for integration in config.blocks("aws_apigatewayv2_integration"):
        function = re.search(r'\["([a-z]+)"\]$', integration["__tfmeta"]["path"]).group(1)
        integrations[integration["id"]] = function
    routes = {
        route["route_key"]: integrations[route["target"].removeprefix("integrations/")]
        for route in config.blocks("aws_apigatewayv2_route")
    }
    expected = {
        "POST /v1/events": "ingest",
        "POST /v1/events/batch": "ingest",
        "GET /v1/events": "query",
        "GET /v1/events/{event_id}": "query",
        "GET /v1/events/{event_id}/status": "query",
    }
    assert expected.items() <= routes.items()
    for route, function in routes.items():
        method = route.split()[0]
        if function == "query":
            assert method == "GET", route
        if "/v1/admin/" in route:
            assert function == "admin", route


# --- The bucket -----------------------------------------------------------------------------


def bucket_resource(config: Config, block_type: str) -> dict:
    bucket = config.block("aws_s3_bucket", "aws_s3_bucket.payloads")
    matches = [b for b in config.blocks(block_type) if b.get("bucket") == bucket["id"]]
    assert len(matches) == 1, f"expected one {block_type} for the payload bucket, found {len(matches)}"
    return matches[0]


def test_the_bucket_blocks_all_public_access(config):
    block = bucket_resource(config, "aws_s3_bucket_public_access_block")
    for setting in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
        assert block[setting] is True, setting


def test_the_bucket_is_encrypted(config):
    encryption = bucket_resource(config, "aws_s3_bucket_server_side_encryption_configuration")
    rule = as_list(encryption["rule"])[0]
    assert rule["apply_server_side_encryption_by_default"]["sse_algorithm"] in ("aws:kms", "AES256")


def test_the_bucket_refuses_requests_without_tls(config):
    bucket = config.block("aws_s3_bucket", "aws_s3_bucket.payloads")
    policy = bucket_resource(config, "aws_s3_bucket_policy")
    document = config.by_id[policy["policy"]]
    tls_denials = [
        statement
        for statement in as_list(document["statement"])
        if statement.get("effect") == "Deny"
        and statement["actions"] == ["s3:*"]
        and any(
            c["test"] == "Bool" and c["variable"] == "aws:SecureTransport" and c["values"] == ["false"]
            for c in as_list(statement.get("condition"))
        )
        and as_list(statement["principals"])[0]["identifiers"] == ["*"]
    ]
    assert len(tls_denials) == 1
    resources = tls_denials[0]["resources"]
    assert any(r.endswith(bucket["id"]) for r in resources)
    assert any(r.endswith(bucket["id"] + "/*") for r in resources)


def test_the_bucket_expires_orphaned_payloads_after_the_dlq_would_have(config):
    lifecycle = bucket_resource(config, "aws_s3_bucket_lifecycle_configuration")
    rules = [r for r in as_list(lifecycle["rule"]) if r["status"] == "Enabled"]
    prefix = config.root_variable_default("payload_prefix")
    expiring = [r for r in rules if "expiration" in r and r["filter"].get("prefix") == f"{prefix}/"]
    assert len(expiring) == 1
    dlq = config.block("aws_sqs_queue", "aws_sqs_queue.dlq")
    assert expiring[0]["expiration"]["days"] * 86400 > dlq["message_retention_seconds"]
    assert any("abort_incomplete_multipart_upload" in r for r in rules)


def test_functions_touch_only_the_payload_prefix(config):
    bucket = config.block("aws_s3_bucket", "aws_s3_bucket.payloads")
    prefix = config.root_variable_default("payload_prefix")
    for name in config.function_names():
        for statement in role_allow_statements(config, name):
            if any(a.startswith("s3:") for a in statement["actions"]):
                for resource in statement["resources"]:
                    assert resource in (f"arn:aws:s3:::{bucket['id']}/{prefix}/*", f"arn:aws:s3:::{bucket['id']}"), (
                        name,
                        resource,
                    )
                if statement["resources"] == [f"arn:aws:s3:::{bucket['id']}"]:
                    assert statement["actions"] == ["s3:ListBucket"], name


# --- The database ---------------------------------------------------------------------------


def test_the_database_is_private_encrypted_protected_and_backed_up(config):
    database = config.block("aws_db_instance", "aws_db_instance.fluxa")
    assert database["engine"] == "postgres"
    assert database["publicly_accessible"] is False
    assert database["storage_encrypted"] is True
    assert database["deletion_protection"] is True
    assert database["backup_retention_period"] >= 1
    assert database["skip_final_snapshot"] is False
    parameters = {
        p["name"]: p["value"]
        for p in config.block("aws_db_parameter_group", "aws_db_parameter_group.fluxa")["parameter"]
    }
    assert parameters["rds.force_ssl"] == "1"
    assert parameters["log_parameter_max_length"] == "0"


def test_the_database_secret_is_what_the_functions_read(config):
    secret = config.block("aws_secretsmanager_secret", "aws_secretsmanager_secret.db")
    assert secret.get("kms_key_id")
    for name in config.function_names():
        environment = config.function(name)["environment"]["variables"]
        if "FLUXA_DATABASE_SECRET_ID" in environment:
            assert environment["FLUXA_DATABASE_SECRET_ID"] == secret["id"], name


# --- IAM ------------------------------------------------------------------------------------


def test_one_role_per_function(config):
    roles = [config.function(name)["role"] for name in config.function_names()]
    assert len(set(roles)) == len(roles)


def test_the_query_role_writes_nothing_anywhere(config):
    writes = []
    for statement in role_allow_statements(config, "query"):
        if required_writes_of(config, "query", statement):
            continue
        writes += [a for a in statement["actions"] if is_write_action(a)]
    assert not writes, f"the query role may write: {writes}"


def test_the_query_role_reaches_no_queue_bucket_or_other_store(config):
    for statement in role_allow_statements(config, "query"):
        for action in statement["actions"]:
            service = action.partition(":")[0]
            assert action != "*" and service not in FORBIDDEN_SERVICES_FOR_QUERY, action
            if service == "secretsmanager":
                assert action == "secretsmanager:GetSecretValue", action
            if service == "kms":
                assert action == "kms:Decrypt", action


def test_no_role_allows_anything_on_every_resource_but_what_aws_requires(config):
    for name in config.function_names():
        for statement in role_allow_statements(config, name):
            if "*" in statement["resources"]:
                assert set(statement["actions"]) <= STAR_RESOURCE_ACTIONS, (name, statement["actions"])
            for action in statement["actions"]:
                assert action != "*" and not action.endswith(":*"), (name, action)


def test_ingest_has_no_database_access(config):
    for statement in role_allow_statements(config, "ingest"):
        for action in statement["actions"]:
            service = action.partition(":")[0]
            assert service not in ("secretsmanager", "rds", "rds-db", "rds-data"), action


def test_ingest_sends_only_to_the_main_queue(config):
    main = config.block("aws_sqs_queue", "aws_sqs_queue.main")
    for statement in role_allow_statements(config, "ingest"):
        sqs_actions = {a for a in statement["actions"] if a.startswith("sqs:")}
        if sqs_actions:
            assert sqs_actions <= {"sqs:SendMessage", "sqs:GetQueueAttributes"}
            assert statement["resources"] == [main["id"]]


def test_the_processor_consumes_the_main_queue_and_only_sends_to_the_dlq(config):
    main = config.block("aws_sqs_queue", "aws_sqs_queue.main")
    dlq = config.block("aws_sqs_queue", "aws_sqs_queue.dlq")
    consume = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"}
    allowed = {main["id"]: consume, dlq["id"]: {"sqs:SendMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"}}
    if config.maybe_block("aws_iam_role_policy", "aws_iam_role_policy.processor_dlq_drain[0]"):
        allowed[dlq["id"]] |= {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"}
    granted = {main["id"]: set(), dlq["id"]: set()}
    for statement in role_allow_statements(config, "processor"):
        sqs_actions = {a for a in statement["actions"] if a.startswith("sqs:")}
        for resource in statement["resources"] if sqs_actions else []:
            assert resource in allowed, resource
            granted[resource] |= sqs_actions
    assert granted[main["id"]] == consume
    assert "sqs:SendMessage" in granted[dlq["id"]]
    for resource, actions in granted.items():
        assert actions <= allowed[resource], (resource, actions - allowed[resource])


def test_the_write_check_recognises_writes():
    """The verb list itself: what it must call a write, and what it must not."""
    for action in ("sqs:SendMessage", "sqs:Send*", "s3:PutObject", "s3:DeleteObject", "s3:*", "*",
                   "secretsmanager:PutSecretValue", "dynamodb:*", "dynamodb:BatchWriteItem",
                   "kms:GenerateDataKey", "lambda:InvokeFunction", "s3:P*", "sqs:S*Message"):
        assert is_write_action(action), action
    for action in ("secretsmanager:GetSecretValue", "kms:Decrypt", "s3:GetObject",
                   "ec2:DescribeSubnets", "sqs:GetQueueAttributes", "s3:ListBucket", "s3:Get*"):
        assert not is_write_action(action), action


# --- Versions -------------------------------------------------------------------------------


def test_terraform_1_0_may_run_it_and_the_aws_provider_is_pinned(config):
    roots = [b for b in config.blocks("terraform") if b["__tfmeta"]["path"] == "terraform"]
    assert len(roots) == 1
    assert roots[0]["required_version"] in (">= 1.0", ">= 1.0.0", "~> 1.0")
    for provider in ("aws", "random"):
        assert roots[0]["required_providers"][provider]["version"].startswith("~>"), provider


def test_the_dlq_drain_maps_the_dlq_to_the_processor_with_partial_batches(config):
    mapping = config.maybe_block(
        "aws_lambda_event_source_mapping", "aws_lambda_event_source_mapping.processor_dlq_drain[0]"
    )
    if mapping is None:
        return
    main = config.block("aws_lambda_event_source_mapping", "aws_lambda_event_source_mapping.processor")
    assert mapping["event_source_arn"] == config.block("aws_sqs_queue", "aws_sqs_queue.dlq")["id"]
    assert mapping["function_name"] == main["function_name"]
    assert mapping["function_response_types"] == ["ReportBatchItemFailures"]
    assert mapping["scaling_config"]["maximum_concurrency"] <= 2
