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

enum { CONFIG_PATH_MAX = 4096, CONFIG_ADDR_MAX = 300 };

struct config {
    /* ---- network ---- */
    char listen[CONFIG_ADDR_MAX];      /* HOST:PORT, [v6]:PORT; port 0 = any */
    char port_file[CONFIG_PATH_MAX];   /* write the bound port here; "" = no */
    char metrics[CONFIG_ADDR_MAX];     /* HTTP /metrics HOST:PORT; "" = off */
    uint32_t max_connections;
    uint32_t max_frame_bytes;          /* after Hello, prefix excluded */
    uint32_t max_hello_bytes;          /* before Hello */
    uint32_t max_message_bytes;        /* payload of one message */
    uint32_t max_batch;                /* messages in one PublishBatch */
    uint64_t conn_output_high_bytes;   /* stop delivering to a consumer past this */
    uint32_t heartbeat_ms;             /* 0 = off */
    uint32_t heartbeat_timeout_ms;     /* close a peer silent this long */
    uint32_t idle_timeout_ms;          /* close a handshake-less peer after */
    /* ---- storage ---- */
    char data_dir[CONFIG_PATH_MAX];
    enum fsync_policy fsync;
    uint32_t fsync_interval_ms;
    uint64_t segment_bytes;
    uint64_t payload_budget_bytes;     /* payloads kept in memory */
    uint64_t memory_high_bytes;        /* past it: OVERLOADED to publishers */
    /* ---- queue defaults (a queue's own attributes override) ---- */
    uint64_t ack_timeout_ms;
    uint32_t max_attempts;
    uint64_t backoff_base_ms;
    uint64_t backoff_cap_ms;
    uint64_t max_lease_ms;             /* 0 = no cap on one Touch */
    uint64_t dedup_window_ms;
    /* ---- logging ---- */
    enum log_level log_level;
};

/* config_defaults: fill c with every default. */
void config_defaults(struct config *c);

/*
 * config_load_file: apply `key value` lines from path on top of c. On error
 * writes "PATH:LINE: KEY: expected ..., got \"...\"" into err and returns
 * PQ_EINVAL (PQ_ESYS when the file cannot be read, with strerror in err).
 */
int config_load_file(struct config *c, const char *path, char *err,
                     size_t errlen);

/*
 * config_set: set one key from its text value (the file parser and the
 * command-line flags both use it). PQ_EINVAL with a message in err for an
 * unknown key or a value out of range.
 */
int config_set(struct config *c, const char *key, const char *value,
               char *err, size_t errlen);

/* config_dump: write every key and its value, one `key value` per line. */
void config_dump(const struct config *c, int fd);

/*
 * Parsers shared with the CLI (durations accept ms, s, m, h, d suffixes;
 * a bare number is milliseconds; sizes accept k, m, g (KiB...)).
 */
int config_parse_duration_ms(const char *s, uint64_t *out);
int config_parse_bytes(const char *s, uint64_t *out);

#endif
