#!/usr/bin/env bash
# tests/tools/run_suites.sh LOGDIR SUITE...: run Check suites, TEST_JOBS
# (default 2) at a time, each with its own log in LOGDIR. A suite's log is
# printed whole, with its wall time, when it ends. If any failed, their
# names go to LOGDIR/failed and their Check failure lines (or the log's
# tail) to LOGDIR/failures.txt, and the exit status is 1. Suites are independent (each makes its own temp dir and
# binds port 0 on loopback), and most of their time is spent waiting on a
# broker, so two at a time on two cores is about twice as fast. PROTOQD,
# PROTOQ and VALGRIND come from the environment (the Makefile sets them).
set -u
LOGDIR=$1
shift
JOBS=${TEST_JOBS:-2}
mkdir -p "$LOGDIR"
rm -f "$LOGDIR"/*.log "$LOGDIR"/*.rc "$LOGDIR/failures.txt" "$LOGDIR/failed"

# run_one SUITE: run it into its log; record its status and time.
run_one() {
    local t=$1 name t0 rc
    name=$(basename "$t")
    t0=$(date +%s)
    ${VALGRIND:-} "./$t" >"$LOGDIR/$name.log" 2>&1
    rc=$?
    echo "$rc $(($(date +%s) - t0))" >"$LOGDIR/$name.rc"
    {
        echo "== $t"
        cat "$LOGDIR/$name.log"
        echo "   ($(($(date +%s) - t0)) s)"
    } | (flock 9; cat) 9>"$LOGDIR/.print.lock"
}
export -f run_one
export LOGDIR

printf '%s\n' "$@" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}

failed=
for t in "$@"; do
    name=$(basename "$t")
    read -r rc _ <"$LOGDIR/$name.rc" 2>/dev/null || rc=1
    if [ "$rc" != 0 ]; then
        failed="$failed $t"
        grep -E ':[EF]:' "$LOGDIR/$name.log" >>"$LOGDIR/failures.txt" ||
            tail -5 "$LOGDIR/$name.log" >>"$LOGDIR/failures.txt"
    fi
done
if [ -n "$failed" ]; then
    echo "$failed" >"$LOGDIR/failed"
    exit 1
fi
