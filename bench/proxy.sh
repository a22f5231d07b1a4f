#!/usr/bin/env bash
# Hangar's reverse proxy against nginx, everything on 127.0.0.1.
#
# HTTP: an nginx upstream serves a small static file; wrk loads (a) the upstream directly,
# (b) nginx proxying to it (HTTP/1.1 keep-alive upstream pool, X-Forwarded-* set), and
# (c) Hangar's proxy (crates/hangar-proxy/examples/proxy_bench.rs) in front of the same upstream
# (wrk's keep-alive GETs take its HTTP/1.1 fast lane; HYPER_LANE=1 also measures hyper's path).
# TCP: bytes pushed to a sink directly and through Hangar's TCP route
# (crates/hangar-proxy/examples/tcp_throughput.rs).
#
# The three HTTP paths are measured in turns, ROUNDS times, and the medians are reported, so
# that load from other processes on the machine hits them alike.
#
# Usage: bench/proxy.sh        (env: THREADS=2 CONNS=64 DURATION=10s ROUNDS=3 FILE_BYTES=1024
#                               TCP_MIB=4096 TCP_STREAMS=1 BASE_PORT=18480 CARGO_TARGET_DIR
#                               HYPER_LANE=1 adds a row with the fast lane off: hyper serves all)
# Installs wrk and nginx-light with apt-get when missing. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS="${THREADS:-2}"
CONNS="${CONNS:-64}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-3}"
FILE_BYTES="${FILE_BYTES:-1024}"
TCP_MIB="${TCP_MIB:-4096}"
TCP_STREAMS="${TCP_STREAMS:-1}"
BASE_PORT="${BASE_PORT:-18480}"
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
HANGAR_PORT=$((BASE_PORT + 2))
SINK_PORT=$((BASE_PORT + 3))
TCP_PROXY_PORT=$((BASE_PORT + 4))
HYPER_PORT=$((BASE_PORT + 5))
HYPER_LANE="${HYPER_LANE:-0}"

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk nginx-light
fi

# An existing CARGO_TARGET_DIR is honoured (a separate one keeps the release build off the
# shared target directory's lock).
cargo build --release -p hangar-proxy --example proxy_bench --example tcp_throughput
BIN="${CARGO_TARGET_DIR:-target}/release/examples"

WORK="$(mktemp -d)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    return 1
}

nginx_conf() { # name, server block
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/$1/body;
    proxy_temp_path $WORK/$1/proxy;
    fastcgi_temp_path $WORK/$1/fastcgi;
    uwsgi_temp_path $WORK/$1/uwsgi;
    scgi_temp_path $WORK/$1/scgi;
    keepalive_requests 1000000;
    $2
}
EOF
    nginx -c "$WORK/$1/nginx.conf" -p "$WORK/$1" -g 'daemon off;' &
    PIDS+=($!)
}

mkdir -p "$WORK/www"
head -c "$FILE_BYTES" /dev/zero | tr '\0' 'x' >"$WORK/www/file.txt"
chmod -R a+rX "$WORK/www"

nginx_conf upstream "server { listen 127.0.0.1:$UP_PORT; location / { root $WORK/www; } }"
nginx_conf proxy "upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
    server { listen 127.0.0.1:$NGINX_PORT; location / {
        proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
        proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Host \$host; proxy_set_header X-Forwarded-Proto \$scheme; } }"
NGINX_PROXY_MASTER=${PIDS[-1]}
"$BIN/proxy_bench" http "127.0.0.1:$HANGAR_PORT" "127.0.0.1:$UP_PORT" >/dev/null &
PIDS+=($!)
HANGAR_PID=$!
PATHS="direct nginx hangar"
HTTP_PORTS="$UP_PORT $NGINX_PORT $HANGAR_PORT"
if [ "$HYPER_LANE" = 1 ]; then
    "$BIN/proxy_bench" http-hyper "127.0.0.1:$HYPER_PORT" "127.0.0.1:$UP_PORT" >/dev/null &
    PIDS+=($!)
    HYPER_PID=$!
    PATHS="$PATHS hyper"
    HTTP_PORTS="$HTTP_PORTS $HYPER_PORT"
fi
"$BIN/tcp_throughput" sink "127.0.0.1:$SINK_PORT" >/dev/null &
PIDS+=($!)
"$BIN/proxy_bench" tcp "127.0.0.1:$TCP_PROXY_PORT" "127.0.0.1:$SINK_PORT" >/dev/null &
PIDS+=($!)
for p in $HTTP_PORTS $SINK_PORT $TCP_PROXY_PORT; do wait_port "$p"; done

# Sanity: every path serves the file.
for p in $HTTP_PORTS; do
    got="$(exec 3<>"/dev/tcp/127.0.0.1/$p"; printf 'GET /file.txt HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' >&3; cat <&3)"
    case "$got" in "HTTP/1.1 200"*) ;; *) echo "port $p did not serve the file: ${got:0:200}" >&2; exit 1 ;; esac
done

to_ms() { # wrk latency like 812.00us / 1.23ms / 1.02s -> ms
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

cpu_ticks() { # utime+stime of the given processes, all threads, in clock ticks
    local t=0 p
    for p in "$@"; do t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat"))); done
    echo "$t"
}
declare -A RPS P50 P99 CPU REQS PROCS
PROCS[direct]=""
PROCS[hangar]="$HANGAR_PID"
PROCS[hyper]="${HYPER_PID:-}"
declare -A PORT=([direct]=$UP_PORT [nginx]=$NGINX_PORT [hangar]=$HANGAR_PORT [hyper]=$HYPER_PORT)
run_wrk() { # name port: appends one measurement
    local out c0 c1
    c0=$(cpu_ticks ${PROCS[$1]})
    out="$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$2/file.txt")"
    c1=$(cpu_ticks ${PROCS[$1]})
    CPU[$1]=$((${CPU[$1]:-0} + c1 - c0))
    REQS[$1]=$((${REQS[$1]:-0} + $(awk '/requests in/ { print $1 }' <<<"$out")))
    if grep -q 'Non-2xx' <<<"$out"; then echo "$1: errors: $out" >&2; exit 1; fi
    RPS[$1]+="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out") "
    P50[$1]+="$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")") "
    P99[$1]+="$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")") "
}

PROCS[nginx]="$NGINX_PROXY_MASTER $(pgrep -P "$NGINX_PROXY_MASTER" | tr '\n' ' ')"
for p in $HTTP_PORTS; do
    wrk -t"$THREADS" -c"$CONNS" -d2s "http://127.0.0.1:$p/file.txt" >/dev/null # warm-up
done
for round in $(seq 1 "$ROUNDS"); do
    line="round $round: requests/s"
    for k in $PATHS; do
        run_wrk "$k" "${PORT[$k]}"
        line="$line $k $(awk '{ print $NF }' <<<"${RPS[$k]}")"
    done
    echo "$line" >&2
done
for k in $PATHS; do
    RPS[$k]="$(tr ' ' '\n' <<<"${RPS[$k]}" | grep . | median)"
    P50[$k]="$(tr ' ' '\n' <<<"${P50[$k]}" | grep . | median)"
    P99[$k]="$(tr ' ' '\n' <<<"${P99[$k]}" | grep . | median)"
done

echo
echo "HTTP: wrk -t$THREADS -c$CONNS -d$DURATION --latency, median of $ROUNDS rounds, GET of a $FILE_BYTES-byte static file from nginx ($(nproc) cores)"
cpu_per_req() { awk -v t="${CPU[$1]}" -v n="${REQS[$1]}" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }'; }
printf '%-22s %12s %10s %10s %16s\n' "path" "requests/s" "p50 ms" "p99 ms" "proxy CPU us/req"
printf '%-22s %12s %10s %10s %16s\n' "upstream, direct" "${RPS[direct]}" "${P50[direct]}" "${P99[direct]}" "-"
printf '%-22s %12s %10s %10s %16s\n' "nginx proxy" "${RPS[nginx]}" "${P50[nginx]}" "${P99[nginx]}" "$(cpu_per_req nginx)"
printf '%-22s %12s %10s %10s %16s\n' "hangar proxy" "${RPS[hangar]}" "${P50[hangar]}" "${P99[hangar]}" "$(cpu_per_req hangar)"
if [ "$HYPER_LANE" = 1 ]; then
    printf '%-22s %12s %10s %10s %16s\n' "hangar, hyper lane" "${RPS[hyper]}" "${P50[hyper]}" "${P99[hyper]}" "$(cpu_per_req hyper)"
fi
awk -v h="${RPS[hangar]}" -v n="${RPS[nginx]}" -v hp="${P99[hangar]}" -v np="${P99[nginx]}" 'BEGIN {
    printf "hangar/nginx: requests/s %.2fx (goal >= 0.90), p99 %.2fx (goal <= 1.20)\n", h / n, hp / np }'

tcp_run() { "$BIN/tcp_throughput" push "127.0.0.1:$1" "$TCP_MIB" "$TCP_STREAMS"; }
tcp_run "$SINK_PORT" >/dev/null # warm-up
read -r _ d_s d_rate < <(tcp_run "$SINK_PORT")
read -r _ h_s h_rate < <(tcp_run "$TCP_PROXY_PORT")
echo
echo "TCP: $TCP_MIB MiB over $TCP_STREAMS connection(s) to a sink that counts the bytes"
printf '%-22s %10s %10s\n' "path" "seconds" "MiB/s"
printf '%-22s %10s %10s\n' "direct" "$d_s" "$d_rate"
printf '%-22s %10s %10s\n' "hangar tcp route" "$h_s" "$h_rate"
awk -v h="$h_rate" -v d="$d_rate" 'BEGIN { printf "hangar/direct: %.2fx\n", h / d }'
