/*
 * cli_queue.c: the queue administration commands (queue
 * create|ls|stat|purge|rm).
 */
#include "cli.h"

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

/*
 * duration_in: parse a duration option of queue create in the config's
 * grammar and range (units.h): min..max ms. On the wire 0 means "the
 * broker's default", so where 0 is not that, min is at least 1 ms.
 */
static bool
duration_in(const char *opt, const char *arg, uint64_t min, uint64_t max,
            uint64_t *out)
{
    if (units_parse_duration_ms(arg, out) != PQ_OK) {
        usage_err("%s: not a duration: %s (e.g. 500ms, 30s, 1h30m)", opt, arg);
        return false;
    }
    if (*out < min || *out > max) {
        char lo[32], hi[32];

        units_format_duration_ms(min, lo, sizeof(lo));
        units_format_duration_ms(max, hi, sizeof(hi));
        usage_err("%s: %s is out of range %s-%s", opt, arg, lo, hi);
        return false;
    }
    return true;
}

static int
cmd_queue_create(struct cli *cli, int argc, char **argv)
{
    enum {
        O_MAXLEN = 256,
        O_MAXBYTES,
        O_ACK,
        O_ATTEMPTS,
        O_DLQ,
        O_BACKOFF,
        O_TTL,
        O_DEDUP,
        O_LEASE,
        O_DLEXP,
        O_TRANSIENT
    };
    static const struct option opts[] = {
        {"max-length", required_argument, NULL, O_MAXLEN},
        {"max-bytes", required_argument, NULL, O_MAXBYTES},
        {"ack-timeout", required_argument, NULL, O_ACK},
        {"max-attempts", required_argument, NULL, O_ATTEMPTS},
        {"dead-letter", required_argument, NULL, O_DLQ},
        {"backoff", required_argument, NULL, O_BACKOFF},
        {"ttl", required_argument, NULL, O_TTL},
        {"dedup-window", required_argument, NULL, O_DEDUP},
        {"max-lease", required_argument, NULL, O_LEASE},
        {"dead-letter-expired", no_argument, NULL, O_DLEXP},
        {"transient", no_argument, NULL, O_TRANSIENT},
        {NULL, 0, NULL, 0},
    };
    struct protoq_queue_attrs a;
    uint64_t v;
    int ch, rc;

    memset(&a, 0, sizeof(a));
    while ((ch = cli_getopt(argc, argv, opts)) != -1) {
        switch (ch) {
        case O_MAXLEN:
            if (units_parse_u64(optarg, &a.max_length) != PQ_OK) {
                return usage_err("--max-length: not a number: %s", optarg);
            }
            break;
        case O_MAXBYTES:
            if (units_parse_bytes(optarg, &a.max_bytes) != PQ_OK) {
                return usage_err("--max-bytes: not a size: %s", optarg);
            }
            break;
        case O_ACK:
            if (!duration_in("--ack-timeout", optarg, UNITS_ACK_TIMEOUT_MIN_MS,
                             UNITS_ACK_TIMEOUT_MAX_MS, &a.ack_timeout_ms)) {
                return EXIT_USAGE;
            }
            break;
        case O_ATTEMPTS:
            if (units_parse_u64(optarg, &v) != PQ_OK || v == 0 ||
                v > UNITS_MAX_ATTEMPTS_MAX) {
                return usage_err("--max-attempts: want 1-%u, not %s",
                                 (unsigned)UNITS_MAX_ATTEMPTS_MAX, optarg);
            }
            a.max_attempts = (uint32_t)v;
            break;
        case O_DLQ:
            if (strlen(optarg) > PROTOQ_NAME_MAX) {
                return usage_err("--dead-letter: name too long");
            }
            snprintf(a.dead_letter, sizeof(a.dead_letter), "%s", optarg);
            break;
        case O_BACKOFF: {
            char *colon = strchr(optarg, ':');

            if (colon != NULL) {
                *colon = '\0';
            }
            if (!duration_in("--backoff BASE", optarg, 0,
                             UNITS_BACKOFF_BASE_MAX_MS, &a.backoff_base_ms) ||
                (colon &&
                 !duration_in("--backoff CAP", colon + 1, 0,
                              UNITS_BACKOFF_CAP_MAX_MS, &a.backoff_cap_ms))) {
                return EXIT_USAGE;
            }
            /* --backoff 0: retry at once (0 on the wire means "default"). */
            a.no_backoff = a.backoff_base_ms == 0;
            break;
        }
        case O_TTL:
            if (!duration_in("--ttl", optarg, 0, UNITS_DURATION_MAX_MS,
                             &a.ttl_ms)) {
                return EXIT_USAGE;
            }
            break;
        case O_DEDUP:
            if (!duration_in("--dedup-window", optarg, 1,
                             UNITS_DEDUP_WINDOW_MAX_MS, &a.dedup_window_ms)) {
                return EXIT_USAGE;
            }
            break;
        case O_LEASE:
            if (!duration_in("--max-lease", optarg, 0, UNITS_MAX_LEASE_MAX_MS,
                             &a.max_lease_ms)) {
                return EXIT_USAGE;
            }
            break;
        case O_DLEXP:
            a.dead_letter_expired = true;
            break;
        case O_TRANSIENT:
            a.transient = true;
            break;
        default:
            return EXIT_USAGE; /* cli_getopt said why */
        }
    }
    if (optind != argc - 1) {
        return usage_err("queue create: want exactly one NAME");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "queue create %s", argv[optind]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_queue_create(cli->c, argv[optind], &a);
    return rc == PQ_OK ? EXIT_OK : fail_pq(cli, rc);
}

static int
cmd_queue_ls(struct cli *cli, int argc, char **argv)
{
    struct protoq_queue_info *list;
    size_t n, i;
    int w_name = 4, w[4] = {5, 7, 8, 9};
    char num[4][32];
    int rc;

    (void)argv;
    if (argc != 1) {
        return usage_err("queue ls: no arguments expected");
    }
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_queue_list(cli->c, &list, &n);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    for (i = 0; i < n; i++) {
        uint64_t v[4] = {list[i].ready, list[i].delayed, list[i].inflight,
                         list[i].consumers};
        int len = (int)strlen(list[i].name);

        w_name = len > w_name ? len : w_name;
        for (int k = 0; k < 4; k++) {
            int l = snprintf(num[k], sizeof(num[k]), "%" PRIu64, v[k]);

            w[k] = l > w[k] ? l : w[k];
        }
    }
    printf("%-*s  %*s  %*s  %*s  %*s\n", w_name, "NAME", w[0], "READY", w[1],
           "DELAYED", w[2], "INFLIGHT", w[3], "CONSUMERS");
    for (i = 0; i < n; i++) {
        printf("%-*s  %*" PRIu64 "  %*" PRIu64 "  %*" PRIu64 "  %*" PRIu64 "\n",
               w_name, list[i].name, w[0], list[i].ready, w[1], list[i].delayed,
               w[2], list[i].inflight, w[3], list[i].consumers);
    }
    protoq_queue_list_free(list, n);
    return fflush(stdout) == 0 ? EXIT_OK
                               : fail(cli, "stdout: %s", strerror(errno));
}

static int
cmd_queue_stat(struct cli *cli, int argc, char **argv)
{
    struct protoq_queue_info q;
    const struct protoq_queue_attrs *a = &q.attrs;
    int rc;

    if (argc != 2) {
        return usage_err("queue stat: want exactly one NAME");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "queue stat %s", argv[1]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_queue_stat(cli->c, argv[1], &q);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    printf("name: %s\n", q.name);
    printf("transient: %s\n", a->transient ? "true" : "false");
    printf("max_length: %" PRIu64 "\n", a->max_length);
    printf("max_bytes: %" PRIu64 "\n", a->max_bytes);
    printf("ack_timeout_ms: %" PRIu64 "\n", a->ack_timeout_ms);
    printf("max_attempts: %u\n", a->max_attempts);
    printf("dead_letter: %s\n", a->dead_letter);
    printf("backoff_base_ms: %" PRIu64 "\n", a->backoff_base_ms);
    printf("backoff_cap_ms: %" PRIu64 "\n", a->backoff_cap_ms);
    printf("ttl_ms: %" PRIu64 "\n", a->ttl_ms);
    printf("dedup_window_ms: %" PRIu64 "\n", a->dedup_window_ms);
    printf("max_lease_ms: %" PRIu64 "\n", a->max_lease_ms);
    printf("dead_letter_expired: %s\n",
           a->dead_letter_expired ? "true" : "false");
    printf("no_backoff: %s\n", a->no_backoff ? "true" : "false");
    printf("ready: %" PRIu64 "\n", q.ready);
    printf("delayed: %" PRIu64 "\n", q.delayed);
    printf("inflight: %" PRIu64 "\n", q.inflight);
    printf("consumers: %" PRIu64 "\n", q.consumers);
    printf("bytes: %" PRIu64 "\n", q.bytes);
    printf("published: %" PRIu64 "\n", q.published);
    printf("acked: %" PRIu64 "\n", q.acked);
    printf("nacked: %" PRIu64 "\n", q.nacked);
    printf("redelivered: %" PRIu64 "\n", q.redelivered);
    printf("expired: %" PRIu64 "\n", q.expired);
    printf("dead_lettered: %" PRIu64 "\n", q.dead_lettered);
    printf("dropped: %" PRIu64 "\n", q.dropped);
    return fflush(stdout) == 0 ? EXIT_OK
                               : fail(cli, "stdout: %s", strerror(errno));
}

static int
cmd_queue_purge_rm(struct cli *cli, int argc, char **argv, bool purge)
{
    uint64_t n = 0;
    int rc;

    if (argc != 2) {
        return usage_err("queue %s: want exactly one NAME",
                         purge ? "purge" : "rm");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "queue %s %s",
             purge ? "purge" : "rm", argv[1]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = purge ? protoq_queue_purge(cli->c, argv[1], &n)
               : protoq_queue_delete(cli->c, argv[1]);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    if (purge) {
        printf("purged %" PRIu64 "\n", n);
    } else {
        printf("deleted queue %s\n", argv[1]);
    }
    return fflush(stdout) == 0 ? EXIT_OK
                               : fail(cli, "stdout: %s", strerror(errno));
}

int
cmd_queue(struct cli *cli, int argc, char **argv)
{
    if (argc < 2) {
        return usage_err("queue: want create, ls, stat, purge or rm");
    }
    cli->cmd = "queue";
    if (strcmp(argv[1], "create") == 0) {
        cli->cmd = "queue create";
        return cmd_queue_create(cli, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "ls") == 0 || strcmp(argv[1], "list") == 0) {
        cli->cmd = "queue ls";
        return cmd_queue_ls(cli, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "stat") == 0) {
        return cmd_queue_stat(cli, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "purge") == 0) {
        return cmd_queue_purge_rm(cli, argc - 1, argv + 1, true);
    }
    if (strcmp(argv[1], "rm") == 0 || strcmp(argv[1], "delete") == 0) {
        return cmd_queue_purge_rm(cli, argc - 1, argv + 1, false);
    }
    {
        static const char *const subs[] = {"create", "ls", "stat",
                                           "purge",  "rm", NULL};
        const char *guess = cli_suggest(argv[1], subs);

        if (guess != NULL) {
            return usage_err("queue: unknown command '%s' (did you mean "
                             "'%s'?)",
                             argv[1], guess);
        }
    }
    return usage_err("queue: unknown command '%s'", argv[1]);
}
