# protoq: one non-recursive Makefile. Everything built goes to build/
# (build/san/ for the sanitizer build, SAN=1).
#
#   make              build protoqd, protoq, protoq-bench, libprotoq.a and the
#                     Python package into build/python (protoc-generated)
#   make run          build, then run protoqd in the foreground (conf/protoqd.conf)
#   make test         build and run every Check suite (SAN=1: ASan + UBSan),
#                     then the Python client's pytest suite
#   make bench        standard benchmark workloads against a fresh protoqd
#   make soak         the crash test with many more kill cycles
#   make install      PREFIX=/usr/local DESTDIR=
#   make clean

PREFIX   ?= /usr/local
BINDIR    = $(DESTDIR)$(PREFIX)/bin
LIBDIR    = $(DESTDIR)$(PREFIX)/lib
INCDIR    = $(DESTDIR)$(PREFIX)/include
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
PKGS      = libevent libevent_pthreads libprotobuf-c

ifeq ($(SAN),1)
B       = build/san
SANFLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
B       = build
SANFLAGS =
endif

# The deps check runs before anything reads pkg-config.
DEPS_OK := $(shell .ci/deps.sh >&2 && echo ok)
ifneq ($(DEPS_OK),ok)
$(error missing build dependencies; see the message above)
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
PROTO_OBJS = $(B)/protocol/protoq.pb-c.o $(B)/protocol/frame.o $(B)/protocol/pqerr.o

CORE_OBJS  = $(B)/broker/mem.o $(B)/broker/log.o $(B)/broker/failpoint.o
QUEUE_OBJS = $(B)/broker/queue.o $(B)/broker/heap.o $(B)/broker/hmap.o $(B)/broker/body.o
STORE_OBJS = $(B)/broker/store.o $(B)/broker/record.o $(B)/broker/crc32c.o
BROKER_OBJS = $(B)/broker/main.o $(B)/broker/server.o $(B)/broker/conn.o \
              $(B)/broker/dispatch.o $(B)/broker/journal.o $(B)/broker/config.o \
              $(QUEUE_OBJS) $(STORE_OBJS) $(CORE_OBJS)

LIB_OBJS   = $(B)/client/client.o
CLI_OBJS   = $(B)/client/cli.o
BENCH_OBJS = $(B)/client/bench.o

UNIT_TESTS  = $(B)/tests/unit/check_frame $(B)/tests/unit/check_queue \
              $(B)/tests/unit/check_store $(B)/tests/unit/check_config
INTEG_TESTS = $(B)/tests/integration/check_server $(B)/tests/integration/check_jobs \
              $(B)/tests/crash/check_crash
TESTS = $(UNIT_TESTS) $(INTEG_TESTS)
TESTUTIL_OBJS = $(B)/tests/testutil.o

BINS = $(B)/protoqd $(B)/protoq $(B)/protoq-bench
LIBA = $(B)/libprotoq.a

# The Python package, assembled in $(B)/python/protoq with its generated
# protoq_pb2.py (never committed); the tests import it from there.
PY_SRCS  = client/python/protoq/__init__.py client/python/protoq/errors.py \
           client/python/protoq/client.py client/python/protoq/worker.py
PY_PKG   = $(B)/python/protoq
PY_STAMP = $(PY_PKG)/protoq_pb2.py

ALL_OBJS = $(PROTO_OBJS) $(BROKER_OBJS) $(LIB_OBJS) $(CLI_OBJS) $(BENCH_OBJS) \
           $(TESTUTIL_OBJS) $(TESTS:=.o)

.PHONY: all run test pytest bench soak install clean
all: $(BINS) $(LIBA) $(PY_STAMP)

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

$(filter-out $(B)/protocol/protoq.pb-c.o,$(ALL_OBJS)): $(B)/protocol/protoq.pb-c.h

$(B)/%.o: %.c
	@mkdir -p $(@D)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

$(B)/protocol/protoq.pb-c.o: $(B)/protocol/protoq.pb-c.c
	$(CC) $(CPPFLAGS) $(CFLAGS) -c -o $@ $<

# ---- programs ----
$(B)/protoqd: $(BROKER_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(LIBA): $(LIB_OBJS) $(PROTO_OBJS)
	$(AR) rcs $@ $^

$(B)/protoq: $(CLI_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(B)/protoq-bench: $(BENCH_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lm

# ---- tests ----
$(B)/tests/%.o: override CFLAGS += $(CHECK_CFLAGS) -Itests

$(B)/tests/unit/check_frame: $(B)/tests/unit/check_frame.o $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_queue: $(B)/tests/unit/check_queue.o $(QUEUE_OBJS) $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_store: $(B)/tests/unit/check_store.o $(STORE_OBJS) $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/unit/check_config: $(B)/tests/unit/check_config.o $(B)/broker/config.o $(CORE_OBJS) $(PROTO_OBJS)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/integration/%: $(B)/tests/integration/%.o $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)
$(B)/tests/crash/%: $(B)/tests/crash/%.o $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)

# Each suite runs on its own; all run even if one fails, and the exit
# status says whether any failed. Integration tests find the binaries
# through PROTOQD / PROTOQ.
test: $(BINS) $(TESTS) $(PY_STAMP)
	@fail=0; for t in $(TESTS); do \
	    echo "== $$t"; \
	    PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQ=$(CURDIR)/$(B)/protoq \
	        $(VALGRIND) ./$$t || fail=1; \
	done; \
	$(MAKE) --no-print-directory pytest || fail=1; \
	exit $$fail

# The Python client's suite alone (against this build's protoqd).
pytest: $(BINS) $(PY_STAMP)
	@echo "== python client (pytest)"
	PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQ=$(CURDIR)/$(B)/protoq \
	    PYTHONPATH=$(CURDIR)/$(B)/python PYTHONDONTWRITEBYTECODE=1 \
	    $(PYTHON) -m pytest -q -p no:cacheprovider client/python/tests

soak: $(BINS) $(B)/tests/crash/check_crash
	PROTOQD=$(CURDIR)/$(B)/protoqd CRASH_CYCLES=$${CRASH_CYCLES:-200} \
	    CK_DEFAULT_TIMEOUT=3600 ./$(B)/tests/crash/check_crash

bench: $(BINS)
	./tests/bench.sh $(B)

run: $(B)/protoqd $(B)/protoq
	@mkdir -p var/protoq
	./$(B)/protoqd -c conf/protoqd.conf

install: $(BINS) $(LIBA) $(PY_STAMP)
	install -d $(BINDIR) $(LIBDIR) $(INCDIR) $(PYLIBDIR)/protoq
	install -m 0755 $(BINS) $(BINDIR)
	install -m 0644 $(LIBA) $(LIBDIR)
	install -m 0644 client/protoq.h $(INCDIR)
	install -m 0644 $(PY_PKG)/*.py $(PYLIBDIR)/protoq

clean:
	rm -rf build

-include $(ALL_OBJS:.o=.d)
