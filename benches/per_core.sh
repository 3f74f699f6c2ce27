#!/usr/bin/env bash
# Each server on a core of its own, the load generator on the other: what a
# core of the server answers, warden's against Redis's.
#
#   bash benches/per_core.sh            # ROUNDS=2 DURATION=10s: about 2 minutes plus the release build
#
# Why: in compare.sh the generator and the server share this machine's two
# cores, so every microsecond the generator spends is one the server does
# not get, and warden (which serves on every core it has) never has both.
# Redis runs its commands on one thread: one core is all of it that counts.
# Here the server (Redis, then warden) runs on CPU 0 alone (`taskset`) and
# warden-bench on CPU 1 alone, so each server's rate is what one core of it
# answers while its generator runs elsewhere. The same keys, requests in
# flight and connections as compare.sh; the variants alternate, ROUNDS
# times, and each is compared with Redis's run of the same round.
#
# warden's rows use `--client h2`. With tonic's client the generator's one
# core runs out before the server's (session 56: 32-37 µs of the
# generator's CPU per unary call against 29-33 of the server's, which was
# busy 0.85 of the time), and the row would measure the generator.
#
# The last column is arithmetic, not a measurement: warden's rate on one
# core, times two, against Redis on its one. This machine cannot show
# whether two cores of warden's answer twice what one does; the CPU per
# call on one connection (one serving thread) and on four (both) is about
# the same in compare.sh's C load generator table.
#
# Prints a Markdown table; the raw JSON lines go to target/bench/per_core.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
REDIS_PORT=${REDIS_PORT:-6398}
PRESIGNED=${PRESIGNED:-1500000}  # ~1.3 KB each; on a fast day (400k/s) they last 4 s, and the rate is over the time they ran
if [ "$(nproc --all)" -lt 2 ]; then
  echo "per_core.sh needs two CPUs: one for the server, one for the generator" >&2
  exit 1
fi
# shellcheck source=benches/common.sh
source benches/common.sh
need redis-server redis-server
build_release
out=target/bench
mkdir -p "$out"
: > "$out/per_core.jsonl"

tmp=$(mktemp -d)
cleanup() {
  stop_and_wait "${warden_pid:-}"
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

taskset -c 0 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$tmp/redis.pid" --logfile "$tmp/redis.log" >/dev/null
for _ in $(seq 50); do [ -s "$tmp/redis.pid" ] && break; sleep 0.1; done
redis_pid=$(cat "$tmp/redis.pid")

run() {  # label, args...
  local label=$1; shift
  echo "== $label (round $round of $ROUNDS, for $DURATION)" >&2
  taskset -c 1 "$bench" --dev-dir "$tmp/dev" --redis "127.0.0.1:$REDIS_PORT" --duration "$DURATION" \
    --concurrency 64 --keys 1000 --json "$@" | sed "s/^{/{\"label\":\"$label\",/" >>"$out/per_core.jsonl"
}
# Each warden row has a server of its own, started afresh on CPU 0, with
# no nonces of the rows before it (see restart_dev_warden in common.sh),
# and each Redis row an emptied Redis (flush_redis).
export WARDEN_CPUS=0
for round in $(seq "$ROUNDS"); do
  flush_redis "$REDIS_PORT"
  run "Redis EVAL (Lua)"                 --backend redis-lua --server-pid "$redis_pid"
  restart_dev_warden "$tmp/dev"
  run "warden Check (unary)"             --backend warden --mode unary --client h2 --server-pid "$warden_pid"
  restart_dev_warden "$tmp/dev"
  run "warden CheckStream"               --backend warden --mode stream --client h2 --server-pid "$warden_pid"
  restart_dev_warden "$tmp/dev"
  run "warden CheckStream (pre-signed)"  --backend warden --mode stream --client h2 \
    --presigned "$PRESIGNED" --server-pid "$warden_pid"
done
"$bench" host

python3 - "$out/per_core.jsonl" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["errors"]:
        sys.exit(f"{d['label']}: {d['errors']} errors, first: {d['first_error']}")
    if not d["requests"]:
        sys.exit(f"{d['label']}: no request answered in {d['seconds']:.3f} s")
    rows.setdefault(d["label"], []).append(d)
redis = [d["rps"] for d in rows["Redis EVAL (Lua)"]]
def span(values, fmt):
    a, b = fmt.format(min(values)), fmt.format(max(values))
    return a if a == b else f"{a}–{b}"
print()
print("| server on CPU 0 alone, generator on CPU 1 | req/s (each round) | server cores | server µs per call | generator µs per call | vs Redis, a core each | two cores of warden's against Redis's one (arithmetic) |")
print("|---|---|---|---|---|---|---|")
def cores(d):
    return f"{d['server_cpu_cores']:.2f}"
for label, runs in rows.items():
    rps = [d["rps"] for d in runs]
    if label == "Redis EVAL (Lua)":
        ratio = twice = "–"
    else:
        # Each round against Redis's run of the same round, minutes apart
        # at most: the host's speed drifts (see compare.sh).
        each = [w / r for w, r in zip(rps, redis)]
        ratio = span(each, "{:.2f}") + "x"
        twice = span([2 * x for x in each], "{:.2f}") + "x"
    print(f"| {label} | {', '.join(f'{r:,.0f}' for r in rps)} "
          f"| {', '.join(cores(d) for d in runs)} "
          f"| {span([d['server_cpu_cores'] * 1e6 / d['rps'] for d in runs], '{:.1f}')} "
          f"| {span([d['client_cpu_cores'] * 1e6 / d['rps'] for d in runs], '{:.1f}')} "
          f"| {ratio} | {twice} |")
# A row whose server had time to spare measured its generator, not the
# server: say so rather than let its ratio stand for the server's.
idle = sorted({d["label"] for runs in rows.values() for d in runs if d["server_cpu_cores"] < 0.85})
if idle:
    print(f"\nthe generator's measure, not the server's (the server busy under 0.85 of its core): {'; '.join(idle)}")
PY
