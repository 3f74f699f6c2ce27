#!/usr/bin/env bash
# warden as a cluster of 1, 2 and 3 nodes on this machine (all on 127.0.0.1,
# all sharing its cores), and the cost of a forwarded check against a local
# one. Starts its own throwaway PostgreSQL (tests/postgres-up.sh) and its own
# nodes, stops everything at the end. About 2 minutes plus the release build.
#
#   bash benches/cluster.sh        # DURATION=10s CONCURRENCY=64 KEYS=1000 by default
#
# Prints a Markdown table; raw JSON lines go to target/bench/cluster.jsonl.
# "CPU µs/check" is the CPU time of all nodes together per check: on one
# machine the nodes compete for the same cores, so throughput cannot grow
# with nodes here; the CPU cost per check is what a capacity plan needs.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONCURRENCY=${CONCURRENCY:-64}
KEYS=${KEYS:-1000}
out=target/bench
mkdir -p "$out"
: > "$out/cluster.jsonl"

echo "== building (release)" >&2
cargo build -q --release -p warden-server -p warden-benches
warden=target/release/warden
bench=target/release/warden-bench
"$bench" host

eval "$(bash tests/postgres-up.sh)"
tmp=$(mktemp -d)
pids=()
stop_nodes() {
  for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]:-}"; do [ -n "$p" ] && wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_nodes
  bash tests/postgres-up.sh stop "$WARDEN_TEST_POSTGRES_DIR"
  rm -rf "$tmp"
}
trap cleanup EXIT

# Certificates and a master key: those `serve --dev` makes. The dev client
# certificate serves as the benchmark's and as the nodes' peer certificate.
"$warden" serve --dev --dev-dir "$tmp/dev" --listen 127.0.0.1:0 >"$tmp/dev.out" 2>/dev/null &
dev_pid=$!
for _ in $(seq 100); do grep -q "^listening on" "$tmp/dev.out" 2>/dev/null && break; sleep 0.1; done
kill "$dev_pid"; wait "$dev_pid" 2>/dev/null || true

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ready() { python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(600):
    try:
        if urllib.request.urlopen(f"http://{sys.argv[1]}/readyz", timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(1)
PY
}

# start_cluster N: N nodes on a fresh database; sets $addrs (comma-separated).
start_cluster() {
  local n=$1 db="bench_$1_$RANDOM" i
  psql -q "$WARDEN_TEST_POSTGRES_URL" -c "CREATE DATABASE $db" >/dev/null
  local url="${WARDEN_TEST_POSTGRES_URL%/*}/$db"
  addrs="" metrics=()
  for i in $(seq "$n"); do
    local port mport
    port=$(free_port); mport=$(free_port)
    cat >"$tmp/dev/node-$i.toml" <<EOF
listen = "127.0.0.1:$port"

[tls]
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[server]
metrics_listen = "127.0.0.1:$mport"

[[callers]]
identity = "spiffe://warden.dev/client"
roles = ["check", "admin", "forward-identity", "peer"]

[store]
dir = "node-$n-$i"
master_key_file = "master.key"
postgres_url = "$url"

[cluster]
node = "node-$i"
advertise = "127.0.0.1:$port"
cert = "client.pem"
key = "client-key.pem"
EOF
    RUST_LOG=warn "$warden" serve --config "$tmp/dev/node-$i.toml" >/dev/null 2>"$tmp/node-$n-$i.err" &
    pids+=($!)
    addrs="${addrs:+$addrs,}127.0.0.1:$port"
    metrics+=("127.0.0.1:$mport")
  done
  for m in "${metrics[@]}"; do ready "$m" || { echo "a node did not become ready" >&2; cat "$tmp"/node-*.err >&2; exit 1; }; done
}

# run LABEL NODES TARGETS MODE
run() {
  local label=$1 nodes=$2 targets=$3 mode=$4 json pidlist
  pidlist=$(IFS=,; echo "${pids[*]}")
  # The nodes' CPU is measured by the load generator over the load only
  # (not while it creates its keys).
  json=$("$bench" --dev-dir "$tmp/dev" --target "$targets" --mode "$mode" --keys "$KEYS" \
    --concurrency "$CONCURRENCY" --connections 4 --duration "$DURATION" --server-pid "$pidlist" --json)
  python3 - "$label" "$nodes" "$mode" "$json" >>"$out/cluster.jsonl" <<'PY'
import json, sys
label, nodes, mode, report = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
cores = report.get("server_cpu_cores") or 0
report.update(label=label, nodes=nodes, mode=mode, cpu_us_per_check=cores / max(report["rps"], 1) * 1e6)
print(json.dumps(report))
PY
  tail -1 "$out/cluster.jsonl" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("   %s (%s): %.0f/s, p99 %.2f ms, %.1f us CPU/check, errors %d" % (r["label"], r["mode"], r["rps"], r["p99_ms"], r["cpu_us_per_check"], r["errors"]))' >&2
}

for n in 1 2 3; do
  echo "== $n node(s)" >&2
  start_cluster "$n"
  run "$n nodes, client on all" "$n" "$addrs" unary
  run "$n nodes, client on all" "$n" "$addrs" stream
  if [ "$n" = 3 ]; then
    # One node receives everything: two thirds of the checks are forwarded.
    run "3 nodes, client on one" 3 "${addrs%%,*}" unary
  fi
  stop_nodes
done

python3 - "$out/cluster.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| setup | mode | checks/s | p50 ms | p99 ms | CPU µs/check (all nodes) | errors |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['label']} | {r['mode']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us_per_check']:.1f} | {r['errors']} |")
PY
