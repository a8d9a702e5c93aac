# Starts and stops a throwaway PostgreSQL server in a temporary data directory, listening on
# 127.0.0.1 only, with trust authentication for local tests and demos. Source it after
# common.sh. When run as root, the server runs as the postgres user, because initdb and
# postgres refuse to run as root.

TALLY_PG_DIR=""
# The server options of the running server, so that scripts can stop and start it again.
TALLY_PG_OPTIONS=""

# The bin directory of the newest installed PostgreSQL server.
postgres_bin_dir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$dir" ] || [ ! -x "$dir/initdb" ]; then
        echo "error: no PostgreSQL server found under /usr/lib/postgresql; install the postgresql package" >&2
        return 1
    fi
    echo "$dir"
}

# Runs a command as the server's owner.
as_postgres_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# start_throwaway_postgres [server options...]
# Starts the server and exports PGHOST, PGPORT, PGUSER and PGDATABASE for libpq clients.
# Extra arguments are passed to postgres, for example "-c fsync=off".
start_throwaway_postgres() {
    local bin port
    bin=$(postgres_bin_dir) || return 1
    TALLY_PG_DIR=$(mktemp -d /tmp/tally-postgres.XXXXXX)
    chmod 755 "$TALLY_PG_DIR"
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres:postgres "$TALLY_PG_DIR"
    fi
    as_postgres_owner "$bin/initdb" -D "$TALLY_PG_DIR/data" -U postgres --auth=trust \
        --encoding=UTF8 --locale=C >"$TALLY_PG_DIR/initdb.log" 2>&1 || {
        echo "error: initdb failed; see $TALLY_PG_DIR/initdb.log" >&2
        cat "$TALLY_PG_DIR/initdb.log" >&2
        return 1
    }
    port=$(free_port)
    local options="-c listen_addresses=127.0.0.1 -p $port -k $TALLY_PG_DIR"
    if [ "$#" -gt 0 ]; then
        options="$options $*"
    fi
    TALLY_PG_OPTIONS=$options
    as_postgres_owner "$bin/pg_ctl" -D "$TALLY_PG_DIR/data" -l "$TALLY_PG_DIR/server.log" \
        -o "$options" -w -t 60 start >/dev/null || {
        echo "error: PostgreSQL did not start; see $TALLY_PG_DIR/server.log" >&2
        cat "$TALLY_PG_DIR/server.log" >&2
        return 1
    }
    export PGHOST=127.0.0.1 PGPORT="$port" PGUSER=postgres PGDATABASE=postgres
    unset PGPASSWORD PGSERVICE
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port, data in $TALLY_PG_DIR" >&2
}

# Stops the server started by start_throwaway_postgres and removes its directory.
stop_throwaway_postgres() {
    if [ -z "$TALLY_PG_DIR" ] || [ ! -d "$TALLY_PG_DIR" ]; then
        return 0
    fi
    local bin
    bin=$(postgres_bin_dir) || return 1
    as_postgres_owner "$bin/pg_ctl" -D "$TALLY_PG_DIR/data" -m fast -w -t 60 stop >/dev/null 2>&1 ||
        as_postgres_owner "$bin/pg_ctl" -D "$TALLY_PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$TALLY_PG_DIR"
    TALLY_PG_DIR=""
    TALLY_PG_OPTIONS=""
}
