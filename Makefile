# protoq: one non-recursive Makefile. Everything built goes to build/
# (build/san/ for the sanitizer build, SAN=1).
#
#   make              build protoqd, protoq, protoq-bench, libprotoq.a
#   make run          build, then run protoqd in the foreground (conf/protoqd.conf)
#   make test         build and run every Check suite (SAN=1: ASan + UBSan)
#   make bench        standard benchmark workloads against a fresh protoqd
#   make soak         the crash test with many more kill cycles, and the
#                     model test with 5000 histories (MODEL_HISTORIES)
#   make install      PREFIX=/usr/local DESTDIR=
#   make clean

PREFIX   ?= /usr/local
BINDIR    = $(DESTDIR)$(PREFIX)/bin
LIBDIR    = $(DESTDIR)$(PREFIX)/lib
INCDIR    = $(DESTDIR)$(PREFIX)/include
PROTOC_C ?= protoc-c
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
MODEL_TESTS = $(B)/tests/model/check_model
MODEL_OBJS  = $(B)/tests/model/model.o $(B)/tests/model/driver.o $(B)/tests/model/ops.o
TESTS = $(UNIT_TESTS) $(INTEG_TESTS) $(MODEL_TESTS)
TESTUTIL_OBJS = $(B)/tests/testutil.o

BINS = $(B)/protoqd $(B)/protoq $(B)/protoq-bench
LIBA = $(B)/libprotoq.a

ALL_OBJS = $(PROTO_OBJS) $(BROKER_OBJS) $(LIB_OBJS) $(CLI_OBJS) $(BENCH_OBJS) \
           $(TESTUTIL_OBJS) $(TESTS:=.o) $(MODEL_OBJS)

.PHONY: all run test bench soak install clean
all: $(BINS) $(LIBA)

# ---- generated protobuf-c code (never committed) ----
# One protoc-c run writes both files (grouped target).
$(B)/protocol/protoq.pb-c.c $(B)/protocol/protoq.pb-c.h &: protocol/protoq.proto
	@mkdir -p $(B)/protocol
	$(PROTOC_C) --proto_path=protocol --c_out=$(B)/protocol $<

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
$(B)/tests/model/check_model: $(B)/tests/model/check_model.o $(MODEL_OBJS) \
                              $(TESTUTIL_OBJS) $(LIBA)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) $(CHECK_LIBS)

# Each suite runs on its own; all run even if one fails, and the exit
# status says whether any failed. Integration tests find the binaries
# through PROTOQD / PROTOQ.
test: $(BINS) $(TESTS)
	@fail=0; for t in $(TESTS); do \
	    echo "== $$t"; \
	    PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQ=$(CURDIR)/$(B)/protoq \
	        $(VALGRIND) ./$$t || fail=1; \
	done; exit $$fail

soak: $(BINS) $(B)/tests/crash/check_crash $(B)/tests/model/check_model
	PROTOQD=$(CURDIR)/$(B)/protoqd CRASH_CYCLES=$${CRASH_CYCLES:-200} \
	    CK_DEFAULT_TIMEOUT=3600 ./$(B)/tests/crash/check_crash
	PROTOQD=$(CURDIR)/$(B)/protoqd MODEL_HISTORIES=$${MODEL_HISTORIES:-5000} \
	    ./$(B)/tests/model/check_model

bench: $(BINS)
	./tests/bench.sh $(B)

run: $(B)/protoqd $(B)/protoq
	@mkdir -p var/protoq
	./$(B)/protoqd -c conf/protoqd.conf

install: $(BINS) $(LIBA)
	install -d $(BINDIR) $(LIBDIR) $(INCDIR)
	install -m 0755 $(BINS) $(BINDIR)
	install -m 0644 $(LIBA) $(LIBDIR)
	install -m 0644 client/protoq.h $(INCDIR)

clean:
	rm -rf build

-include $(ALL_OBJS:.o=.d)
