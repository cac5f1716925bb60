# protoq: one non-recursive Makefile. Everything built goes to build/
# (build/san/ for the sanitizer build, SAN=1).
#
#   make              build protoqd, protoq, protoq-bench, libprotoq.a
#   make run          build, then run protoqd in the foreground (conf/protoqd.conf)
#   make test         build and run every Check suite (SAN=1: ASan + UBSan)
#   make bench        standard benchmark workloads against a fresh protoqd
#   make soak         the crash test with many more kill cycles
#   make fuzz         build the libFuzzer targets (clang) into build/fuzz and
#                     run each for FUZZ_SECONDS (default 60)
#   make fuzz-corpus  regenerate the seed corpora under tests/fuzz/corpus
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
TESTS = $(UNIT_TESTS) $(INTEG_TESTS)
TESTUTIL_OBJS = $(B)/tests/testutil.o

BINS = $(B)/protoqd $(B)/protoq $(B)/protoq-bench
LIBA = $(B)/libprotoq.a

ALL_OBJS = $(PROTO_OBJS) $(BROKER_OBJS) $(LIB_OBJS) $(CLI_OBJS) $(BENCH_OBJS) \
           $(TESTUTIL_OBJS) $(TESTS:=.o) $(B)/tests/fuzz/gen_corpus.o

.PHONY: all run test bench soak install clean fuzz fuzz-build fuzz-corpus
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

# Each suite runs on its own; all run even if one fails, and the exit
# status says whether any failed. Integration tests find the binaries
# through PROTOQD / PROTOQ.
test: $(BINS) $(TESTS)
	@fail=0; for t in $(TESTS); do \
	    echo "== $$t"; \
	    PROTOQD=$(CURDIR)/$(B)/protoqd PROTOQ=$(CURDIR)/$(B)/protoq \
	        $(VALGRIND) ./$$t || fail=1; \
	done; exit $$fail

soak: $(BINS) $(B)/tests/crash/check_crash
	PROTOQD=$(CURDIR)/$(B)/protoqd CRASH_CYCLES=$${CRASH_CYCLES:-200} \
	    CK_DEFAULT_TIMEOUT=3600 ./$(B)/tests/crash/check_crash

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
               $(FZ)/protocol/pqerr.o $(FZ)/broker/mem.o $(FZ)/broker/log.o \
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

install: $(BINS) $(LIBA)
	install -d $(BINDIR) $(LIBDIR) $(INCDIR)
	install -m 0755 $(BINS) $(BINDIR)
	install -m 0644 $(LIBA) $(LIBDIR)
	install -m 0644 client/protoq.h $(INCDIR)

clean:
	rm -rf build

-include $(ALL_OBJS:.o=.d) $(FUZZ_OBJS:.o=.d)
