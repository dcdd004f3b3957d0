#!/usr/bin/env bash
# Run a command with CKPTD_TEST_POSTGRES_URL set, so the postgres-marked tests run instead of skipping:
#
#   bash .ci/services/with-postgres.sh .venv/bin/python -m pytest ...
#
# Uses the caller's CKPTD_TEST_POSTGRES_URL when set (.ci/run starts one); otherwise starts a
# throwaway cluster with postgres.sh when PostgreSQL's server binaries are installed, and stops it
# when the command ends. Without them (and without the variable) the command runs as it is and
# the postgres tests skip, saying why.
set -uo pipefail
here=$(dirname "$0")
if [[ -z "${CKPTD_TEST_POSTGRES_URL:-}" ]] && ls -d /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  log=$(mktemp)
  if url=$(bash "$here/postgres.sh" 2>"$log"); then
    stop=$(grep -o '/[^ ]*/stop.sh' "$log" | tail -1)
    trap '[[ -n "$stop" ]] && bash "$stop" >/dev/null 2>&1; rm -f "$log"' EXIT
    export CKPTD_TEST_POSTGRES_URL="$url"
    echo "with-postgres.sh: PostgreSQL for this run at $url" >&2
  else
    echo "with-postgres.sh: PostgreSQL did not start; the postgres tests will skip:" >&2
    cat "$log" >&2
  fi
fi
"$@"
