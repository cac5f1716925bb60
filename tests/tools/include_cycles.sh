#!/bin/sh
# include_cycles.sh DIR...: fail when the modules of DIR include each other
# in a circle. A module is a .c/.h pair (broker/queue.c + broker/queue.h)
# with the files split off it (broker/store_verify.c belongs to store when
# broker/store.h exists); an edge A -> B is an #include "B.h" in a file of
# A. Headers outside DIR
# (system, generated, protocol/) are not modules here. Prints the edges with
# -v, the modules on a cycle when there is one (exit 1). `make
# check-includes` runs it on broker/, protocol/ and client/.
set -eu
verbose=0
[ "${1:-}" = "-v" ] && { verbose=1; shift; }
# module DIR FILE: the module FILE belongs to.
module() {
    m=${2%.*}
    p=${m%%_*}
    if [ "$p" != "$m" ] && [ -e "$1/$p.h" ]; then
        m=$p
    fi
    echo "$m"
}
edges=$(mktemp)
trap 'rm -f "$edges"' EXIT
for dir in "$@"; do
    for f in "$dir"/*.c "$dir"/*.h; do
        [ -e "$f" ] || continue
        from=$(module "$dir" "$(basename "$f")")
        echo "$from $from" >>"$edges"
        sed -n 's/^#include "\([^"]*\)\.h".*/\1/p' "$f" | while read -r to; do
            [ -e "$dir/$to.h" ] || continue
            to=$(module "$dir" "$to.h")
            [ "$to" = "$from" ] || echo "$from $to" >>"$edges"
        done
    done
done
[ "$verbose" = 1 ] && sort -u "$edges" | awk '$1 != $2'
if ! out=$(tsort "$edges" 2>&1 >/dev/null); then
    echo "include cycle in $*:" >&2
    echo "$out" | sed -n "s/^tsort: //p" | grep -v "input contains a loop" | sort -u | tr "\n" " " >&2; echo >&2
    exit 1
fi
echo "no include cycle in $*"
