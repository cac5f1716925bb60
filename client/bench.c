/*
 * bench.c: protoq-bench, the load generator. One thread per producer and
 * per consumer, each with its own libprotoq connection to one broker.
 *
 * Every payload starts with a header (magic, producer id, sequence number,
 * CLOCK_MONOTONIC send time in ns; client and broker share the machine), so
 * consumers can measure publish-to-delivery latency and check exactly-once
 * delivery against a bitmap per producer: a second delivery of (producer,
 * seq) is a duplicate, a confirmed message never delivered is lost. A run
 * that loses or duplicates anything, or whose publishes fail, exits 1.
 *
 * Producers keep at most --inflight unconfirmed publishes (pipelined with
 * protoq_publish_async) and record publish-to-PublishOk latency. With
 * --rate they pace to a fixed total rate and flush every message.
 *
 * Modes for backlog tests: --publish-only (no consumers; the queue is kept)
 * and --consume-only (no producers; drains --messages from an existing
 * queue, then deletes it).
 */
#include "protoq.h"
#include "clock.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum {
    BENCH_MAGIC = 0x70716231, /* "pqb1" */
    HDR_LEN = 24,             /* magic u32, producer u32, seq u64, ns u64 */
    MAX_PRODUCERS = 1024,
    IDLE_STOP_MS = 10000, /* consumers give up after this long idle
                             once nothing more is expected */
};

struct opts {
    int producers, consumers;
    uint64_t messages; /* total; 0 with --duration */
    size_t size;
    uint32_t inflight, prefetch;
    const char *queue;
    bool transient, json;
    double rate;        /* total msgs/s; 0 = as fast as possible */
    double duration_s;  /* 0 = by --messages */
    const char *server; /* HOST:PORT or tls://HOST:PORT */
    const char *token;  /* -t / $PROTOQ_TOKEN; NULL = none */
    const char *tls_ca, *tls_cert, *tls_key; /* --ca, --cert, --key */
    bool publish_only, consume_only;
};

/* Latency samples (microseconds) of one thread. */
struct lat {
    uint32_t *v;
    size_t n, cap;
};

struct bench;

struct producer {
    struct bench *b;
    int id;
    uint64_t count; /* to publish; UINT64_MAX with --duration */
    uint64_t sent, confirmed, failed;
    uint64_t *send_ns; /* ring of send times, by seq & ring_mask */
    uint64_t ring_mask;
    struct lat lat; /* publish -> PublishOk */
    char err[256];
    protoq_client *c; /* for messages in on_confirm */
    int64_t done_ns;  /* when its last confirm arrived */
    pthread_t th;
};

struct consumer {
    struct bench *b;
    int id;
    uint64_t received, dups, foreign;
    struct lat lat; /* publish -> delivery */
    char err[256];
    pthread_t th;
    bool joined;
};

struct bench {
    struct opts o;
    uint64_t seq_cap; /* bitmap bits per producer */
    _Atomic(uint64_t *) bitmap[MAX_PRODUCERS];
    atomic_uint_fast64_t unique;    /* distinct (producer, seq) received */
    atomic_uint_fast64_t confirmed; /* over all producers */
    atomic_uint_fast64_t received;
    atomic_uint_fast64_t sent;
    atomic_int producers_left;
    atomic_bool stop; /* fatal error or interrupt */
    int64_t start_ns;
    int64_t deadline_ns; /* --duration end, or 0 */
    _Atomic int64_t last_delivery_ns;
    struct producer *prod;
    struct consumer *cons;
};

/* ---- helpers ---- */

static int64_t
mono_ns(void)
{
    return (int64_t)clock_mono_ns();
}

static void
put_u32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

static void
put_u64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

static uint32_t
get_u32(const uint8_t *p)
{
    uint32_t v;

    memcpy(&v, p, 4);
    return v;
}

static uint64_t
get_u64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, 8);
    return v;
}

static int
lat_add(struct lat *l, int64_t ns)
{
    uint64_t us = ns > 0 ? (uint64_t)ns / 1000 : 0;

    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 65536;
        uint32_t *n = realloc(l->v, cap * sizeof(*n));

        if (n == NULL) {
            return -1;
        }
        l->v = n;
        l->cap = cap;
    }
    l->v[l->n++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
    return 0;
}

static int
cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? -1 : x > y;
}

/* Merge samples into one sorted array. */
static struct lat
lat_merge(struct lat *const *parts, size_t n)
{
    struct lat all = {NULL, 0, 0};
    size_t i, total = 0;

    for (i = 0; i < n; i++) {
        total += parts[i]->n;
    }
    if (total == 0) {
        return all;
    }
    all.v = malloc(total * sizeof(*all.v));
    if (all.v == NULL) {
        return all;
    }
    for (i = 0; i < n; i++) {
        memcpy(all.v + all.n, parts[i]->v, parts[i]->n * sizeof(*all.v));
        all.n += parts[i]->n;
    }
    all.cap = total;
    qsort(all.v, all.n, sizeof(*all.v), cmp_u32);
    return all;
}

static uint64_t
pct(const struct lat *l, double p)
{
    size_t i;

    if (l->n == 0) {
        return 0;
    }
    i = (size_t)ceil(p / 100.0 * (double)l->n);
    if (i > 0) {
        i--;
    }
    if (i >= l->n) {
        i = l->n - 1;
    }
    return l->v[i];
}

static int
bench_connect(struct bench *b, const char *name, protoq_client **out, char *err,
              size_t errlen)
{
    struct protoq_opts o;
    int rc;

    memset(&o, 0, sizeof(o));
    o.client_name = name;
    o.auth_token = b->o.token;
    o.io_timeout_ms = 60000;
    o.tls_ca_file = b->o.tls_ca;
    o.tls_cert_file = b->o.tls_cert;
    o.tls_key_file = b->o.tls_key;
    rc = protoq_connect(b->o.server, &o, out);
    if (rc != PQ_OK) {
        snprintf(err, errlen, "connect %s: %s", b->o.server,
                 protoq_errmsg(*out));
        protoq_close(*out);
        *out = NULL;
    }
    return rc;
}

static void
fmt_err(char *buf, size_t len, const char *what, protoq_client *c, int rc)
{
    int code = protoq_last_error_code(c);

    if (rc == PQ_EREMOTE && code != 0) {
        snprintf(buf, len, "%s: %s (%s)", what, protoq_errmsg(c),
                 protoq_code_name(code));
    } else {
        snprintf(buf, len, "%s: %s", what, protoq_errmsg(c));
    }
}

/* ---- producers ---- */

/* The confirm callback's arg is the producer; the sequence number is
 * recovered from the ring slot, passed as arg via a small per-slot record. */
struct slot {
    struct producer *p;
    uint64_t seq;
};

static void
on_confirm(void *arg, int err, uint64_t message_id, bool duplicate)
{
    struct slot *s = arg;
    struct producer *p = s->p;
    int64_t now = mono_ns();

    (void)message_id;
    (void)duplicate;
    if (err != PQ_OK) {
        if (p->failed++ == 0) {
            fmt_err(p->err, sizeof(p->err), "publish", p->c, err);
        }
    } else {
        p->confirmed++;
        atomic_fetch_add(&p->b->confirmed, 1);
        lat_add(&p->lat, now - (int64_t)p->send_ns[s->seq & p->ring_mask]);
    }
    p->send_ns[s->seq & p->ring_mask] = 0; /* slot free */
}

static void *
producer_main(void *arg)
{
    struct producer *p = arg;
    struct bench *b = p->b;
    protoq_client *c = NULL;
    struct protoq_message m;
    struct slot *slots = NULL;
    uint8_t *payload = NULL;
    char name[32];
    double interval_ns = 0;
    uint64_t seq;
    int rc;

    snprintf(name, sizeof(name), "bench-producer-%d", p->id);
    if (bench_connect(b, name, &c, p->err, sizeof(p->err)) != PQ_OK) {
        goto out;
    }
    p->c = c;
    payload = calloc(1, b->o.size);
    slots = calloc(p->ring_mask + 1, sizeof(*slots));
    if (payload == NULL || slots == NULL) {
        snprintf(p->err, sizeof(p->err), "out of memory");
        goto out;
    }
    for (size_t i = HDR_LEN; i < b->o.size; i++) {
        payload[i] = (uint8_t)('a' + i % 26);
    }
    memset(&m, 0, sizeof(m));
    m.payload = payload;
    m.len = b->o.size;
    if (b->o.rate > 0) {
        interval_ns = 1e9 * b->o.producers / b->o.rate;
    }
    put_u32(payload, BENCH_MAGIC);
    put_u32(payload + 4, (uint32_t)p->id);
    for (seq = 0; seq < p->count && !atomic_load(&b->stop); seq++) {
        int64_t now = mono_ns();

        if (b->deadline_ns && now >= b->deadline_ns) {
            break;
        }
        if (seq >= b->seq_cap) {
            break;
        }
        if (interval_ns > 0) {
            int64_t due = b->start_ns + (int64_t)(interval_ns * (double)seq);

            while ((now = mono_ns()) < due) {
                int64_t wait_ms = (due - now) / 1000000;

                if (wait_ms > 0) {
                    rc = protoq_poll(c, (int)wait_ms);
                } else {
                    struct timespec ts = {0, due - now};

                    nanosleep(&ts, NULL);
                    rc = protoq_poll(c, 0);
                }
                if (rc < 0) {
                    fmt_err(p->err, sizeof(p->err), "poll", c, rc);
                    goto out;
                }
            }
            if (b->deadline_ns && now >= b->deadline_ns) {
                break;
            }
        }
        /* Window and ring slot: wait for confirms until both are free. */
        while (protoq_outstanding(c) >= b->o.inflight ||
               p->send_ns[seq & p->ring_mask] != 0) {
            size_t want = protoq_outstanding(c);

            rc = protoq_wait_confirms(c, want ? want - 1 : 0, 60000);
            if (rc != PQ_OK) {
                fmt_err(p->err, sizeof(p->err), "waiting for confirms", c, rc);
                goto out;
            }
        }
        now = mono_ns();
        put_u64(payload + 8, seq);
        put_u64(payload + 16, (uint64_t)now);
        p->send_ns[seq & p->ring_mask] = (uint64_t)now;
        slots[seq & p->ring_mask].p = p;
        slots[seq & p->ring_mask].seq = seq;
        rc = protoq_publish_async(c, b->o.queue, &m, on_confirm,
                                  &slots[seq & p->ring_mask]);
        if (rc != PQ_OK) {
            fmt_err(p->err, sizeof(p->err), "publish", c, rc);
            p->send_ns[seq & p->ring_mask] = 0;
            goto out;
        }
        p->sent++;
        atomic_fetch_add(&b->sent, 1);
        if (interval_ns > 0) {
            rc = protoq_flush(c);
            if (rc != PQ_OK) {
                fmt_err(p->err, sizeof(p->err), "flush", c, rc);
                goto out;
            }
        }
        if (p->failed > 0) {
            break;
        }
    }
    rc = protoq_wait_confirms(c, 0, 120000);
    if (rc != PQ_OK) {
        fmt_err(p->err, sizeof(p->err), "waiting for the last confirms", c, rc);
    }
out:
    p->done_ns = mono_ns();
    if (p->err[0] != '\0' && p->failed == 0) {
        p->failed = 1;
    }
    atomic_fetch_sub(&b->producers_left, 1);
    protoq_close(c);
    free(payload);
    free(slots);
    return NULL;
}

/* ---- consumers ---- */

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct consumer *k = arg;
    struct bench *b = k->b;
    const uint8_t *p = d->payload;
    int64_t now = mono_ns();
    uint64_t seq, bit, old;
    uint32_t pid;
    uint64_t *map;

    k->received++;
    atomic_fetch_add(&b->received, 1);
    atomic_store(&b->last_delivery_ns, now);
    if (protoq_ack(c, d->message_id, d->attempt) != PQ_OK &&
        k->err[0] == '\0') {
        fmt_err(k->err, sizeof(k->err), "ack", c, PQ_ECLOSED);
    }
    if (d->len < HDR_LEN || get_u32(p) != BENCH_MAGIC) {
        k->foreign++;
        return;
    }
    pid = get_u32(p + 4);
    seq = get_u64(p + 8);
    if (pid >= MAX_PRODUCERS || seq >= b->seq_cap) {
        k->foreign++;
        return;
    }
    lat_add(&k->lat, now - (int64_t)get_u64(p + 16));
    map = atomic_load(&b->bitmap[pid]);
    if (map == NULL) {
        uint64_t *n = calloc((b->seq_cap + 63) / 64, sizeof(uint64_t));
        uint64_t *expected = NULL;

        if (n == NULL) {
            k->foreign++;
            return;
        }
        if (!atomic_compare_exchange_strong(&b->bitmap[pid], &expected, n)) {
            free(n);
        }
        map = atomic_load(&b->bitmap[pid]);
    }
    bit = (uint64_t)1 << (seq & 63);
    old = atomic_fetch_or((_Atomic uint64_t *)&map[seq / 64], bit);
    if (old & bit) {
        k->dups++;
    } else {
        atomic_fetch_add(&b->unique, 1);
    }
}

/* How many distinct messages the consumers should see in all. */
static uint64_t
expected_total(struct bench *b)
{
    if (b->o.consume_only) {
        return b->o.messages;
    }
    if (atomic_load(&b->producers_left) > 0) {
        return UINT64_MAX;
    }
    return atomic_load(&b->confirmed);
}

static void *
consumer_main(void *arg)
{
    struct consumer *k = arg;
    struct bench *b = k->b;
    protoq_client *c = NULL;
    char name[32];
    int64_t idle_since = mono_ns();
    int rc;

    snprintf(name, sizeof(name), "bench-consumer-%d", k->id);
    if (bench_connect(b, name, &c, k->err, sizeof(k->err)) != PQ_OK) {
        atomic_store(&b->stop, true);
        return NULL;
    }
    rc = protoq_subscribe(c, b->o.queue, b->o.prefetch, NULL, 0, on_deliver, k,
                          NULL);
    if (rc != PQ_OK) {
        fmt_err(k->err, sizeof(k->err), "subscribe", c, rc);
        atomic_store(&b->stop, true);
        goto out;
    }
    while (!atomic_load(&b->stop)) {
        uint64_t want = expected_total(b);

        if (atomic_load(&b->unique) >= want) {
            break;
        }
        rc = protoq_poll(c, 100);
        if (rc < 0) {
            fmt_err(k->err, sizeof(k->err), "poll", c, rc);
            break;
        }
        if (rc > 0) {
            idle_since = mono_ns();
        } else if (want != UINT64_MAX &&
                   mono_ns() - idle_since > (int64_t)IDLE_STOP_MS * 1000000) {
            break; /* nothing more is coming: the rest is lost */
        }
    }
    /* Let the last acks reach the broker before we disconnect. */
    rc = protoq_flush(c);
    if (rc != PQ_OK && k->err[0] == '\0') {
        fmt_err(k->err, sizeof(k->err), "flush", c, rc);
    }
out:
    protoq_close(c);
    return NULL;
}

/* ---- main ---- */

static const char usage_text[] =
    "usage: protoq-bench [-s [tls://]HOST:PORT] [-t TOKEN] [--ca FILE]\n"
    "                    [--cert FILE --key FILE] [--producers P] [--consumers "
    "C]\n"
    "                    [--messages N | --duration S] [--size BYTES]\n"
    "                    [--inflight W] [--prefetch K] [--queue NAME]\n"
    "                    [--transient] [--rate R] [--json]\n"
    "                    [--publish-only | --consume-only]\n"
    "  Defaults: 1 producer, 1 consumer, 100000 messages of 1024 bytes,\n"
    "  inflight 1000, prefetch 1000, queue bench, durable, no rate limit.\n"
    "  --rate R: R messages/s in total; --duration S: publish for S seconds.\n"
    "  --publish-only: no consumers, the queue is kept (for a backlog).\n"
    "  --consume-only: no producers; drain N messages published earlier,\n"
    "  then delete the queue. Exit 1 if a message was lost or duplicated.\n"
    "  -t TOKEN (or $PROTOQ_TOKEN): the auth token for a broker with tokens.\n";

static int
usage(const char *msg)
{
    if (msg != NULL) {
        fprintf(stderr, "protoq-bench: %s\n", msg);
    }
    fputs(usage_text, stderr);
    return 2;
}

static bool
parse_num(const char *s, double *out)
{
    char *end;

    errno = 0;
    *out = strtod(s, &end);
    return errno == 0 && end != s && *end == '\0' && *out >= 0;
}

/* getenv, with "" counted as unset. */
static const char *
env_or_null(const char *name)
{
    const char *v = getenv(name);

    return v != NULL && v[0] != '\0' ? v : NULL;
}

static int
parse_args(struct opts *o, int argc, char **argv)
{
    enum {
        O_PROD = 256,
        O_CONS,
        O_MSGS,
        O_SIZE,
        O_INFL,
        O_PREF,
        O_QUEUE,
        O_TRANS,
        O_RATE,
        O_DUR,
        O_JSON,
        O_PUBONLY,
        O_CONSONLY,
        O_CA,
        O_CERT,
        O_KEY,
        O_HELP
    };
    static const struct option lo[] = {
        {"producers", required_argument, NULL, O_PROD},
        {"consumers", required_argument, NULL, O_CONS},
        {"messages", required_argument, NULL, O_MSGS},
        {"size", required_argument, NULL, O_SIZE},
        {"inflight", required_argument, NULL, O_INFL},
        {"prefetch", required_argument, NULL, O_PREF},
        {"queue", required_argument, NULL, O_QUEUE},
        {"transient", no_argument, NULL, O_TRANS},
        {"rate", required_argument, NULL, O_RATE},
        {"duration", required_argument, NULL, O_DUR},
        {"json", no_argument, NULL, O_JSON},
        {"publish-only", no_argument, NULL, O_PUBONLY},
        {"consume-only", no_argument, NULL, O_CONSONLY},
        {"server", required_argument, NULL, 's'},
        {"token", required_argument, NULL, 't'},
        {"ca", required_argument, NULL, O_CA},
        {"cert", required_argument, NULL, O_CERT},
        {"key", required_argument, NULL, O_KEY},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    bool msgs_set = false;
    double v;
    int ch;

    o->producers = 1;
    o->consumers = 1;
    o->messages = 100000;
    o->size = 1024;
    o->inflight = 1000;
    o->prefetch = 1000;
    o->queue = "bench";
    o->server = getenv("PROTOQ_SERVER");
    if (o->server == NULL || o->server[0] == '\0') {
        o->server = "127.0.0.1:7650";
    }
    o->token = getenv("PROTOQ_TOKEN");
    o->tls_ca = env_or_null("PROTOQ_CA");
    o->tls_cert = env_or_null("PROTOQ_CERT");
    o->tls_key = env_or_null("PROTOQ_KEY");
    while ((ch = getopt_long(argc, argv, "s:t:h", lo, NULL)) != -1) {
        const char *a = optarg;

        switch (ch) {
        case O_PROD:
            if (!parse_num(a, &v) || v > MAX_PRODUCERS) {
                return usage("--producers: want 0-1024");
            }
            o->producers = (int)v;
            break;
        case O_CONS:
            if (!parse_num(a, &v) || v > 1024) {
                return usage("--consumers: want 0-1024");
            }
            o->consumers = (int)v;
            break;
        case O_MSGS:
            if (!parse_num(a, &v) || v < 1) {
                return usage("--messages: want a number > 0");
            }
            o->messages = (uint64_t)v;
            msgs_set = true;
            break;
        case O_SIZE:
            if (!parse_num(a, &v) || v > 64 * 1024 * 1024) {
                return usage("--size: want bytes");
            }
            o->size = (size_t)v;
            break;
        case O_INFL:
            if (!parse_num(a, &v) || v < 1 || v > 1000000) {
                return usage("--inflight: want 1-1000000");
            }
            o->inflight = (uint32_t)v;
            break;
        case O_PREF:
            if (!parse_num(a, &v) || v < 1 || v > 100000) {
                return usage("--prefetch: want 1-100000");
            }
            o->prefetch = (uint32_t)v;
            break;
        case O_QUEUE:
            o->queue = a;
            break;
        case O_TRANS:
            o->transient = true;
            break;
        case O_RATE:
            if (!parse_num(a, &v) || v <= 0) {
                return usage("--rate: want messages per second > 0");
            }
            o->rate = v;
            break;
        case O_DUR:
            if (!parse_num(a, &v) || v <= 0) {
                return usage("--duration: want seconds > 0");
            }
            o->duration_s = v;
            break;
        case O_JSON:
            o->json = true;
            break;
        case O_PUBONLY:
            o->publish_only = true;
            break;
        case O_CONSONLY:
            o->consume_only = true;
            break;
        case 's':
            o->server = a;
            break;
        case 't':
            o->token = a;
            break;
        case O_CA:
            o->tls_ca = a;
            break;
        case O_CERT:
            o->tls_cert = a;
            break;
        case O_KEY:
            o->tls_key = a;
            break;
        case O_HELP:
        case 'h':
            fputs(usage_text, stdout);
            exit(0);
        default:
            return usage(NULL);
        }
    }
    if (optind != argc) {
        return usage("unexpected argument");
    }
    if (o->publish_only) {
        o->consumers = 0;
    }
    if (o->consume_only) {
        o->producers = 0;
    }
    if (o->publish_only && o->consume_only) {
        return usage("--publish-only and --consume-only exclude each other");
    }
    if (o->producers == 0 && o->consumers == 0) {
        return usage("nothing to do: no producers and no consumers");
    }
    if (o->producers == 0) {
        o->consume_only = true;
    }
    if (o->consumers == 0) {
        o->publish_only = true;
    }
    if (o->size < HDR_LEN) {
        o->size = HDR_LEN;
    }
    if (o->duration_s > 0 && !msgs_set) {
        o->messages = 0;
    }
    return 0;
}

static void
progress(struct bench *b, int64_t now)
{
    double t = (double)(now - b->start_ns) / 1e9;

    fprintf(stderr,
            "protoq-bench: %5.1fs sent %" PRIu64 " confirmed %" PRIu64
            " received %" PRIu64 "\n",
            t, (uint64_t)atomic_load(&b->sent),
            (uint64_t)atomic_load(&b->confirmed),
            (uint64_t)atomic_load(&b->received));
}

/* Create (or, for --consume-only, check) the queue. */
static int
setup_queue(struct bench *b, char *err, size_t errlen)
{
    protoq_client *c = NULL;
    struct protoq_queue_attrs a;
    int rc;

    if (bench_connect(b, "bench-admin", &c, err, errlen) != PQ_OK) {
        return -1;
    }
    if (b->o.consume_only) {
        struct protoq_queue_info qi;

        rc = protoq_queue_stat(c, b->o.queue, &qi);
    } else {
        memset(&a, 0, sizeof(a));
        a.transient = b->o.transient;
        rc = protoq_queue_create(c, b->o.queue, &a);
    }
    if (rc != PQ_OK) {
        fmt_err(err, errlen, b->o.queue, c, rc);
    }
    protoq_close(c);
    return rc == PQ_OK ? 0 : -1;
}

static void
delete_queue(struct bench *b)
{
    protoq_client *c = NULL;
    char err[256];

    if (bench_connect(b, "bench-admin", &c, err, sizeof(err)) != PQ_OK) {
        fprintf(stderr, "protoq-bench: deleting %s: %s\n", b->o.queue, err);
        return;
    }
    if (protoq_queue_delete(c, b->o.queue) != PQ_OK) {
        fprintf(stderr, "protoq-bench: deleting %s: %s\n", b->o.queue,
                protoq_errmsg(c));
    }
    protoq_close(c);
}

/* main: run one benchmark; exit 0 clean, 1 lost/duplicated/failed, 2 usage. */
int
main(int argc, char **argv)
{
    struct bench *b = calloc(1, sizeof(*b));
    struct lat **parts = NULL;
    struct lat conf_all, e2e_all;
    uint64_t published = 0, confirmed = 0, received = 0, dups = 0, lost = 0;
    uint64_t failed = 0, foreign = 0, expect;
    int64_t end_ns, pub_end_ns = 0;
    double wall_s, pub_s;
    char err[256];
    int rc, i, ret = 0;
    bool show_progress = false;

    if (b == NULL) {
        fprintf(stderr, "protoq-bench: out of memory\n");
        return 1;
    }
    rc = parse_args(&b->o, argc, argv);
    if (rc != 0) {
        free(b);
        return rc;
    }
    b->seq_cap = b->o.messages;
    if (b->o.consume_only) {
        /* Draining what another run published: its sequence numbers may
         * run past the count asked for here (some were taken already). */
        b->seq_cap = 2 * b->o.messages + 1024;
    }
    if (b->seq_cap == 0) {
        /* --duration without --messages: room for what the rate allows,
         * or a generous cap when unpaced. */
        b->seq_cap = b->o.rate > 0
                         ? (uint64_t)(b->o.rate * b->o.duration_s * 1.5) + 1000
                         : 50000000;
    }
    if (setup_queue(b, err, sizeof(err)) != 0) {
        fprintf(stderr, "protoq-bench: %s\n", err);
        free(b);
        return 1;
    }
    b->prod = calloc((size_t)b->o.producers + 1, sizeof(*b->prod));
    b->cons = calloc((size_t)b->o.consumers + 1, sizeof(*b->cons));
    parts =
        calloc((size_t)(b->o.producers + b->o.consumers) + 1, sizeof(*parts));
    if (b->prod == NULL || b->cons == NULL || parts == NULL) {
        fprintf(stderr, "protoq-bench: out of memory\n");
        return 1;
    }
    atomic_store(&b->producers_left, b->o.producers);
    b->start_ns = mono_ns();
    if (b->o.duration_s > 0) {
        b->deadline_ns = b->start_ns + (int64_t)(b->o.duration_s * 1e9);
    }
    for (i = 0; i < b->o.consumers; i++) {
        struct consumer *k = &b->cons[i];

        k->b = b;
        k->id = i;
        if (pthread_create(&k->th, NULL, consumer_main, k) != 0) {
            fprintf(stderr, "protoq-bench: pthread_create failed\n");
            return 1;
        }
    }
    for (i = 0; i < b->o.producers; i++) {
        struct producer *p = &b->prod[i];
        uint64_t ring = 1;

        p->b = b;
        p->id = i;
        p->count =
            b->o.messages
                ? b->o.messages / (uint64_t)b->o.producers +
                      ((uint64_t)i < b->o.messages % (uint64_t)b->o.producers)
                : UINT64_MAX;
        while (ring < 2 * (uint64_t)b->o.inflight) {
            ring *= 2;
        }
        p->ring_mask = ring - 1;
        p->send_ns = calloc(ring, sizeof(*p->send_ns));
        if (p->send_ns == NULL ||
            pthread_create(&p->th, NULL, producer_main, p) != 0) {
            fprintf(stderr, "protoq-bench: cannot start producer %d\n", i);
            return 1;
        }
    }

    /* Progress once a second while the run goes on (after 2 s). */
    for (;;) {
        bool prod_done = atomic_load(&b->producers_left) == 0;
        bool cons_done = true;
        int64_t now;
        struct timespec ts = {0, 100000000};

        if (b->o.consumers > 0) {
            cons_done = atomic_load(&b->unique) >= expected_total(b) ||
                        atomic_load(&b->stop);
        }
        if (prod_done && cons_done) {
            break;
        }
        nanosleep(&ts, NULL);
        now = mono_ns();
        if (now - b->start_ns > 2000000000LL) {
            show_progress = true;
        }
        if (show_progress && (now - b->start_ns) / 1000000000 !=
                                 (now - 100000000 - b->start_ns) / 1000000000) {
            progress(b, now);
        }
        /* Consumers may also stop on their own (idle, errors). */
        if (prod_done && b->o.consumers > 0) {
            bool all_exited = true;

            for (i = 0; i < b->o.consumers; i++) {
                if (!b->cons[i].joined) {
                    if (pthread_tryjoin_np(b->cons[i].th, NULL) == 0) {
                        b->cons[i].joined = true;
                    } else {
                        all_exited = false;
                    }
                }
            }
            if (all_exited) {
                break;
            }
        }
    }
    for (i = 0; i < b->o.producers; i++) {
        pthread_join(b->prod[i].th, NULL);
    }
    for (i = 0; i < b->o.consumers; i++) {
        if (!b->cons[i].joined) {
            pthread_join(b->cons[i].th, NULL);
        }
    }
    end_ns = b->o.consumers > 0 ? atomic_load(&b->last_delivery_ns) : 0;

    /* ---- results ---- */
    for (i = 0; i < b->o.producers; i++) {
        struct producer *p = &b->prod[i];

        published += p->sent;
        confirmed += p->confirmed;
        failed += p->failed;
        if (p->done_ns > pub_end_ns) {
            pub_end_ns = p->done_ns;
        }
        if (p->err[0] != '\0') {
            fprintf(stderr, "protoq-bench: producer %d: %s\n", i, p->err);
            ret = 1;
        }
        parts[i] = &p->lat;
    }
    conf_all = lat_merge(parts, (size_t)b->o.producers);
    for (i = 0; i < b->o.consumers; i++) {
        struct consumer *k = &b->cons[i];

        received += k->received;
        dups += k->dups;
        foreign += k->foreign;
        if (k->err[0] != '\0') {
            fprintf(stderr, "protoq-bench: consumer %d: %s\n", i, k->err);
            ret = 1;
        }
        parts[i] = &k->lat;
    }
    e2e_all = lat_merge(parts, (size_t)b->o.consumers);
    expect = b->o.consume_only ? b->o.messages : confirmed;
    if (b->o.consumers > 0) {
        uint64_t unique = atomic_load(&b->unique);

        lost = expect > unique ? expect - unique : 0;
    }
    if (end_ns < pub_end_ns) {
        end_ns = pub_end_ns;
    }
    if (end_ns <= b->start_ns) {
        end_ns = mono_ns();
    }
    wall_s = (double)(end_ns - b->start_ns) / 1e9;
    pub_s =
        pub_end_ns > b->start_ns ? (double)(pub_end_ns - b->start_ns) / 1e9 : 0;
    if (lost > 0 || dups > 0 || failed > 0 || foreign > 0) {
        ret = 1;
    }
    if (b->o.json) {
        printf("{\"producers\":%d,\"consumers\":%d,\"messages\":%" PRIu64
               ",\"size\":%zu,\"inflight\":%u,\"prefetch\":%u,\"rate\":%.0f,"
               "\"durable\":%s,\"published\":%" PRIu64 ",\"confirmed\":%" PRIu64
               ",\"received\":%" PRIu64 ",\"duplicates\":%" PRIu64
               ",\"lost\":%" PRIu64 ",\"wall_s\":%.3f,\"msgs_per_s\":%.0f,"
               "\"pub_per_s\":%.0f,\"lat_p50_us\":%" PRIu64
               ",\"lat_p99_us\":%" PRIu64 ",\"lat_p999_us\":%" PRIu64
               ",\"lat_max_us\":%" PRIu64 ",\"conf_p50_us\":%" PRIu64
               ",\"conf_p99_us\":%" PRIu64 "}\n",
               b->o.producers, b->o.consumers,
               b->o.messages ? b->o.messages : published, b->o.size,
               b->o.inflight, b->o.prefetch, b->o.rate,
               b->o.transient ? "false" : "true", published, confirmed,
               received, dups, lost, wall_s,
               wall_s > 0 ? (double)(received - dups) / wall_s : 0,
               pub_s > 0 ? (double)confirmed / pub_s : 0, pct(&e2e_all, 50),
               pct(&e2e_all, 99), pct(&e2e_all, 99.9), pct(&e2e_all, 100),
               pct(&conf_all, 50), pct(&conf_all, 99));
    }
    fprintf(b->o.json ? stderr : stdout,
            "protoq-bench: %d producers, %d consumers, %zu-byte messages, "
            "%s, inflight %u, prefetch %u%s\n"
            "  published %" PRIu64 " (confirmed %" PRIu64 ", failed %" PRIu64
            ") in %.2fs: %.0f msgs/s\n"
            "  received %" PRIu64 " (duplicates %" PRIu64 ", lost %" PRIu64
            ", foreign %" PRIu64 ") end to end in %.2fs: %.0f msgs/s\n"
            "  confirm latency us:  p50 %" PRIu64 "  p99 %" PRIu64
            "  p99.9 %" PRIu64 "  max %" PRIu64 "\n"
            "  end-to-end latency us: p50 %" PRIu64 "  p99 %" PRIu64
            "  p99.9 %" PRIu64 "  max %" PRIu64 "\n",
            b->o.producers, b->o.consumers, b->o.size,
            b->o.transient ? "transient" : "durable", b->o.inflight,
            b->o.prefetch, b->o.rate > 0 ? " (rate-limited)" : "", published,
            confirmed, failed, pub_s, pub_s > 0 ? (double)confirmed / pub_s : 0,
            received, dups, lost, foreign, wall_s,
            wall_s > 0 ? (double)(received - dups) / wall_s : 0,
            pct(&conf_all, 50), pct(&conf_all, 99), pct(&conf_all, 99.9),
            pct(&conf_all, 100), pct(&e2e_all, 50), pct(&e2e_all, 99),
            pct(&e2e_all, 99.9), pct(&e2e_all, 100));
    if (!b->o.publish_only) {
        delete_queue(b);
    }
    free(conf_all.v);
    free(e2e_all.v);
    for (i = 0; i < b->o.producers; i++) {
        free(b->prod[i].lat.v);
        free(b->prod[i].send_ns);
    }
    for (i = 0; i < b->o.consumers; i++) {
        free(b->cons[i].lat.v);
    }
    for (i = 0; i < MAX_PRODUCERS; i++) {
        free(atomic_load(&b->bitmap[i]));
    }
    free(parts);
    free(b->prod);
    free(b->cons);
    free(b);
    return ret;
}
