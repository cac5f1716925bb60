#!/usr/bin/env bash
# tests/bench.sh BUILD_DIR: the standard benchmark workloads (make bench).
#
# Starts a fresh protoqd (BUILD_DIR/protoqd) on 127.0.0.1, port 0, in a
# mktemp dir, runs BUILD_DIR/protoq-bench through these workloads, and prints
# a table:
#   W1  durable,   1 producer, 1 consumer, 100,000 x 1 KiB, inflight 1000, prefetch 1000
#   W1t W1 over TLS (tls_listen; a throwaway CA and certificate made with
#       the openssl CLI in the temp dir; TLS 1.3, hostname verified)
#   W2  the same, transient queue
#   W3  durable,   4 producers, 4 consumers, 100,000 x 1 KiB
#   W4  durable,   fixed rate 2000 msgs/s for 5 s (latency at a modest load)
#   W5  backlog:   1,000,000 x 1 KiB published with no consumer; protoqd's
#                  peak RSS; restart (SIGTERM, start on the same data dir)
#                  until the first message is delivered again; then drain.
# BENCH_METRICS=1 turns the broker's /metrics on (127.0.0.1, port 0) and
# scrapes it once a second during the runs (curl), to see what it costs.
# Each run checks exactly-once delivery; the script exits 1 if any run lost
# or duplicated a message or failed. It kills only the protoqd it started
# (by pid) and removes its temp dir on exit. Bounded: well under 5 minutes
# on a 2-core machine.
set -u

BUILD=${1:-build}
PROTOQD=$BUILD/protoqd
BENCH=$BUILD/protoq-bench
PROTOQ=$BUILD/protoq
for bin in "$PROTOQD" "$BENCH" "$PROTOQ"; do
    if [ ! -x "$bin" ]; then
        echo "bench.sh: $bin not found (run make first)" >&2
        exit 1
    fi
done

TMP=$(mktemp -d /tmp/protoq-bench.XXXXXX) || exit 1
PID=
ADDR=
TLS_ADDR=
FAILED=0
ROWS=()

cleanup() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null
        for _ in $(seq 1 100); do
            kill -0 "$PID" 2>/dev/null || break
            sleep 0.05
        done
        kill -KILL "$PID" 2>/dev/null
        wait "$PID" 2>/dev/null
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_ms() { date +%s%3N; }

# make_tls: a CA and a certificate for 127.0.0.1 in $TMP (for W1t).
make_tls() {
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
    openssl req -x509 "${ec[@]}" -keyout "$TMP/ca.key" -out "$TMP/ca.pem" \
        -days 1 -subj "/CN=bench CA" &&
    openssl req "${ec[@]}" -keyout "$TMP/srv.key" -out "$TMP/srv.csr" \
        -subj "/CN=127.0.0.1" &&
    printf 'subjectAltName=IP:127.0.0.1\n' > "$TMP/srv.ext" &&
    openssl x509 -req -in "$TMP/srv.csr" -CA "$TMP/ca.pem" \
        -CAkey "$TMP/ca.key" -CAcreateserial -days 1 \
        -extfile "$TMP/srv.ext" -out "$TMP/srv.pem"
} 2>>"$TMP/openssl.log"

# start_broker: start protoqd on $TMP/data, wait (at most 30 s: recovery of
# a large backlog) for its port file. Sets PID and ADDR, and TLS_ADDR
# when make_tls made a certificate.
start_broker() {
    rm -f "$TMP/port" "$TMP/tlsport"
    # Default settings (fsync always) but a small payload budget, the
    # setting W5's memory target is stated for.
    printf 'payload_budget_bytes 16m\n' > "$TMP/bench.conf"
    if [ "${BENCH_METRICS:-0}" = 1 ]; then
        printf 'metrics 127.0.0.1:0\n' >> "$TMP/bench.conf"
    fi
    if [ -s "$TMP/srv.pem" ]; then
        printf 'tls_listen 127.0.0.1:0\ntls_port_file %s\ntls_cert %s\ntls_key %s\n' \
            "$TMP/tlsport" "$TMP/srv.pem" "$TMP/srv.key" >> "$TMP/bench.conf"
    fi
    "$PROTOQD" -c "$TMP/bench.conf" --listen 127.0.0.1:0 --port-file "$TMP/port" \
        --data-dir "$TMP/data" --log-level warn \
        >/dev/null 2>>"$TMP/protoqd.log" &
    PID=$!
    for _ in $(seq 1 600); do
        if [ -s "$TMP/port" ]; then
            ADDR=127.0.0.1:$(head -1 "$TMP/port")
            if [ "${BENCH_METRICS:-0}" = 1 ]; then
                start_scraper "$(awk '/^metrics/ {print $2}' "$TMP/port")"
            fi
            if [ -s "$TMP/tlsport" ]; then
                TLS_ADDR=tls://127.0.0.1:$(head -1 "$TMP/tlsport")
            fi
            return 0
        fi
        if ! kill -0 "$PID" 2>/dev/null; then
            echo "bench.sh: protoqd exited during start:" >&2
            tail -20 "$TMP/protoqd.log" >&2
            PID=
            return 1
        fi
        sleep 0.05
    done
    echo "bench.sh: protoqd wrote no port file within 30 s" >&2
    return 1
}

# start_scraper PORT: GET /metrics once a second until the broker stops.
SCRAPER=
start_scraper() {
    local port=$1 pid=$PID
    (while kill -0 "$pid" 2>/dev/null; do
        curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/metrics"
        sleep 1
    done) &
    SCRAPER=$!
}

# stop_broker: SIGTERM, wait up to 10 s, then SIGKILL.
stop_broker() {
    kill -TERM "$PID" 2>/dev/null
    for _ in $(seq 1 200); do
        kill -0 "$PID" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$PID" 2>/dev/null
    wait "$PID" 2>/dev/null
    PID=
    if [ -n "$SCRAPER" ]; then
        wait "$SCRAPER" 2>/dev/null
        SCRAPER=
    fi
}

vmhwm_mb() {
    awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status" 2>/dev/null
}

# jf JSON FIELD: one numeric/boolean field of a bench JSON line.
jf() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" <<<"$1"; }

# run NAME ARGS...: one protoq-bench run; appends a table row. The server
# is $ADDR unless ARGS name one (-s).
run() {
    local name=$1 out rc
    shift
    echo "== $name: protoq-bench $*" >&2
    out=$(timeout 120 "$BENCH" -s "$ADDR" --json "$@" 2>"$TMP/bench.err")
    rc=$?
    grep -v '^protoq-bench: *[0-9.]*s sent' "$TMP/bench.err" >&2
    if [ $rc -ne 0 ] || [ -z "$out" ]; then
        echo "bench.sh: $name failed (exit $rc)" >&2
        FAILED=1
    fi
    [ -n "$out" ] || out='{}'
    LAST=$out
    ROWS+=("$(printf '%-4s %10s %10s %9s %9s %9s %9s %9s %6s %5s' "$name" \
        "$(jf "$out" msgs_per_s)" "$(jf "$out" pub_per_s)" \
        "$(jf "$out" lat_p50_us)" "$(jf "$out" lat_p99_us)" \
        "$(jf "$out" lat_max_us)" "$(jf "$out" conf_p50_us)" \
        "$(jf "$out" conf_p99_us)" "$(jf "$out" lost)" \
        "$(jf "$out" duplicates)")")
}

T0=$(now_ms)
if ! command -v openssl >/dev/null || ! make_tls; then
    echo "bench.sh: no openssl CLI or it failed: W1t is skipped" >&2
    FAILED=1
fi
start_broker || exit 1
echo "bench.sh: protoqd $PID on $ADDR${TLS_ADDR:+ and $TLS_ADDR}, data in $TMP/data" >&2

run W1 --producers 1 --consumers 1 --messages 100000 --size 1024 \
    --inflight 1000 --prefetch 1000 --queue w1
if [ -n "$TLS_ADDR" ]; then
    run W1t -s "$TLS_ADDR" --ca "$TMP/ca.pem" --producers 1 --consumers 1 \
        --messages 100000 --size 1024 --inflight 1000 --prefetch 1000 --queue w1t
fi
run W2 --producers 1 --consumers 1 --messages 100000 --size 1024 \
    --inflight 1000 --prefetch 1000 --queue w2 --transient
run W3 --producers 4 --consumers 4 --messages 100000 --size 1024 \
    --inflight 1000 --prefetch 1000 --queue w3
run W4 --producers 1 --consumers 1 --rate 2000 --duration 5 --size 1024 \
    --inflight 1000 --prefetch 1000 --queue w4

# W5: a backlog of 1,000,000 x 1 KiB with no consumer.
run W5p --producers 1 --publish-only --messages 1000000 --size 1024 \
    --inflight 1000 --queue w5
W5_RSS=$(vmhwm_mb "$PID")
stop_broker
R0=$(now_ms)
start_broker || exit 1
R1=$(now_ms)
# The first delivery after the restart: one message consumed and acked
# (so the drain below expects one fewer).
if ! timeout 120 "$PROTOQ" -s "$ADDR" consume w5 --count 1 >/dev/null; then
    echo "bench.sh: no delivery from w5 after the restart" >&2
    FAILED=1
fi
R2=$(now_ms)
W5_RSS2=$(vmhwm_mb "$PID")
run W5d --consumers 1 --consume-only --messages 999999 --size 1024 \
    --prefetch 1000 --queue w5
W5_RSS3=$(vmhwm_mb "$PID")

echo
echo "protoq bench ($(nproc) cores; 1 KiB messages; latencies in microseconds)"
printf '%-4s %10s %10s %9s %9s %9s %9s %9s %6s %5s\n' run msgs/s pub/s \
    e2e_p50 e2e_p99 e2e_max conf_p50 conf_p99 lost dups
for row in "${ROWS[@]}"; do
    echo "$row"
done
echo
echo "W1 durable 1p/1c (W1t: over TLS); W2 transient 1p/1c; W3 durable 4p/4c; W4 durable at 2000/s for 5 s;"
echo "W5p 1,000,000 published with no consumer; W5d its drain after a restart."
echo "W5: protoqd peak RSS ${W5_RSS:-?} MB after the backlog was published;" \
    "restart to port file $((R1 - R0)) ms, to first delivery $((R2 - R0)) ms;" \
    "peak RSS after restart ${W5_RSS2:-?} MB, after the drain ${W5_RSS3:-?} MB."
echo "total $(( ($(now_ms) - T0) / 1000 )) s"
exit $FAILED
