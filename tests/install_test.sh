#!/bin/bash
# install_test.sh BUILD_DIR: `make install` into a temp DESTDIR (PREFIX=/usr)
# and check what an operator and a C developer get: every file in its
# place, a unit whose ExecStart names PREFIX's protoqd (and that
# systemd-analyze verify accepts), a program compiled with
# `cc x.c $(pkg-config --cflags --libs protoq)` that talks to the
# installed protoqd (shared library, then static), and `make uninstall`
# leaving only the configuration. Every wait is bounded; the broker is
# stopped by its pid.
set -euo pipefail
B=${1:-build}
T=$(mktemp -d /tmp/protoq-install.XXXXXX)
PID=
cleanup() {
    if [[ -n $PID ]]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$T"
}
trap cleanup EXIT
fail() { echo "install_test: FAIL: $*" >&2; exit 1; }

make --no-print-directory install DESTDIR="$T/root" PREFIX=/usr >"$T/install.log" 2>&1 ||
    { cat "$T/install.log"; fail "make install"; }
R=$T/root
for f in usr/bin/protoqd usr/bin/protoq usr/bin/protoq-bench \
    usr/lib/libprotoq.a usr/lib/libprotoq.so.0.1.0 usr/lib/libprotoq.so.0 \
    usr/lib/libprotoq.so usr/include/protoq.h usr/lib/pkgconfig/protoq.pc \
    usr/share/man/man1/protoq.1 usr/share/man/man5/protoqd.conf.5 \
    usr/share/man/man8/protoqd.8 usr/share/bash-completion/completions/protoq \
    usr/lib/systemd/system/protoqd.service usr/lib/sysusers.d/protoqd.conf \
    etc/protoq/protoqd.conf usr/lib/python3/dist-packages/protoq/client.py; do
    [[ -e $R/$f ]] || fail "$f not installed"
done
[[ $(readlink "$R/usr/lib/libprotoq.so.0") == libprotoq.so.0.1.0 ]] || fail "soname link"
# (Outputs are captured before grep: with pipefail, `cmd | grep -q` fails
# when grep exits at the first match and cmd then dies of SIGPIPE.)
dyn=$(readelf -d "$R/usr/lib/libprotoq.so.0.1.0")
grep -q 'SONAME.*\[libprotoq.so.0\]' <<<"$dyn" || fail "soname"
# The shared library exports protoq.h's functions and nothing else.
syms=$(nm -D --defined-only "$R/usr/lib/libprotoq.so.0.1.0" | awk '{print $3}')
extra=$(grep -v -e '^protoq_[a-z]' -e '^PROTOQ_0$' <<<"$syms" || true)
[[ -z $extra ]] || fail "libprotoq.so exports more than its API: $(head -3 <<<"$extra")"
grep -q '^protoq_connect@@PROTOQ_0$' <<<"$syms" || fail "protoq_connect not exported"
grep -qx 'ExecStart=/usr/bin/protoqd -c /etc/protoq/protoqd.conf --data-dir /var/lib/protoq' \
    "$R/usr/lib/systemd/system/protoqd.service" || fail "ExecStart not from PREFIX"
! grep -q '^data_dir var/protoq' "$R/etc/protoq/protoqd.conf" || fail "conf keeps make run's data_dir"
"$R/usr/bin/protoqd" --check-config -c "$R/etc/protoq/protoqd.conf" >/dev/null ||
    fail "installed conf does not load"
for m in man1/protoq.1 man5/protoqd.conf.5 man8/protoqd.8; do
    out=$(groff -mandoc -Tutf8 -ww -z "$R/usr/share/man/$m" 2>&1) || fail "$m: groff"
    [[ -z $out ]] || fail "$m: $out"
done
bash -n "$R/usr/share/bash-completion/completions/protoq" || fail "completion syntax"
if command -v systemd-analyze >/dev/null; then
    # verify wants ExecStart's binary where the unit says: check a copy
    # whose path points into DESTDIR.
    sed "s|/usr/bin/protoqd|$R/usr/bin/protoqd|" \
        "$R/usr/lib/systemd/system/protoqd.service" >"$T/protoqd.service"
    systemd-analyze verify "$T/protoqd.service" >"$T/verify.log" 2>&1 ||
        { cat "$T/verify.log"; fail "systemd-analyze verify"; }
fi

# A program against the installed tree, found through pkg-config only.
cat >"$T/x.c" <<'C'
#include <protoq.h>
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    protoq_client *c = NULL;
    struct protoq_message m;
    uint64_t id = 0;
    int rc;

    (void)argc;
    rc = protoq_connect(argv[1], NULL, &c);
    if (rc == PQ_OK) {
        rc = protoq_queue_create(c, "installed", NULL);
    }
    memset(&m, 0, sizeof(m));
    m.payload = "hello";
    m.len = 5;
    if (rc == PQ_OK) {
        rc = protoq_publish(c, "installed", &m, &id);
    }
    if (rc != PQ_OK) {
        fprintf(stderr, "x: %s\n", c ? protoq_errmsg(c) : "no memory");
        protoq_close(c);
        return 1;
    }
    printf("%llu\n", (unsigned long long)id);
    protoq_close(c);
    return 0;
}
C
export PKG_CONFIG_SYSROOT_DIR=$R
export PKG_CONFIG_PATH=$R/usr/lib/pkgconfig
CFL=$(pkg-config --cflags --libs protoq) || fail "pkg-config protoq"
[[ $CFL == *"-I$R/usr/include"* && $CFL == *-lprotoq* ]] || fail "pkg-config says: $CFL"
cc -Wall -Werror -o "$T/x" "$T/x.c" $CFL || fail "cc against the .pc (shared)"
STATIC=$(pkg-config --static --cflags --libs protoq | sed 's/-lprotoq/-l:libprotoq.a/')
cc -Wall -Werror -o "$T/x-static" "$T/x.c" $STATIC || fail "cc against the .pc (static)"
deps=$(LD_LIBRARY_PATH=$R/usr/lib ldd "$T/x")
grep -q "libprotoq.so.0 => $R/usr/lib/" <<<"$deps" ||
    { echo "$deps" >&2; fail "x does not use the installed libprotoq.so.0"; }
deps=$(ldd "$T/x-static")
! grep -q libprotoq <<<"$deps" || fail "x-static links libprotoq.so"

"$R/usr/bin/protoqd" --listen 127.0.0.1:0 --port-file "$T/port" \
    --data-dir "$T/data" 2>"$T/protoqd.log" &
PID=$!
for _ in $(seq 100); do [[ -s $T/port ]] && break; sleep 0.05; done
[[ -s $T/port ]] || { cat "$T/protoqd.log"; fail "installed protoqd did not start"; }
ADDR=127.0.0.1:$(cat "$T/port")
LD_LIBRARY_PATH=$R/usr/lib timeout 20 "$T/x" "$ADDR" >"$T/x.out" || fail "x did not run"
timeout 20 "$T/x-static" "$ADDR" >"$T/x-static.out" || fail "x-static did not run"
[[ $(timeout 20 "$R/usr/bin/protoq" -s "$ADDR" consume installed --count 2 --wait 5s) == $'hello\nhello' ]] ||
    fail "the installed protoq did not get both messages"
kill "$PID"; wait "$PID" || true; PID=

make --no-print-directory uninstall DESTDIR="$T/root" PREFIX=/usr >"$T/uninstall.log" 2>&1 ||
    { cat "$T/uninstall.log"; fail "make uninstall"; }
left=$(cd "$R" && find . -type f -o -type l | sort)
[[ $left == "./etc/protoq/protoqd.conf" ]] || fail "left after uninstall: $left"
echo "install_test: ok (installed, compiled with pkg-config shared and static, ran, uninstalled)"
