/*
 * producer.c: submit jobs with libprotoq, each confirmed durable, surviving
 * a broker restart without storing a job twice.
 *
 *     producer [-s HOST:PORT] [-n JOBS] [-r K=V]... [-p PAYLOAD] QUEUE
 *
 * Publishes JOBS (default 10) jobs with PAYLOAD (default "steps=20") that
 * require the tags given with -r (e.g. -r gpu=a100: only workers with that
 * tag get them) and prints "published ID" for each. The handle reconnects
 * by itself (protoq_opts.reconnect); a publish that fails because the
 * connection went (PQ_ECLOSED) may or may not have been stored, so it is
 * sent again with the same idempotency key: the broker stores it once
 * (within the queue's dedup window).
 *
 * Built by `make all` into build/examples/ (not installed); run against a
 * real protoqd by tests/integration/check_examples.c.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "protoq.h"

enum { MAX_REQUIRES = 8, TRIES = 5 };

/* One publish, retried while the connection is what failed. */
static int
publish_one(protoq_client *c, const char *queue, struct protoq_message *m,
            uint64_t *id)
{
    int rc = PQ_ECLOSED;

    for (int i = 0; i < TRIES && (rc == PQ_ECLOSED || rc == PQ_ETIMEDOUT);
         i++) {
        rc = protoq_publish(c, queue, m, id);
    }
    return rc;
}

int
main(int argc, char **argv)
{
    struct protoq_opts o = {.client_name = "producer", .reconnect = true};
    const char *server = getenv("PROTOQ_SERVER");
    const char *payload = "steps=20";
    struct protoq_kv req[MAX_REQUIRES];
    char req_buf[MAX_REQUIRES][256];
    size_t n_req = 0;
    protoq_client *c = NULL;
    int n = 10, opt, rc;

    while ((opt = getopt(argc, argv, "s:n:r:p:")) != -1) {
        char *eq;

        switch (opt) {
        case 's':
            server = optarg;
            break;
        case 'n':
            n = atoi(optarg);
            break;
        case 'p':
            payload = optarg;
            break;
        case 'r':
            if (n_req == MAX_REQUIRES || strlen(optarg) >= 256 ||
                strchr(optarg, '=') == NULL) {
                fprintf(stderr, "producer: -r wants K=V (at most %d)\n",
                        MAX_REQUIRES);
                return 2;
            }
            strcpy(req_buf[n_req], optarg);
            eq = strchr(req_buf[n_req], '=');
            *eq = '\0';
            req[n_req].key = req_buf[n_req];
            req[n_req].value = eq + 1;
            n_req++;
            break;
        default:
            goto usage;
        }
    }
    if (optind + 1 != argc) {
        goto usage;
    }
    rc = protoq_connect(server ? server : "127.0.0.1:7650", &o, &c);
    for (int i = 0; i < n && rc == PQ_OK; i++) {
        struct protoq_message m = {0};
        char key[64];
        uint64_t id;

        /* Unique per run and job: a retry of this job reuses it. */
        snprintf(key, sizeof(key), "producer-%ld-%d-%d", (long)time(NULL),
                 (int)getpid(), i);
        m.payload = payload;
        m.len = strlen(payload);
        m.idempotency_key = key;
        m.requires = req;
        m.n_requires = n_req;
        rc = publish_one(c, argv[optind], &m, &id);
        if (rc == PQ_OK) {
            printf("published %" PRIu64 "\n", id);
        }
    }
    if (rc != PQ_OK) {
        fprintf(stderr, "producer: %s\n",
                c ? protoq_errmsg(c) : "out of memory");
    }
    protoq_close(c);
    return rc == PQ_OK ? 0 : 1;

usage:
    fprintf(stderr, "usage: producer [-s HOST:PORT] [-n JOBS] [-r K=V]... "
                    "[-p PAYLOAD] QUEUE\n");
    return 2;
}
