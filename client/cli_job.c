/*
 * cli_job.c: commands about jobs: `protoq cancel QUEUE ID`, `protoq job
 * QUEUE ID` and `protoq jobs QUEUE` (look without changing anything), and
 * `protoq progress`, which a job run by `protoq work` calls to report
 * progress (it appends a line to the file named by $PROTOQ_PROGRESS; work
 * forwards it with the next touch).
 */
#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A wall-clock time (Unix ms) as UTC ISO 8601 with ms; "-" for 0. */
static const char *
iso_time(uint64_t ms, char *buf, size_t cap)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    size_t n;

    if (ms == 0 || gmtime_r(&t, &tm) == NULL) {
        return "-";
    }
    n = strftime(buf, cap, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, cap - n, ".%03uZ", (unsigned)(ms % 1000));
    return buf;
}

/* QUEUE ID from argv[1..2] into *id; a usage error otherwise. */
static int
queue_and_id(const char *what, int argc, char **argv, uint64_t *id)
{
    if (argc != 3) {
        return usage_err("%s: want QUEUE ID", what);
    }
    if (units_parse_u64(argv[2], id) != PQ_OK || *id == 0) {
        return usage_err("%s: not a message id: %s", what, argv[2]);
    }
    return EXIT_OK;
}

int
cmd_cancel(struct cli *cli, int argc, char **argv)
{
    uint64_t id;
    int rc;

    if ((rc = queue_and_id("cancel", argc, argv, &id)) != EXIT_OK) {
        return rc;
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "cancel %s %s", argv[1],
             argv[2]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_cancel(cli->c, argv[1], id);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    return EXIT_OK;
}

/* protoq job QUEUE ID: one "key: value" line per field (DESIGN.md). */
int
cmd_job(struct cli *cli, int argc, char **argv)
{
    struct protoq_job j;
    char t1[40], t2[40];
    uint64_t id;
    int rc;

    if ((rc = queue_and_id("job", argc, argv, &id)) != EXIT_OK) {
        return rc;
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "job %s %s", argv[1], argv[2]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_job_get(cli->c, argv[1], id, &j);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    printf("id: %" PRIu64 "\nqueue: %s\nstate: %s\nattempt: %u\n"
           "failures: %u\npriority: %u\n",
           j.id, j.queue, protoq_job_state_name(j.state), j.attempt, j.failures,
           j.priority);
    if (j.has_holder) {
        printf("holder: %s %s\nlease_left_ms: %" PRIu64 "\n", j.holder_name,
               j.holder_address, j.lease_left_ms);
    } else {
        printf("holder: -\nlease_left_ms: -\n");
    }
    if (j.has_progress) {
        printf("progress_percent: %u\n", j.progress_percent);
    } else {
        printf("progress_percent: -\n");
    }
    printf("progress_text: %s\ncheckpoint: %s\nlast_error: %s\n"
           "published_at: %s\ndue_at: %s\n",
           j.progress_text, j.checkpoint, j.last_error,
           iso_time(j.published_at_ms, t1, sizeof(t1)),
           iso_time(j.due_at_ms, t2, sizeof(t2)));
    for (size_t i = 0; i < j.n_requires; i++) {
        printf("requires: %s=%s\n", j.requires[i].key, j.requires[i].value);
    }
    if (j.cancelled) {
        printf("cancelled: yes\n");
    }
    protoq_job_fini(&j);
    return fflush(stdout) == 0 ? EXIT_OK
                               : fail(cli, "stdout: %s", strerror(errno));
}

static void
print_job_json(const struct protoq_job *j)
{
    printf("{\"id\":\"%" PRIu64 "\",\"queue\":", j->id);
    cli_json_str(stdout, j->queue, strlen(j->queue));
    printf(",\"state\":\"%s\",\"attempt\":%u,\"failures\":%u,"
           "\"priority\":%u,\"published_at_ms\":%" PRIu64
           ",\"due_at_ms\":%" PRIu64,
           protoq_job_state_name(j->state), j->attempt, j->failures,
           j->priority, j->published_at_ms, j->due_at_ms);
    if (j->has_holder) {
        printf(",\"holder\":");
        cli_json_str(stdout, j->holder_name, strlen(j->holder_name));
        printf(",\"holder_address\":");
        cli_json_str(stdout, j->holder_address, strlen(j->holder_address));
        printf(",\"lease_left_ms\":%" PRIu64, j->lease_left_ms);
    }
    if (j->has_progress) {
        printf(",\"progress_percent\":%u,\"progress_text\":",
               j->progress_percent);
        cli_json_str(stdout, j->progress_text, strlen(j->progress_text));
        printf(",\"checkpoint\":");
        cli_json_str(stdout, j->checkpoint, strlen(j->checkpoint));
    }
    if (j->last_error[0] != '\0') {
        printf(",\"last_error\":");
        cli_json_str(stdout, j->last_error, strlen(j->last_error));
    }
    printf("}\n");
}

static void
print_job_row(const struct protoq_job *j)
{
    char holder[140] = "-", progress[16] = "-";

    if (j->has_holder) {
        snprintf(holder, sizeof(holder), "%s@%s", j->holder_name,
                 j->holder_address);
    }
    if (j->has_progress) {
        snprintf(progress, sizeof(progress), "%u%%", j->progress_percent);
    }
    printf("%-20" PRIu64 " %-8s %7u %8u %4u %-9s %s\n", j->id,
           protoq_job_state_name(j->state), j->attempt, j->failures,
           j->priority, progress, holder);
}

/* protoq jobs QUEUE [--state S] [--limit N] [--json]: the first N jobs in
 * id order (fetched a page of up to 1000 at a time). */
int
cmd_jobs(struct cli *cli, int argc, char **argv)
{
    static const struct option opts[] = {
        {"state", required_argument, NULL, 's'},
        {"limit", required_argument, NULL, 'l'},
        {"json", no_argument, NULL, 'j'},
        {NULL, 0, NULL, 0},
    };
    uint64_t limit = 100, after = 0, shown = 0;
    int state = PROTOQ_JOB_ANY, ch, rc;
    bool json = false;

    while ((ch = cli_getopt(argc, argv, opts)) != -1) {
        switch (ch) {
        case 's':
            state = protoq_job_state_parse(optarg);
            if (state < 0) {
                return usage_err("jobs: --state: ready, delayed, inflight or "
                                 "dead, not %s",
                                 optarg);
            }
            break;
        case 'l':
            if (units_parse_u64(optarg, &limit) != PQ_OK || limit == 0) {
                return usage_err("jobs: --limit: not a count: %s", optarg);
            }
            break;
        case 'j':
            json = true;
            break;
        default:
            return EXIT_USAGE; /* cli_getopt said why */
        }
    }
    if (argc - optind != 1) {
        return usage_err("jobs: want QUEUE");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "jobs %s", argv[optind]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    if (!json) {
        printf("%-20s %-8s %7s %8s %4s %-9s %s\n", "ID", "STATE", "ATTEMPT",
               "FAILURES", "PRIO", "PROGRESS", "HOLDER");
    }
    do {
        uint64_t want = limit - shown;
        struct protoq_job *list;
        size_t n;

        rc = protoq_job_list(cli->c, argv[optind], state,
                             (uint32_t)(want > 1000 ? 1000 : want), after,
                             &list, &n, &after);
        if (rc != PQ_OK) {
            return fail_pq(cli, rc);
        }
        for (size_t i = 0; i < n; i++) {
            if (json) {
                print_job_json(&list[i]);
            } else {
                print_job_row(&list[i]);
            }
        }
        shown += n;
        protoq_job_list_free(list, n);
    } while (after != 0 && shown < limit);
    return fflush(stdout) == 0 ? EXIT_OK
                               : fail(cli, "stdout: %s", strerror(errno));
}

/*
 * protoq progress PERCENT [TEXT...]     a percentage (0-100) and a text
 * protoq progress --checkpoint URI      where the job's last checkpoint is
 */
int
cmd_progress(struct cli *cli, int argc, char **argv)
{
    const char *path = getenv("PROTOQ_PROGRESS");
    uint64_t pct;
    FILE *f;
    int ok;

    cli->cmd = "progress";
    if (argc < 2 || (strcmp(argv[1], "--checkpoint") == 0 && argc != 3)) {
        return usage_err("progress: want PERCENT [TEXT] or --checkpoint URI");
    }
    if (strcmp(argv[1], "--checkpoint") != 0 &&
        (units_parse_u64(argv[1], &pct) != PQ_OK || pct > 100)) {
        return usage_err("progress: want a percent 0-100, not %s", argv[1]);
    }
    if (path == NULL || path[0] == '\0') {
        return fail(cli, "PROTOQ_PROGRESS is not set (run under protoq work)");
    }
    f = fopen(path, "a");
    if (f == NULL) {
        return fail(cli, "%s: %s", path, strerror(errno));
    }
    if (strcmp(argv[1], "--checkpoint") == 0) {
        fprintf(f, "checkpoint %s\n", argv[2]);
    } else {
        fprintf(f, "progress %" PRIu64, pct);
        for (int i = 2; i < argc; i++) {
            fprintf(f, " %s", argv[i]);
        }
        fputc('\n', f);
    }
    ok = ferror(f) == 0;
    if (fclose(f) != 0 || !ok) {
        return fail(cli, "%s: %s", path, strerror(errno));
    }
    return EXIT_OK;
}
