#!/usr/bin/env bash
# warden side by side with the Redis recipe it replaces, on this machine, in
# one run (about 3 minutes plus the release build). Starts its own
# redis-server (installing it with apt-get if missing) and its own
# `warden serve --dev`, both on 127.0.0.1, and stops both at the end.
#
#   bash benches/compare.sh            # DURATION=10s CONCURRENCY=64 KEYS=1000 by default
#
# Prints a Markdown table (ratios against the Redis EVAL variant), writes the
# raw JSON lines to target/bench/compare.jsonl and the latency curves to
# target/bench/latency.svg (copy it to benches/results/ for the README).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
KEYS=${KEYS:-1000}
REDIS_PORT=${REDIS_PORT:-6399}
MEMORY_KEYS=${MEMORY_KEYS:-1000000}
MEMORY_NONCES=${MEMORY_NONCES:-10000000}
out=target/bench
mkdir -p "$out"
: > "$out/compare.jsonl"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "== installing redis-server"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi

echo "== building (release)"
cargo build -q --release -p warden-server -p warden-benches
bench=target/release/warden-bench

tmp=$(mktemp -d)
cleanup() {
  [ -n "${warden_pid:-}" ] && kill "$warden_pid" 2>/dev/null || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$tmp/redis.pid" --logfile "$tmp/redis.log" >/dev/null
target/release/warden serve --dev --dev-dir "$tmp/dev" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  >"$tmp/warden.out" 2>"$tmp/warden.err" &
warden_pid=$!
for _ in $(seq 100); do grep -q "^listening on" "$tmp/warden.out" 2>/dev/null && break; sleep 0.1; done
# Ready once past the restart fence (start + future_skew + 1 s).
metrics=$(sed -n 's/^metrics on \([^ ]*\).*/\1/p' "$tmp/warden.out")
echo "== waiting for warden to pass its restart fence" >&2
python3 - "$metrics" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        if urllib.request.urlopen(f"http://{sys.argv[1]}/readyz", timeout=1).status == 200:
            break
    except OSError:
        pass
    time.sleep(0.1)
PY
for _ in $(seq 50); do [ -s "$tmp/redis.pid" ] && break; sleep 0.1; done
redis_pid=$(cat "$tmp/redis.pid")

step=0
steps=7
run() {  # label, args...
  local label=$1; shift
  step=$((step + 1))
  echo "== [$step/$steps] $label (for $DURATION)" >&2
  "$bench" --dev-dir "$tmp/dev" --redis "127.0.0.1:$REDIS_PORT" --duration "$DURATION" \
    --concurrency "$CONCURRENCY" --keys "$KEYS" --json "$@" | sed "s/^{/{\"label\":\"$label\",/" | tee -a "$out/compare.jsonl"
}

run "warden Check (unary)"      --backend warden --mode unary  --server-pid "$warden_pid"
run "warden CheckStream"        --backend warden --mode stream --server-pid "$warden_pid"
run "Redis recipe (pipelined)"  --backend redis-recipe --server-pid "$redis_pid"
run "Redis EVAL (Lua)"          --backend redis-lua    --server-pid "$redis_pid"
# Latency at half of warden's unary peak, open loop.
peak=$(grep '"warden Check (unary)"' "$out/compare.jsonl" | python3 -c 'import json,sys; print(int(json.loads(sys.stdin.read())["rps"]))')
run "warden Check at 50% of peak" --backend warden --mode unary --rate $((peak / 2)) --server-pid "$warden_pid"
run "warden mixed traffic"      --backend warden --mode unary --mix valid=85,replay=5,bad-signature=5,over-limit=5 --popularity zipf
echo "== [7/7] memory (a minute or two)" >&2
"$bench" memory --keys "$MEMORY_KEYS" --nonces "$MEMORY_NONCES" --redis "127.0.0.1:$REDIS_PORT" --json \
  | sed 's/^{/{"label":"memory",/' | tee -a "$out/compare.jsonl"

python3 - "$out/compare.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
load = [r for r in rows if r["label"] != "memory"]
base = next(r for r in load if r["label"] == "Redis EVAL (Lua)")["rps"]
print()
print("| workload | req/s | vs Redis EVAL | p50 ms | p99 ms | p99.9 ms | errors | server CPU (cores) |")
print("|---|---|---|---|---|---|---|---|")
for r in load:
    cpu = r.get("server_cpu_cores")
    print(f"| {r['label']} | {r['rps']:.0f} | {r['rps'] / base:.2f}x | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
          f"{r['p999_ms']:.3f} | {r['errors']} | {cpu:.2f} |" if cpu is not None else
          f"| {r['label']} | {r['rps']:.0f} | {r['rps'] / base:.2f}x | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
          f"{r['p999_ms']:.3f} | {r['errors']} | – |")
m = next(r for r in rows if r["label"] == "memory")
print()
print(f"| memory ({m['keys']:,} keys, {m['nonces']:,} nonces) | per rate-limit key | per nonce |")
print("|---|---|---|")
print(f"| warden engine (RSS delta) | {m['warden_bytes_per_key']:.1f} B | {m['warden_bytes_per_nonce']:.1f} B |")
print(f"| Redis (used_memory delta) | {m['redis_bytes_per_key']:.1f} B | {m['redis_bytes_per_nonce']:.1f} B |")
PY

python3 benches/plot_latency.py "$out/compare.jsonl" "$out/latency.svg"
