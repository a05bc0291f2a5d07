"""Prints the environment the Terraform gives each Lambda function, as one JSON object
{function: {variable: value}}, read with tfparse as test_terraform.py reads it.

crates/fluxa-lambda/tests/watch.rs starts every function binary with exactly this environment, so
that a function that cannot start with what the Terraform deploys fails a test, not a cold start.

Every key, and every value the Terraform writes or computes from variables (FLUXA_LEASE, the
body limits, RUST_LOG), is printed as Terraform evaluates it. Two kinds of value cannot be known
offline, and are printed as placeholders that the test replaces with its own deployment's values:
- what exists only once applied: tfparse gives a reference to another block's attribute (the
  queue's URL, the secret's ARN, the bucket's name) as that block's id, printed here as
  `${<block path>}`, e.g. `${module.stateful.aws_sqs_queue.main}`;
- the inputs an operator must give: operator-inputs.tfvars sets each to `${var.<name>}`.
A value that is neither (a null, a list) fails the script, naming the function and the variable.

The configuration is loaded with tests/all-features.tfvars too, so that the admin function is
there; the features it switches on change no other function's environment.

Run it with the Python that has tfparse (`scripts/terraform-check.sh --python` prints it):

    "$(scripts/terraform-check.sh --python)" infra/terraform/tests/function_environments.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import tfparse

TERRAFORM_DIR = Path(__file__).resolve().parent.parent
# tfparse reads these relative to TERRAFORM_DIR.
VARS_PATHS = ["tests/all-features.tfvars", "tests/operator-inputs.tfvars"]
FUNCTION_PATH = re.compile(r'aws_lambda_function\.function\["([a-z]+)"\]$')
BLOCK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def function_environments() -> dict[str, dict[str, str]]:
    parsed = tfparse.load_from_path(str(TERRAFORM_DIR), stop_on_hcl_error=True, vars_paths=VARS_PATHS)
    paths = {
        block["id"]: block["__tfmeta"]["path"]
        for blocks in parsed.values()
        for block in blocks
        if isinstance(block, dict) and "id" in block
    }

    def rendered(function: str, name: str, value) -> str:
        if not isinstance(value, str):
            sys.exit(
                f"function_environments: {function}'s {name} is {value!r}, not a string: give its "
                "variable a placeholder in operator-inputs.tfvars"
            )

        def placeholder(match: re.Match) -> str:
            if match.group(0) not in paths:
                sys.exit(f"function_environments: {function}'s {name} names no known block: {value}")
            return "${" + paths[match.group(0)] + "}"

        return BLOCK_ID.sub(placeholder, value)

    environments = {}
    for block in parsed.get("aws_lambda_function", []):
        match = FUNCTION_PATH.search(block["__tfmeta"]["path"])
        if match is None:
            sys.exit(f"function_environments: an unexpected function {block['__tfmeta']['path']}")
        function = match.group(1)
        variables = block.get("environment", {}).get("variables", {})
        environments[function] = {
            name: rendered(function, name, value) for name, value in sorted(variables.items())
        }
    return environments


if __name__ == "__main__":
    json.dump(function_environments(), sys.stdout, indent=2, sort_keys=True)
    print()
