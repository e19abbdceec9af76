#!/usr/bin/env python3
"""tapnetem: a user-space netem between two TAP interfaces.

This machine's kernel has no sch_netem (`tc qdisc add ... netem` answers
"Specified qdisc kind is unknown"), so the tests impair traffic here instead:
frames read from one tap are written to the other after a fixed delay, with
optional loss, duplication and reordering (netem's semantics: a reordered
frame skips the delay), and ECN congestion marks (--ce: an IPv4 frame whose
ECN field is ECT(0) or ECT(1) becomes CE, as an AQM router marks instead of
dropping). The other direction passes unchanged unless --both-ways.

Typical use (all inside a private network namespace):

    vsnoop's tap --- bridge --- tap A  [tapnetem]  tap B (host address)

    tapnetem.py --a dly0 --b dly1 --delay-ms 20      # host -> guest delayed

The taps are created (IFF_TAP | IFF_NO_PI) if missing; the caller puts A in
the bridge and gives B the host address. Prints "READY" once both taps are
open, and on SIGTERM/SIGINT (or SIGUSR1, without exiting) one line of
counters: forwarded, dropped, duplicated, reordered, ce_marked, and the median and
largest lateness of delayed frames behind their due time, in microseconds
(the delay really added is the configured one plus this lateness).
"""

import argparse
import fcntl
import heapq
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536 + 64


def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def mark_ce(frame):
    """The frame with its IPv4 ECN field set to CE and the header checksum
    recomputed, or None if it is not ECN-capable IPv4 (Not-ECT stays, as a
    router would drop it instead; CE is already marked)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if ihl < 20 or len(frame) < 14 + ihl or frame[15] & 3 not in (1, 2):
        return None
    b = bytearray(frame)
    b[15] |= 3
    b[24:26] = b"\0\0"
    total = sum(struct.unpack(f"!{ihl // 2}H", bytes(b[14:14 + ihl])))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    b[24:26] = struct.pack("!H", ~total & 0xFFFF)
    return bytes(b)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="tap toward the guest (bridge side)")
    p.add_argument("--b", required=True, help="tap toward the host stack")
    p.add_argument("--delay-ms", type=float, default=0.0, help="delay of B->A frames")
    p.add_argument("--loss", type=float, default=0.0, help="percent of B->A frames dropped")
    p.add_argument("--duplicate", type=float, default=0.0, help="percent of B->A frames sent twice")
    p.add_argument("--reorder", type=float, default=0.0,
                   help="percent of B->A frames sent at once, overtaking delayed ones")
    p.add_argument("--ce", type=float, default=0.0,
                   help="percent of ECN-capable IPv4 B->A frames marked CE")
    p.add_argument("--both-ways", action="store_true", help="impair A->B too")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    rng = random.Random(args.seed)
    fd_a, fd_b = open_tap(args.a), open_tap(args.b)
    delay_ns = int(args.delay_ms * 1e6)
    counts = {"forwarded": 0, "dropped": 0, "duplicated": 0, "reordered": 0,
              "ce_marked": 0, "late_us_p50": 0, "late_us_max": 0}
    lateness = []  # microseconds behind the due time, per delayed frame
    queue = []  # (due ns, sequence, fd, frame)
    seq = 0
    stop = False

    def report(*_):
        if lateness:
            counts["late_us_p50"] = sorted(lateness)[len(lateness) // 2]
        print("tapnetem " + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)

    def finish(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    signal.signal(signal.SIGUSR1, report)
    print("READY", flush=True)

    def send(fd, frame):
        try:
            os.write(fd, frame)
            counts["forwarded"] += 1
        except OSError:
            counts["dropped"] += 1

    def impaired(frame, out_fd, now):
        nonlocal seq
        if rng.random() * 100 < args.loss:
            counts["dropped"] += 1
            return
        if args.ce and rng.random() * 100 < args.ce:
            marked = mark_ce(frame)
            if marked is not None:
                counts["ce_marked"] += 1
                frame = marked
        copies = 2 if rng.random() * 100 < args.duplicate else 1
        counts["duplicated"] += copies - 1
        for _ in range(copies):
            if rng.random() * 100 < args.reorder:
                counts["reordered"] += 1
                send(out_fd, frame)
            else:
                seq += 1
                heapq.heappush(queue, (now + delay_ns, seq, out_fd, frame))

    while not stop:
        now = time.monotonic_ns()
        while queue and queue[0][0] <= now:
            due, _, fd, frame = heapq.heappop(queue)
            late = (now - due) // 1000
            counts["late_us_max"] = max(counts["late_us_max"], late)
            if len(lateness) < 100_000:
                lateness.append(late)
            send(fd, frame)
        # select() takes microseconds (poll and epoll round up to milliseconds).
        timeout = max(0.0, (queue[0][0] - now) / 1e9) if queue else 1.0
        try:
            ready, _, _ = select.select([fd_a, fd_b], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic_ns()
        for fd in ready:
            while True:
                try:
                    frame = os.read(fd, MAX_FRAME)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if fd == fd_b:
                    impaired(frame, fd_a, now)
                elif args.both_ways:
                    impaired(frame, fd_b, now)
                else:
                    send(fd_b, frame)
    report()


if __name__ == "__main__":
    sys.exit(main())
