#!/usr/bin/env bash
# Test services for hangar-blobstore and hangar-image, all on 127.0.0.1:
#   - moto server (S3, PyPI `moto[server]`), bucket "hangar-test"
#   - Azurite (Azure Blob, npm `azurite`), container "hangar-test"
#   - nginx + dav-ext (Debian) as an Artifactory-like generic HTTP store,
#     repository "generic-local", basic auth hangar / hangar-test-pw
#   - PostgreSQL (Debian `postgresql`, initdb + pg_ctl on a scratch folder, no systemd),
#     user postgres / hangar-test-pw (scram), for hangar-store-sql and the binary's tests
#   - MariaDB (Debian `mariadb-server`, mariadb-install-db + mariadbd on a scratch folder),
#     user hangar / hangar-test-pw with every privilege, database "hangar"
#
# Usage: scripts/test-services.sh start|stop|env|status
#   start  install what is missing (idempotent), start the servers, wait until
#          each answers, record PIDs; then print the env lines
#   env    print `export VAR=...` lines for the tests (eval "$(... env)")
#   stop   stop the servers by their recorded PIDs
#
# Overridable: HANGAR_SERVICES_CACHE (installs; default ~/.cache/hangar-test-services),
# HANGAR_SERVICES_STATE (PIDs, data, logs; default /tmp/hangar-test-services),
# HANGAR_S3_PORT (17480), HANGAR_AZURITE_PORT (17481), HANGAR_DAV_PORT (17482),
# HANGAR_POSTGRES_PORT (17483), HANGAR_MYSQL_PORT (17484).
set -euo pipefail

CACHE="${HANGAR_SERVICES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hangar-test-services}"
STATE="${HANGAR_SERVICES_STATE:-/tmp/hangar-test-services}"
S3_PORT="${HANGAR_S3_PORT:-17480}"
AZ_PORT="${HANGAR_AZURITE_PORT:-17481}"
DAV_PORT="${HANGAR_DAV_PORT:-17482}"
PG_PORT="${HANGAR_POSTGRES_PORT:-17483}"
MY_PORT="${HANGAR_MYSQL_PORT:-17484}"
DB_PASSWORD=hangar-test-pw
BUCKET=hangar-test
CONTAINER=hangar-test
DAV_REPO=generic-local
DAV_USER=hangar
DAV_PASSWORD=hangar-test-pw
AZ_ACCOUNT=devstoreaccount1
AZ_KEY='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='

log() { echo "test-services: $*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else die "need root for: $*"; fi
}

install_apt() {
    if command -v nginx >/dev/null && [ -f /usr/lib/nginx/modules/ngx_http_dav_ext_module.so ]; then
        return
    fi
    log "installing nginx + dav-ext (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nginx-light libnginx-mod-http-dav-ext >/dev/null \
      || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nginx libnginx-mod-http-dav-ext >/dev/null
    # Debian's packaging may start a system nginx on :80; we run our own.
}

# The database servers come from Debian's packages; their postinst scripts start nothing
# here (no systemd), so start_postgres and start_mariadb run private instances.
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

install_databases() {
    local bin
    bin=$(pg_bin)
    if [ -n "$bin" ] && [ -x "$bin/initdb" ] && command -v mariadbd >/dev/null && command -v mariadb-install-db >/dev/null; then
        return
    fi
    log "installing postgresql and mariadb-server (apt)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql mariadb-server >/dev/null
}

# run_pg CMD...: PostgreSQL's tools refuse to run as root; run them as `postgres` then.
run_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_postgres() {
    local bin dir="$STATE/postgres" deadline
    bin=$(pg_bin)
    if [ -f "$dir/data/postmaster.pid" ] && kill -0 "$(head -n 1 "$dir/data/postmaster.pid")" 2>/dev/null; then
        log "postgres already running"; return
    fi
    rm -rf "$dir"
    mkdir -p "$dir/sock"
    printf '%s\n' "$DB_PASSWORD" >"$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; fi
    run_pg "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$STATE/postgres-initdb.log" 2>&1 \
        || { tail -n 30 "$STATE/postgres-initdb.log" >&2; die "initdb failed"; }
    run_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 60 \
        -o "-p $PG_PORT -k $dir/sock -c listen_addresses=127.0.0.1 -c max_connections=400" start >/dev/null \
        || { tail -n 30 "$dir/log" >&2; die "postgres did not start"; }
    head -n 1 "$dir/data/postmaster.pid" >"$STATE/postgres.pid"
    deadline=$((SECONDS + 60))
    until "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; do
        [ $SECONDS -lt $deadline ] || { tail -n 30 "$dir/log" >&2; die "postgres did not answer on :$PG_PORT"; }
        sleep 0.1
    done
    log "postgres answers on 127.0.0.1:$PG_PORT"
}

stop_postgres() {
    local bin dir="$STATE/postgres"
    bin=$(pg_bin)
    if [ -n "$bin" ] && [ -f "$dir/data/postmaster.pid" ]; then
        run_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || stop_one postgres
        log "stopped postgres"
    fi
    rm -f "$STATE/postgres.pid"
    rm -rf "$dir"
}

start_mariadb() {
    local dir="$STATE/mariadb" deadline
    if pid_alive "$STATE/mariadb.pid"; then log "mariadb already running"; return; fi
    rm -rf "$dir"
    mkdir -p "$dir/data" "$dir/run"
    local as=(--user="$(id -un)")
    mariadb-install-db --no-defaults "${as[@]}" --datadir="$dir/data" --auth-root-authentication-method=normal \
        --skip-test-db >"$STATE/mariadb-install.log" 2>&1 \
        || { tail -n 30 "$STATE/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
    setsid mariadbd --no-defaults "${as[@]}" --datadir="$dir/data" --socket="$dir/run/mysqld.sock" \
        --pid-file="$dir/run/mysqld.pid" --port="$MY_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --max-connections=500 --innodb-flush-log-at-trx-commit=1 \
        >"$STATE/mariadb.log" 2>&1 </dev/null &
    echo $! >"$STATE/mariadb.pid"
    deadline=$((SECONDS + 60))
    until mariadb-admin --no-defaults --socket="$dir/run/mysqld.sock" -uroot ping >/dev/null 2>&1; do
        pid_alive "$STATE/mariadb.pid" || { tail -n 30 "$STATE/mariadb.log" >&2; die "mariadbd exited"; }
        [ $SECONDS -lt $deadline ] || { tail -n 30 "$STATE/mariadb.log" >&2; die "mariadb did not answer"; }
        sleep 0.1
    done
    mariadb --no-defaults --socket="$dir/run/mysqld.sock" -uroot -e \
        "CREATE DATABASE IF NOT EXISTS hangar CHARACTER SET utf8mb4;
         CREATE USER IF NOT EXISTS 'hangar'@'127.0.0.1' IDENTIFIED BY '$DB_PASSWORD';
         GRANT ALL ON *.* TO 'hangar'@'127.0.0.1'; FLUSH PRIVILEGES;" \
        || die "cannot create the mariadb test user"
    log "mariadb answers on 127.0.0.1:$MY_PORT"
}

install_pip() {
    if [ -x "$CACHE/venv/bin/moto_server" ] && "$CACHE/venv/bin/python" -c 'import azure.storage.blob' 2>/dev/null; then
        return
    fi
    log "installing moto[server] and azure-storage-blob into $CACHE/venv (pip)"
    mkdir -p "$CACHE"
    python3 -m venv "$CACHE/venv"
    "$CACHE/venv/bin/pip" install -q --disable-pip-version-check 'moto[server]' azure-storage-blob
}

install_npm() {
    if [ -f "$CACHE/npm/node_modules/azurite/package.json" ]; then
        return
    fi
    log "installing azurite into $CACHE/npm (npm)"
    mkdir -p "$CACHE/npm"
    npm install --silent --no-audit --no-fund --prefix "$CACHE/npm" azurite >/dev/null
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_http NAME URL PIDFILE: poll until the server answers any HTTP status.
wait_http() {
    local name=$1 url=$2 pidfile=$3 deadline=$((SECONDS + 60)) code
    while [ $SECONDS -lt $deadline ]; do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" || true)
        if [ -n "$code" ] && [ "$code" != 000 ]; then
            log "$name answers on $url (HTTP $code)"
            return 0
        fi
        if ! pid_alive "$pidfile"; then
            log "$name exited; its log:"; tail -n 30 "$STATE/$name.log" >&2 || true
            die "$name did not start"
        fi
        sleep 0.2
    done
    tail -n 30 "$STATE/$name.log" >&2 || true
    die "$name did not answer on $url within 60 s"
}

start_moto() {
    if pid_alive "$STATE/moto.pid"; then log "moto already running"; return; fi
    setsid "$CACHE/venv/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" >"$STATE/moto.log" 2>&1 </dev/null &
    echo $! >"$STATE/moto.pid"
    wait_http moto "http://127.0.0.1:$S3_PORT/" "$STATE/moto.pid"
    # moto does not check signatures: an unsigned PUT creates the bucket.
    curl -sf -X PUT "http://127.0.0.1:$S3_PORT/$BUCKET" -o /dev/null || die "cannot create bucket $BUCKET"
}

start_azurite() {
    if pid_alive "$STATE/azurite.pid"; then log "azurite already running"; return; fi
    mkdir -p "$STATE/azurite" "$STATE/azurite-tmp"
    TMPDIR="$STATE/azurite-tmp" setsid node "$CACHE/npm/node_modules/azurite/dist/src/blob/main.js" \
        --blobHost 127.0.0.1 --blobPort "$AZ_PORT" --location "$STATE/azurite" \
        --skipApiVersionCheck --loose --disableTelemetry \
        >"$STATE/azurite.log" 2>&1 </dev/null &
    echo $! >"$STATE/azurite.pid"
    wait_http azurite "http://127.0.0.1:$AZ_PORT/" "$STATE/azurite.pid"
    AZ_PORT="$AZ_PORT" AZ_KEY="$AZ_KEY" CONTAINER="$CONTAINER" "$CACHE/venv/bin/python" - <<'PY'
import os
from azure.storage.blob import BlobServiceClient
from azure.core.exceptions import ResourceExistsError
cs = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=%s;"
      "BlobEndpoint=http://127.0.0.1:%s/devstoreaccount1;" % (os.environ["AZ_KEY"], os.environ["AZ_PORT"]))
try:
    BlobServiceClient.from_connection_string(cs).create_container(os.environ["CONTAINER"])
except ResourceExistsError:
    pass
PY
}

start_nginx() {
    if pid_alive "$STATE/nginx.pid"; then log "nginx already running"; return; fi
    local root="$STATE/dav-root" tmp="$STATE/dav-tmp"
    mkdir -p "$root/$DAV_REPO" "$tmp" "$STATE/nginx-logs"
    if [ "$(id -u)" = 0 ]; then chown -R nobody "$root" "$tmp"; fi
    printf '%s:{PLAIN}%s\n' "$DAV_USER" "$DAV_PASSWORD" >"$STATE/htpasswd"
    chmod 644 "$STATE/htpasswd"
    cat >"$STATE/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_http_dav_ext_module.so;
daemon off;
worker_processes 2;
pid $STATE/nginx-master.pid;
error_log $STATE/nginx-logs/error.log warn;
events { worker_connections 512; }
http {
    access_log off;
    client_body_temp_path $tmp;
    proxy_temp_path $tmp;
    fastcgi_temp_path $tmp;
    uwsgi_temp_path $tmp;
    scgi_temp_path $tmp;
    client_max_body_size 0;
    server {
        listen 127.0.0.1:$DAV_PORT;
        root $root;
        auth_basic "hangar-test";
        auth_basic_user_file $STATE/htpasswd;
        location / {
            dav_methods PUT DELETE MKCOL COPY MOVE;
            dav_ext_methods PROPFIND OPTIONS;
            create_full_put_path on;
            dav_access user:rw group:rw all:r;
            autoindex off;
        }
    }
}
EOF
    setsid nginx -c "$STATE/nginx.conf" -p "$STATE" >"$STATE/nginx.log" 2>&1 </dev/null &
    echo $! >"$STATE/nginx.pid"
    wait_http nginx "http://127.0.0.1:$DAV_PORT/" "$STATE/nginx.pid"
}

print_env() {
    cat <<EOF
export HANGAR_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export HANGAR_TEST_S3_BUCKET=$BUCKET
export HANGAR_TEST_AZURITE_ENDPOINT=http://127.0.0.1:$AZ_PORT/$AZ_ACCOUNT
export HANGAR_TEST_AZURITE_CONTAINER=$CONTAINER
export HANGAR_TEST_ARTIFACTORY_URL=http://127.0.0.1:$DAV_PORT
export HANGAR_TEST_ARTIFACTORY_REPO=$DAV_REPO
export HANGAR_TEST_ARTIFACTORY_USER=$DAV_USER
export HANGAR_TEST_ARTIFACTORY_PASSWORD=$DAV_PASSWORD
export HANGAR_TEST_POSTGRES_URL=postgres://postgres:$DB_PASSWORD@127.0.0.1:$PG_PORT/postgres
export HANGAR_TEST_MYSQL_URL=mysql://hangar:$DB_PASSWORD@127.0.0.1:$MY_PORT/hangar
EOF
}

stop_one() {
    local name=$1 pidfile="$STATE/$1.pid" pid deadline
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 15))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

case "${1:-}" in
    start)
        mkdir -p "$STATE"
        install_apt
        install_pip
        install_npm
        install_databases
        start_postgres
        start_mariadb
        start_moto
        start_azurite
        start_nginx
        print_env
        ;;
    stop)
        stop_one nginx
        stop_one azurite
        stop_one moto
        stop_one mariadb
        stop_postgres
        rm -rf "$STATE/mariadb"
        rm -rf "$STATE/dav-root" "$STATE/dav-tmp" "$STATE/azurite" "$STATE/azurite-tmp"
        ;;
    env)
        print_env
        ;;
    status)
        for s in moto azurite nginx postgres mariadb; do
            if pid_alive "$STATE/$s.pid"; then echo "$s: running (pid $(cat "$STATE/$s.pid"))"; else echo "$s: stopped"; fi
        done
        ;;
    *)
        echo "usage: $0 start|stop|env|status" >&2
        exit 2
        ;;
esac
