#!/usr/bin/env bash
# Instructions the server runs per call, counted by callgrind: a measure
# that does not vary from run to run as wall-clock time does on a shared VM
# (±4 %), so a change worth a few per cent can be seen before it is timed.
#
#   bash benches/instructions.sh            # CALLS=3000; about a minute plus the release build
#
# For each kind of call (warden's `Check`, signed, dry run; the same check
# on `CheckStream`, 64 to a stream; Envoy's ext_authz, the signed POST
# refused 429; forward auth over HTTP/1.1, 64 connections, a signed GET
# refused 429: as in `compare.sh c-loadgen`),
# starts the release server in plaintext mode under
# `valgrind --tool=callgrind --instr-atstart=no`, warms it up with 500 calls
# from h2load (one connection, 64 in flight), switches instrumentation on
# for CALLS more (streams of 64 checks, CALLS checks in all, on `CheckStream`),
# and prints the total divided by CALLS. Denials are not
# logged (`max_denial_log_lines = 0`), so the log's cost at valgrind's slow
# pace does not count. Installs valgrind and h2load (nghttp2-client) with
# apt-get when run as root and missing.
#
# Under valgrind, SHA-256 runs without the CPU's SHA instructions: about
# 72,000 instructions per call of a 1 KiB signed request, in every build.
# Compare builds with each other, not with the wall clock; time what the
# counts show with `compare.sh c-loadgen` (alternated runs, before and after).
#
# SERVER=PATH counts another build of the server (say, an earlier commit's,
# built with its own CARGO_TARGET_DIR) under the same load and generator:
#   SERVER=/tmp/old/release/warden bash benches/instructions.sh
#
# KEEP=DIR keeps each kind's profile as DIR/KIND.callgrind, to read where
# the instructions go: `callgrind_annotate --inclusive=yes DIR/check.callgrind`.
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS=${CALLS:-3000}
SERVER=${SERVER:-target/release/warden}
PER_STREAM=64
# shellcheck source=benches/common.sh
source benches/common.sh
need valgrind valgrind
need h2load nghttp2-client
echo "== building (release)" >&2
cargo build -q --release -p warden-server -p warden-benches
bench=target/release/warden-bench

tmp=$(mktemp -d)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

secret=bench-secret-0123456789abcdefghijklmnopqrstuvwxyz
port=50997
forward_port=50996
cat > "$tmp/plain.toml" <<EOF
listen = "127.0.0.1:$port"
insecure_plaintext = true
[server]
metrics_listen = "off"
max_inflight = 100000
max_denial_log_lines = 0
[forward_auth]
listen = "127.0.0.1:$forward_port"
identity = "bench.forward-auth"
[[callers]]
identity = "bench.forward-auth"
roles = ["check"]
[[policies]]
name = "bench"
limit = 1000000000
period = "1s"
[[policies]]
name = "spent"
limit = 1
period = "1h"
[[keys]]
id = "wk_h2load"
policies = ["bench"]
secrets = [{ value = "$secret" }]
[[keys]]
id = "wk_envoy"
policies = ["spent"]
secrets = [{ value = "$secret" }]
[[keys]]
id = "wk_forward"
policies = ["spent"]
secrets = [{ value = "$secret" }]
EOF

# KIND NAME: instructions per call of one kind of call.
count() {
  local kind=$1 name=$2 frame_args path h2 per_request=1
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$tmp/$kind.out" \
    "$SERVER" serve --config "$tmp/plain.toml" >"$tmp/$kind.log" 2>&1 &
  server_pid=$!
  # Ready once a call gets its promised answer (past the restart fence;
  # valgrind starts the server slowly).
  local ready=""
  case $kind in
    forward-auth)
      # The key's one request an hour spent first; then the same signed
      # GET, refused 429 every time. Each is signed when it is sent: one
      # signed before the server's restart fence opens is STALE.
      local header spend=() auth=() asked=(-H 'X-Original-Method: GET' -H 'X-Original-URI: /orders')
      for _ in $(seq 600); do
        spend=()
        while IFS= read -r header; do spend+=(-H "$header"); done \
          < <(python3 benches/c_loadgen.py sign wk_forward "$secret" GET /orders)
        h2load --h1 -n 1 -c 1 "${spend[@]}" "${asked[@]}" "http://127.0.0.1:$forward_port/auth" \
          >"$tmp/spend.out" 2>&1 || true
        if grep -q "status codes: 1 2xx" "$tmp/spend.out"; then
          ready=1
          break
        fi
        sleep 0.2
      done
      while IFS= read -r header; do auth+=(-H "$header"); done \
        < <(python3 benches/c_loadgen.py sign wk_forward "$secret" GET /orders)
      h2=(h2load --h1 -c 64 -t 1 "${auth[@]}" "${asked[@]}" "http://127.0.0.1:$forward_port/auth")
      ;;
    *)
      if [ "$kind" = check ] || [ "$kind" = stream ]; then
        frame_args=(--key-id wk_h2load)
        path=warden.v1.Warden/Check
      else
        frame_args=(--kind ext-authz --key-id wk_envoy)
        path=envoy.service.auth.v3.Authorization/Check
      fi
      for _ in $(seq 600); do
        if "$bench" frame "${frame_args[@]}" --secret "$secret" --check "127.0.0.1:$port" \
            >"$tmp/$kind.bin" 2>"$tmp/frame.err"; then
          ready=1
          break
        fi
        sleep 0.2
      done
      h2=(h2load -c 1 -m 64 -t 1 -d "$tmp/$kind.bin" -H 'content-type: application/grpc'
        -H 'te: trailers' "http://127.0.0.1:$port/$path")
      if [ "$kind" = stream ]; then
        # One stream a request, 64 checks in it: the same dry-run check
        # (nothing is remembered), as a gateway's stream carries many.
        for _ in $(seq "$PER_STREAM"); do cat "$tmp/$kind.bin"; done >"$tmp/$kind.streamed"
        h2=(h2load -c 1 -m 4 -t 1 -d "$tmp/$kind.streamed" -H 'content-type: application/grpc'
          -H 'te: trailers' "http://127.0.0.1:$port/warden.v1.Warden/CheckStream")
        per_request=$PER_STREAM
      fi
      ;;
  esac
  if [ -z "$ready" ]; then
    cat "$tmp/frame.err" "$tmp/$kind.log" >&2 2>/dev/null || true
    return 1
  fi
  local requests=$((CALLS / per_request))
  "${h2[@]}" -n $((500 / per_request + 1)) >/dev/null
  callgrind_control -i on "$server_pid" >/dev/null 2>&1
  "${h2[@]}" -n "$requests" >"$tmp/$kind.h2"
  callgrind_control -i off "$server_pid" >/dev/null 2>&1
  callgrind_control -d "$server_pid" >/dev/null 2>&1
  kill "$server_pid"
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
  # A stream cut short still succeeds as a request: every check of every
  # stream must have had its answer (an allowed one is 132 bytes).
  local data
  data=$(sed -n 's/.*(\([0-9]*\)) data$/\1/p' "$tmp/$kind.h2")
  if ! grep -q "requests: $requests total, $requests started, $requests done" "$tmp/$kind.h2" ||
    { [ "$kind" = stream ] && [ "${data:-0}" -lt $((requests * per_request * 100)) ]; }; then
    echo "== $name: not every call succeeded" >&2
    cat "$tmp/$kind.h2" >&2
    return 1
  fi
  # The dump made while instrumented is the file's first part.
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp "$tmp/$kind.out.1" "$KEEP/$kind.callgrind"
  fi
  local total
  total=$(callgrind_annotate "$tmp/$kind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen { gsub(",", "", $1); print $1; seen = 1 }')
  echo "| $name | $((total / (requests * per_request))) |"
}

echo "== counting $SERVER" >&2
echo "| call | instructions per call ($CALLS calls) |"
echo "|---|---|"
count check "warden Check (signed, 1 KiB, dry run)"
count stream "warden CheckStream, per check (the same, 64 to a stream)"
count ext-authz "Envoy ext_authz (signed, 1 KiB, refused 429)"
count forward-auth "forward auth, HTTP/1.1 (signed GET, refused 429)"
