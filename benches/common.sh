# What the bench scripts share; sourced.

# Installs the Debian package $2 with apt-get when the command $1 is missing.
need() {
  command -v "$1" >/dev/null 2>&1 && return
  echo "== installing $2" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
}

# Builds what the scripts measure, in release, sets bench (warden-bench's
# path) and prints how fast the host is today: every number moves with it.
build_release() {
  echo "== building (release)" >&2
  cargo build -q --release -p warden-server -p warden-benches
  bench=target/release/warden-bench
  "$bench" host
}

# Starts `warden serve --dev` in $1 (its dev directory) on free loopback
# ports, sets warden_pid and warden_metrics (the metrics listener's
# address), and returns once the server is past its restart fence
# (/readyz), when checks are decided. WARDEN_CPUS=LIST runs it on those
# CPUs only (`taskset -c LIST`). SERVER=PATH runs another build of warden
# (say, an earlier commit's) instead of target/release/warden, as
# instructions.sh does.
start_dev_warden() {
  local dev=$1 log_dir
  local -a pin=()
  [ -n "${WARDEN_CPUS:-}" ] && pin=(taskset -c "$WARDEN_CPUS")
  log_dir=$(dirname "$dev")
  "${pin[@]}" "${SERVER:-target/release/warden}" serve --dev --dev-dir "$dev" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    >"$log_dir/warden.out" 2>"$log_dir/warden.err" &
  warden_pid=$!
  for _ in $(seq 100); do grep -q "^listening on" "$log_dir/warden.out" 2>/dev/null && break; sleep 0.1; done
  warden_metrics=$(sed -n 's/^metrics on \([^ ]*\).*/\1/p' "$log_dir/warden.out")
  echo "== waiting for warden to pass its restart fence" >&2
  python3 - "$warden_metrics" <<'PY'
import sys, time, urllib.request
for _ in range(300):
    try:
        if urllib.request.urlopen(f"http://{sys.argv[1]}/readyz", timeout=1).status == 200:
            break
    except OSError:
        pass
    time.sleep(0.1)
PY
}

# Stops the warden that start_dev_warden started and starts a new one in a
# fresh $1 (new certificates, no keys, no nonces), for a benchmark row
# that must not find the rows before it still held in memory. At a fast
# host's 400,000 checks a second, a few rows of 10 s fill the dev server's
# nonce_capacity (10 million: what 33,000 new nonces a second keep over
# the 305 s window), and every check after that is refused
# ResourceExhausted, as it should be (found in session 58). SIGKILL: the
# old state is thrown away with its directory.
restart_dev_warden() {
  local dev=$1
  if [ -n "${warden_pid:-}" ]; then
    kill -9 "$warden_pid" 2>/dev/null || true
    wait "$warden_pid" 2>/dev/null || true
  fi
  rm -rf "$dev"
  start_dev_warden "$dev"
}

# Empties the Redis on port $1 (FLUSHALL), so that a Redis row, like a
# warden row (restart_dev_warden), starts with none of the nonces and
# counters the rows before it left: millions of them, kept 300 s, and
# Redis's tables grow and rehash as warden's do.
flush_redis() {
  redis-cli -p "$1" flushall >/dev/null
}

# Stops the process $1 this shell started (if any) and waits for it to
# end, so that a directory it writes to can be removed after: warden saves
# its state at a graceful stop, and `rm -rf` of its store while it did
# failed, and a run that had measured everything exited 1 (key_churn.sh,
# session 58).
stop_and_wait() {
  [ -n "${1:-}" ] || return 0
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
