#!/usr/bin/env python3
"""Pools the bulk on/off pairs of several benches/ack-offload.sh runs.

Usage: benches/pool-bulk-pairs.py RUN-bulk.csv [RUN-bulk.csv ...]

Each file is a PREFIX-bulk.csv of ack-offload.sh; its "alternating" rows are
iperf3 runs on one boot with the offload switched off and on through the
control socket, paired by their rep number. Prints, per file and for all
pairs together, the median of the per-pair on/off ratios of throughput and
of vsnoop's CPU per MB, each with a 95 % bootstrap range of the median
(10 000 resamples, fixed seed, so reruns print the same figures).
"""
import csv
import random
import statistics
import sys


def pairs(path):
    runs = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["kind"] == "alternating":
                runs.setdefault(r["rep"], {})[r["config"]] = r
    out = []
    for p in runs.values():
        if "on" in p and "off" in p:
            thr = float(p["on"]["mbit_per_s"]) / float(p["off"]["mbit_per_s"])
            cpu = float(p["on"]["vsnoop_cpu_us_per_mb"]) / float(p["off"]["vsnoop_cpu_us_per_mb"])
            out.append((thr, cpu))
    return out


def median_range(values, resamples=10_000):
    rng = random.Random(1)
    meds = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    return statistics.median(values), meds[int(0.025 * resamples)], meds[int(0.975 * resamples)]


def line(name, p):
    thr = median_range([t for t, _ in p])
    cpu = median_range([c for _, c in p])
    return (f"{name}: {len(p)} pairs, throughput on/off {thr[0]:.3f} ({thr[1]:.3f}-{thr[2]:.3f}), "
            f"vsnoop CPU per MB on/off {cpu[0]:.3f} ({cpu[1]:.3f}-{cpu[2]:.3f})")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[2])
    pooled = []
    for path in sys.argv[1:]:
        p = pairs(path)
        if not p:
            sys.exit(f"{path}: no alternating on/off pairs")
        print(line(path, p))
        pooled += p
    print(line("all", pooled))
    # The median alone: its range is on the line above.
    print(f"bulk loss with the offload on: {100 * (1 - statistics.median(t for t, _ in pooled)):.1f} %")


if __name__ == "__main__":
    main()
