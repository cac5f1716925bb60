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

#include <openssl/crypto.h>

#include "auth.h"
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
        "               [--salvage-data DIR] [--hash-token] [--version]\n"
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
        "                     see README); exit 0 if it checks clean after\n"
        "  --hash-token       read a token on stdin, print its SHA-256 for\n"
        "                     auth_file (and an example line)\n");
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
    OPT_HASH_TOKEN,
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
    {"hash-token", no_argument, NULL, OPT_HASH_TOKEN},
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

/*
 * hash_token: --hash-token. One token on stdin (a trailing newline is not
 * part of it); its hex SHA-256 on the first line of stdout, then an example
 * auth_file line. 0, or EX_DATAERR for an empty or oversized token.
 */
static int
hash_token(void)
{
    char tok[4097], hex[2 * AUTH_HASH_BYTES + 1];
    size_t n = fread(tok, 1, sizeof(tok) - 1, stdin);
    int rc = EX_DATAERR;

    tok[n] = '\0';
    if (n == sizeof(tok) - 1 && fgetc(stdin) != EOF) {
        fprintf(stderr, "protoqd: --hash-token: token over %zu bytes\n", n);
        goto out;
    }
    if (n > 0 && tok[n - 1] == '\n') {
        tok[--n] = '\0';
        if (n > 0 && tok[n - 1] == '\r') {
            tok[--n] = '\0';
        }
    }
    if (n == 0 || strlen(tok) != n) {
        fprintf(stderr, "protoqd: --hash-token: give one non-empty token on "
                        "stdin (no NUL bytes)\n");
        goto out;
    }
    if (auth_hash_hex(tok, hex) != PQ_OK) {
        fprintf(stderr, "protoqd: --hash-token: SHA-256 failed\n");
        rc = EX_SOFTWARE;
        goto out;
    }
    printf("%s\n# an auth_file line (choose the name and permissions):\n"
           "# NAME %s consume:QUEUE-GLOB publish:QUEUE-GLOB\n",
           hex, hex);
    rc = 0;
out:
    OPENSSL_cleanse(tok, sizeof(tok));
    return rc;
}

/*
 * protected_mode: without auth_file, refuse a listen address that is not
 * loopback unless allow_anonymous is yes (then warn). 0 or EX_CONFIG.
 */
static int
protected_mode(const struct config *c)
{
    const char *const addrs[] = {c->listen, c->tls_listen};
    char host[CONFIG_ADDR_MAX];
    uint16_t port;

    if (c->auth_file[0] != '\0') {
        return 0;
    }
    for (size_t i = 0; i < sizeof(addrs) / sizeof(addrs[0]); i++) {
        if (addrs[i][0] == '\0' ||
            config_split_hostport(addrs[i], host, sizeof(host), &port) !=
                PQ_OK ||
            auth_host_is_loopback(host)) {
            continue;
        }
        if (!c->allow_anonymous) {
            fprintf(stderr,
                    "protoqd: refusing to listen on %s: it is not a loopback "
                    "address and no auth_file is set, so anyone who can reach "
                    "the port could read, delete and publish anything. Set "
                    "auth_file (README, \"Running protoq on a network\"), or "
                    "allow_anonymous yes to accept that.\n",
                    addrs[i]);
            return EX_CONFIG;
        }
        log_warn("listening on %s with no auth_file (allow_anonymous yes): "
                 "anyone who can reach the port may do anything",
                 addrs[i]);
    }
    return 0;
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
        case OPT_HASH_TOKEN:
            return hash_token();
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
    log_set_level(srv.cfg.log_level);
    log_set_json(srv.cfg.log_format == 1);
    if ((rc = protected_mode(&srv.cfg)) != 0) {
        return rc;
    }
    if (server_load_auth(&srv, err, sizeof(err)) != PQ_OK) {
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
        auth_table_free(srv.auth);
        SSL_CTX_free(srv.tls_ctx);
        return 0;
    }
    if (srv.auth != NULL) {
        log_info("auth_file %s: %zu tokens; clients must authenticate",
                 srv.cfg.auth_file, auth_table_count(srv.auth));
    }
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
