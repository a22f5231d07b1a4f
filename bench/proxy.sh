#!/usr/bin/env bash
# Hangar's reverse proxy against nginx, everything on 127.0.0.1.
#
# HTTP: an nginx upstream serves a small static file; wrk loads (a) the upstream directly,
# (b) nginx proxying to it (HTTP/1.1 keep-alive upstream pool, X-Forwarded-* set), and
# (c) Hangar's proxy (crates/hangar-proxy/examples/proxy_bench.rs) in front of the same upstream
# (wrk's keep-alive GETs take its HTTP/1.1 fast lane; HYPER_LANE=1 also measures hyper's path).
# Beyond the fast lane, each next to nginx in front of the same upstream:
# (d) HTTP/2 cleartext (h2c, prior knowledge) with h2load, nginx `listen ... http2`;
# (e) HTTP/2 over TLS (ALPN h2, a self-signed P-256 certificate) with h2load, nginx `ssl http2`
#     with TLS 1.3 allowed as rustls does (nginx before 1.23.4 offers at most TLS 1.2 by default;
#     both then agree on TLS 1.3, TLS_AES_128_GCM_SHA256 and X25519 with h2load, which prints them);
# (f) HTTP/1.1 `Connection: close` (a new client connection per request) with wrk;
# (g) TCP: bytes pushed to a sink (crates/hangar-proxy/examples/tcp_throughput.rs) directly,
#     through nginx's `stream` proxy and through Hangar's TCP route.
#
# Every pair is measured in turns, ROUNDS times, and the medians are reported, so that load
# from other processes on the machine hits them alike. p50/p99 of h2load come from its
# per-request log.
#
# Usage: bench/proxy.sh        (env: THREADS=2 CONNS=64 DURATION=10s ROUNDS=3 FILE_BYTES=1024
#                               H2_CONNS=16 H2_STREAMS=10 CLOSE_CONNS=16
#                               TCP_MIB=4096 TCP_STREAMS=1 BASE_PORT=18480 CARGO_TARGET_DIR
#                               HYPER_LANE=1 adds a row with the fast lane off: hyper serves all;
#                               ONLY="h1 h2c tls close tcp" picks sections)
# Installs wrk, nginx-light, its stream module (libnginx-mod-stream), h2load (nghttp2-client)
# and openssl with apt-get when missing. Stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS="${THREADS:-2}"
CONNS="${CONNS:-64}"
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-3}"
FILE_BYTES="${FILE_BYTES:-1024}"
TCP_MIB="${TCP_MIB:-4096}"
TCP_STREAMS="${TCP_STREAMS:-1}"
H2_CONNS="${H2_CONNS:-16}"
H2_STREAMS="${H2_STREAMS:-10}"
CLOSE_CONNS="${CLOSE_CONNS:-16}"
ONLY="${ONLY:-h1 h2c tls close tcp}"
BASE_PORT="${BASE_PORT:-18480}"
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
HANGAR_PORT=$((BASE_PORT + 2))
SINK_PORT=$((BASE_PORT + 3))
TCP_PROXY_PORT=$((BASE_PORT + 4))
HYPER_PORT=$((BASE_PORT + 5))
NGINX_H2C_PORT=$((BASE_PORT + 6))
NGINX_TLS_PORT=$((BASE_PORT + 7))
HANGAR_TLS_PORT=$((BASE_PORT + 8))
NGINX_TCP_PORT=$((BASE_PORT + 9))
HYPER_LANE="${HYPER_LANE:-0}"
on() { [[ " $ONLY " == *" $1 "* ]]; }

STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v h2load >/dev/null \
    || ! command -v openssl >/dev/null || [ ! -e "$STREAM_MODULE" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends wrk nginx-light \
        libnginx-mod-stream nghttp2-client openssl
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

nginx_conf() { # name, http block, [main context: modules, stream block]
    mkdir -p "$WORK/$1"
    cat >"$WORK/$1/nginx.conf" <<EOF
${3:-}
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

# The certificate of both TLS listeners: self-signed P-256, PKCS#8 key.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
chmod 644 "$WORK/key.pem"

nginx_conf upstream "server { listen 127.0.0.1:$UP_PORT; location / { root $WORK/www; } }"
PROXY_LOCATION="location / {
        proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\";
        proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Host \$host; proxy_set_header X-Forwarded-Proto \$scheme; }"
nginx_conf proxy "upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; }
    server { listen 127.0.0.1:$NGINX_PORT; $PROXY_LOCATION }
    server { listen 127.0.0.1:$NGINX_H2C_PORT http2; $PROXY_LOCATION }
    server { listen 127.0.0.1:$NGINX_TLS_PORT ssl http2; ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem; ssl_protocols TLSv1.2 TLSv1.3; $PROXY_LOCATION }" \
    "load_module $STREAM_MODULE;
stream { server { listen 127.0.0.1:$NGINX_TCP_PORT; proxy_pass 127.0.0.1:$SINK_PORT; proxy_half_close on; } }"
NGINX_PROXY_MASTER=${PIDS[-1]}
# One Hangar listener serves HTTP/1.1 (fast lane), Connection: close and h2c; another TLS.
"$BIN/proxy_bench" http "127.0.0.1:$HANGAR_PORT" "127.0.0.1:$UP_PORT" >/dev/null &
PIDS+=($!)
HANGAR_PID=$!
"$BIN/proxy_bench" https "127.0.0.1:$HANGAR_TLS_PORT" "127.0.0.1:$UP_PORT" "$WORK/cert.pem" "$WORK/key.pem" >/dev/null &
PIDS+=($!)
HANGAR_TLS_PID=$!
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
for p in $HTTP_PORTS $SINK_PORT $TCP_PROXY_PORT $NGINX_H2C_PORT $NGINX_TLS_PORT $HANGAR_TLS_PORT $NGINX_TCP_PORT; do
    wait_port "$p"
done

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

cpu_per_req() { awk -v t="${CPU[$1]}" -v n="${REQS[$1]}" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }'; }
PROCS[nginx]="$NGINX_PROXY_MASTER $(pgrep -P "$NGINX_PROXY_MASTER" | tr '\n' ' ')"
if on h1; then
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
printf '%-22s %12s %10s %10s %16s\n' "path" "requests/s" "p50 ms" "p99 ms" "proxy CPU us/req"
printf '%-22s %12s %10s %10s %16s\n' "upstream, direct" "${RPS[direct]}" "${P50[direct]}" "${P99[direct]}" "-"
printf '%-22s %12s %10s %10s %16s\n' "nginx proxy" "${RPS[nginx]}" "${P50[nginx]}" "${P99[nginx]}" "$(cpu_per_req nginx)"
printf '%-22s %12s %10s %10s %16s\n' "hangar proxy" "${RPS[hangar]}" "${P50[hangar]}" "${P99[hangar]}" "$(cpu_per_req hangar)"
if [ "$HYPER_LANE" = 1 ]; then
    printf '%-22s %12s %10s %10s %16s\n' "hangar, hyper lane" "${RPS[hyper]}" "${P50[hyper]}" "${P99[hyper]}" "$(cpu_per_req hyper)"
fi
awk -v h="${RPS[hangar]}" -v n="${RPS[nginx]}" -v hp="${P99[hangar]}" -v np="${P99[nginx]}" 'BEGIN {
    printf "hangar/nginx: requests/s %.2fx (goal >= 0.90), p99 %.2fx (goal <= 1.20)\n", h / n, hp / np }'

fi

ratio_line() { # label, hangar rps, nginx rps, hangar p99, nginx p99
    awk -v l="$1" -v h="$2" -v n="$3" -v hp="$4" -v np="$5" 'BEGIN {
        printf "%s hangar/nginx: requests/s %.2fx (goal >= 0.90), p99 %.2fx (goal <= 1.20)\n", l, h / n, hp / np }'
}
row() { printf '%-26s %12s %10s %10s %16s\n' "$@"; }

# h2load: one measurement into the RPS/P50/P99 lists of $1.
run_h2load() { # name url
    local out log c0 c1
    log="$WORK/h2load.log"
    rm -f "$log" # h2load appends
    c0=$(cpu_ticks ${PROCS[$1]})
    out="$(h2load -c "$H2_CONNS" -m "$H2_STREAMS" -t "$THREADS" -D "${DURATION%s}" --log-file="$log" "$2" 2>&1)"
    c1=$(cpu_ticks ${PROCS[$1]})
    if ! grep -q ' 0 failed, 0 errored' <<<"$out" || ! awk '$2 != 200 { exit 1 }' "$log"; then
        echo "$1: errors: $out" >&2
        exit 1
    fi
    CPU[$1]=$((${CPU[$1]:-0} + c1 - c0))
    REQS[$1]=$((${REQS[$1]:-0} + $(wc -l <"$log")))
    RPS[$1]+="$(awk '/^finished in/ { print $4 }' <<<"$out") "
    P50[$1]+="$(cut -f3 "$log" | sort -n | awk '{ v[NR] = $1 } END { printf "%.3f", v[int(NR * 0.50)] / 1000 }') "
    P99[$1]+="$(cut -f3 "$log" | sort -n | awk '{ v[NR] = $1 } END { printf "%.3f", v[int(NR * 0.99)] / 1000 }') "
}

run_close() { # name port: wrk, a new connection for each request
    local out c0 c1
    c0=$(cpu_ticks ${PROCS[$1]})
    out="$(wrk -t"$THREADS" -c"$CLOSE_CONNS" -d"$DURATION" --latency -H 'Connection: close' "http://127.0.0.1:$2/file.txt")"
    c1=$(cpu_ticks ${PROCS[$1]})
    if grep -q 'Non-2xx' <<<"$out"; then echo "$1: errors: $out" >&2; exit 1; fi
    CPU[$1]=$((${CPU[$1]:-0} + c1 - c0))
    REQS[$1]=$((${REQS[$1]:-0} + $(awk '/requests in/ { print $1 }' <<<"$out")))
    RPS[$1]+="$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out") "
    P50[$1]+="$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")") "
    P99[$1]+="$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")") "
}

pair() { # title runner nginx-name nginx-target hangar-name hangar-target
    local title=$1 run=$2 n=$3 nt=$4 h=$5 ht=$6 round
    $run "$n" "$nt" >/dev/null 2>&1 || true # warm-up (also of TLS session set-up paths)
    RPS[$n]="" P50[$n]="" P99[$n]="" RPS[$h]="" P50[$h]="" P99[$h]=""
    for round in $(seq 1 "$ROUNDS"); do
        $run "$n" "$nt"
        $run "$h" "$ht"
        echo "$title round $round: requests/s nginx $(awk '{ print $NF }' <<<"${RPS[$n]}") hangar $(awk '{ print $NF }' <<<"${RPS[$h]}")" >&2
    done
    for k in "$n" "$h"; do
        RPS[$k]="$(tr ' ' '\n' <<<"${RPS[$k]}" | grep . | median)"
        P50[$k]="$(tr ' ' '\n' <<<"${P50[$k]}" | grep . | median)"
        P99[$k]="$(tr ' ' '\n' <<<"${P99[$k]}" | grep . | median)"
    done
}

PROCS[nginx_h2c]="${PROCS[nginx]}" PROCS[hangar_h2c]="$HANGAR_PID"
PROCS[nginx_tls]="${PROCS[nginx]}" PROCS[hangar_tls]="$HANGAR_TLS_PID"
PROCS[nginx_close]="${PROCS[nginx]}" PROCS[hangar_close]="$HANGAR_PID"
BEYOND=()
if on h2c; then
    pair h2c run_h2load nginx_h2c "http://127.0.0.1:$NGINX_H2C_PORT/file.txt" hangar_h2c "http://127.0.0.1:$HANGAR_PORT/file.txt"
    BEYOND+=(h2c)
fi
if on tls; then
    for t in "nginx $NGINX_TLS_PORT" "hangar $HANGAR_TLS_PORT"; do # what each negotiates with h2load
        echo "TLS ${t% *}: $(h2load -n 1 "https://127.0.0.1:${t#* }/file.txt" 2>&1 \
            | awk '/^TLS Protocol|^Cipher|^Server Temp Key|^Application protocol/' | tr '\n' ' ')" >&2
    done
    pair "h2 TLS" run_h2load nginx_tls "https://127.0.0.1:$NGINX_TLS_PORT/file.txt" hangar_tls "https://127.0.0.1:$HANGAR_TLS_PORT/file.txt"
    BEYOND+=(tls)
fi
if on close; then
    pair close run_close nginx_close "$NGINX_PORT" hangar_close "$HANGAR_PORT"
    BEYOND+=(close)
fi
if [ "${#BEYOND[@]}" -gt 0 ]; then
    echo
    echo "Beyond the fast lane: median of $ROUNDS rounds of $DURATION, GET of the same $FILE_BYTES-byte file; HTTP/2 with h2load -c$H2_CONNS -m$H2_STREAMS -t$THREADS, Connection: close with wrk -c$CLOSE_CONNS -t$THREADS"
    row "path" "requests/s" "p50 ms" "p99 ms" "proxy CPU us/req"
    declare -A LABEL=([h2c]="HTTP/2 h2c" [tls]="HTTP/2 TLS" [close]="HTTP/1.1 Connection: close")
    for b in "${BEYOND[@]}"; do
        row "nginx, ${LABEL[$b]}" "${RPS[nginx_$b]}" "${P50[nginx_$b]}" "${P99[nginx_$b]}" "$(cpu_per_req "nginx_$b")"
        row "hangar, ${LABEL[$b]}" "${RPS[hangar_$b]}" "${P50[hangar_$b]}" "${P99[hangar_$b]}" "$(cpu_per_req "hangar_$b")"
    done
    for b in "${BEYOND[@]}"; do
        ratio_line "${LABEL[$b]}:" "${RPS[hangar_$b]}" "${RPS[nginx_$b]}" "${P99[hangar_$b]}" "${P99[nginx_$b]}"
    done
fi

if on tcp; then
    tcp_run() { "$BIN/tcp_throughput" push "127.0.0.1:$1" "$TCP_MIB" "$TCP_STREAMS"; }
    tcp_run "$SINK_PORT" >/dev/null # warm-up
    declare -A TCP_RATE
    for round in $(seq 1 "$ROUNDS"); do
        line="TCP round $round: MiB/s"
        for k in direct nginx hangar; do
            case $k in direct) p=$SINK_PORT ;; nginx) p=$NGINX_TCP_PORT ;; hangar) p=$TCP_PROXY_PORT ;; esac
            read -r _ _ rate < <(tcp_run "$p")
            TCP_RATE[$k]+="$rate "
            line="$line $k $rate"
        done
        echo "$line" >&2
    done
    for k in direct nginx hangar; do TCP_RATE[$k]="$(tr ' ' '\n' <<<"${TCP_RATE[$k]}" | grep . | median)"; done
    echo
    echo "TCP: $TCP_MIB MiB over $TCP_STREAMS connection(s) to a sink that counts the bytes, median of $ROUNDS rounds"
    printf '%-26s %10s\n' "path" "MiB/s"
    printf '%-26s %10s\n' "direct" "${TCP_RATE[direct]}"
    printf '%-26s %10s\n' "nginx stream proxy" "${TCP_RATE[nginx]}"
    printf '%-26s %10s\n' "hangar tcp route" "${TCP_RATE[hangar]}"
    awk -v h="${TCP_RATE[hangar]}" -v n="${TCP_RATE[nginx]}" -v d="${TCP_RATE[direct]}" 'BEGIN {
        printf "TCP hangar/nginx: %.2fx (goal >= 0.90); hangar/direct: %.2fx\n", h / n, h / d }'
fi
