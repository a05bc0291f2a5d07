#!/usr/bin/env bash
# Holds Fluxa to its own OpenAPI document (contract section 7): starts `fluxa serve` on the
# embedded backend with a token of every scope, checks that `GET /v1/openapi.json` is served
# without a token and is valid OpenAPI 3.1, then lets schemathesis send generated requests to
# every operation and fails on any 5xx, any response whose status, content type, headers or
# body the document does not allow. `./test` runs it; it can also be run alone.
#
# Needs python3 with the venv module and a Rust toolchain. The tools are pip-installed, pinned,
# into .venv/schemathesis (ignored by git) the first time only. Settings:
#   FLUXA_SCHEMATHESIS_EXAMPLES  generated requests per operation and phase (default 100)
#   FLUXA_SCHEMATHESIS_SEED      the generator's seed (default fixed, so a run is repeatable)
#   FLUXA_SCHEMATHESIS_ARGS      more `st run` options, e.g. `--report har --report-dir /tmp/st`
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

SCHEMATHESIS_VERSION=4.32.5
SPEC_VALIDATOR_VERSION=0.9.0
venv="$repo/.venv/schemathesis"
examples="${FLUXA_SCHEMATHESIS_EXAMPLES:-100}"
seed="${FLUXA_SCHEMATHESIS_SEED:-20261130}"

tools_installed() {
    "$venv/bin/python" - "$SCHEMATHESIS_VERSION" "$SPEC_VALIDATOR_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if (version("schemathesis"), version("openapi-spec-validator")) == tuple(sys.argv[1:]) else 1)
PY
}
if ! tools_installed; then
    echo "schemathesis: installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION" "openapi-spec-validator==$SPEC_VALIDATOR_VERSION"
fi

cargo build --locked --quiet -p fluxa

workdir=$(mktemp -d)
server_pid=""
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    server_pid=""
}
trap 'stop_server; rm -rf "$workdir"' EXIT

# A throwaway token with every scope, made for this run and dead with its server.
token=$("$venv/bin/python" -c 'import secrets; print(secrets.token_hex(24))')
# Port 0 and a fresh data directory: nothing is shared with another run. Any FLUXA_* setting
# from the caller's environment is dropped so this is always the embedded backend.
: >"$workdir/server.log"
env $(env | sed -n 's/^\(FLUXA_[A-Z0-9_]*\)=.*/-u \1/p') \
    FLUXA_API_TOKENS="ingest+read+admin=$token" RUST_LOG=info \
    "$repo/target/debug/fluxa" serve --bind 127.0.0.1:0 --data-dir "$workdir/data" \
    >>"$workdir/server.log" 2>&1 &
server_pid=$!

addr=""
for _ in $(seq 1 300); do
    addr=$(grep '"fluxa started"' "$workdir/server.log" \
        | sed -n 's/.*"addr":"\([0-9.]*:[0-9]*\)".*/\1/p' | head -n 1 || true)
    [ -n "$addr" ] && break
    if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
    sleep 0.1
done
if [ -z "$addr" ]; then
    echo "schemathesis: fluxa serve did not start; its log:" >&2
    cat "$workdir/server.log" >&2
    exit 1
fi
base="http://$addr"
echo "schemathesis: fluxa serving on $base"

# Fetched without a token: the document is public, like /healthz.
"$venv/bin/python" - "$base/v1/openapi.json" "$workdir/openapi.json" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    assert response.status == 200, response.status
    assert response.headers["Content-Type"].startswith("application/json")
    document = json.load(response)
assert document["openapi"].startswith("3.1."), document["openapi"]
json.dump(document, open(sys.argv[2], "w"))
PY
"$venv/bin/openapi-spec-validator" "$workdir/openapi.json"

started=$(date +%s)
status=0
# Run from the scratch folder, so nothing schemathesis or hypothesis writes lands in the repo.
(
    cd "$workdir"
    # The document as fetched, with the base URL: loaded from its URL, schemathesis would
    # skip the operation that serves it.
    "$venv/bin/st" run "$workdir/openapi.json" --url "$base" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
        --header "Authorization: Bearer $token" \
        --max-examples "$examples" \
        --seed "$seed" \
        --workers 1 \
        --request-timeout 30 \
        --generation-database none \
        --no-color \
        --report junit --report-junit-path "$workdir/junit.xml" \
        ${FLUXA_SCHEMATHESIS_ARGS:-}
) || status=$?
echo "schemathesis: took $(( $(date +%s) - started )) s"
# One line a CI log reader understands: operations that passed every check, and those that did
# not.
"$venv/bin/python" - "$workdir/junit.xml" <<'PY' || true
import sys
import xml.etree.ElementTree as ElementTree
cases = ElementTree.parse(sys.argv[1]).getroot().iter("testcase")
outcomes = [any(child.tag in ("failure", "error") for child in case) for case in cases]
print(f"schemathesis: {outcomes.count(False)} passed, {outcomes.count(True)} failed")
PY

if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "schemathesis: the server died during the run; its log:" >&2
    tail -n 50 "$workdir/server.log" >&2
    exit 1
fi
# An internal error or a panic the HTTP layer turned into an answer is a finding even when
# the answer conforms. (The processor logs dead-lettered events as errors; those are the
# expected outcome of generated events that reuse an id.)
if grep '"level":"ERROR"' "$workdir/server.log" | grep -q '"target":"fluxa_api'; then
    echo "schemathesis: the API logged errors:" >&2
    grep '"level":"ERROR"' "$workdir/server.log" | grep '"target":"fluxa_api' | tail -n 20 >&2
    status=1
fi
stop_server
exit "$status"
