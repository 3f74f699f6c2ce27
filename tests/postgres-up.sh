#!/usr/bin/env bash
# Starts a throwaway PostgreSQL on 127.0.0.1 for the tests and prints the
# `export WARDEN_TEST_POSTGRES_URL=...` and `export WARDEN_TEST_POSTGRES_DIR=...`
# lines to eval. Installs PostgreSQL with apt-get when it is missing and we
# are root. Stop it with: bash tests/postgres-up.sh stop DIR; restart it
# (same data and port) with: bash tests/postgres-up.sh restart DIR
set -euo pipefail

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [ "${1:-}" = restart ]; then
  dir=$2
  pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  # Same data, same port (pg_ctl restart reuses the start's options).
  as_postgres "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/log" -m fast -w restart >/dev/null
  exit 0
fi

if [ "${1:-}" = stop ]; then
  dir=$2
  pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  as_postgres "$pgbin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$pgbin" ] || [ ! -x "$pgbin/initdb" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing postgresql" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  else
    echo "PostgreSQL is not installed (apt-get install postgresql)" >&2
    exit 1
  fi
fi

dir=$(mktemp -d /tmp/warden-pg.XXXXXX)
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres "$dir"
as_postgres "$pgbin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
# TLS on, when WARDEN_PG_TLS_CERT and WARDEN_PG_TLS_KEY name a certificate
# and its key (PEM): copied where the server's user alone can read them.
options=""
if [ -n "${WARDEN_PG_TLS_CERT:-}" ]; then
  cp "$WARDEN_PG_TLS_CERT" "$dir/server.crt"
  cp "$WARDEN_PG_TLS_KEY" "$dir/server.key"
  chmod 600 "$dir/server.crt" "$dir/server.key"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/server.crt" "$dir/server.key"
  options="-c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key"
fi
# Below the kernel's ephemeral range (32768+), where nothing else takes it
# by chance, and below the tests' own ports (see free_port). Several of
# these servers run at once (the suite's, and cluster tests' own), so a
# port another one holds is possible: then another port.
started=""
for _ in 1 2 3 4 5 6 7 8; do
  port=$(( 15000 + RANDOM % 8000 ))
  if as_postgres "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 $options" start >/dev/null; then
    started=1
    break
  fi
done
if [ -z "$started" ]; then
  echo "pg_ctl: could not start PostgreSQL on any of 8 ports; see $dir/log" >&2
  exit 1
fi
echo "export WARDEN_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres"
echo "export WARDEN_TEST_POSTGRES_DIR=$dir"
