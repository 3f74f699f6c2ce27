"""Reads the C load generators' output for benches/compare.sh: one JSON line
per run (req/s, latency quantiles, server CPU), and the ratio table.

    python3 benches/c_loadgen.py h2load LABEL h2load.out h2load.log SECONDS CPU_TICKS CLK_TCK [EXPECTED [COUNTED]]
    python3 benches/c_loadgen.py redis-benchmark LABEL out.csv STARTED ENDED CPU_TICKS CLK_TCK
    python3 benches/c_loadgen.py table compare.jsonl
    python3 benches/c_loadgen.py sign KEY_ID SECRET METHOD PATH    # warden-v1 headers, one per line

EXPECTED is the status class every answer should have (2xx by default);
any other answer counts as an error. COUNTED, when given, is how many of
the answers the server itself counted as the one the request should get
(its metrics, read before and after the run): a gRPC answer is HTTP 200
whatever it says, so the answers short of that count are errors too.

The table gives each row against redis-benchmark's runs (compare.sh makes
them before the h2load rows and after): one ratio when they agree, else
the range between them; against the runs of a command at a time on 64
connections, and against those of 16 commands pipelined on each of 4.
"""

import csv
import hashlib
import hmac
import json
import re
import secrets
import sys
import time


def h2load(label, out_path, log_path, secs, ticks, hz, expected="2xx", counted=None):
    out = open(out_path).read()
    done = sum(int(n) for n in re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out).groups())
    ok = int(re.search(rf"(\d+) {expected}", out).group(1))
    if counted is not None:
        # The server also counts the calls still in flight when h2load
        # stops, which h2load does not count as done.
        ok = min(ok, int(counted))
    # The quantiles come from a second run's --log-file (start µs, status,
    # latency µs per request): the log slows h2load itself (compare.sh).
    lat = sorted(int(line.split()[2]) for line in open(log_path) if line.strip())
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] / 1000
    secs = float(secs)
    return {"label": label, "rps": done / secs, "p50_ms": q(0.5), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "errors": done - ok, "server_cpu_cores": int(ticks) / int(hz) / secs}


def redis_benchmark(label, csv_path, started, ended, ticks, hz):
    row = list(csv.DictReader(open(csv_path)))[-1]
    secs = float(ended) - float(started)
    return {"label": label, "rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]),
            "p99_ms": float(row["p99_latency_ms"]), "p999_ms": float(row["max_latency_ms"]), "errors": 0,
            "server_cpu_cores": int(ticks) / int(hz) / secs}


def against(rps, bases):
    """`rps` as a multiple of Redis's runs `bases`: one ratio when they
    agree to two decimals, else the range from the fastest run's to the
    slowest's (the host's drift within one run, shown, not averaged away)."""
    low, high = rps / max(bases), rps / min(bases)
    if f"{low:.2f}" == f"{high:.2f}":
        return f"{low:.2f}x"
    return f"{low:.2f}–{high:.2f}x"


def table(path):
    rows = [json.loads(line) for line in open(path)]
    rows = [r for r in rows if r["label"].startswith(("h2load", "redis-benchmark"))]
    redis = [r for r in rows if r["label"].startswith("redis-benchmark")]
    # A command at a time on each of 64 connections (the measure),
    # and pipelined as h2load's streams share their connection.
    plain = [r["rps"] for r in redis if "pipelined" not in r["label"]]
    pipelined = [r["rps"] for r in redis if "pipelined" in r["label"]]
    print()
    print("| C load generator | req/s | vs Redis EVAL, 64 conns (its runs before and after) "
          "| vs Redis EVAL, 4 conns x 16 pipelined (the same) | p50 ms | p99 ms | server CPU (cores) | CPU µs per request |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        per = r["server_cpu_cores"] / r["rps"] * 1e6 if r["rps"] else 0
        print(f"| {r['label']} | {r['rps']:.0f} | {against(r['rps'], plain)} "
              f"| {against(r['rps'], pipelined) if pipelined else '–'} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
              f"{r['server_cpu_cores']:.2f} | {per:.1f} |")


def sign(key_id, secret, method, path):
    """The warden-v1 signing headers of a request with no query and no body
    (the scheme in DESIGN.md; the Python client's sign_request, without its
    dependencies), as h2load -H arguments, one per line."""
    ts, nonce = str(int(time.time())), secrets.token_hex(16)
    message = "\n".join(["warden-v1", ts, nonce, method, path, "", hashlib.sha256(b"").hexdigest()])
    signature = hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()
    for name, value in [("X-Key-Id", key_id), ("X-Timestamp", ts), ("X-Nonce", nonce), ("X-Signature", signature)]:
        print(f"{name}: {value}")


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "table":
        table(*args)
    elif kind == "sign":
        sign(*args)
    else:
        print(json.dumps({"h2load": h2load, "redis-benchmark": redis_benchmark}[kind](*args)))
