/*
 * cli_job.c: commands about one job: `protoq cancel QUEUE ID` and
 * `protoq progress`, which a job run by `protoq work` calls to report
 * progress (it appends a line to the file named by $PROTOQ_PROGRESS; work
 * forwards it with the next touch).
 */
#include "cli.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int
cmd_cancel(struct cli *cli, int argc, char **argv)
{
    uint64_t id;
    int rc;

    if (argc != 3) {
        return usage_err("cancel: want QUEUE ID");
    }
    if (units_parse_u64(argv[2], &id) != PQ_OK || id == 0) {
        return usage_err("cancel: not a message id: %s", argv[2]);
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
