#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster for the catalog tests and print its URL on stdout.
#
#   url=$(bash .ci/services/postgres.sh)   # postgresql+psycopg://postgres@127.0.0.1:PORT/ckptd_test
#   export CKPTD_TEST_POSTGRES_URL=$url
#
# Installs Debian's postgresql if no server binaries are found; initialises a cluster in a
# fresh temporary directory as the `postgres` user (trust auth, listening on 127.0.0.1 only,
# on a free port, fsync off: the data is disposable); waits until it accepts connections;
# creates the database. Everything else goes to stderr. Stop it with the script whose path is
# printed on stderr (`$DIR/stop.sh`), or let the machine go: nothing outside $DIR is touched.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }

find_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then echo "$d"; return 0; fi
  done
  return 1
}

if ! BIN=$(find_bin); then
  log "installing postgresql from Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  BIN=$(find_bin)
fi

# initdb refuses to run as root: the cluster belongs to a `postgres` system user, created when the
# server binaries came without one (an image may ship them without the Debian package's user).
if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
  log "creating the postgres system user"
  group=(--user-group)
  getent group postgres >/dev/null 2>&1 && group=(-g postgres)
  useradd --system "${group[@]}" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin postgres >&2
fi

as_postgres() {
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

DIR=$(mktemp -d "${TMPDIR:-/tmp}/ckptd-pg.XXXXXX")
chmod 755 "$DIR"
[[ $(id -u) -eq 0 ]] && chown postgres:postgres "$DIR"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
DB=${CKPTD_PG_DATABASE:-ckptd_test}

as_postgres "$BIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --no-sync >"$DIR/initdb.log" 2>&1 \
  || { cat "$DIR/initdb.log" >&2; exit 1; }
as_postgres "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
  -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=200" \
  start >&2 || { cat "$DIR/server.log" >&2; exit 1; }

for _ in $(seq 1 100); do
  if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then break; fi
  sleep 0.1
done
"$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" || { log "server did not become ready"; cat "$DIR/server.log" >&2; exit 1; }
"$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB" >&2

cat >"$DIR/stop.sh" <<STOP
#!/usr/bin/env bash
# Stop the throwaway cluster and delete its files.
if [[ \$(id -u) -eq 0 ]]; then runuser -u postgres -- "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop; \
else "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop; fi
rm -rf "$DIR"
STOP
chmod +x "$DIR/stop.sh"
log "PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PORT, data in $DIR; stop with $DIR/stop.sh"
echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB"
