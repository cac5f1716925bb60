/*
 * gen_corpus.c: writes the seed corpora of the fuzz targets into
 * tests/fuzz/corpus/{frame,record,config}/ (run from the top of the tree:
 * `make fuzz-corpus`). Seeds are built with the real encoders (protobuf-c,
 * record_encode, config_dump), so they stay valid when the formats grow;
 * a few are hand-written bytes that no encoder produces, each reproducing a
 * bug the fuzzers found. Deterministic: the same tree writes the same
 * files, named after what they hold.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "frame.h"
#include "fuzz.h"
#include "pqerr.h"
#include "record.h"

static const char *top = "tests/fuzz/corpus";

static void
write_seed(const char *target, const char *name, const void *data, size_t len)
{
    char path[512];
    int fd;

    snprintf(path, sizeof(path), "%s/%s", top, target);
    if ((mkdir(top, 0755) != 0 && errno != EEXIST) ||
        (mkdir(path, 0755) != 0 && errno != EEXIST)) {
        perror(path);
        exit(1);
    }
    snprintf(path, sizeof(path), "%s/%s/%s", top, target, name);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, data, len) != (ssize_t)len || close(fd) != 0) {
        perror(path);
        exit(1);
    }
}

/* ---- frames (bodies, no length prefix) ---- */

static void
frame_seed(const char *name, const Protoq__Frame *f)
{
    size_t n = protoq__frame__get_packed_size(f);
    uint8_t *buf = malloc(n + 1);

    FUZZ_CHECK(buf != NULL);
    protoq__frame__pack(f, buf);
    write_seed("frame", name, buf, n);
    free(buf);
}

static void
frame_seeds(void)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Hello hello = PROTOQ__HELLO__INIT;
    Protoq__Publish pub = PROTOQ__PUBLISH__INIT, pub2 = PROTOQ__PUBLISH__INIT;
    Protoq__Publish *items[2] = {&pub, &pub2};
    Protoq__PublishBatch batch = PROTOQ__PUBLISH_BATCH__INIT;
    Protoq__Message m = PROTOQ__MESSAGE__INIT, plain = PROTOQ__MESSAGE__INIT;
    Protoq__KeyValue h1 = PROTOQ__KEY_VALUE__INIT, h2 = PROTOQ__KEY_VALUE__INIT;
    Protoq__KeyValue r1 = PROTOQ__KEY_VALUE__INIT;
    Protoq__KeyValue *hdrs[2] = {&h1, &h2}, *reqs[1] = {&r1};
    Protoq__Progress prog = PROTOQ__PROGRESS__INIT;
    Protoq__Touch touch = PROTOQ__TOUCH__INIT;
    Protoq__Release rel = PROTOQ__RELEASE__INIT;
    Protoq__Subscribe sub = PROTOQ__SUBSCRIBE__INIT;
    Protoq__QueueCreate qc = PROTOQ__QUEUE_CREATE__INIT;
    Protoq__QueueAttrs qa = PROTOQ__QUEUE_ATTRS__INIT;
    Protoq__Nack nack = PROTOQ__NACK__INIT;
    /* Message{payload "x", field 0 (fixed64, key sent as 81 00)} in a
     * Publish to "q": the input that found item 5a of issue 8. */
    static const uint8_t field0[] = {
        0x08, 0x02, 0xa2, 0x01, 0x12, 0x0a, 0x01, 'q', 0x12, 0x0d, 0x0a, 0x01,
        'x',  0x81, 0x00, 1,    2,    3,    4,    5,   6,    7,    8};
    /* Touch{progress: Progress{percent 50, field 0}}: the same for a
     * job's progress. */
    static const uint8_t progress0[] = {
        0x08, 0x03, 0xd2, 0x02, 0x12, 0x08, 0x01, 0x10, 0x01, 0x22, 0x0c, 0x08,
        0x32, 0x81, 0x00, 1,    2,    3,    4,    5,    6,    7,    8};

    hello.protocol_version = 1;
    hello.client_name = "seed";
    f.request_id = 1;
    f.kind_case = PROTOQ__FRAME__KIND_HELLO;
    f.hello = &hello;
    frame_seed("hello", &f);

    plain.payload.data = (uint8_t *)"hello";
    plain.payload.len = 5;
    pub.queue = "jobs";
    pub.message = &plain;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &pub;
    frame_seed("publish", &f);

    h1.key = "content-type";
    h1.value = "text/plain";
    h2.key = "k";
    h2.value = "";
    r1.key = "gpu";
    r1.value = "a100";
    m.payload.data = (uint8_t *)"work";
    m.payload.len = 4;
    m.n_headers = 2;
    m.headers = hdrs;
    m.priority = 9;
    m.delay_ms = 1000;
    m.deliver_at_ms = 1764547200000ULL;
    m.ttl_ms = 60000;
    m.idempotency_key = "key-1";
    m.correlation_id = "corr-1";
    m.reply_to = "replies";
    m.n_requires = 1;
    m.requires = reqs;
    pub.message = &m;
    frame_seed("publish_every_field", &f);

    pub2.queue = "other";
    pub2.message = &plain;
    batch.n_items = 2;
    batch.items = items;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH_BATCH;
    f.publish_batch = &batch;
    frame_seed("publish_batch", &f);

    prog.percent = 40;
    prog.text = "step 2";
    prog.checkpoint = "s3://b/ckpt";
    touch.message_id = 7;
    touch.attempt = 1;
    touch.extend_ms = 30000;
    touch.progress = &prog;
    f.kind_case = PROTOQ__FRAME__KIND_TOUCH;
    f.touch = &touch;
    frame_seed("touch_progress", &f);

    rel.message_id = 7;
    rel.attempt = 1;
    rel.progress = &prog;
    rel.confirm = true;
    f.kind_case = PROTOQ__FRAME__KIND_RELEASE;
    f.release = &rel;
    frame_seed("release_progress", &f);

    sub.queue = "jobs";
    sub.prefetch = 10;
    sub.n_tags = 1;
    sub.tags = reqs;
    f.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE;
    f.subscribe = &sub;
    frame_seed("subscribe", &f);

    qa.max_length = 100;
    qa.dead_letter = "dlq";
    qa.backoff_base_ms = 10;
    qc.name = "jobs";
    qc.attrs = &qa;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_CREATE;
    f.queue_create = &qc;
    frame_seed("queue_create", &f);

    nack.message_id = 7;
    nack.attempt = 2;
    nack.error = "boom";
    f.kind_case = PROTOQ__FRAME__KIND_NACK;
    f.nack = &nack;
    frame_seed("nack", &f);

    write_seed("frame", "bug_unknown_field0_in_message", field0,
               sizeof(field0));
    write_seed("frame", "bug_unknown_field0_in_progress", progress0,
               sizeof(progress0));
}

/* ---- log records: the type byte, then the body ---- */

static void
record_seed(const char *name, const struct record *r)
{
    ssize_t n = record_encoded_size(r);
    uint8_t *buf;

    FUZZ_CHECK(n >= 0);
    buf = malloc((size_t)n + 1);
    FUZZ_CHECK(buf != NULL);
    buf[0] = r->type;
    FUZZ_CHECK(record_encode(r, buf + 1, (size_t)n) == n);
    write_seed("record", name, buf, (size_t)n + 1);
    free(buf);
}

#define S(lit) ((struct rec_str){(lit), sizeof(lit) - 1})
#define B(lit) ((struct rec_bytes){(const uint8_t *)(lit), sizeof(lit) - 1})

static void
record_seeds(void)
{
    static const uint64_t keep[2] = {5, 9};
    static const struct rec_kv reqs[1] = {{S("gpu"), S("a100")}};
    struct record r, inner;
    struct rec_publish pubs[2];

    memset(&r, 0, sizeof(r));
    r.type = REC_QUEUE_CREATE;
    r.u.queue_create.name = S("jobs");
    r.u.queue_create.attrs.max_length = 100;
    snprintf(r.u.queue_create.attrs.dead_letter,
             sizeof(r.u.queue_create.attrs.dead_letter), "dlq");
    r.u.queue_create.attrs.dead_letter_expired = true;
    record_seed("queue_create", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_QUEUE_DELETE;
    r.u.queue_delete.name = S("jobs");
    record_seed("queue_delete", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_QUEUE_PURGE;
    r.u.queue_purge.name = S("jobs");
    r.u.queue_purge.n_keep = 2;
    r.u.queue_purge.keep_ids = keep;
    record_seed("queue_purge", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_PUBLISH;
    r.u.publish.id = 42;
    r.u.publish.queue = S("jobs");
    r.u.publish.priority = 3;
    r.u.publish.attempt = 1;
    r.u.publish.published_wall_ms = 1764547200000ULL;
    r.u.publish.idem_key = S("key-1");
    r.u.publish.n_requires = 1;
    r.u.publish.requires = reqs;
    r.u.publish.progress = B("\x08\x32");
    r.u.publish.body = B("\x0a\x05hello");
    record_seed("publish", &r);
    pubs[0] = pubs[1] = r.u.publish;
    pubs[1].id = 43;
    pubs[1].n_requires = 0;
    pubs[1].requires = NULL;

    memset(&r, 0, sizeof(r));
    r.type = REC_ACK;
    r.u.ack.id = 42;
    record_seed("ack", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_REQUEUE;
    r.u.requeue.id = 42;
    r.u.requeue.attempt = 2;
    r.u.requeue.failures = 1;
    r.u.requeue.deliver_at_wall_ms = 1764547201000ULL;
    record_seed("requeue", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_DEAD_LETTER;
    r.u.dead_letter.id = 42;
    r.u.dead_letter.target = S("dlq");
    r.u.dead_letter.reason = S("max_attempts");
    r.u.dead_letter.body = B("\x0a\x05hello");
    record_seed("dead_letter", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_DROP;
    r.u.drop.id = 42;
    r.u.drop.reason = S("expired");
    record_seed("drop", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_PROGRESS;
    r.u.progress.id = 42;
    r.u.progress.progress = B("\x08\x32\x12\x04half");
    record_seed("progress", &r);

    memset(&r, 0, sizeof(r));
    r.type = REC_ROUTE_BIND;
    r.u.route.route = S("train");
    r.u.route.queue = S("jobs");
    r.u.route.pattern = S("*.gpu.#");
    record_seed("route_bind", &r);
    r.type = REC_ROUTE_UNBIND;
    record_seed("route_unbind", &r);

    {
        struct rec_publish items[2];

        memset(items, 0, sizeof(items));
        items[0].id = 43;
        items[0].queue = S("jobs");
        items[0].n_requires = 1;
        items[0].requires = reqs;
        items[0].body = B("\x0a\x05hello");
        items[1].id = 44;
        items[1].queue = S("dlq");
        items[1].body = B("\x0a\x02hi");
        memset(&r, 0, sizeof(r));
        r.type = REC_PUBLISH_BATCH;
        r.u.batch.n = 2;
        r.u.batch.items = items;
        record_seed("publish_batch", &r);
    }

    {
        static const struct rec_deliver_item d[] = {{42, 1}, {43, 3}};

        memset(&r, 0, sizeof(r));
        r.type = REC_DELIVER;
        r.u.deliver.n = 2;
        r.u.deliver.items = d;
        record_seed("deliver", &r);
    }

    /* an ack with its result and a follow-up */
    memset(&inner, 0, sizeof(inner));
    inner.type = REC_ACK;
    inner.u.ack.id = 41;
    memset(&r, 0, sizeof(r));
    r.type = REC_ATOMIC;
    r.u.atomic.inner_type = REC_ACK;
    r.u.atomic.inner = &inner;
    r.u.atomic.n = 2;
    r.u.atomic.pubs = pubs;
    record_seed("atomic", &r);
}

/* ---- conf files ---- */

static void
config_seeds(void)
{
    static const char small[] = "# a small conf\n"
                                "listen [::1]:0\n"
                                "data_dir \" /var/lib/protoq \"\n"
                                "fsync interval\n"
                                "fsync_interval_ms 5s\n"
                                "max_frame_bytes 4M\n"
                                "segment_bytes 64k\n"
                                "metrics \"\"\n"
                                "log_level debug\n";
    char path[512];
    struct config c;
    int fd;

    write_seed("config", "small", small, sizeof(small) - 1);
    /* Every key with its default, as config_dump writes it. */
    snprintf(path, sizeof(path), "%s/config/defaults", top);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    FUZZ_CHECK(fd >= 0);
    config_defaults(&c);
    config_dump(&c, fd);
    FUZZ_CHECK(close(fd) == 0);
}

int
main(void)
{
    frame_seeds();
    record_seeds();
    config_seeds();
    return 0;
}
