# A scratch broker on 127.0.0.1 (PORT=0 picks a free port), stopped at the end.
set -eu
dir=$(mktemp -d /tmp/protoq-walk.XXXXXX)
pids=
trap 'set +e; kill $pids 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
ms() { date +%s%3N; }
# wait_for FILE TEXT: up to 30 s for a line with TEXT in FILE
wait_for() {
    n=0
    until grep -q -- "$2" "$1" 2>/dev/null; do
        n=$((n + 1)); [ $n -le 1500 ] || { echo "no '$2' in $1" >&2; exit 1; }
        sleep 0.02
    done
}
start_broker() {
    rm -f "$dir/port"
    protoqd --listen "127.0.0.1:$1" --data-dir "$dir/data" \
        --port-file "$dir/port" 2>>"$dir/protoqd.log" &
    broker=$!; pids="$pids $broker"
    wait_for "$dir/port" ""
    port=$(cat "$dir/port"); export PROTOQ_SERVER=127.0.0.1:$port
}
start_broker "${PORT:-7650}"

# The job: its payload is its config; 8 steps of 0.5 s (2 for "small" jobs),
# each reported with protoq progress, resuming from the last checkpoint.
cat >"$dir/train.sh" <<'EOF'
cfg=$(cat)
echo "$1 runs job $PROTOQ_MESSAGE_ID attempt $PROTOQ_ATTEMPT: $cfg"
case $cfg in *lr=10*) echo "loss is NaN" >&2; exit 3 ;; esac
steps=8; case $cfg in small*) steps=2 ;; esac
step=${PROTOQ_CHECKPOINT:-0}
while [ "$step" -lt "$steps" ]; do
    sleep 0.5; step=$((step + 1))
    protoq progress $((step * 100 / steps)) "step $step/$steps"
    protoq progress --checkpoint "$step"
done
echo "$1 finished job $PROTOQ_MESSAGE_ID"
EOF
work() { # work NAME TAG: a worker, its output in $dir/NAME.log
    protoq work train --tag "gpu=$2" --concurrency 2 --shutdown-grace 1s \
        -- sh "$dir/train.sh" "$1" >>"$dir/$1.log" 2>&1 &
    eval "$1=\$!"; pids="$pids $!"
}

# 20 jobs: 1 big one needs an a100, 19 small ones a t4; one has a bad lr.
protoq queue create train.failed
protoq queue create train --max-attempts 3 --dead-letter train.failed --backoff 0
big=$(protoq pub train "big lr=0.001" --require gpu=a100)
for i in $(seq 1 18); do protoq pub train "small $i lr=0.01" --require gpu=t4; done >/dev/null
bad=$(protoq pub train "small lr=10" --require gpu=t4)

# 3 workers: w1 (a100) takes the big job; w3 (t4) the small ones; w2 (a100)
# waits idle for the next a100 job.
work w1 a100; wait_for "$dir/w1.log" "runs job $big"
work w2 a100; work w3 t4
sleep 2
protoq jobs train --state inflight          # progress of what runs now
protoq job train "$big"

# kill -9 w1: the broker gives the big job to w2 at once (a failed attempt,
# attempt 2), which resumes it from its checkpoint.
t0=$(ms); kill -9 "$w1"; wait "$w1" 2>/dev/null || true
wait_for "$dir/w2.log" "runs job $big attempt 2"
echo "kill -9 to running on w2: $(($(ms) - t0)) ms"

# SIGTERM w2 (pre-emption): it releases the job (no failed attempt,
# progress kept) and exits 0; a new a100 worker picks it up as attempt 3.
kill -TERM "$w2"; wait "$w2"; echo "w2 exited $?"
work w4 a100; wait_for "$dir/w4.log" "runs job $big attempt 3"

# Cancel a small job that is still waiting.
small=$(protoq jobs train --state ready | awk 'NR == 2 { print $1 }')
protoq cancel train "$small" && echo "cancelled $small"

# Restart the broker (SIGTERM, then again on the same port): the workers
# reconnect by themselves and take jobs again.
runs() { cat "$dir"/w*.log | grep -c "runs job"; }
before=$(runs)
kill -TERM "$broker"; wait "$broker"
t0=$(ms); start_broker "$port"
n=0; until [ "$(runs)" -gt "$before" ]; do
    n=$((n + 1)); [ $n -le 1500 ] || { echo "no job after restart" >&2; exit 1; }
    sleep 0.02
done
echo "broker restart to a worker running a job: $(($(ms) - t0)) ms"

# Everything ends: the big job finishes, the bad one is dead-lettered.
wait_for "$dir/w4.log" "finished job $big"
n=0; while protoq queue stat train | grep -qE '^(ready|delayed|inflight): [1-9]'; do
    n=$((n + 1)); [ $n -le 300 ] || { echo "jobs left" >&2; exit 1; }; sleep 0.1
done
protoq jobs train --state dead
protoq consume train.failed --count 1 --no-ack --json
kill -TERM "$w3" "$w4"; wait "$w3"; wait "$w4"; echo "workers exited $?"
kill -TERM "$broker"; wait "$broker"
