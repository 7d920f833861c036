#!/usr/bin/env bash
# A local Synapse for development and tests: installed from PyPI into the repo's .venv/,
# configured for 127.0.0.1 with SQLite, no federation, loose rate limits and the
# appservice-mode encryption extensions (MSC2409, MSC3202).
#
#   scripts/synapse.sh install
#       Creates .venv/ and installs Synapse into it (skipped when already there).
#   scripts/synapse.sh init  DIR [--port N] [--registration FILE]...
#       Writes DIR/homeserver.yaml (secrets kept across runs; port and registrations rewritten).
#   scripts/synapse.sh start DIR [--port N] [--registration FILE]...
#       install + init, starts Synapse in the background, records its PID in DIR/synapse.pid,
#       waits until /_matrix/client/versions answers, prints the homeserver URL.
#   scripts/synapse.sh stop  DIR
#       Stops the Synapse recorded in DIR/synapse.pid (TERM, then KILL after a bounded wait).
#   scripts/synapse.sh run   DIR [--port N] [--registration FILE]...
#       For tests: like start, but Synapse is our child; prints `ready <url>` once it answers,
#       and stops it when our standard input closes (so a test process that dies, however it
#       dies, never leaves Synapse behind). Exits when Synapse exits.
#   scripts/synapse.sh guard [--signal SIG] CMD [ARG]...
#       For tests: runs CMD and sends it SIGKILL (or SIG) when our standard input closes;
#       exits with CMD's status. The test harness runs mxpay under it for the same reason
#       as `run`.
#
# Environment: MXPAY_VENV (default: <repo>/.venv), MXPAY_SYNAPSE_SPEC (pip requirement,
# default below), MXPAY_SYNAPSE_START_TIMEOUT_S (default 60).
# Homeserver logs: DIR/homeserver.log; Synapse's own stdout/stderr: DIR/synapse.out.

set -euo pipefail

repo_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MXPAY_VENV:-$repo_dir/.venv}"
# The Synapse release the project was checked against (see the development guide); a
# range within one minor release keeps pip's cache useful and behaviour stable.
synapse_spec="${MXPAY_SYNAPSE_SPEC:-matrix-synapse>=1.163.2,<1.164}"
start_timeout_s="${MXPAY_SYNAPSE_START_TIMEOUT_S:-60}"
stop_timeout_s=15

die() {
    echo "synapse.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# The marker names the requirement, so changing the pin reinstalls.
install_marker() {
    echo "$venv/.mxpay-installed-$(printf '%s' "$synapse_spec" | cksum | cut -d' ' -f1)"
}

cmd_install() {
    local marker
    marker="$(install_marker)"
    [[ -f "$marker" ]] && return 0
    command -v python3 >/dev/null || die "python3 is needed (3.10 or newer, with venv)"
    mkdir -p "$venv"
    # Concurrent test runs may both find Synapse missing: one installs, the other waits.
    exec 9>"$venv/.install.lock"
    flock -w 600 9 || die "timed out waiting for another install into $venv"
    if [[ ! -f "$marker" ]]; then
        echo "synapse.sh: installing $synapse_spec into $venv (once, about 30 s)" >&2
        [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" ||
            die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$synapse_spec" >&2 ||
            die "pip install $synapse_spec failed"
        touch "$marker"
    fi
    exec 9>&-
}

# Parses `DIR [--port N] [--registration FILE]...` into dir, port, registrations.
parse_server_args() {
    [[ $# -ge 1 ]] || usage
    dir="$1"
    shift
    port=""
    registrations=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --port)
            [[ $# -ge 2 ]] || usage
            port="$2"
            shift 2
            ;;
        --registration)
            [[ $# -ge 2 ]] || usage
            registrations+=("$2")
            shift 2
            ;;
        *) die "unknown argument: $1" ;;
        esac
    done
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if [[ -z "$port" ]]; then
        # Reuse the port of an earlier init of this directory, else take a free one.
        if [[ -f "$dir/port" ]]; then
            port="$(cat "$dir/port")"
        else
            port="$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        fi
    fi
    [[ "$port" =~ ^[0-9]+$ ]] || die "--port wants a number, got $port"
}

cmd_init() {
    cmd_install
    parse_server_args "$@"
    local args=("$dir" --port "$port")
    local r
    for r in ${registrations[@]+"${registrations[@]}"}; do
        args+=(--registration "$r")
    done
    "$venv/bin/python" "$repo_dir/scripts/synapse_config.py" "${args[@]}"
    echo "$port" >"$dir/port"
}

http_ok() {
    if command -v curl >/dev/null; then
        curl -fsS -o /dev/null -m 2 "$1" 2>/dev/null
    else
        "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
    fi
}

# Starts Synapse as our child, sets `synapse_pid`, and waits (bounded) until it answers.
spawn_and_wait() {
    local url="http://127.0.0.1:$port"
    # Synapse's daemonize would detach it from our watch; run it in the foreground instead.
    "$venv/bin/python" -m synapse.app.homeserver -c "$dir/homeserver.yaml" \
        </dev/null >>"$dir/synapse.out" 2>&1 &
    synapse_pid=$!
    local deadline=$((SECONDS + start_timeout_s))
    until http_ok "$url/_matrix/client/versions"; do
        if ! kill -0 "$synapse_pid" 2>/dev/null; then
            tail -n 30 "$dir/synapse.out" "$dir/homeserver.log" >&2 2>/dev/null || true
            die "Synapse exited during start-up (logs: $dir/synapse.out, $dir/homeserver.log)"
        fi
        if ((SECONDS >= deadline)); then
            kill -KILL "$synapse_pid" 2>/dev/null || true
            die "Synapse did not answer on $url within ${start_timeout_s} s (logs in $dir)"
        fi
        sleep 0.1
    done
}

# TERM, a bounded wait, then KILL.
stop_pid() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    local deadline=$((SECONDS + stop_timeout_s))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
}

# Is the PID recorded in DIR/synapse.pid a live Synapse of this directory?
recorded_pid_alive() {
    local pid_file="$dir/synapse.pid" pid
    [[ -f "$pid_file" ]] || return 1
    pid="$(cat "$pid_file")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # Guard against a recycled PID: the process must be Synapse running our config.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$dir/homeserver.yaml"
}

cmd_start() {
    cmd_init "$@"
    if recorded_pid_alive; then
        echo "synapse.sh: Synapse already runs for $dir (PID $(cat "$dir/synapse.pid"))" >&2
        echo "http://127.0.0.1:$port"
        return 0
    fi
    spawn_and_wait
    echo "$synapse_pid" >"$dir/synapse.pid"
    echo "http://127.0.0.1:$port"
}

cmd_stop() {
    [[ $# -eq 1 ]] || usage
    dir="$(cd "$1" 2>/dev/null && pwd)" || die "no such directory: $1"
    if recorded_pid_alive; then
        stop_pid "$(cat "$dir/synapse.pid")"
    fi
    rm -f "$dir/synapse.pid"
}

cmd_run() {
    cmd_init "$@"
    spawn_and_wait
    echo "$synapse_pid" >"$dir/synapse.pid"
    echo "ready http://127.0.0.1:$port"
    # The watcher: standard input closing means our test process is gone.
    (
        cat >/dev/null
        stop_pid "$synapse_pid"
    ) <&0 &
    local status=0
    wait "$synapse_pid" || status=$?
    rm -f "$dir/synapse.pid"
    exit "$status"
}

cmd_guard() {
    local signal=KILL
    if [[ "${1:-}" == --signal ]]; then
        [[ $# -ge 2 ]] || usage
        signal="$2"
        shift 2
    fi
    [[ $# -ge 1 ]] || usage
    "$@" </dev/null &
    local child=$!
    (
        cat >/dev/null
        if kill -0 "$child" 2>/dev/null; then
            echo "synapse.sh guard: standard input closed; sending SIG$signal to $1" >&2
            kill -"$signal" "$child" 2>/dev/null || true
        fi
    ) <&0 &
    local status=0
    # (bash's own "Killed" job notice would only repeat the line above)
    wait "$child" 2>/dev/null || status=$?
    exit "$status"
}

[[ $# -ge 1 ]] || usage
command="$1"
shift
case "$command" in
install) cmd_install ;;
init) cmd_init "$@" ;;
start) cmd_start "$@" ;;
stop) cmd_stop "$@" ;;
run) cmd_run "$@" ;;
guard) cmd_guard "$@" ;;
-h | --help | help) usage ;;
*) die "unknown command: $command (try --help)" ;;
esac
