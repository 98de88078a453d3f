#!/usr/bin/env bash
# A throwaway PostgreSQL server on a local socket for the distributed-search test (tests/test_search.py), from
# Debian's package. Sourced by .ci/run: exports VITCOMPRESS_TEST_POSTGRES and stops the server on exit. Without the
# package (and no way to install it) the test skips.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$pg_bin" ] && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q postgresql >/dev/null 2>&1 ||
     { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; }) || true
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
fi
if [ -z "$pg_bin" ]; then
  echo "ci: no PostgreSQL server (Debian's postgresql package): the distributed-search test will skip" >&2
  return 0 2>/dev/null || exit 0
fi
pg_dir=$(mktemp -d)
as=()
if [ "$(id -u)" = 0 ]; then  # the server refuses to run as root: Debian's package made a postgres user
  chown postgres "$pg_dir"
  as=(runuser -u postgres --)
fi
"${as[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U vitcompress >/dev/null
"${as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w \
  -o "-k $pg_dir -c listen_addresses='' -c max_connections=50" start >/dev/null
export VITCOMPRESS_TEST_POSTGRES="postgresql+psycopg2://vitcompress@/postgres?host=$pg_dir"
pg_stop() { "${as[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1; rm -rf "$pg_dir"; }
