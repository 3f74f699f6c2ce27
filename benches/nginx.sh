#!/usr/bin/env bash
# warden's forward-auth endpoint behind a real nginx (`auth_request`), under
# load, in the configurations the README discusses (about 6 minutes plus the
# release build). Installs nginx and h2load with apt-get if missing; starts
# its own warden and nginx on 127.0.0.1 and stops both.
#
#   bash benches/nginx.sh        # ROUNDS=2 CONNECTIONS=32 REQUESTS=50000 by default
#
# What is timed is the flood case: a client sending a signed request its
# key has no requests left for. warden verifies the signature, finds the
# nonce unused, refuses it at its limit and stores nothing, so h2load can
# send the same request again and again (a request with a fresh nonce each
# time is not something h2load can send). nginx answers the client 429.
#
# Configurations (one row each, alternated, ROUNDS times):
#   recommended   an upstream keeping 64 idle connections (more than the
#                 CONNECTIONS requests in flight), denial_body = false,
#                 auth_request_statuses = true
#   keepalive 16  fewer kept than in flight: past 16, nginx opens a
#                 connection to warden and closes it after its answer
#   with bodies   denial_body = true: nginx closes its connection to warden
#                 after each refusal
#   no keepalive  nginx's default proxy_pass: a connection to warden per request
#   statuses off  auth_request_statuses = false: warden answers 429, which
#                 nginx takes for a failure (an error line, and the client's
#                 connection closed after the answer)
#
# The first, second and fourth again with nginx reaching warden over mTLS
# (certificates made with openssl for the run): past the kept connections,
# every auth request is a TLS handshake.
#
# Prints requests/s and the CPU each process took per request (from
# /proc/PID/stat), and how many error lines nginx wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
CONNECTIONS=${CONNECTIONS:-32}
REQUESTS=${REQUESTS:-50000}

for tool in nginx:nginx h2load:nghttp2-client; do
  if ! command -v "${tool%%:*}" >/dev/null 2>&1 && ! [ -x "/usr/sbin/${tool%%:*}" ]; then
    echo "== installing ${tool#*:}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${tool#*:}" >/dev/null
  fi
done
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

echo "== building (release)" >&2
cargo build -q --release -p warden-server -p warden-benches
target/release/warden-bench host
warden=$PWD/target/release/warden
secret=bench-secret-0123456789abcdefghijklmnopqrstuvwxyz

tmp=$(mktemp -d)
cleanup() {
  kill "${nginx_pid:-}" "${warden_pid:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# For the mTLS rows: a CA, warden's server certificate, and nginx's client
# certificate, whose SPIFFE ID is its caller identity.
certs=$tmp/certs
mkdir -p "$certs"
(
  cd "$certs"
  ec() { openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1-key.pem" "${@:2}" 2>/dev/null; }
  ec ca -x509 -days 2 -subj /CN=bench-ca -out ca.pem
  for who in "server:subjectAltName=DNS:localhost,IP:127.0.0.1" "nginx:subjectAltName=URI:spiffe://bench/nginx"; do
    ec "${who%%:*}" -subj "/CN=${who%%:*}" -out "${who%%:*}.csr"
    openssl x509 -req -in "${who%%:*}.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 2 \
      -extfile <(echo "${who#*:}") -out "${who%%:*}.pem" 2>/dev/null
  done
)

# One configuration: KEEPALIVE (idle connections kept; 0: no upstream
# block) DENIAL_BODY STATUSES [TRANSPORT: plaintext or mtls]; prints a
# table row.
run() {
  local keepalive=$1 denial_body=$2 statuses=$3 transport=${4:-plaintext} d
  d=$(mktemp -d -p "$tmp")
  mkdir -p "$d/logs"
  local mode scheme=http ssl=""
  if [ "$transport" = mtls ]; then
    mode="tls = true"
    scheme=https
    ssl="proxy_ssl_certificate $certs/nginx.pem; proxy_ssl_certificate_key $certs/nginx-key.pem;
      proxy_ssl_trusted_certificate $certs/ca.pem; proxy_ssl_verify on; proxy_ssl_name localhost;
      proxy_ssl_protocols TLSv1.3;"
    cat > "$d/warden.toml" <<TOML
listen = "127.0.0.1:0"
[tls]
cert = "$certs/server.pem"
key = "$certs/server-key.pem"
client_ca = "$certs/ca.pem"
TOML
  else
    mode='identity = "nginx.forward-auth"'
    echo -e 'listen = "127.0.0.1:0"\ninsecure_plaintext = true' > "$d/warden.toml"
  fi
  cat >> "$d/warden.toml" <<TOML
[server]
metrics_listen = "127.0.0.1:0"
[forward_auth]
listen = "127.0.0.1:0"
$mode
client_address_header = "X-Real-IP"
denial_body = $denial_body
auth_request_statuses = $statuses
[[callers]]
identity = "nginx.forward-auth"
roles = ["check"]
[[callers]]
identity = "spiffe://bench/nginx"
roles = ["check"]
[[policies]]
name = "one"
limit = 1
period = "1h"
[[keys]]
id = "wk_forward"
policies = ["one"]
secrets = [{ value = "$secret" }]
TOML
  RUST_LOG=${RUST_LOG:-warn} "$warden" serve --config "$d/warden.toml" > "$d/warden.out" 2> "$d/warden.err" &
  warden_pid=$!
  for _ in $(seq 100); do grep -q "^forward auth on" "$d/warden.out" && break; sleep 0.1; done
  local auth_port app_port port upstream pass status_var error_pages
  auth_port=$(sed -n 's/^forward auth on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$d/warden.out")
  app_port=$(free_port)
  port=$(free_port)
  if [ "$keepalive" != 0 ]; then
    upstream="upstream warden { server 127.0.0.1:$auth_port; keepalive $keepalive; }"
    pass="proxy_pass $scheme://warden/auth; proxy_http_version 1.1; proxy_set_header Connection \"\";"
  else
    upstream=""
    pass="proxy_pass $scheme://127.0.0.1:$auth_port/auth;"
  fi
  if [ "$statuses" = true ]; then
    status_var='$upstream_http_x_warden_status'
    error_pages='403 500'
  else
    status_var='$upstream_status'
    error_pages='500'
  fi
  cat > "$d/nginx.conf" <<NGINX
daemon off; master_process off; worker_processes 1; pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $d/body; proxy_temp_path $d/proxy; fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi; scgi_temp_path $d/scgi;
  $upstream
  server { listen 127.0.0.1:$app_port; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:$port;
    location / {
      auth_request /_warden;
      auth_request_set \$warden_status $status_var;
      auth_request_set \$warden_retry_after \$upstream_http_retry_after;
      error_page $error_pages = @warden_refused;
      proxy_pass http://127.0.0.1:$app_port;
    }
    location = /_warden {
      internal;
      $pass
      $ssl
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-Method \$request_method;
      proxy_set_header X-Original-URI \$request_uri;
      proxy_set_header X-Real-IP \$remote_addr;
    }
    location @warden_refused {
      add_header Retry-After \$warden_retry_after always;
      if (\$warden_status = 429) { return 429 "Too many requests.\n"; }
      if (\$warden_status = 403) { return 403 "Forbidden.\n"; }
      if (\$warden_status = 400) { return 400 "Bad request.\n"; }
      return 503 "Try again later.\n";
    }
  }
}
NGINX
  "$nginx_bin" -p "$d" -c "$d/nginx.conf" 2> "$d/nginx.err" &
  nginx_pid=$!
  # A fresh process refuses requests signed before it started answering
  # (its restart fence, a few seconds): sign the key's one request until it
  # goes through, and the timed one after.
  local sign=() ask=() code=
  for _ in $(seq 100); do
    sign=()
    while IFS= read -r h; do sign+=(-H "$h"); done < <(python3 benches/c_loadgen.py sign wk_forward "$secret" GET /orders)
    code=$(curl -s -o /dev/null -w '%{http_code}' "${sign[@]}" "http://127.0.0.1:$port/orders" || true)
    [ "$code" = 200 ] && break
    sleep 0.2
  done
  [ "$code" = 200 ] || { echo "the key's one request was not let through ($code)" >&2; cat "$d/warden.err" "$d/nginx.err" >&2; exit 1; }
  while IFS= read -r h; do ask+=(-H "$h"); done < <(python3 benches/c_loadgen.py sign wk_forward "$secret" GET /orders)
  local w0 n0 w1 n1 done_ rps
  w0=$(cpu_ticks "$warden_pid"); n0=$(cpu_ticks "$nginx_pid")
  h2load --h1 -n "$REQUESTS" -c "$CONNECTIONS" -t 1 "${ask[@]}" "http://127.0.0.1:$port/orders" > "$d/h2load.out" 2>&1
  w1=$(cpu_ticks "$warden_pid"); n1=$(cpu_ticks "$nginx_pid")
  done_=$(sed -n 's/^status codes: [0-9]* 2xx, [0-9]* 3xx, \([0-9]*\) 4xx.*/\1/p' "$d/h2load.out")
  [ "$done_" = "$REQUESTS" ] || { echo "expected $REQUESTS answers 4xx:" >&2; cat "$d/h2load.out" >&2; exit 1; }
  rps=$(sed -n 's/^finished in .*, \([0-9.]*\) req\/s.*/\1/p' "$d/h2load.out")
  per_request() { awk -v t="$1" -v n="$REQUESTS" 'BEGIN { printf "%.1f", t * 10000 / n }'; }
  printf '| %s | %s | %s | %s | %s | %.0f | %s | %s | %s |\n' "$label" "$transport" "$keepalive" "$denial_body" "$statuses" "$rps" \
    "$(per_request $((w1 - w0)))" "$(per_request $((n1 - n0)))" "$(grep -c '\[error\]' "$d/logs/error.log" || true)"
  kill "$nginx_pid" "$warden_pid"
  wait "$nginx_pid" "$warden_pid" 2>/dev/null || true
  unset nginx_pid warden_pid
}

echo "| configuration | nginx to warden | upstream keepalive | denial_body | auth_request_statuses | requests/s | warden µs/request | nginx µs/request | nginx error lines |"
echo "|---|---|---|---|---|---|---|---|---|"
for _ in $(seq "$ROUNDS"); do
  label=recommended run 64 false true
  label="keepalive 16" run 16 false true
  label="with bodies" run 64 true true
  label="no keepalive" run 0 false true
  label="statuses off" run 64 false false
  label=recommended run 64 false true mtls
  label="keepalive 16" run 16 false true mtls
  label="no keepalive" run 0 false true mtls
done
