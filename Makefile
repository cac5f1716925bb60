# protoq: one non-recursive Makefile. Everything built goes to build/
# (build/san/ for the sanitizer build, SAN=1).
#
#   make              build protoqd, protoq, protoq-bench, libprotoq.a and the
#                     Python package into build/python (protoc-generated)
#   make run          build, then run protoqd in the foreground (conf/protoqd.conf)
#   make test         build and run every Check suite (SAN=1: ASan + UBSan),
#                     then the Python client's pytest suite and (not with
#                     SAN=1) test-install
#   make bench        standard benchmark workloads against a fresh protoqd
#   make soak         the crash test with many more kill cycles, and the
#                     model test with 5000 histories (MODEL_HISTORIES)
#   make fuzz         build the libFuzzer targets (clang) into build/fuzz and
#                     run each for FUZZ_SECONDS (default 60)
#   make fuzz-corpus  regenerate the seed corpora under tests/fuzz/corpus
#   make install      PREFIX=/usr/local DESTDIR= (programs, libprotoq .a and
#                     .so, protoq.h, protoq.pc, conf, systemd unit and
#                     sysusers file, man pages, bash completion, Python)
#   make uninstall    remove what make install put there
#   make test-install install into a temp DESTDIR, build and run a program
#                     against it with pkg-config
#   make deb          Debian packages (protoq, libprotoq0, libprotoq-dev)
#                     from debian/ into build/deb, then lintian
#   make clean

VERSION   = 0.1.0
SOVERSION = 0
PREFIX   ?= /usr/local
BINDIR    = $(DESTDIR)$(PREFIX)/bin
LIBDIR    = $(DESTDIR)$(PREFIX)/lib
INCDIR    = $(DESTDIR)$(PREFIX)/include
PCDIR     = $(LIBDIR)/pkgconfig
MANDIR    = $(DESTDIR)$(PREFIX)/share/man
BASHCOMPDIR = $(DESTDIR)$(PREFIX)/share/bash-completion/completions
# systemd's own directories under PREFIX (/usr/lib/systemd/system for
# PREFIX=/usr; /usr/local/lib/systemd/system is on systemd's path too).
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
UNITDIR   = $(DESTDIR)$(SYSTEMDUNITDIR)
SYSUSERSDIR = $(DESTDIR)$(PREFIX)/lib/sysusers.d
# The config: /etc/protoq for PREFIX=/usr, else PREFIX/etc/protoq.
ifeq ($(PREFIX),/usr)
SYSCONFDIR ?= /etc
else
SYSCONFDIR ?= $(PREFIX)/etc
endif
PROTOC_C ?= protoc-c
PROTOC   ?= protoc
# Debian's interpreter, where python3-protobuf and python3-pytest live (a
# python3 earlier in PATH, e.g. pyenv's, would not see them).
PYTHON   ?= /usr/bin/python3
# Where `make install` puts the Python package: on Debian's sys.path,
# /usr/lib/python3/dist-packages for PREFIX=/usr, else
# PREFIX/lib/python3.X/dist-packages (/usr/local's is on sys.path too).
ifeq ($(PREFIX),/usr)
PYLIBDIR  = $(DESTDIR)/usr/lib/python3/dist-packages
else
PYLIBDIR  = $(DESTDIR)$(PREFIX)/lib/$(shell $(PYTHON) -c 'import sys; print("python%d.%d" % sys.version_info[:2])')/dist-packages
endif
PKGS      = libevent libevent_pthreads libprotobuf-c openssl

ifeq ($(SAN),1)
B       = build/san
SANFLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
B       = build
SANFLAGS =
endif

# The deps check runs before anything reads pkg-config, and only for goals
# that build or run something: `make clean` and the source checks never
# install packages. NODEPS=1 skips it (debian/rules: Build-Depends did it).
NODEPS_GOALS = clean format format-check check-includes uninstall
ifneq ($(NODEPS),1)
ifneq ($(filter-out $(NODEPS_GOALS),$(or $(MAKECMDGOALS),all)),)
DEPS_OK := $(shell .ci/deps.sh >&2 && echo ok)
ifneq ($(DEPS_OK),ok)
$(error missing build dependencies; see the message above)
endif
endif
endif

PKG_CFLAGS   := $(shell pkg-config --cflags $(PKGS))
PKG_LIBS     := $(shell pkg-config --libs $(PKGS))
CHECK_CFLAGS := $(shell pkg-config --cflags check)
CHECK_LIBS   := $(shell pkg-config --libs check)

CFLAGS ?= -O2 -g
override CPPFLAGS += -Iprotocol -I$(B)/protocol -Ibroker -Iclient -D_GNU_SOURCE
override CFLAGS   += -std=c11 -Wall -Wextra -Werror -Wformat=2 -Wshadow -Wvla \
                     -Wstrict-prototypes -Wmissing-prototypes -MMD -MP \
                     -pthread $(SANFLAGS) $(PKG_CFLAGS)
override LDFLAGS  += -pthread $(SANFLAGS)
LDLIBS += $(PKG_LIBS)

# ---- object lists (explicit: no wildcards) ----
PROTO_GEN  = $(B)/protocol/protoq.pb-c.c $(B)/protocol/protoq.pb-c.h
PROTO_OBJS = $(B)/protocol/protoq.pb-c.o $(B)/protocol/frame.o $(B)/protocol/pqerr.o \
             $(B)/protocol/units.o $(B)/protocol/strcheck.o $(B)/protocol/pbwire.o \
             $(B)/protocol/tlsio.o $(B)/protocol/backoff.o

CORE_OBJS  = $(B)/broker/mem.o $(B)/broker/log.o $(B)/broker/failpoint.o
QUEUE_OBJS = $(B)/broker/queue.o $(B)/broker/queue_ready.o $(B)/broker/queue_dedup.o \
             $(B)/broker/queue_deliver.o $(B)/broker/heap.o $(B)/broker/hmap.o $(B)/broker/body.o
STORE_OBJS = $(B)/broker/store.o $(B)/broker/store_thread.o $(B)/broker/store_recover.o \
             $(B)/broker/store_verify.o $(B)/broker/store_read.o $(B)/broker/record.o \
             $(B)/broker/crc32c.o
BROKER_OBJS = $(B)/broker/main.o $(B)/broker/server.o $(B)/broker/conn.o \
              $(B)/broker/dispatch.o $(B)/broker/dispatch_admin.o \
              $(B)/broker/dispatch_publish.o $(B)/broker/dispatch_consume.o \
              $(B)/broker/dispatch_deliver.o $(B)/broker/dispatch_result.o \
              $(B)/broker/dispatch_route.o $(B)/broker/dispatch_job.o \
              $(B)/broker/dispatch_session.o \
              $(B)/broker/journal.o $(B)/broker/journal_replay.o \
              $(B)/broker/route.o $(B)/broker/config.o $(B)/broker/auth.o \
              $(B)/broker/metrics.o $(B)/broker/tls.o \
              $(QUEUE_OBJS) $(STORE_OBJS) $(CORE_OBJS)

LIB_OBJS   = $(B)/client/client.o $(B)/client/client_admin.o \
             $(B)/client/client_pub.o $(B)/client/client_consume.o \
             $(B)/client/client_job.o $(B)/client/client_tls.o \
             $(B)/client/client_reconnect.o $(B)/client/client_connect.o
CLI_OBJS   = $(B)/client/cli.o $(B)/client/cli_queue.o $(B)/client/cli_pub.o \
             $(B)/client/cli_consume.o $(B)/client/cli_work.o $(B)/client/cli_job.o \
             $(B)/client/cli_json.o $(B)/client/cli_help.o $(B)/client/cli_route.o \
             $(B)/client/cli_wait.o
BENCH_OBJS = $(B)/client/bench.o
# Example programs (client/examples): built by all, never installed.
EXAMPLES   = $(B)/examples/worker_thread $(B)/examples/producer

UNIT_TESTS  = $(B)/tests/unit/check_frame $(B)/tests/unit/check_structs \
              $(B)/tests/unit/check_queue $(B)/tests/unit/check_queue_compact \
              $(B)/tests/unit/check_record $(B)/tests/unit/check_store \
              $(B)/tests/unit/check_store_recover $(B)/tests/unit/check_config \
              $(B)/tests/unit/check_journal $(B)/tests/unit/check_log \
              $(B)/tests/unit/check_route $(B)/tests/unit/check_record_atomic \
              $(B)/tests/unit/check_auth
INTEG_TESTS = $(B)/tests/integration/check_server $(B)/tests/integration/check_admin \
              $(B)/tests/integration/check_delivery $(B)/tests/integration/check_requests \
              $(B)/tests/integration/check_durability $(B)/tests/integration/check_jobs \
              $(B)/tests/integration/check_jobs_restart $(B)/tests/integration/check_attempt_crash \
              $(B)/tests/integration/check_client $(B)/tests/integration/check_work \
              $(B)/tests/integration/check_loss $(B)/tests/integration/check_evict \
              $(B)/tests/integration/check_cli $(B)/tests/integration/check_ops \
              $(B)/tests/integration/check_limits \
              $(B)/tests/integration/check_metrics $(B)/tests/integration/check_systemd \
              $(B)/tests/integration/check_routes $(B)/tests/integration/check_visibility \
              $(B)/tests/integration/check_results $(B)/tests/integration/check_auth \
              $(B)/tests/integration/check_tls $(B)/tests/integration/check_reconnect \
              $(B)/tests/integration/check_examples $(B)/tests/integration/check_walkthrough \
              $(B)/tests/integration/check_grace $(B)/tests/integration/check_silence \
              $(B)/tests/crash/check_crash $(B)/tests/crash/check_disk_full \
              $(B)/tests/crash/check_segments $(B)/tests/crash/check_datadir \
              $(B)/tests/golden/check_golden
MODEL_TESTS = $(B)/tests/model/check_model $(B)/tests/model/check_powerloss
MODEL_OBJS  = $(B)/tests/model/model.o $(B)/tests/model/restart.o \
              $(B)/tests/model/driver.o $(B)/tests/model/ops.o \
              $(B)/tests/model/powerloss.o
# The model test's protoqd: the broker plus the power-loss seam, which
# journals what a power loss would undo (tests/model/pl_seam.c); never
# installed, and the production protoqd does not link it.
PL_PROTOQD  = $(B)/tests/model/protoqd-pl
PL_SEAM_OBJ = $(B)/tests/model/pl_seam.o
TESTS = $(UNIT_TESTS) $(INTEG_TESTS) $(MODEL_TESTS)
TESTUTIL_OBJS = $(B)/tests/testutil.o
QFIX_OBJS   = $(B)/tests/unit/queue_fixture.o
SFIX_OBJS   = $(B)/tests/unit/store_fixture.o
SRVFIX_OBJS = $(B)/tests/integration/server_fixture.o
SERVER_TESTS = $(B)/tests/integration/check_server $(B)/tests/integration/check_admin \
               $(B)/tests/integration/check_delivery $(B)/tests/integration/check_requests \
               $(B)/tests/integration/check_durability
JOBFIX_OBJS = $(B)/tests/integration/jobs_fixture.o
JOBS_TESTS  = $(B)/tests/integration/check_jobs $(B)/tests/integration/check_jobs_restart \
              $(B)/tests/integration/check_attempt_crash
CRASHFIX_OBJS = $(B)/tests/crash/crash_fixture.o
CRASH_TESTS = $(B)/tests/crash/check_crash $(B)/tests/crash/check_disk_full \
              $(B)/tests/crash/check_segments

BINS = $(B)/protoqd $(B)/protoq $(B)/protoq-bench
LIBA = $(B)/libprotoq.a
# The shared library: the same objects built with -fPIC into $(B)/pic.
LIBSO_NAME = libprotoq.so.$(SOVERSION)
LIBSO      = $(B)/libprotoq.so.$(VERSION)
PIC_OBJS   = $(patsubst $(B)/%,$(B)/pic/%,$(LIB_OBJS) $(PROTO_OBJS))

# The Python package, assembled in $(B)/python/protoq with its generated
# protoq_pb2.py (never committed); the tests import it from there.
PY_SRCS  = client/python/protoq/__init__.py client/python/protoq/errors.py \
           client/python/protoq/client.py client/python/protoq/worker.py
PY_PKG   = $(B)/python/protoq
PY_STAMP = $(PY_PKG)/protoq_pb2.py

ALL_OBJS = $(PROTO_OBJS) $(BROKER_OBJS) $(LIB_OBJS) $(CLI_OBJS) $(BENCH_OBJS) \
           $(TESTUTIL_OBJS) $(QFIX_OBJS) $(SFIX_OBJS) $(SRVFIX_OBJS) $(JOBFIX_OBJS) \
           $(CRASHFIX_OBJS) $(TESTS:=.o) $(MODEL_OBJS) $(PL_SEAM_OBJ) $(B)/tests/fuzz/gen_corpus.o \
           $(EXAMPLES:$(B)/examples/%=$(B)/client/examples/%.o)

.PHONY: all run test pytest bench soak install uninstall test-install deb clean fuzz fuzz-build fuzz-corpus \
        check-includes format format-check
all: $(BINS) $(LIBA) $(LIBSO) $(PY_STAMP) $(EXAMPLES)

# ---- generated protobuf-c code (never committed) ----
# One protoc-c run writes both files (grouped target).
$(B)/protocol/protoq.pb-c.c $(B)/protocol/protoq.pb-c.h &: protocol/protoq.proto
	@mkdir -p $(B)/protocol
	$(PROTOC_C) --proto_path=protocol --c_out=$(B)/protocol $<

# One protoc run for the Python messages; the sources are copied beside them.
$(PY_STAMP): protocol/protoq.proto $(PY_SRCS)
	@mkdir -p $(PY_PKG)
	cp $(PY_SRCS) $(PY_PKG)/
	$(PROTOC) --proto_path=protocol --python_out=$(PY_PKG) $<

# The generated header must exist before the first compile (order-only);
# after that the .d files say who includes it, so a .proto edit rebuilds
# only those objects.
$(filter-out $(B)/protocol/protoq.pb-c.o,$(ALL_OBJS)): | $(B)/protocol/protoq.pb-c.h

$(B)/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/protocol/protoq.pb-c.o: $(B)/protocol/protoq.pb-c.c
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/pic/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -fPIC -c -o $@ $<

$(B)/pic/protocol/protoq.pb-c.o: $(B)/protocol/protoq.pb-c.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -fPIC -c -o $@ $<

$(filter-out $(B)/pic/protocol/protoq.pb-c.o,$(PIC_OBJS)): | $(B)/protocol/protoq.pb-c.h

# ---- programs ----
$(B)/protoqd: $(BROKER_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(LIBA): $(LIB_OBJS) $(PROTO_OBJS)
	$(AR) rcs $@ $^

# libprotoq.so.VERSION with soname libprotoq.so.SOVERSION; it needs only
# protobuf-c (and pthreads) at run time.
$(LIBSO): $(PIC_OBJS) client/libprotoq.map
	$(CC) $(LDFLAGS) -shared -Wl,-soname,$(LIBSO_NAME) -Wl,--as-needed \
	    -Wl,--version-script=client/libprotoq.map -o $@ $(PIC_OBJS) $(LDLIBS)
	ln -sf libprotoq.so.$(VERSION) $(B)/$(LIBSO_NAME)
	ln -sf $(LIBSO_NAME) $(B)/libprotoq.so

$(B)/protoq: $(CLI_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(B)/protoq-bench: $(BENCH_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lm

$(B)/examples/%: $(B)/client/examples/%.o $(LIBA)
	@mkdir -p $(@D)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# ---- tests ----
$(B)/tests/%.o: override CFLAGS += $(CHECK_CFLAGS) -Itests

$(B)/tests/unit/check_frame: $(B)/tests/unit/check_frame.o $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_structs $(B)/tests/unit/check_queue $(B)/tests/unit/check_queue_compact: \
        %: %.o $(QFIX_OBJS) $(QUEUE_OBJS) $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_record $(B)/tests/unit/check_store $(B)/tests/unit/check_store_recover: \
        %: %.o $(SFIX_OBJS) $(STORE_OBJS) $(B)/broker/hmap.o $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_record_atomic: $(B)/tests/unit/check_record_atomic.o $(B)/broker/record.o \
                                    $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_journal: $(B)/tests/unit/check_journal.o $(B)/broker/journal.o \
                               $(B)/broker/journal_replay.o $(B)/broker/route.o \
                               $(QUEUE_OBJS) $(STORE_OBJS) $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_log: $(B)/tests/unit/check_log.o $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_route: $(B)/tests/unit/check_route.o $(B)/broker/route.o $(B)/broker/record.o \
                             $(QUEUE_OBJS) $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_config: $(B)/tests/unit/check_config.o $(B)/broker/config.o $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_auth: $(B)/tests/unit/check_auth.o $(B)/broker/auth.o $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
# check_cli also calls the CLI's --json writer directly.
$(B)/tests/integration/check_cli: $(B)/tests/integration/check_cli.o \
                                  $(B)/client/cli_json.o $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(SERVER_TESTS): %: %.o $(SRVFIX_OBJS) $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(JOBS_TESTS): %: %.o $(JOBFIX_OBJS) $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/integration/%: $(B)/tests/integration/%.o $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(CRASH_TESTS): %: %.o $(CRASHFIX_OBJS) $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/crash/%: $(B)/tests/crash/%.o $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/golden/%: $(B)/tests/golden/%.o $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/model/check_model: $(B)/tests/model/check_model.o $(MODEL_OBJS) \
                              $(TESTUTIL_OBJS) $(LIBA) | $(PL_PROTOQD)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/model/check_powerloss: $(B)/tests/model/check_powerloss.o \
                                  $(B)/tests/model/powerloss.o $(TESTUTIL_OBJS) \
                                  $(LIBA) | $(PL_PROTOQD)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
# check_crash's power-loss loop runs protoqd-pl too.
$(B)/tests/crash/check_crash: $(B)/tests/model/powerloss.o | $(PL_PROTOQD)
$(PL_PROTOQD): $(BROKER_OBJS) $(PROTO_OBJS) $(PL_SEAM_OBJ)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

# Each suite runs on its own; all run even if one fails, and the exit
# status says whether any failed. Integration tests find the binaries
# through PROTOQD / PROTOQ.
# Suites run TEST_JOBS (default 2) at a time, the longest first
# (tests/tools/run_suites.sh: one log each under $(B)/tests/logs).
TEST_ORDER = $(MODEL_TESTS) $(CRASH_TESTS) $(filter-out $(MODEL_TESTS) $(CRASH_TESTS),$(TESTS))
test: $(BINS) $(TESTS) $(PY_STAMP) $(EXAMPLES)
	@failed=; \
	PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQ=$(CURDIR)/$(B)/protoq \
	    PROTOQD_PL=$(CURDIR)/$(PL_PROTOQD) PROTOQ_EXAMPLES=$(CURDIR)/$(B)/examples \
	    VALGRIND="$(VALGRIND)" tests/tools/run_suites.sh $(B)/tests/logs \
	    $(TEST_ORDER) || failed="$$(cat $(B)/tests/logs/failed)"; \
	$(MAKE) --no-print-directory pytest || failed="$$failed pytest"; \
	$(if $(filter 1,$(SAN)),,$(MAKE) --no-print-directory test-install || failed="$$failed test-install";) \
	if [ -n "$$failed" ]; then echo "== FAILED:$$failed"; \
	    cat $(B)/tests/logs/failures.txt 2>/dev/null; exit 1; fi

# The Python client's suite alone (against this build's protoqd).
pytest: $(BINS) $(PY_STAMP)
	@echo "== python client (pytest)"
	PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQ=$(CURDIR)/$(B)/protoq \
	    PYTHONPATH=$(CURDIR)/$(B)/python PYTHONDONTWRITEBYTECODE=1 \
	    $(PYTHON) -m pytest -q -p no:cacheprovider client/python/tests

soak: $(BINS) $(B)/tests/crash/check_crash $(B)/tests/model/check_model
	PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQD_PL=$(CURDIR)/$(PL_PROTOQD) \
	    CRASH_CYCLES=$${CRASH_CYCLES:-200} PL_CYCLES=$${PL_CYCLES:-100} \
	    CK_DEFAULT_TIMEOUT=3600 ./$(B)/tests/crash/check_crash
	PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQD_PL=$(CURDIR)/$(PL_PROTOQD) \
	    MODEL_HISTORIES=$${MODEL_HISTORIES:-5000} \
	    ./$(B)/tests/model/check_model

# The tree is formatted by .clang-format (clang-format 14): `make format`
# rewrites, `make format-check` (CI) fails on any difference.
FORMAT_SRCS = $(shell git ls-files '*.c' '*.h' 2>/dev/null)
format:
	clang-format -i $(FORMAT_SRCS)
format-check:
	clang-format --dry-run -Werror $(FORMAT_SRCS)

# No include cycle between the modules of broker/, protocol/ and client/.
check-includes:
	tests/tools/include_cycles.sh broker protocol client

bench: $(BINS)
	./tests/bench.sh $(B)

# ---- fuzzing: libFuzzer + ASan + UBSan, built with clang into build/fuzz ----
# Each target runs FUZZ_SECONDS on build/fuzz/corpus/NAME (what it found so
# far) seeded from tests/fuzz/corpus/NAME; a crash or a broken property is
# saved as build/fuzz/artifacts/NAME/crash-* and fails the run. Reproduce
# one with ./build/fuzz/fuzz_NAME FILE. .ci/deps.sh fuzz installs clang.
FUZZ_CC      ?= $(shell command -v clang-14 || command -v clang)
FUZZ_SECONDS ?= 60
FZ           = build/fuzz
FUZZ_NAMES   = frame record config
FUZZ_BINS    = $(FUZZ_NAMES:%=$(FZ)/fuzz_%)
FUZZ_SAN     = -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_CFLAGS  = -g -O1 -fno-omit-frame-pointer -std=c11 -Wall -Wextra -Werror \
               -Wshadow -Wvla -Wstrict-prototypes -Wmissing-prototypes -MMD -MP \
               -D_GNU_SOURCE -Iprotocol -I$(FZ)/protocol -Ibroker \
               $(FUZZ_SAN) -fsanitize=fuzzer-no-link $(PKG_CFLAGS)
FUZZ_COMMON  = $(FZ)/protocol/protoq.pb-c.o $(FZ)/protocol/frame.o \
               $(FZ)/protocol/pqerr.o $(FZ)/protocol/units.o $(FZ)/protocol/pbwire.o \
               $(FZ)/broker/mem.o $(FZ)/broker/log.o \
               $(FZ)/broker/failpoint.o
FUZZ_OBJS    = $(FUZZ_COMMON) $(FZ)/broker/body.o $(FZ)/broker/record.o \
               $(FZ)/broker/config.o $(FUZZ_NAMES:%=$(FZ)/tests/fuzz/fuzz_%.o)
# FUZZ_PROTOBUF_C_SRC=DIR/protobuf-c.c (the source of the installed
# protobuf-c version, e.g. from its v1.4.1 tag) builds it with the fuzzer's
# coverage instead of linking the system library, so that fuzz_frame sees
# inside the protobuf decoder.
ifneq ($(FUZZ_PROTOBUF_C_SRC),)
FUZZ_PBC     = $(FZ)/protobuf-c.o
FUZZ_PBC_LIB =
else
FUZZ_PBC     =
FUZZ_PBC_LIB = $(shell pkg-config --libs libprotobuf-c)
endif
FUZZ_COMMON += $(FUZZ_PBC)
# Per-target options.
FUZZ_ARGS_frame  = -max_len=16384
FUZZ_ARGS_record = -max_len=4096
FUZZ_ARGS_config = -max_len=8192 -dict=tests/fuzz/config.dict

$(FZ)/protocol/protoq.pb-c.c $(FZ)/protocol/protoq.pb-c.h &: protocol/protoq.proto
	@test -n "$(FUZZ_CC)" || { echo "make fuzz needs clang: run .ci/deps.sh fuzz" >&2; exit 1; }
	@mkdir -p $(FZ)/protocol
	$(PROTOC_C) --proto_path=protocol --c_out=$(FZ)/protocol $<

$(filter-out $(FZ)/protocol/protoq.pb-c.o,$(FUZZ_OBJS)): $(FZ)/protocol/protoq.pb-c.h

$(FZ)/%.o: %.c
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c -o $@ $<

$(FZ)/protocol/protoq.pb-c.o: $(FZ)/protocol/protoq.pb-c.c
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c -o $@ $<

# ASan only, no UBSan: protobuf-c 1.4.1 has undefined behaviour that is
# harmless on our compilers and not ours to fix (NULL + 0 for messages
# without fields; int shifts overflowing on 5-byte field keys).
$(FZ)/protobuf-c.o: $(FUZZ_PROTOBUF_C_SRC)
	@mkdir -p $(@D)
	$(FUZZ_CC) -g -O1 -fsanitize=address,fuzzer-no-link -w -c -o $@ $<

$(FZ)/fuzz_frame: $(FZ)/tests/fuzz/fuzz_frame.o $(FZ)/broker/body.o $(FUZZ_COMMON)
$(FZ)/fuzz_record: $(FZ)/tests/fuzz/fuzz_record.o $(FZ)/broker/record.o $(FUZZ_COMMON)
$(FZ)/fuzz_config: $(FZ)/tests/fuzz/fuzz_config.o $(FZ)/broker/config.o $(FUZZ_COMMON)
$(FUZZ_BINS):
	$(FUZZ_CC) $(FUZZ_SAN) -fsanitize=fuzzer -o $@ $^ $(FUZZ_PBC_LIB)

define fuzz_run
	@mkdir -p $(FZ)/corpus/$(1) $(FZ)/artifacts/$(1)
	@echo "== fuzz_$(1): $(FUZZ_SECONDS) s"
	./$(FZ)/fuzz_$(1) -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	    -print_final_stats=1 -artifact_prefix=$(FZ)/artifacts/$(1)/ \
	    $(FUZZ_ARGS_$(1)) $(FZ)/corpus/$(1) tests/fuzz/corpus/$(1)
endef

fuzz-build: $(FUZZ_BINS)

fuzz: $(FUZZ_BINS)
	$(call fuzz_run,frame)
	$(call fuzz_run,record)
	$(call fuzz_run,config)

# The seed corpora are committed; this rewrites them from the encoders.
$(B)/tests/fuzz/gen_corpus: $(B)/tests/fuzz/gen_corpus.o $(B)/broker/record.o \
                            $(B)/broker/config.o $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

fuzz-corpus: $(B)/tests/fuzz/gen_corpus
	./$(B)/tests/fuzz/gen_corpus

run: $(B)/protoqd $(B)/protoq
	@mkdir -p var/protoq
	./$(B)/protoqd -c conf/protoqd.conf

install: $(BINS) $(LIBA) $(LIBSO) $(PY_STAMP)
	install -d $(BINDIR) $(LIBDIR) $(INCDIR) $(PCDIR) $(PYLIBDIR)/protoq \
	    $(MANDIR)/man1 $(MANDIR)/man5 $(MANDIR)/man8 $(BASHCOMPDIR) \
	    $(UNITDIR) $(SYSUSERSDIR) $(DESTDIR)$(SYSCONFDIR)/protoq
	install -m 0755 $(BINS) $(BINDIR)
	install -m 0644 $(LIBA) $(LIBDIR)
	install -m 0644 $(LIBSO) $(LIBDIR)
	ln -sf libprotoq.so.$(VERSION) $(LIBDIR)/$(LIBSO_NAME)
	ln -sf $(LIBSO_NAME) $(LIBDIR)/libprotoq.so
	install -m 0644 client/protoq.h $(INCDIR)
	sed -e 's|@PREFIX@|$(PREFIX)|g' -e 's|@VERSION@|$(VERSION)|g' \
	    client/protoq.pc.in > $(PCDIR)/protoq.pc
	install -m 0644 client/protoq.1 $(MANDIR)/man1
	install -m 0644 conf/protoqd.conf.5 $(MANDIR)/man5
	install -m 0644 broker/protoqd.8 $(MANDIR)/man8
	install -m 0644 client/protoq.bash-completion $(BASHCOMPDIR)/protoq
	sed -e 's|/usr/local/bin/protoqd|$(PREFIX)/bin/protoqd|' \
	    -e 's|/etc/protoq/|$(SYSCONFDIR)/protoq/|' \
	    systemd/protoqd.service > $(UNITDIR)/protoqd.service
	chmod 0644 $(UNITDIR)/protoqd.service
	install -m 0644 systemd/protoqd.sysusers $(SYSUSERSDIR)/protoqd.conf
	# The conf without the source tree's data_dir (var/protoq, for make
	# run): the default /var/lib/protoq applies. An existing one is kept.
	test -e $(DESTDIR)$(SYSCONFDIR)/protoq/protoqd.conf || \
	    sed -e '/^data_dir var\/protoq$$/d' conf/protoqd.conf \
	        > $(DESTDIR)$(SYSCONFDIR)/protoq/protoqd.conf
	install -m 0644 $(PY_PKG)/*.py $(PYLIBDIR)/protoq

uninstall:
	rm -f $(addprefix $(BINDIR)/,protoqd protoq protoq-bench) \
	    $(LIBDIR)/libprotoq.a $(LIBDIR)/libprotoq.so.$(VERSION) \
	    $(LIBDIR)/$(LIBSO_NAME) $(LIBDIR)/libprotoq.so \
	    $(INCDIR)/protoq.h $(PCDIR)/protoq.pc \
	    $(MANDIR)/man1/protoq.1 $(MANDIR)/man5/protoqd.conf.5 \
	    $(MANDIR)/man8/protoqd.8 $(BASHCOMPDIR)/protoq \
	    $(UNITDIR)/protoqd.service $(SYSUSERSDIR)/protoqd.conf
	rm -rf $(PYLIBDIR)/protoq
	@echo "kept $(DESTDIR)$(SYSCONFDIR)/protoq/protoqd.conf (configuration)"

# Debian packages, built by dpkg-buildpackage from a copy of the tracked
# files (its output goes to the parent directory: build/deb), then checked
# by lintian (errors fail). Needs debhelper and lintian (.ci/deps.sh deb).
DEB_SRC = build/deb/protoq-$(VERSION)
deb:
	rm -rf build/deb && mkdir -p $(DEB_SRC)
	git ls-files -z | xargs -0 tar cf - | tar xf - -C $(DEB_SRC)
	cd $(DEB_SRC) && dpkg-buildpackage -b -us -uc
	lintian --fail-on error build/deb/*.changes
	@ls build/deb/*.deb

# Install into a temp DESTDIR; compile and run a program against it with
# pkg-config (shared and static); check the unit and the uninstall.
test-install: all
	tests/install_test.sh $(B)

clean:
	rm -rf build

-include $(ALL_OBJS:.o=.d) $(PIC_OBJS:.o=.d) $(FUZZ_OBJS:.o=.d)
