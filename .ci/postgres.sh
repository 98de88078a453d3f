#!/usr/bin/env bash
# A throwaway PostgreSQL server on a local socket for the distributed-search test (tests/test_search.py), from
# Debian's package. Sourced by .ci/run (under set -euo pipefail: nothing here may fail the run): exports
# VITCOMPRESS_TEST_POSTGRES and defines pg_stop. Without the package (and no way to install it) the test skips.
pg_find() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true; }
pg_bin=$(pg_find)
if [ -z "$pg_bin" ] && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q postgresql >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; } || true
  pg_bin=$(pg_find)
fi
pg_dir=$(mktemp -d)
pg_as=()
if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then  # the server refuses to run as root
  chown postgres "$pg_dir"
  pg_as=(runuser -u postgres --)
fi
if [ -n "$pg_bin" ] &&
   "${pg_as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U vitcompress >/dev/null 2>&1 &&
   "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
     -o "-k $pg_dir -c listen_addresses='' -c max_connections=50" start >/dev/null 2>&1; then
  export VITCOMPRESS_TEST_POSTGRES="postgresql+psycopg2://vitcompress@/postgres?host=$pg_dir"
  pg_stop() { "${pg_as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$pg_dir"; }
else
  echo "ci: no PostgreSQL server (Debian's postgresql package): the distributed-search test will skip" >&2
  rm -rf "$pg_dir"
fi
