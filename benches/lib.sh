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

# Where a process's CPU went (the benchmarks' perf options): perf script
# output on stdin, prints "category=share;..." (shares of the samples). A
# sample belongs to the first category whose kernel frame is in its stack,
# else by its leaf: libc memcpy/memmove (the custody copy, header copies),
# other user code, other kernel code. Only kernel stacks are whole (vsnoop
# and libc have no frame pointers), so user samples go by their leaf.
PERF_SPLIT='
import re, sys
cats = [("host_stack", r"\b(tcp_v[46]_rcv|handle_softirqs)\b"), ("tap_write", r"\btun_(chr_write_iter|get_user)\b"),
        ("tap_read", r"\btun_(chr_read_iter|do_read)\b"), ("notify", r"\beventfd_(write|signal)\b"),
        ("other_syscalls", r"\b(do_syscall_64|entry_SYSCALL_64)")]
count = {c: 0 for c, _ in cats}
count.update(user_memcpy=0, user_other=0, kernel_other=0)
samples, stack = 0, []
for line in sys.stdin.read().split("\n") + [""]:
    if line.strip():
        stack.append(line)
        continue
    if not stack:
        continue
    samples += 1
    text = "\n".join(stack)
    cat = next((c for c, pat in cats if re.search(pat, text)), None)
    if cat is None:
        leaf = stack[0]
        if "kernel.kallsyms" in leaf:
            cat = "kernel_other"
        elif re.search(r"mem(cpy|move)", leaf):
            cat = "user_memcpy"
        else:
            cat = "user_other"
    count[cat] += 1
    stack = []
if samples:
    print(";".join("%s=%.4f" % (c, n / samples) for c, n in count.items()))
'

# perf record at 999 Hz with call graphs on one process into `data`, in the
# background (its PID in PERF_PID); errors go to `logfile`. PERF_CALLGRAPH
# (default fp) is perf's --call-graph: dwarf gives whole user stacks (vsnoop
# and libc have no frame pointers) at about 8 KB per sample.
perf_begin() { # pid data logfile
    rm -f "$2"
    perf record -q -F 999 --call-graph "${PERF_CALLGRAPH:-fp}" -p "$1" -o "$2" 2>>"$3" &
    PERF_PID=$!
    sleep 0.5
}

# Ends perf_begin's recording and sets PERF_RESULT to its PERF_SPLIT line
# (not a command substitution: perf must be this shell's child to be reaped).
perf_end() { # perf_pid data logfile
    local rc=0
    kill -INT "$1"
    wait "$1" || rc=$?
    # 130: perf record ends on SIGINT by exiting with 128 + 2.
    [[ $rc == 0 || $rc == 130 ]] || die "perf record failed ($rc): $(tail -3 "$3")"
    PERF_RESULT=$(perf script -i "$2" -F ip,sym,dso 2>>"$3" | "${PYTHON:-python3}" -c "$PERF_SPLIT")
}
