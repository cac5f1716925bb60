/*
 * config.h: every protoqd setting, its default, the conf file parser and the
 * command-line overrides. Config keys are snake_case and spelled the same in
 * conf/protoqd.conf, in struct config and in metrics. The file format is
 * `key value` lines with `#` comments; flags override the file.
 */
#ifndef PQ_CONFIG_H
#define PQ_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "log.h"

enum fsync_policy { FSYNC_ALWAYS, FSYNC_INTERVAL, FSYNC_NEVER };

/* With tls_client_ca set: must a TLS client show a certificate? */
enum tls_client_verify { TLS_CLIENT_REQUIRE, TLS_CLIENT_OPTIONAL };

enum { CONFIG_PATH_MAX = 4096, CONFIG_ADDR_MAX = 300 };

/* Longest line config_load_file accepts, newline excluded. */
enum { CONFIG_LINE_MAX = 4096 };

struct config {
    /* ---- network ---- */
    char listen[CONFIG_ADDR_MAX];    /* HOST:PORT, [v6]:PORT; port 0 = any;
                                        "" = no plain listener (tls_listen) */
    char port_file[CONFIG_PATH_MAX]; /* write the bound port here; "" = no */
    char metrics[CONFIG_ADDR_MAX];   /* HTTP /metrics HOST:PORT; "" = off */
    uint32_t max_connections;
    uint32_t max_frame_bytes;   /* after Hello, prefix excluded */
    uint32_t max_hello_bytes;   /* before Hello */
    uint32_t max_message_bytes; /* payload of one message */
    uint32_t max_batch;         /* messages in one PublishBatch */
    uint32_t max_result_bytes;  /* result an Ack may carry */
    uint64_t
        conn_output_high_bytes;    /* stop delivering to a consumer past this */
    uint32_t heartbeat_ms;         /* 0 = off */
    uint32_t heartbeat_timeout_ms; /* close a peer silent this long */
    uint32_t idle_timeout_ms;      /* close a handshake-less peer after */
    uint32_t frame_timeout_ms;     /* a started frame must be whole by then */
    uint32_t idle_conn_timeout_ms; /* close a silent peer without
                                      subscriptions after; 0 = never */
    uint32_t max_connections_per_addr;  /* from one source address */
    uint32_t max_handshake_connections; /* before Hello (at most half of
                                           max_connections) */
    uint32_t disconnect_grace_ms;       /* a session's deliveries are kept this
                                           long after its connection goes; 0 =
                                           off (a disconnect fails them) */
    uint32_t max_held_sessions;         /* disconnected sessions kept at once */
    /* ---- security ---- */
    char auth_file[CONFIG_PATH_MAX]; /* token table; "" = no tokens */
    uint32_t allow_anonymous; /* 1: no auth_file on a non-loopback listen */
    /* ---- TLS ---- */
    char tls_listen[CONFIG_ADDR_MAX];    /* TLS HOST:PORT; "" = none */
    char tls_port_file[CONFIG_PATH_MAX]; /* its bound port; "" = no */
    char tls_cert[CONFIG_PATH_MAX];      /* PEM chain, leaf first */
    char tls_key[CONFIG_PATH_MAX];       /* PEM private key */
    char tls_client_ca[CONFIG_PATH_MAX]; /* PEM CAs for client certificates;
                                            "" = none asked for */
    enum tls_client_verify tls_client_verify;
    /* ---- storage ---- */
    char data_dir[CONFIG_PATH_MAX];
    enum fsync_policy fsync;
    uint32_t fsync_interval_ms;
    uint64_t segment_bytes;
    uint64_t payload_budget_bytes; /* payloads kept in memory */
    uint64_t memory_high_bytes;    /* past it: OVERLOADED to publishers */
    /* ---- queue defaults (a queue's own attributes override) ---- */
    uint64_t ack_timeout_ms;
    uint32_t max_attempts;
    uint64_t backoff_base_ms;
    uint64_t backoff_cap_ms;
    uint64_t max_lease_ms; /* 0 = no cap on one Touch */
    uint64_t dedup_window_ms;
    /* ---- logging ---- */
    enum log_level log_level;
    uint32_t log_format; /* 0 text, 1 json (one object a line) */
    /* ---- bookkeeping, not a setting ---- */
    uint64_t overridden; /* bit per key set by config_override() */
};

/* config_defaults: fill c with every default. */
void config_defaults(struct config *c);

/*
 * config_load_file: apply `key value` lines from path on top of c. On error
 * writes "PATH:LINE: KEY: expected ..., got \"...\"" into err and returns
 * PQ_EINVAL (PQ_ESYS when the file cannot be read, with strerror in err).
 * Lines: `key value` (value = rest of the line, trimmed; "" = empty string),
 * whole-line `#` comments, blank lines; a later line for a key wins. Each
 * value is range-checked; cross-field checks wait for config_validate, after
 * the flags. c may be partly updated on error.
 */
int config_load_file(struct config *c, const char *path, char *err,
                     size_t errlen);

/*
 * config_set: set one key from its text value (the file parser and the
 * command-line flags both use it). PQ_EINVAL with a message in err for an
 * unknown key or a value out of range.
 */
int config_set(struct config *c, const char *key, const char *value, char *err,
               size_t errlen);

/*
 * config_override: config_set for a command-line flag. Besides setting the
 * key it marks it in c->overridden, so config_reload_file keeps the flag's
 * value (and does not report it as an ignored change) on every SIGHUP.
 */
int config_override(struct config *c, const char *key, const char *value,
                    char *err, size_t errlen);

/*
 * config_validate: range-check every key and run the cross-field checks
 * (max_frame_bytes >= max_message_bytes + 64 KiB, heartbeat_timeout_ms >
 * heartbeat_ms when heartbeats are on, backoff_cap_ms >= backoff_base_ms,
 * max_lease_ms 0 or >= ack_timeout_ms, metrics not on listen's port, at
 * least one of listen and tls_listen, tls_cert and tls_key with
 * tls_listen, tls_listen not on listen's port). Call it
 * once after the file and the flags are applied. PQ_OK, or PQ_EINVAL with
 * "KEY: expected ..., got \"...\"" in err.
 */
int config_validate(const struct config *c, char *err, size_t errlen);

/*
 * config_dump: write every key and its value, one `key value` per line, in
 * table order; sizes in bytes, durations in ms, strings that are empty or
 * start/end with blanks in double quotes. The output loads back unchanged.
 */
void config_dump(const struct config *c, int fd);

/*
 * config_get: the canonical text of one key's value (as config_dump writes
 * it, strings unquoted) into buf. PQ_ENOTFOUND for an unknown key,
 * PQ_ETOOBIG when buf is too small.
 */
int config_get(const struct config *c, const char *key, char *buf, size_t len);

/* config_key_reloadable: true when SIGHUP applies key (false if unknown). */
bool config_key_reloadable(const char *key);

/* config_key_count, config_key_name: the key table, in dump order. */
size_t config_key_count(void);
const char *config_key_name(size_t i);

/*
 * config_reload_file: SIGHUP. Parse path over the defaults into a copy,
 * put back the keys in live->overridden (flags win), validate it, then copy
 * only the reloadable keys into live (log_level, log_format, max_connections,
 * max_hello_bytes, max_message_bytes, max_batch, conn_output_high_bytes,
 * heartbeat_ms, heartbeat_timeout_ms, idle_timeout_ms, frame_timeout_ms,
 * idle_conn_timeout_ms, max_connections_per_addr, max_handshake_connections,
 * disconnect_grace_ms, max_held_sessions,
 * max_result_bytes, memory_high_bytes, tls_cert, tls_key, tls_client_ca,
 * tls_client_verify).
 * A key missing from the file goes back to its default, as on a restart.
 * PQ_OK on success; non-reloadable keys whose value in the file differs
 * from the running one are ignored and named in err ("ignored until
 * restart: data_dir, fsync"; err is "" when none). On any error (unreadable
 * file, bad line, invalid result) live is left unchanged and a negative
 * PQ_E* comes back with the message in err. Side effects such as
 * log_set_level() are the caller's job.
 */
int config_reload_file(struct config *live, const char *path, char *err,
                       size_t errlen);

/*
 * config_split_hostport: "HOST:PORT", "[V6]:PORT" (brackets stripped) ->
 * host and port 0..65535. host may be NULL (validate only). PQ_EINVAL for a
 * malformed address, PQ_ETOOBIG when host does not fit in hostlen.
 */
int config_split_hostport(const char *s, char *host, size_t hostlen,
                          uint16_t *port);

/* config_fsync_name: "always", "interval" or "never". */
const char *config_fsync_name(enum fsync_policy p);

#endif
