/*
 * main.c: protoqd's entry point: the command line, the config (file first,
 * flags override it), the startup order, and exit codes from <sysexits.h>:
 *   0 clean stop, EX_USAGE bad flags, EX_CONFIG bad config,
 *   EX_DATAERR damaged data dir, EX_OSERR startup failure (bind, lock...),
 *   EX_IOERR fatal storage error (fsync failed while running, or no room
 *   or an I/O error writing the log at start).
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include <event2/event.h>

#include "config.h"
#include "failpoint.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "server.h"
#include "tls.h"
#include "store.h"

#ifndef PROTOQ_VERSION
#define PROTOQ_VERSION "0.1.0"
#endif

static void
usage(FILE *out)
{
    fprintf(
        out,
        "usage: protoqd [-c FILE] [--listen HOST:PORT] [--data-dir DIR]\n"
        "               [--metrics HOST:PORT] [--log-level "
        "debug|info|warn|error]\n"
        "               [--port-file PATH] [--fsync always|interval|never]\n"
        "               [--check-config] [--check-data DIR]\n"
        "               [--salvage-data DIR] [--version]\n"
        "\n"
        "  -c FILE            read settings from FILE (see "
        "conf/protoqd.conf);\n"
        "                     flags override it\n"
        "  --listen HOST:PORT address to serve (default 127.0.0.1:7650;\n"
        "                     port 0 picks a free port)\n"
        "  --port-file PATH   write the bound port to PATH once listening\n"
        "  --data-dir DIR     where the log lives\n"
        "  --check-config     load and validate the config, print it, exit\n"
        "  --check-data DIR   verify a data dir read-only, print a summary,\n"
        "                     exit 0 if clean, 65 if damaged\n"
        "  --salvage-data DIR make a damaged data dir startable, keeping what\n"
        "                     can be read (originals go to DIR/salvage-TIME/;\n"
        "                     see README); exit 0 if it checks clean after\n");
}

enum {
    OPT_LISTEN = 256,
    OPT_DATA_DIR,
    OPT_METRICS,
    OPT_LOG_LEVEL,
    OPT_PORT_FILE,
    OPT_FSYNC,
    OPT_CHECK_CONFIG,
    OPT_CHECK_DATA,
    OPT_SALVAGE_DATA,
    OPT_VERSION,
    OPT_HELP,
};

static const struct option longopts[] = {
    {"listen", required_argument, NULL, OPT_LISTEN},
    {"data-dir", required_argument, NULL, OPT_DATA_DIR},
    {"metrics", required_argument, NULL, OPT_METRICS},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"port-file", required_argument, NULL, OPT_PORT_FILE},
    {"fsync", required_argument, NULL, OPT_FSYNC},
    {"check-config", no_argument, NULL, OPT_CHECK_CONFIG},
    {"check-data", required_argument, NULL, OPT_CHECK_DATA},
    {"salvage-data", required_argument, NULL, OPT_SALVAGE_DATA},
    {"version", no_argument, NULL, OPT_VERSION},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

/* The config key each settings flag stands for. */
static const char *
flag_key(int opt)
{
    switch (opt) {
    case OPT_LISTEN:
        return "listen";
    case OPT_DATA_DIR:
        return "data_dir";
    case OPT_METRICS:
        return "metrics";
    case OPT_LOG_LEVEL:
        return "log_level";
    case OPT_PORT_FILE:
        return "port_file";
    case OPT_FSYNC:
        return "fsync";
    default:
        return NULL;
    }
}

/* init_exit_code: the exit code for a failed start (README, "Exit
 * codes"): a damaged data dir 65, a disk that cannot take the log (full,
 * I/O error) 74, anything else (locked, bind, out of memory) 71. */
static int
init_exit_code(int rc)
{
    switch (rc) {
    case PQ_ECORRUPT:
    case PQ_EVERSION:
        return EX_DATAERR;
    case PQ_ENOSPC:
    case PQ_EIO:
        return EX_IOERR;
    default:
        return EX_OSERR;
    }
}

int
main(int argc, char **argv)
{
    static struct server srv; /* large; zeroed; lives for the process */
    const char *conf = NULL, *check_data = NULL, *salvage_data = NULL;
    bool check_config = false;
    char err[1024] = "";
    int opt, rc;

    log_init();
    /* First pass: find -c and the action flags. */
    while ((opt = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            conf = optarg;
            break;
        case OPT_CHECK_CONFIG:
            check_config = true;
            break;
        case OPT_CHECK_DATA:
            check_data = optarg;
            break;
        case OPT_SALVAGE_DATA:
            salvage_data = optarg;
            break;
        case OPT_VERSION:
            printf("protoqd %s (protocol %d)\n", PROTOQ_VERSION, 1);
            return 0;
        case 'h':
        case OPT_HELP:
            usage(stdout);
            return 0;
        case '?':
            usage(stderr);
            return EX_USAGE;
        default:
            break;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "protoqd: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return EX_USAGE;
    }
    if (check_data != NULL || salvage_data != NULL) {
        rc = check_data != NULL
                 ? store_check(check_data, stdout, err, sizeof(err))
                 : store_salvage(salvage_data, stdout, err, sizeof(err));
        if (rc != PQ_OK) {
            fprintf(stderr, "protoqd: %s\n", err);
            return (rc == PQ_ECORRUPT || rc == PQ_EVERSION) ? EX_DATAERR
                                                            : EX_OSERR;
        }
        return 0;
    }

    config_defaults(&srv.cfg);
    if (conf != NULL) {
        if (config_load_file(&srv.cfg, conf, err, sizeof(err)) != PQ_OK) {
            fprintf(stderr, "protoqd: %s\n", err);
            return EX_CONFIG;
        }
        snprintf(srv.conf_path, sizeof(srv.conf_path), "%s", conf);
    }
    /* Second pass: flags override the file. */
    optind = 1;
    while ((opt = getopt_long(argc, argv, "c:h", longopts, NULL)) != -1) {
        const char *key = flag_key(opt);

        if (key != NULL &&
            config_override(&srv.cfg, key, optarg, err, sizeof(err)) != PQ_OK) {
            fprintf(stderr, "protoqd: --%s: %s\n", longopts[opt - 256].name,
                    err);
            return EX_USAGE;
        }
    }
    if (config_validate(&srv.cfg, err, sizeof(err)) != PQ_OK) {
        fprintf(stderr, "protoqd: %s\n", err);
        return EX_CONFIG;
    }
    /* The TLS files are part of the config: a bad one is EX_CONFIG, found
     * by --check-config too, and before the log is replayed. */
    if (srv.cfg.tls_listen[0] != '\0' &&
        tls_server_ctx_new(&srv.cfg, &srv.tls_ctx, err, sizeof(err)) != PQ_OK) {
        fprintf(stderr, "protoqd: %s\n", err);
        return EX_CONFIG;
    }
    if (check_config) {
        config_dump(&srv.cfg, STDOUT_FILENO);
        SSL_CTX_free(srv.tls_ctx);
        return 0;
    }
    log_set_level(srv.cfg.log_level);
    failpoint_init();
    log_info("protoqd %s starting (data dir %s, fsync %s)", PROTOQ_VERSION,
             srv.cfg.data_dir,
             srv.cfg.fsync == FSYNC_ALWAYS     ? "always"
             : srv.cfg.fsync == FSYNC_INTERVAL ? "interval"
                                               : "never");

    /* libevent allocates through mem.c too, so that connection buffers
     * (a partial frame from its first byte) count against
     * memory_high_bytes and show in protoq_memory_bytes. */
    event_set_mem_functions(pq_malloc, pq_realloc, pq_free);
    srv.broker.store_fd = -1;
    rc = server_init(&srv, err, sizeof(err));
    if (rc != PQ_OK) {
        log_err("%s", err);
        server_fini(&srv);
        return init_exit_code(rc);
    }
    rc = server_run(&srv);
    server_fini(&srv);
    if (rc == 0) {
        log_info("stopped cleanly");
    }
    return rc;
}
