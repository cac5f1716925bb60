/*
 * cli_consume.c: protoq consume: print deliveries (plain or --json) and ack
 * them only after their output reached stdout.
 */
#include "cli.h"
#include "clock.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum consume_mode { MODE_ACK, MODE_NO_ACK, MODE_NACK };

/* A delivery token waiting for its ack (after stdout was flushed). */
struct token {
    uint64_t id;
    uint32_t attempt;
};

/* A growable list of delivery tokens. */
struct tokens {
    struct token *v;
    size_t n, cap;
};

struct consume_state {
    struct cli *cli;
    enum consume_mode mode;
    bool json;
    uint64_t count;          /* 0 = no limit */
    uint64_t received;       /* printed */
    struct tokens acks;      /* printed, not yet acked (or nacked) */
    struct tokens give_back; /* to release at exit: deliveries past
                                --count (never printed), and with
                                --no-ack everything printed */
    int out_err;             /* errno of a failed write to stdout */
    bool oom;
    uint64_t async_errors;
};

static bool
tokens_append(struct tokens *l, const struct token *tok)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 1024;
        struct token *n = realloc(l->v, cap * sizeof(*n));

        if (n == NULL) {
            return false;
        }
        l->v = n;
        l->cap = cap;
    }
    l->v[l->n++] = *tok;
    return true;
}

static bool
tokens_add(struct tokens *l, const struct protoq_delivery *d)
{
    struct token tok = {.id = d->message_id, .attempt = d->attempt};

    return tokens_append(l, &tok);
}

/* utf8_valid: strict UTF-8 (no overlongs, surrogates or > U+10FFFF). */
static bool
utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        uint32_t cp;

        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n) {
            return false;
        }
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) {
                return false;
            }
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
            (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += len;
    }
    return true;
}

static void
base64_out(FILE *out, const unsigned char *p, size_t n)
{
    static const char tbl[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i;

    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];

        fputc(tbl[v >> 18], out);
        fputc(tbl[(v >> 12) & 63], out);
        fputc(tbl[(v >> 6) & 63], out);
        fputc(tbl[v & 63], out);
    }
    if (i < n) {
        uint32_t v = (uint32_t)p[i] << 16;

        if (i + 1 < n) {
            v |= (uint32_t)p[i + 1] << 8;
        }
        fputc(tbl[v >> 18], out);
        fputc(tbl[(v >> 12) & 63], out);
        fputc(i + 1 < n ? tbl[(v >> 6) & 63] : '=', out);
        fputc('=', out);
    }
}

static void
print_json(FILE *out, const struct protoq_delivery *d)
{
    size_t i;

    fprintf(out,
            "{\"id\":%" PRIu64 ",\"attempt\":%u,\"priority\":%u,"
            "\"queue\":",
            d->message_id, d->attempt, d->priority);
    cli_json_str(out, d->queue, strlen(d->queue));
    fputs(",\"headers\":{", out);
    for (i = 0; i < d->n_headers; i++) {
        if (i > 0) {
            fputc(',', out);
        }
        cli_json_str(out, d->headers[i].key, strlen(d->headers[i].key));
        fputc(':', out);
        cli_json_str(out, d->headers[i].value, strlen(d->headers[i].value));
    }
    fputc('}', out);
    if (utf8_valid(d->payload, d->len)) {
        fputs(",\"payload\":", out);
        cli_json_str(out, d->payload, d->len);
    } else {
        fputs(",\"payload_base64\":\"", out);
        base64_out(out, d->payload, d->len);
        fputc('"', out);
    }
    fputs("}\n", out);
}

/* Set by SIGINT, SIGTERM or SIGHUP: stop as if --count was reached. */
static volatile sig_atomic_t consume_stop;

static void
on_consume_signal(int sig)
{
    (void)sig;
    consume_stop = 1;
}

static void
consume_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct consume_state *st = arg;

    (void)c;
    if ((st->count > 0 && st->received >= st->count) || consume_stop ||
        st->out_err != 0) {
        /* Past the count (the broker had credit left): not printed, given
         * back with a Release at exit, which is not a failed attempt. */
        if (!tokens_add(&st->give_back, d)) {
            st->oom = true;
        }
        return;
    }
    if (st->json) {
        print_json(stdout, d);
    } else {
        fwrite(d->payload, 1, d->len, stdout);
        fputc('\n', stdout);
    }
    st->received++;
    /* --no-ack holds what it printed and gives it back at exit (after
     * pausing the flow, so it is not pushed straight back to us). */
    if (!tokens_add(st->mode == MODE_NO_ACK ? &st->give_back : &st->acks, d)) {
        st->oom = true;
    }
}

static void
consume_error(void *arg, protoq_client *c, int code, const char *message,
              uint64_t request_id)
{
    struct consume_state *st = arg;

    (void)c;
    (void)request_id;
    st->async_errors++;
    fprintf(stderr, "protoq: %s: %s failed: %s (%s)\n", st->cli->cmd,
            st->mode == MODE_NACK ? "nack" : "ack", message,
            protoq_code_name(code));
}

/*
 * Flush stdout, then ack (or nack) everything printed so far. Output first:
 * a message is never acked before its line reached stdout. When final, the
 * last ack waits for the broker's durable Ok, which also brings any error
 * for the acks before it (replies come in request order).
 */
static int
consume_settle(struct consume_state *st, bool final)
{
    protoq_client *c = st->cli->c;
    size_t i;
    int rc = PQ_OK;

    if (st->out_err == 0 && fflush(stdout) != 0) {
        st->out_err = errno;
    }
    if (st->out_err != 0) {
        /* What was printed may never have been written: give it all back
         * (a release, not a failed attempt) instead of acking it. */
        for (i = 0; i < st->acks.n && !st->oom; i++) {
            if (!tokens_append(&st->give_back, &st->acks.v[i])) {
                st->oom = true;
            }
        }
        st->acks.n = 0;
        if (!final) {
            return PQ_ESYS;
        }
    }
    for (i = 0; i < st->acks.n && rc == PQ_OK; i++) {
        const struct token *t = &st->acks.v[i];
        bool last_sync = final && i + 1 == st->acks.n && st->give_back.n == 0;

        if (st->mode == MODE_NACK) {
            rc = last_sync
                     ? protoq_nack_sync(c, t->id, t->attempt, 0, false, NULL)
                     : protoq_nack(c, t->id, t->attempt, 0, false, NULL);
        } else {
            rc = last_sync ? protoq_ack_sync(c, t->id, t->attempt)
                           : protoq_ack(c, t->id, t->attempt);
        }
    }
    st->acks.n = 0;
    if (final) {
        /* Give back what we hold but did not ack; the last one waits for
         * the broker, so errors for everything before it are in too. */
        size_t n = st->give_back.n;

        /* Over a snapshot: a release frees credit, and what the broker
         * sends for it while we wait must not be released in turn (it
         * would come straight back, forever). */
        /* Newest first: each release re-enters at the front of its
         * priority level, so this keeps the queue's order. */
        for (i = n; i > 0 && rc == PQ_OK; i--) {
            const struct token t = st->give_back.v[i - 1];

            rc = protoq_release(c, t.id, t.attempt, PROTOQ_RELEASE_UNSPECIFIED,
                                NULL, i == 1);
        }
        st->give_back.n = 0;
    }
    if (rc == PQ_OK && !final) {
        rc = protoq_flush(c);
    }
    return rc;
}

/* SIGINT, SIGTERM, SIGHUP stop cleanly (they interrupt poll: no
 * SA_RESTART); a closed stdout is an EPIPE from write, not a SIGPIPE. */
static void
install_consume_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_consume_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

int
cmd_consume(struct cli *cli, int argc, char **argv)
{
    enum { O_COUNT = 256, O_WAIT, O_PREFETCH, O_JSON, O_NOACK, O_NACK, O_TAG };
    static const struct option opts[] = {
        {"count", required_argument, NULL, O_COUNT},
        {"wait", required_argument, NULL, O_WAIT},
        {"prefetch", required_argument, NULL, O_PREFETCH},
        {"json", no_argument, NULL, O_JSON},
        {"no-ack", no_argument, NULL, O_NOACK},
        {"nack", no_argument, NULL, O_NACK},
        {"tag", required_argument, NULL, O_TAG},
        {NULL, 0, NULL, 0},
    };
    struct consume_state st;
    struct kvlist tags;
    uint64_t wait_ms = DEFAULT_WAIT_MS, prefetch = 0, credit, v;
    bool wait_set = false;
    const char *queue;
    uint64_t sub_id;
    int64_t idle_deadline;
    int ch, rc, ret = EXIT_OK;

    memset(&st, 0, sizeof(st));
    st.cli = cli;
    tags.n = tags.used = 0;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_COUNT:
            if (units_parse_u64(optarg, &st.count) != PQ_OK || st.count == 0) {
                return usage_err("--count: want a number > 0, not %s", optarg);
            }
            break;
        case O_WAIT:
            if (units_parse_duration_ms(optarg, &wait_ms) != PQ_OK) {
                return usage_err("--wait: not a duration: %s", optarg);
            }
            wait_set = true;
            break;
        case O_PREFETCH:
            if (units_parse_u64(optarg, &v) != PQ_OK || v == 0 ||
                v > UINT32_MAX) {
                return usage_err("--prefetch: want a number > 0, not %s",
                                 optarg);
            }
            prefetch = v;
            break;
        case O_JSON:
            st.json = true;
            break;
        case O_NOACK:
            if (st.mode == MODE_NACK) {
                return usage_err("--no-ack and --nack exclude each other");
            }
            st.mode = MODE_NO_ACK;
            break;
        case O_NACK:
            if (st.mode == MODE_NO_ACK) {
                return usage_err("--no-ack and --nack exclude each other");
            }
            st.mode = MODE_NACK;
            break;
        case O_TAG:
            if (!kv_add(&tags, optarg)) {
                return usage_err("--tag: want K=V (at most %d)", MAX_KV);
            }
            break;
        default:
            return usage_err("consume: bad option");
        }
    }
    if (optind != argc - 1) {
        return usage_err("consume: want exactly one QUEUE");
    }
    queue = argv[optind];
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "consume %s", queue);
    cli->cmd = cli->cmdbuf;
    if (prefetch == 0) {
        prefetch = DEFAULT_PREFETCH;
        if (st.count > 0 && st.count < prefetch) {
            prefetch = st.count;
        }
    }
    install_consume_signals();
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    protoq_set_error_cb(cli->c, consume_error, &st);
    credit = prefetch;
    rc = protoq_subscribe(cli->c, queue, (uint32_t)credit, tags.kv, tags.n,
                          consume_deliver, &st, &sub_id);
    if (rc != PQ_OK) {
        ret = fail_pq(cli, rc);
        goto out;
    }
    idle_deadline = (st.count > 0 && !wait_set) ? -1 : 0;
    for (;;) {
        int64_t now = (int64_t)clock_mono_ms();
        int timeout = -1;

        /* Deliveries can arrive inside any call on the handle (protoq_flow
         * below runs callbacks while it waits for its Ok): check the count
         * and send their acks before blocking, or both sides wait. */
        if ((st.count > 0 && st.received >= st.count) || consume_stop) {
            rc = PQ_OK;
            break;
        }
        if (st.acks.n > 0) {
            rc = consume_settle(&st, false);
            if (rc != PQ_OK) {
                break;
            }
        }
        if (idle_deadline == 0) {
            idle_deadline = now + (int64_t)wait_ms;
        }
        if (idle_deadline > 0) {
            if (now >= idle_deadline) {
                rc = PQ_OK;
                break;
            }
            timeout = (int)(idle_deadline - now);
        }
        rc = protoq_poll(cli->c, timeout);
        if (rc < 0) {
            ret = fail_pq(cli, rc);
            goto out;
        }
        if (st.oom) {
            ret = fail(cli, "out of memory");
            goto out;
        }
        if (rc > 0 && idle_deadline > 0) {
            idle_deadline = 0; /* re-armed on the next pass */
        }
        if (st.count > 0 && st.received >= st.count) {
            rc = PQ_OK;
            break;
        }
        rc = consume_settle(&st, false);
        if (rc != PQ_OK) {
            break;
        }
        /* --no-ack holds every delivery, so widen the credit as it fills;
         * near --count, narrow it so few extra messages come our way. */
        if (st.mode == MODE_NO_ACK && st.received + prefetch / 2 >= credit) {
            credit = st.received + prefetch;
            if (st.count > 0 && credit > st.count) {
                credit = st.count;
            }
            rc = protoq_flow(cli->c, sub_id, (uint32_t)credit);
        } else if (st.mode != MODE_NO_ACK && st.count > 0 &&
                   st.count - st.received <= credit / 2 && credit > 1) {
            credit = st.count - st.received;
            rc = protoq_flow(cli->c, sub_id, (uint32_t)credit);
        }
        if (rc != PQ_OK) {
            break;
        }
    }
    if (rc == PQ_OK || (rc == PQ_ESYS && st.out_err != 0)) {
        /* Pause the flow (Flow 0) before the final acks and releases free
         * credit, so nothing more is pushed to us: what arrives meanwhile
         * is released too, and the broker holds nothing of ours when we
         * disconnect. */
        rc = protoq_flow(cli->c, sub_id, 0);
    }
    if (rc == PQ_OK && !st.oom) {
        rc = consume_settle(&st, true);
    }
    if (st.oom) {
        ret = fail(cli, "out of memory");
        goto out;
    }
    if (st.out_err == EPIPE && rc == PQ_OK) {
        /* The reader went away (consume | head): a clean stop. */
    } else if (st.out_err != 0) {
        ret = fail(cli, "writing stdout: %s", strerror(st.out_err));
    } else if (rc != PQ_OK) {
        ret = fail_pq(cli, rc);
    } else if (st.async_errors > 0) {
        ret = EXIT_ERR;
    }
out:
    free(st.acks.v);
    free(st.give_back.v);
    return ret;
}
