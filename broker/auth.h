/*
 * auth.h: the token table of protoqd (config `auth_file`) and the
 * permission checks made against it. No I/O besides reading the file, no
 * libevent: dispatch.c asks, the server loads and swaps tables.
 *
 * The file: one token a line, `NAME HASH PERM...`; `#` comments and blank
 * lines. NAME is 1..64 bytes of [A-Za-z0-9._:-] and unique; HASH is the
 * lowercase or uppercase hex SHA-256 of the token (64 digits); PERM is
 * `admin` (everything) or `publish:GLOB`, `consume:GLOB`, `manage:GLOB`,
 * where GLOB is a queue-name pattern in which `*` matches any run of
 * characters (none included). Tokens are never stored in clear.
 */
#ifndef PQ_AUTH_H
#define PQ_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum { AUTH_HASH_BYTES = 32, AUTH_NAME_MAX = 64 };

/* A permission a request needs; bits, so a check can accept several. */
enum auth_perm {
    AUTH_PUBLISH = 1,
    AUTH_CONSUME = 2,
    AUTH_MANAGE = 4, /* create, delete, purge, bind; overrides ownership */
    AUTH_ANY = AUTH_PUBLISH | AUTH_CONSUME | AUTH_MANAGE,
};

struct auth_table;
struct auth_token;

/*
 * auth_table_load: parse path into a new table (*out, freed with
 * auth_table_free). PQ_EINVAL with "PATH:LINE: ..." in err for a bad line,
 * PQ_ESYS when the file cannot be read, PQ_ENOMEM. *out is NULL on error.
 */
int auth_table_load(const char *path, struct auth_table **out, char *err,
                    size_t errlen);

/* auth_table_parse: the same from text already in memory (name for
 * messages, e.g. the file's path). */
int auth_table_parse(const char *name, const char *text, size_t len,
                     struct auth_table **out, char *err, size_t errlen);

void auth_table_free(struct auth_table *t);

/* auth_table_count: tokens in t. */
size_t auth_table_count(const struct auth_table *t);

/*
 * auth_lookup: the entry whose hash is SHA-256(token), or NULL. Every
 * entry is compared in constant time, so the time taken does not say how
 * close a guess came. The result lives as long as t.
 */
const struct auth_token *auth_lookup(const struct auth_table *t,
                                     const char *token);

/* auth_find: the entry with this name and hash, or NULL (a connection
 * finds its token again in a reloaded table). */
const struct auth_token *auth_find(const struct auth_table *t, const char *name,
                                   const uint8_t hash[AUTH_HASH_BYTES]);

const char *auth_token_name(const struct auth_token *tok);
const uint8_t *auth_token_hash(const struct auth_token *tok);
bool auth_token_is_admin(const struct auth_token *tok);

/*
 * auth_allows: true when tok holds admin, or one of the permissions in
 * perms (bits of enum auth_perm) with a glob that matches queue.
 */
bool auth_allows(const struct auth_token *tok, unsigned perms,
                 const char *queue);

/* auth_perm_name: "publish", "consume", "manage", or "publish or ..." for
 * several bits, for FORBIDDEN messages. */
const char *auth_perm_name(unsigned perms);

/* auth_glob_match: pattern over name, `*` = any run (none included); every
 * other byte matches itself. */
bool auth_glob_match(const char *pattern, const char *name);

/* auth_sha256: SHA-256 of len bytes (OpenSSL's libcrypto). PQ_OK or
 * PQ_ENOMEM. */
int auth_sha256(const void *data, size_t len, uint8_t out[AUTH_HASH_BYTES]);

/* auth_hash_hex: SHA-256 of token as 64 lowercase hex digits + NUL. */
int auth_hash_hex(const char *token, char out[2 * AUTH_HASH_BYTES + 1]);

/*
 * auth_host_is_loopback: every address host resolves to (numeric or by
 * name, for a passive listen) is loopback (127.0.0.0/8, ::1). False for
 * a wildcard (0.0.0.0, ::) or when it does not resolve.
 */
bool auth_host_is_loopback(const char *host);

#endif
