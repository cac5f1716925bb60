#!/bin/sh
# deps.sh: make sure the Debian packages protoq builds and tests with are
# installed. As root it installs what is missing with apt-get; otherwise it
# prints the exact command to run and exits 1.
#   .ci/deps.sh        what `make` and `make test` need
#   .ci/deps.sh fuzz   that, plus clang and libFuzzer for `make fuzz` and
#                      clang-format for `make format-check` (CI)
#   .ci/deps.sh deb    that, plus debhelper and lintian for `make deb`
set -eu

# libssl-dev: TLS (broker and libprotoq); openssl: the CLI check_tls makes
# its throwaway CA and certificates with.
# python3-*, protobuf-compiler: the Python client (client/python), its
# generated messages, its tests and the venv install test. groff-base: the
# install test renders the man pages. libssl-dev, openssl: libcrypto's
# SHA-256 for auth tokens, OpenSSL for TLS and the TLS tests' throwaway CA.
PKGS="build-essential pkg-config libevent-dev libprotobuf-c-dev protobuf-c-compiler check
      libssl-dev openssl
      python3 python3-protobuf protobuf-compiler python3-pytest python3-setuptools
      python3-wheel python3-venv python3-pip groff-base"
if [ "${1:-}" = fuzz ]; then
    PKGS="$PKGS clang-14 libclang-rt-14-dev clang-format"
fi
if [ "${1:-}" = deb ]; then
    PKGS="$PKGS debhelper lintian"
fi

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing="$missing $p"
    fi
done

[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "protoq: missing Debian packages:$missing" >&2
    echo "run: sudo apt-get install -y$missing" >&2
    exit 1
fi

echo "protoq: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2 || true
apt-get install -y -q --no-install-recommends $missing >&2
