# Helpers shared by the benchmark scripts (sourced, not run). The sourcing
# script sets BENCH_NAME (the prefix of its log lines) first.

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$BENCH_NAME" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Ends one process this script started, by PID: SIGCONT (it may be stopped),
# SIGTERM, then SIGKILL after 5 s; reaps it.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -CONT "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Runs `command...` until it succeeds (output discarded), every 0.2 s, for
# at most `seconds`; dies naming `description` if it never does.
wait_for() { # seconds description command...
    local secs=$1 what=$2; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for $what"
        sleep 0.2
    done
}
