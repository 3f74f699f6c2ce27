#!/usr/bin/env python3
"""How often this machine stops a CPU under a running program, and for how long.

A latency tail can come from the machine rather than from the server: a
virtual machine's CPU is a thread on its host, and the host may stop it for
milliseconds. This probe spins one process on each CPU (pinned) reading the
clock in a tight loop and reports every gap above a threshold: time the
process was runnable and on its CPU, yet did not run. It measures each CPU
alone (the others idle) and then all of them busy at once, as they are under
a load test whose client and server share the machine.

    python3 benches/vcpu_pauses.py [--seconds 6] [--threshold-ms 1]

Standard library only; Linux (sched_setaffinity). Nothing else should run
meanwhile.
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time


def spin(cpu, seconds, threshold_ns, out):
    """Reads the clock until `seconds` pass; reports gaps above the threshold."""
    os.sched_setaffinity(0, {cpu})
    start = time.perf_counter_ns()
    end = start + int(seconds * 1e9)
    gaps = []
    last = start
    while last < end:
        now = time.perf_counter_ns()
        if now - last > threshold_ns:
            gaps.append(((last - start) / 1e9, (now - last) / 1e6))
        last = now
    out.put((cpu, gaps))


def measure(cpus, seconds, threshold_ns):
    out = mp.Queue()
    procs = [mp.Process(target=spin, args=(c, seconds, threshold_ns, out)) for c in cpus]
    for p in procs:
        p.start()
    results = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    return results


def summary(gaps, seconds):
    if not gaps:
        return {"pauses": 0, "paused_ms_per_s": 0.0}
    lengths = [g for _, g in gaps]
    starts = [t for t, _ in gaps]
    period = statistics.median([b - a for a, b in zip(starts, starts[1:])]) if len(starts) > 1 else None
    return {
        "pauses": len(gaps),
        "median_ms": round(statistics.median(lengths), 2),
        "max_ms": round(max(lengths), 2),
        "median_period_s": round(period, 3) if period else None,
        "paused_ms_per_s": round(sum(lengths) / seconds, 2),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--threshold-ms", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    threshold_ns = int(args.threshold_ms * 1e6)
    rows = []
    for cpu in cpus:
        gaps = measure([cpu], args.seconds, threshold_ns)[cpu]
        rows.append({"cpu": cpu, "others": "idle", **summary(gaps, args.seconds)})
    together = measure(cpus, args.seconds, threshold_ns)
    for cpu in cpus:
        rows.append({"cpu": cpu, "others": "busy", **summary(together[cpu], args.seconds)})
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return
    print(f"pauses over {args.threshold_ms:g} ms in {args.seconds:g} s of spinning, per CPU")
    print("| cpu | other CPUs | pauses | median ms | max ms | median period s | paused ms per s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cpu']} | {r['others']} | {r['pauses']} | {r.get('median_ms', '–')} | "
              f"{r.get('max_ms', '–')} | {r.get('median_period_s') or '–'} | {r['paused_ms_per_s']} |")


if __name__ == "__main__":
    main()
