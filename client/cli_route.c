/*
 * cli_route.c: protoq route bind|unbind|ls: a route's bindings to queues,
 * each with an optional topic pattern (`a.*.c`, `a.#`; none: every key).
 */
#include "cli.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* route bind|unbind ROUTE QUEUE [--pattern P] */
static int
route_change(struct cli *cli, bool bind, int argc, char **argv)
{
    static const struct option opts[] = {
        {"pattern", required_argument, NULL, 'p'},
        {NULL, 0, NULL, 0},
    };
    const char *pattern = "";
    int ch, rc;

    while ((ch = cli_getopt(argc, argv, opts)) != -1) {
        if (ch != 'p') {
            return EXIT_USAGE; /* cli_getopt said why */
        }
        pattern = optarg;
    }
    if (argc - optind != 2) {
        return usage_err("route %s: want ROUTE QUEUE [--pattern P]", argv[0]);
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "route %s %s %s", argv[0],
             argv[optind], argv[optind + 1]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = bind ? protoq_route_bind(cli->c, argv[optind], argv[optind + 1],
                                  pattern)
              : protoq_route_unbind(cli->c, argv[optind], argv[optind + 1],
                                    pattern);
    return rc == PQ_OK ? EXIT_OK : fail_pq(cli, rc);
}

/* route ls: ROUTE QUEUE PATTERN lines ("*" shows an empty pattern: every
 * key), a header first. */
static int
route_ls(struct cli *cli, int argc)
{
    struct protoq_binding *b;
    size_t n;
    int rc;

    if (argc != 1) {
        return usage_err("route ls: no arguments");
    }
    cli->cmd = "route ls";
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_route_list(cli->c, &b, &n);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    printf("%-24s %-24s %s\n", "ROUTE", "QUEUE", "PATTERN");
    for (size_t i = 0; i < n; i++) {
        printf("%-24s %-24s %s\n", b[i].route, b[i].queue,
               b[i].pattern[0] ? b[i].pattern : "(every key)");
    }
    free(b);
    return fflush(stdout) == 0 ? EXIT_OK : fail(cli, "stdout: write failed");
}

int
cmd_route(struct cli *cli, int argc, char **argv)
{
    cli->cmd = "route";
    if (argc < 2) {
        return usage_err("route: want bind, unbind or ls");
    }
    if (strcmp(argv[1], "bind") == 0 || strcmp(argv[1], "unbind") == 0) {
        return route_change(cli, argv[1][0] == 'b', argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "ls") == 0) {
        return route_ls(cli, argc - 1);
    }
    return usage_err("route: unknown subcommand '%s'", argv[1]);
}
