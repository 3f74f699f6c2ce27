#!/usr/bin/env bash
# What administering keys costs a running warden (about 2 minutes plus the
# release build): creating keys one at a time through the admin API up to
# KEYS (rate and latency per batch, which must not grow with the number of
# keys), then how long listing one owner's few keys takes among them, then
# checks at a steady 5,000/s with and without keys being created
# beside them (a key change must not stall the checks); and how long a
# policy change, which rebuilds every key, takes at that size; and the
# server's memory per key, as created and after a restart. Starts its own
# `warden serve --dev` on 127.0.0.1 and stops it at the end.
#
#   bash benches/key_churn.sh          # KEYS=100000 EVERY=20000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
KEYS=${KEYS:-100000}
EVERY=${EVERY:-20000}

# shellcheck source=benches/common.sh
source benches/common.sh
build_release

tmp=$(mktemp -d)
cleanup() {
  stop_and_wait "${warden_pid:-}"
  stop_and_wait "${load_pid:-}"
  rm -rf "$tmp"
}
trap cleanup EXIT

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$warden_pid/status"; }
start_dev_warden "$tmp/dev"
empty_kib=$(rss_kib)
echo "   server RSS with no key: $((empty_kib / 1024)) MiB"

echo "== creating $KEYS keys, one at a time"
"$bench" keys --dev-dir "$tmp/dev" --count "$KEYS" --every "$EVERY" --time-listing
echo "   server RSS: $(( $(rss_kib) / 1024 )) MiB, $(( ($(rss_kib) - empty_kib) * 1024 / KEYS )) B per key"

echo "== a policy change: every key is rebuilt (on a blocking thread)"
target/release/warden policies put --dev-dir "$tmp/dev" churn --limit 100 --period 1m >/dev/null
curl -s "http://$warden_metrics/metrics" | awk '/^warden_key_changes_seconds_sum\{change="all"\}/ {printf "   took %.0f ms\n", $2 * 1000}'

echo "== checks at 5,000/s for 20 s, nothing else running"
"$bench" --dev-dir "$tmp/dev" --mode unary --rate 5000 --duration 20s --keys 10 2>/dev/null | grep -E "^latency"
echo "== the same while 2,000 more keys are created"
"$bench" --dev-dir "$tmp/dev" --mode unary --rate 5000 --duration 20s --keys 10 >"$tmp/load.txt" 2>&1 &
load_pid=$!
sleep 3
"$bench" keys --dev-dir "$tmp/dev" --count 2000 --every 2000
wait "$load_pid"
load_pid=""
grep -E "^latency" "$tmp/load.txt"

echo "== restarted on the same store: memory per key without the churn of creating them"
kill "$warden_pid"
wait "$warden_pid" 2>/dev/null || true
start_dev_warden "$tmp/dev"
echo "   server RSS: $(( $(rss_kib) / 1024 )) MiB, $(( ($(rss_kib) - empty_kib) * 1024 / (KEYS + 2000) )) B per key"
