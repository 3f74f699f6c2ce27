#!/usr/bin/env bash
# warden side by side with the Redis recipe it replaces, on this machine, in
# one run (about 4 minutes plus the release build). Starts its own
# redis-server (installing it with apt-get if missing) and its own
# `warden serve --dev`, both on 127.0.0.1, and stops both at the end.
#
#   bash benches/compare.sh            # DURATION=10s CONCURRENCY=64 KEYS=1000 by default
#   bash benches/compare.sh c-loadgen  # only h2load vs redis-benchmark (see c_loadgen below)
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

# shellcheck source=benches/common.sh
source benches/common.sh
need redis-server redis-server
build_release

tmp=$(mktemp -d)
cleanup() {
  stop_and_wait "${warden_pid:-}"
  stop_and_wait "${plain_pid:-}"
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$tmp"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$tmp/redis.pid" --logfile "$tmp/redis.log" >/dev/null
for _ in $(seq 50); do [ -s "$tmp/redis.pid" ] && break; sleep 0.1; done
redis_pid=$(cat "$tmp/redis.pid")

# --- C load generators: h2load vs redis-benchmark --------------------------
# The same kind of client on both sides (both C, both 64 requests in
# flight), so neither pays for a slower load generator: h2load against
# warden's plaintext loopback port (a signed Check with a 1 KiB body,
# dry_run, so every answer runs the whole pipeline), redis-benchmark
# against the Redis recipe as one EVAL (rate limit + nonce, as warden-bench's
# Lua variant). Metrics stay on, as in production (they cost per call too).
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# redis-benchmark's EVAL, for as long as an h2load row: 64 connections with
# a command at a time on each (the issue's measure, and how nginx's
# auth_request asks forward auth), then 4 connections with 16 commands
# pipelined on each, the shape of h2load's 4 connections x 16 streams.
# h2load's streams share their connection's reads and writes, as pipelined
# commands do, while 64 connections cost Redis a read and a write per
# command: against that alone, warden's rows look better than like for
# like (session 58: Redis answered 77,000-87,000/s that way and about
# 200,000 to warden-bench's 4 multiplexed connections).
# Run before the h2load rows and after them: the host's speed drifts within
# a run (session 54: Redis ran twice as fast 26 minutes after its first
# run), so each ratio is given against both, as a range.
redis_benchmark() {  # when: before or after
  local secs=${DURATION%s}
  local shape conns pipeline rate label
  # rate: about what Redis answers each shape on a fast day, so that -n
  # (redis-benchmark runs a count, not a time) lasts about the row's time.
  for shape in "64 1 80000" "4 16 300000"; do
    read -r conns pipeline rate <<<"$shape"
    if [ "$pipeline" = 1 ]; then
      label="redis-benchmark: Redis EVAL (Lua), 64 conns, $1"
    else
      label="redis-benchmark: Redis EVAL (Lua), $conns conns x $pipeline pipelined, $1"
    fi
    echo "== $label" >&2
    local n=$((secs * rate))
    local before after started ended
    flush_redis "$REDIS_PORT"
    before=$(cpu_ticks "$redis_pid")
    started=$(date +%s.%N)
    redis-benchmark -p "$REDIS_PORT" -c "$conns" -P "$pipeline" -n "$n" -r 1000000 --csv \
      EVAL "if redis.call('SET', KEYS[2], '1', 'NX', 'EX', 300) == false then return -1 end local n = redis.call('INCR', KEYS[1]) if n == 1 then redis.call('EXPIRE', KEYS[1], 60) end return n" \
      2 "rl:__rand_int__" "nonce:__rand_int__:__rand_int__" >"$tmp/rb.csv"
    ended=$(date +%s.%N)
    after=$(cpu_ticks "$redis_pid")
    python3 benches/c_loadgen.py redis-benchmark "$label" \
      "$tmp/rb.csv" "$started" "$ended" "$((after - before))" "$(getconf CLK_TCK)" | tee -a "$out/compare.jsonl"
  done
}

c_loadgen() {
  need h2load nghttp2-client
  local secs=${DURATION%s}
  local secret=bench-secret-0123456789abcdefghijklmnopqrstuvwxyz
  printf '%s\n' \
    'listen = "127.0.0.1:0"' \
    'insecure_plaintext = true' \
    '[server]' \
    'metrics_listen = "127.0.0.1:0"' \
    'max_inflight = 100000' \
    '[[policies]]' \
    'name = "bench"' \
    'limit = 1000000000' \
    'period = "1s"' \
    '[[keys]]' \
    'id = "wk_h2load"' \
    'policies = ["bench"]' \
    "secrets = [{ value = \"$secret\" }]" \
    '[forward_auth]' \
    'listen = "127.0.0.1:0"' \
    'identity = "bench.forward-auth"' \
    '[[callers]]' \
    'identity = "bench.forward-auth"' \
    'roles = ["check"]' \
    '[[policies]]' \
    'name = "spent"' \
    'limit = 1' \
    'period = "1h"' \
    '[[keys]]' \
    'id = "wk_forward"' \
    'policies = ["spent"]' \
    "secrets = [{ value = \"$secret\" }]" \
    '[[keys]]' \
    'id = "wk_envoy"' \
    'policies = ["spent"]' \
    "secrets = [{ value = \"$secret\" }]" \
    '[envoy_ratelimit]' \
    "config = [\"$tmp/ratelimit.yaml\"]" > "$tmp/plain.toml"
  # envoyproxy/ratelimit's YAML: limits no benchmark reaches, so every
  # ShouldRateLimit is counted and answered OK.
  printf '%s\n' \
    'domain: bench' \
    'descriptors:' \
    '  - key: remote_address' \
    '    rate_limit: { unit: second, requests_per_unit: 1000000000 }' \
    '  - key: generic_key' \
    '    value: orders' \
    '    rate_limit: { unit: second, requests_per_unit: 1000000000 }' > "$tmp/ratelimit.yaml"
  redis_benchmark before
  target/release/warden serve --config "$tmp/plain.toml" >"$tmp/plain.out" 2>"$tmp/plain.err" &
  plain_pid=$!
  # warden picks the port and says which (a port picked here and released
  # could be taken by someone else before warden binds it).
  local port=""
  for _ in $(seq 100); do
    port=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/plain.out" 2>/dev/null)
    [ -n "$port" ] && break
    sleep 0.1
  done
  local forward_port plain_metrics
  forward_port=$(sed -n 's/^forward auth on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/plain.out" 2>/dev/null)
  plain_metrics=$(sed -n 's/^metrics on \([^ ]*\).*/\1/p' "$tmp/plain.out" 2>/dev/null)
  if [ -z "$port" ] || [ -z "$forward_port" ] || [ -z "$plain_metrics" ]; then
    cat "$tmp/plain.err" >&2
    return 1
  fi
  # Ready once the frame is allowed (past the restart fence).
  local ready=""
  for _ in $(seq 150); do
    if "$bench" frame --key-id wk_h2load --secret "$secret" --check "127.0.0.1:$port" \
        >"$tmp/check.bin" 2>"$tmp/frame.err"; then
      ready=1
      break
    fi
    sleep 0.1
  done
  if [ -z "$ready" ]; then
    cat "$tmp/frame.err" "$tmp/plain.err" >&2
    return 1
  fi
  # Envoy's two calls, each required to get its promised answer first.
  local kind
  for kind in ext-authz rate-limit; do
    if ! "$bench" frame --kind "$kind" --key-id wk_envoy --secret "$secret" \
        --check "127.0.0.1:$port" >"$tmp/$kind.bin" 2>"$tmp/frame.err"; then
      cat "$tmp/frame.err" "$tmp/plain.err" >&2
      return 1
    fi
  done
  # warden's own count of a gateway face's answers, allowed ("true") or
  # not: a gateway run's errors are the answers h2load got that warden did
  # not count as the one the frame promises (h2load sees only HTTP 200).
  answers() {  # face, allowed
    curl -s "http://$plain_metrics/metrics" | awk -v face="face=\"$1\"" -v allowed="allowed=\"$2\"" \
      '/^warden_gateway_answers_total\{/ && index($0, face) && index($0, allowed) {n = $NF} END {print n + 0}'
  }
  # Two runs each: h2load's per-request log (--log-file, where the latency
  # quantiles come from) writes a line per answer from its one loop, which
  # cost it 15 % of its calls on one connection (78k against 93k/s, session
  # 38), while redis-benchmark keeps its histogram in memory. So req/s and
  # server CPU come from a run without the log, the quantiles from a second
  # run with it.
  h2() {  # label, connections, streams per connection, frame, gRPC method[, face, allowed]
    echo "== h2load: $1 (for ${secs}s, then ${secs}s more for its latencies)" >&2
    rm -f "$tmp/h2.log"
    local before after counted=()
    local run=(h2load -D "$secs" -c "$2" -m "$3" -t 1 -d "$tmp/$4"
      -H 'content-type: application/grpc' -H 'te: trailers'
      "http://127.0.0.1:$port/$5")
    [ -n "${6:-}" ] && counted=("$(answers "$6" "$7")")
    before=$(cpu_ticks "$plain_pid")
    "${run[@]}" >"$tmp/h2.out"
    after=$(cpu_ticks "$plain_pid")
    [ -n "${6:-}" ] && counted=("$(($(answers "$6" "$7") - counted[0]))")
    "${run[@]}" --log-file "$tmp/h2.log" >/dev/null
    python3 benches/c_loadgen.py h2load "$1" "$tmp/h2.out" "$tmp/h2.log" "$secs" \
      "$((after - before))" "$(getconf CLK_TCK)" 2xx "${counted[@]}" | tee -a "$out/compare.jsonl"
  }
  h2 "h2load: warden Check, plaintext, 1 conn x 64" 1 64 check.bin warden.v1.Warden/Check
  h2 "h2load: warden Check, plaintext, 4 conns x 16" 4 16 check.bin warden.v1.Warden/Check
  # Envoy's calls, as an Envoy with warden as its ext_authz and rate limit
  # services makes them (one connection from each Envoy worker).
  h2 "h2load: warden ext_authz, plaintext, 1 conn x 64 (429)" 1 64 ext-authz.bin \
    envoy.service.auth.v3.Authorization/Check ext_authz false
  h2 "h2load: warden ext_authz, plaintext, 4 conns x 16 (429)" 4 16 ext-authz.bin \
    envoy.service.auth.v3.Authorization/Check ext_authz false
  h2 "h2load: warden ShouldRateLimit, plaintext, 1 conn x 64" 1 64 rate-limit.bin \
    envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit ratelimit true
  h2 "h2load: warden ShouldRateLimit, plaintext, 4 conns x 16" 4 16 rate-limit.bin \
    envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit ratelimit true

  # Forward auth, as nginx's auth_request asks it: HTTP/1.1, one request at
  # a time on each of 64 kept-alive connections, like redis-benchmark's 64.
  # h2load sends the same request again and again, so it is one that is
  # over its key's limit (the key's one request an hour spent first): every
  # answer verifies the signature, looks the nonce up and decides the
  # limit, and a denied request stores nothing, so it is refused (429) the
  # same way each time instead of as a replay.
  local header auth=() spend=()
  while IFS= read -r header; do spend+=(-H "$header"); done \
    < <(python3 benches/c_loadgen.py sign wk_forward "$secret" GET /orders)
  while IFS= read -r header; do auth+=(-H "$header"); done \
    < <(python3 benches/c_loadgen.py sign wk_forward "$secret" GET /orders)
  local asked=(-H 'X-Original-Method: GET' -H 'X-Original-URI: /orders')
  h2load --h1 -n 1 -c 1 "${spend[@]}" "${asked[@]}" "http://127.0.0.1:$forward_port/auth" >"$tmp/spend.out"
  if ! grep -q "status codes: 1 2xx" "$tmp/spend.out"; then
    echo "the forward-auth endpoint did not allow the first request:" >&2
    cat "$tmp/spend.out" "$tmp/plain.err" >&2
    return 1
  fi
  echo "== h2load: warden forward auth, HTTP/1.1, 64 conns (for ${secs}s, then ${secs}s more for its latencies)" >&2
  rm -f "$tmp/h2.log"
  local before after
  local run=(h2load --h1 -D "$secs" -c 64 -t 1 "${auth[@]}" "${asked[@]}"
    "http://127.0.0.1:$forward_port/auth")
  before=$(cpu_ticks "$plain_pid")
  "${run[@]}" >"$tmp/h2.out"
  after=$(cpu_ticks "$plain_pid")
  "${run[@]}" --log-file "$tmp/h2.log" >/dev/null
  python3 benches/c_loadgen.py h2load "h2load: warden forward auth, HTTP/1.1, 64 conns (429)" \
    "$tmp/h2.out" "$tmp/h2.log" "$secs" "$((after - before))" "$(getconf CLK_TCK)" 4xx \
    | tee -a "$out/compare.jsonl"
  kill "$plain_pid" 2>/dev/null || true
  plain_pid=""

  redis_benchmark after
}

if [ "${1:-}" = "c-loadgen" ]; then
  : > "$out/compare.jsonl"
  c_loadgen
  python3 benches/c_loadgen.py table "$out/compare.jsonl"
  exit 0
fi

step=0
steps=13
run() {  # label, args...
  local label=$1; shift
  step=$((step + 1))
  echo "== [$step/$steps] $label (for $DURATION)" >&2
  "$bench" --dev-dir "$tmp/dev" --redis "127.0.0.1:$REDIS_PORT" --duration "$DURATION" \
    --concurrency "$CONCURRENCY" --keys "$KEYS" --json "$@" | sed "s/^{/{\"label\":\"$label\",/" | tee -a "$out/compare.jsonl"
}

# Redis EVAL before warden's rows and after them, so that each ratio is
# given against both (the host drifts within a run; see redis_benchmark).
# Each warden row has a server of its own, started afresh, with no nonces
# of the rows before it (see restart_dev_warden in common.sh), and each
# Redis row an emptied Redis (flush_redis).
flush_redis "$REDIS_PORT"
run "Redis EVAL (Lua), before"  --backend redis-lua    --server-pid "$redis_pid"
restart_dev_warden "$tmp/dev"
run "warden Check (unary)"      --backend warden --mode unary  --server-pid "$warden_pid"
# The same calls with HTTP/2 spoken directly (benches/lean.rs): about what
# a gateway's own codec costs, where tonic's client takes a core of the two
# the server shares (both on the Rust client's mTLS connection).
restart_dev_warden "$tmp/dev"
run "warden Check (unary, h2 client)" --backend warden --mode unary --client h2 --server-pid "$warden_pid"
restart_dev_warden "$tmp/dev"
run "warden CheckStream"        --backend warden --mode stream --server-pid "$warden_pid"
restart_dev_warden "$tmp/dev"
run "warden CheckStream (h2 client)" --backend warden --mode stream --client h2 --server-pid "$warden_pid"
# The same with requests signed before the run: the generator only sends,
# as a gateway forwarding what its clients signed (ends when all are sent).
restart_dev_warden "$tmp/dev"
run "warden CheckStream (pre-signed)" --backend warden --mode stream --presigned 2000000 --server-pid "$warden_pid"
flush_redis "$REDIS_PORT"
run "Redis recipe (pipelined)"  --backend redis-recipe --server-pid "$redis_pid"
flush_redis "$REDIS_PORT"
run "Redis EVAL (Lua), after"   --backend redis-lua    --server-pid "$redis_pid"
# Latency at half of warden's unary peak, open loop, with each client.
peak_of() {
  grep "\"$1\"" "$out/compare.jsonl" | python3 -c 'import json,sys; print(int(json.loads(sys.stdin.read())["rps"]))'
}
peak=$(peak_of "warden Check (unary)")
restart_dev_warden "$tmp/dev"
run "warden Check at 50% of peak" --backend warden --mode unary --rate $((peak / 2)) --server-pid "$warden_pid"
peak=$(peak_of "warden Check (unary, h2 client)")
restart_dev_warden "$tmp/dev"
run "warden Check at 50% of peak (h2 client)" --backend warden --mode unary --client h2 \
  --rate $((peak / 2)) --server-pid "$warden_pid"
restart_dev_warden "$tmp/dev"
run "warden mixed traffic"      --backend warden --mode unary --mix valid=85,replay=5,bad-signature=5,over-limit=5 --popularity zipf
echo "== [12/13] C load generators" >&2
# The mTLS warden is done: stopped, so its background sweeps of the
# millions of nonces the runs above left do not take CPU from the
# plaintext warden h2load measures.
stop_and_wait "$warden_pid"
warden_pid=""
c_loadgen
echo "== [13/13] memory (a minute or two)" >&2
"$bench" memory --keys "$MEMORY_KEYS" --nonces "$MEMORY_NONCES" --redis "127.0.0.1:$REDIS_PORT" --json \
  | sed 's/^{/{"label":"memory",/' | tee -a "$out/compare.jsonl"

python3 - "$out/compare.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
load = [r for r in rows if r["label"] != "memory" and not r["label"].startswith(("h2load", "redis-benchmark"))]
sys.path.insert(0, "benches")
from c_loadgen import against
bases = [r["rps"] for r in load if r["label"].startswith("Redis EVAL (Lua)")]
print()
print("| workload | req/s | vs Redis EVAL (its runs before and after) | p50 ms | p99 ms | p99.9 ms | errors | server CPU (cores) | generator CPU (cores) |")
print("|---|---|---|---|---|---|---|---|---|")
cores = lambda v: f"{v:.2f}" if v is not None else "–"
for r in load:
    print(f"| {r['label']} | {r['rps']:.0f} | {against(r['rps'], bases)} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
          f"{r['p999_ms']:.3f} | {r['errors']} | {cores(r.get('server_cpu_cores'))} | {cores(r.get('client_cpu_cores'))} |")
# A row with errors measured something else than the server's rate (a
# full nonce memory, an open loop past its bound): say what, under the
# table, rather than let its ratio stand alone.
for r in (r for r in load if r["errors"]):
    print(f"\n{r['label']}: {r['errors']} errors, the first: {r.get('first_error')}")
m = next(r for r in rows if r["label"] == "memory")
print()
print(f"| memory ({m['keys']:,} keys, {m['nonces']:,} nonces) | per rate-limit key | per nonce |")
print("|---|---|---|")
print(f"| warden engine (RSS delta) | {m['warden_bytes_per_key']:.1f} B | {m['warden_bytes_per_nonce']:.1f} B |")
print(f"| Redis (used_memory delta) | {m['redis_bytes_per_key']:.1f} B | {m['redis_bytes_per_nonce']:.1f} B |")
PY

python3 benches/c_loadgen.py table "$out/compare.jsonl"

python3 benches/plot_latency.py "$out/compare.jsonl" "$out/latency.svg"

# How often this machine stopped a busy CPU while nothing else ran: the
# floor under every tail above (see README, session 9).
echo
python3 benches/vcpu_pauses.py --seconds 4
"$bench" host
