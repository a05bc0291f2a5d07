#!/usr/bin/env bash
# Installs cargo-lambda (PyPI `cargo-lambda`, which brings its own Zig linker), pinned, into
# .venv/cargo-lambda (ignored by git) the first time only, then runs `cargo lambda ARGS…` with
# it on PATH. `./test` uses it for the `cargo lambda watch` test of every function binary;
# docs/DEPLOY-AWS.md for the release zips:
#
#   scripts/cargo-lambda.sh build --release --output-format zip -p fluxa-lambda
#   scripts/cargo-lambda.sh --path     prints the folder to put on PATH, and installs nothing more
#
# Needs python3 with the venv module; reaches PyPI once.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

CARGO_LAMBDA_VERSION=1.9.2
venv="$repo/.venv/cargo-lambda"

installed() {
    "$venv/bin/python" - "$CARGO_LAMBDA_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("cargo-lambda") == sys.argv[1] else 1)
PY
}
if ! installed; then
    echo "cargo-lambda: installing cargo-lambda $CARGO_LAMBDA_VERSION into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "cargo-lambda==$CARGO_LAMBDA_VERSION" >&2
fi

if [ "${1:-}" = "--path" ]; then
    echo "$venv/bin"
    exit 0
fi
PATH="$venv/bin:$PATH" exec cargo lambda "$@"
