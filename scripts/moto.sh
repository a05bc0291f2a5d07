#!/usr/bin/env bash
# Runs moto server, an AWS emulator (S3, SQS, Secrets Manager), on a loopback port for the
# tests of Fluxa's AWS backends. It checks no signatures, so the tests use static dummy keys.
#
#   eval "$(scripts/moto.sh start)"   installs moto the first time, starts a server, waits until
#                                     it answers, and prints the `export` lines that point the
#                                     AWS SDKs and object_store at it (AWS_ENDPOINT_URL,
#                                     AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and
#                                     FLUXA_TEST_MOTO_PID
#   scripts/moto.sh stop              stops the server FLUXA_TEST_MOTO_PID names
#
# `./test` starts one before the black-box suite's S3 run and stops it on exit. Each server
# keeps everything in memory, so a new one starts empty.
#
# Needs python3 with the venv module. moto is pip-installed, pinned, into .venv/moto (ignored
# by git) the first time only. The server's pid file and log are .venv/moto/server-<port>.pid
# and .log. Settings:
#   FLUXA_TEST_MOTO_PORT  the port to listen on (default: a free one)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

MOTO_VERSION=5.2.5
venv="$repo/.venv/moto"

usage() {
    echo "usage: eval \"\$(scripts/moto.sh start)\" | scripts/moto.sh stop" >&2
    exit 2
}

moto_installed() {
    "$venv/bin/python" - "$MOTO_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
import flask  # the server extra
sys.exit(0 if version("moto") == sys.argv[1] else 1)
PY
}

install_moto() {
    if ! moto_installed; then
        echo "moto: installing moto $MOTO_VERSION into $venv" >&2
        python3 -m venv "$venv"
        # pip's progress goes to stderr: stdout carries only the export lines.
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            "moto[server,s3,sqs,secretsmanager]==$MOTO_VERSION" >&2
    fi
}

free_port() {
    "$venv/bin/python" -c '
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])'
}

answers() {
    "$venv/bin/python" - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/moto-api/", timeout=1) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

is_moto() {
    [ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q moto_server
}

start() {
    install_moto
    mkdir -p "$venv"
    # A port picked as free may be taken before moto binds it: then try another.
    for _ in 1 2 3; do
        port="${FLUXA_TEST_MOTO_PORT:-$(free_port)}"
        log="$venv/server-$port.log"
        # Detached, output to its log: `$(scripts/moto.sh start)` must not wait for it.
        nohup "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" </dev/null >"$log" 2>&1 &
        pid=$!
        for _ in $(seq 1 150); do
            if ! kill -0 "$pid" 2>/dev/null; then break; fi
            # Still alive: the answer is ours, not another server's on a taken port.
            if answers "$port" && kill -0 "$pid" 2>/dev/null; then
                echo "$pid" >"$venv/server-$port.pid"
                echo "moto: serving on http://127.0.0.1:$port (pid $pid)" >&2
                echo "export AWS_ENDPOINT_URL=http://127.0.0.1:$port"
                echo "export AWS_REGION=us-east-1"
                echo "export AWS_ACCESS_KEY_ID=test"
                echo "export AWS_SECRET_ACCESS_KEY=test"
                echo "export FLUXA_TEST_MOTO_PID=$pid"
                return 0
            fi
            sleep 0.2
        done
        kill "$pid" 2>/dev/null || true
        if [ -n "${FLUXA_TEST_MOTO_PORT:-}" ]; then break; fi
    done
    echo "moto: the server did not start; its log:" >&2
    cat "$log" >&2
    exit 1
}

stop() {
    local pid="${FLUXA_TEST_MOTO_PID:-}"
    if [ -z "$pid" ]; then
        echo "moto: FLUXA_TEST_MOTO_PID is not set; nothing to stop" >&2
        return 0
    fi
    # Only a moto server: the pid may have been reused since.
    if is_moto "$pid"; then
        kill -TERM "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        echo "moto: stopped (pid $pid)" >&2
    fi
    local pid_file
    for pid_file in $(grep -lx "$pid" "$venv"/server-*.pid 2>/dev/null || true); do
        rm -f "$pid_file" "${pid_file%.pid}.log"
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) usage ;;
esac
