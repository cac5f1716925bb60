/*
 * auth.c: the token table (auth.h has the file format), lookups in constant
 * time, permission checks by queue-name glob, and the loopback test of
 * protected mode. A table is immutable once loaded: a SIGHUP builds a new
 * one and the server swaps it in whole, so a bad file never leaves half a
 * table behind.
 */
#include "auth.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "mem.h"
#include "pqerr.h"

enum {
    AUTH_FILE_MAX = 4 * 1024 * 1024, /* bytes of auth_file */
    AUTH_LINE_MAX = 4096,            /* bytes of one line */
    AUTH_PERMS_MAX = 64,             /* permissions on one line */
    AUTH_GLOB_MAX = 256,             /* bytes of one glob */
};

struct auth_grant {
    unsigned perm; /* one bit of enum auth_perm */
    char *glob;    /* owned */
};

struct auth_token {
    char name[AUTH_NAME_MAX + 1];
    uint8_t hash[AUTH_HASH_BYTES];
    bool admin;
    struct auth_grant *grants; /* owned */
    size_t ngrants;
};

struct auth_table {
    struct auth_token *v;
    size_t n, cap;
};

/* ---- globs and names ---- */

/* auth_glob_match: see auth.h. Backtracks to the last `*` only, so it is
 * O(len(pattern) * len(name)) at worst. */
bool
auth_glob_match(const char *pattern, const char *name)
{
    const char *p = pattern, *s = name;
    const char *star = NULL, *resume = NULL;

    while (*s != '\0') {
        if (*p == '*') {
            star = p++;
            resume = s;
        } else if (*p == *s) {
            p++;
            s++;
        } else if (star != NULL) {
            p = star + 1;
            s = ++resume;
        } else {
            return false;
        }
    }
    while (*p == '*') {
        p++;
    }
    return *p == '\0';
}

static bool
name_byte_ok(char ch)
{
    return (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') ||
           (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-' ||
           ch == ':';
}

static bool
valid_name(const char *s, size_t max, bool star_ok)
{
    size_t i;

    for (i = 0; s[i] != '\0'; i++) {
        if (i >= max || !(name_byte_ok(s[i]) || (star_ok && s[i] == '*'))) {
            return false;
        }
    }
    return i > 0;
}

static int
hexval(char ch)
{
    if (ch >= '0' && ch <= '9') {
        return ch - '0';
    }
    if (ch >= 'a' && ch <= 'f') {
        return ch - 'a' + 10;
    }
    if (ch >= 'A' && ch <= 'F') {
        return ch - 'A' + 10;
    }
    return -1;
}

static bool
parse_hash(const char *s, uint8_t out[AUTH_HASH_BYTES])
{
    if (strlen(s) != 2 * AUTH_HASH_BYTES) {
        return false;
    }
    for (size_t i = 0; i < AUTH_HASH_BYTES; i++) {
        int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);

        if (hi < 0 || lo < 0) {
            return false;
        }
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    return true;
}

/* ---- hashing ---- */

/* auth_sha256: see auth.h. */
int
auth_sha256(const void *data, size_t len, uint8_t out[AUTH_HASH_BYTES])
{
    unsigned int n = 0;

    if (EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) != 1 ||
        n != AUTH_HASH_BYTES) {
        return PQ_ENOMEM;
    }
    return PQ_OK;
}

/* auth_hash_hex: see auth.h. */
int
auth_hash_hex(const char *token, char out[2 * AUTH_HASH_BYTES + 1])
{
    static const char digits[] = "0123456789abcdef";
    uint8_t h[AUTH_HASH_BYTES];
    int rc = auth_sha256(token, strlen(token), h);

    if (rc != PQ_OK) {
        return rc;
    }
    for (size_t i = 0; i < AUTH_HASH_BYTES; i++) {
        out[2 * i] = digits[h[i] >> 4];
        out[2 * i + 1] = digits[h[i] & 15];
    }
    out[2 * AUTH_HASH_BYTES] = '\0';
    return PQ_OK;
}

/* ---- the table ---- */

static void
token_fini(struct auth_token *t)
{
    for (size_t i = 0; i < t->ngrants; i++) {
        pq_free(t->grants[i].glob);
    }
    pq_free(t->grants);
    t->grants = NULL;
    t->ngrants = 0;
}

void
auth_table_free(struct auth_table *t)
{
    if (t == NULL) {
        return;
    }
    for (size_t i = 0; i < t->n; i++) {
        token_fini(&t->v[i]);
    }
    pq_free(t->v);
    pq_free(t);
}

size_t
auth_table_count(const struct auth_table *t)
{
    return t ? t->n : 0;
}

__attribute__((format(printf, 5, 6))) static int
line_err(char *err, size_t errlen, const char *name, unsigned line,
         const char *fmt, ...)
{
    char msg[300];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(err, errlen, "%s:%u: %s", name, line, msg);
    return PQ_EINVAL;
}

/* One permission word into t (admin, or KIND:GLOB). */
static int
parse_perm(struct auth_token *t, const char *word, const char *name,
           unsigned line, char *err, size_t errlen)
{
    static const struct {
        const char *prefix;
        unsigned perm;
    } kinds[] = {
        {"publish:", AUTH_PUBLISH},
        {"consume:", AUTH_CONSUME},
        {"manage:", AUTH_MANAGE},
    };
    struct auth_grant *g;

    if (strcmp(word, "admin") == 0) {
        t->admin = true;
        return PQ_OK;
    }
    for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
        size_t plen = strlen(kinds[i].prefix);

        if (strncmp(word, kinds[i].prefix, plen) != 0) {
            continue;
        }
        if (!valid_name(word + plen, AUTH_GLOB_MAX, true)) {
            return line_err(err, errlen, name, line,
                            "token %s: permission \"%.80s\": expected a "
                            "queue-name glob (A-Z a-z 0-9 . _ - : and *, up "
                            "to %d bytes) after the colon",
                            t->name, word, AUTH_GLOB_MAX);
        }
        if (t->ngrants == AUTH_PERMS_MAX) {
            return line_err(err, errlen, name, line,
                            "token %s: over %d permissions", t->name,
                            AUTH_PERMS_MAX);
        }
        g = pq_realloc(t->grants, (t->ngrants + 1) * sizeof(*g));
        if (g == NULL) {
            return PQ_ENOMEM;
        }
        t->grants = g;
        g[t->ngrants].perm = kinds[i].perm;
        g[t->ngrants].glob = pq_strdup(word + plen);
        if (g[t->ngrants].glob == NULL) {
            return PQ_ENOMEM;
        }
        t->ngrants++;
        return PQ_OK;
    }
    return line_err(err, errlen, name, line,
                    "token %s: permission \"%.80s\": expected admin, "
                    "publish:GLOB, consume:GLOB or manage:GLOB",
                    t->name, word);
}

/* One non-blank, non-comment line (NUL-terminated, modified) into tb. */
static int
parse_line(struct auth_table *tb, char *text, const char *name, unsigned line,
           char *err, size_t errlen)
{
    static const char blanks[] = " \t\r";
    char *save = NULL;
    char *word = strtok_r(text, blanks, &save);
    char *hash = strtok_r(NULL, blanks, &save);
    struct auth_token *t;
    int rc;

    if (!valid_name(word, AUTH_NAME_MAX, false)) {
        return line_err(err, errlen, name, line,
                        "token name \"%.80s\": expected 1-%d bytes of A-Z "
                        "a-z 0-9 . _ - :",
                        word, AUTH_NAME_MAX);
    }
    if (hash == NULL) {
        return line_err(err, errlen, name, line,
                        "token %s: expected NAME HASH PERM...", word);
    }
    if (tb->n == tb->cap) {
        size_t cap = tb->cap ? tb->cap * 2 : 16;
        struct auth_token *v = pq_realloc(tb->v, cap * sizeof(*v));

        if (v == NULL) {
            return PQ_ENOMEM;
        }
        tb->v = v;
        tb->cap = cap;
    }
    t = &tb->v[tb->n];
    memset(t, 0, sizeof(*t));
    snprintf(t->name, sizeof(t->name), "%s", word);
    if (!parse_hash(hash, t->hash)) {
        return line_err(err, errlen, name, line,
                        "token %s: expected the hex SHA-256 of the token (64 "
                        "digits; protoqd --hash-token makes it), got "
                        "\"%.80s\"",
                        t->name, hash);
    }
    tb->n++; /* from here token_fini frees what the line added */
    for (size_t i = 0; i + 1 < tb->n; i++) {
        if (strcmp(tb->v[i].name, t->name) == 0) {
            return line_err(err, errlen, name, line,
                            "token %s: name used twice", t->name);
        }
        if (CRYPTO_memcmp(tb->v[i].hash, t->hash, AUTH_HASH_BYTES) == 0) {
            return line_err(err, errlen, name, line,
                            "token %s: same hash as token %s", t->name,
                            tb->v[i].name);
        }
    }
    while ((word = strtok_r(NULL, blanks, &save)) != NULL) {
        rc = parse_perm(t, word, name, line, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if (!t->admin && t->ngrants == 0) {
        return line_err(err, errlen, name, line,
                        "token %s: no permission given (admin, "
                        "publish:GLOB, consume:GLOB, manage:GLOB)",
                        t->name);
    }
    return PQ_OK;
}

/* auth_table_parse: see auth.h. */
int
auth_table_parse(const char *name, const char *text, size_t len,
                 struct auth_table **out, char *err, size_t errlen)
{
    struct auth_table *tb = pq_calloc(1, sizeof(*tb));
    char buf[AUTH_LINE_MAX + 1];
    unsigned line = 0;
    size_t at = 0;
    int rc = PQ_OK;

    *out = NULL;
    if (tb == NULL) {
        rc = PQ_ENOMEM;
        goto out;
    }
    while (at < len) {
        const char *nl = memchr(text + at, '\n', len - at);
        size_t n = nl ? (size_t)(nl - (text + at)) : len - at;
        char *p;

        line++;
        if (n > AUTH_LINE_MAX) {
            rc = line_err(err, errlen, name, line, "line over %d bytes",
                          AUTH_LINE_MAX);
            goto out;
        }
        if (memchr(text + at, '\0', n) != NULL) {
            rc = line_err(err, errlen, name, line, "NUL byte in the line");
            goto out;
        }
        memcpy(buf, text + at, n);
        buf[n] = '\0';
        at += n + (nl ? 1 : 0);
        p = buf + strspn(buf, " \t\r");
        if (*p == '\0' || *p == '#') {
            continue;
        }
        rc = parse_line(tb, p, name, line, err, errlen);
        if (rc != PQ_OK) {
            goto out;
        }
    }
out:
    if (rc == PQ_ENOMEM) {
        snprintf(err, errlen, "%s: out of memory", name);
    }
    if (rc != PQ_OK) {
        auth_table_free(tb);
        return rc;
    }
    *out = tb;
    return PQ_OK;
}

/* auth_table_load: see auth.h. */
int
auth_table_load(const char *path, struct auth_table **out, char *err,
                size_t errlen)
{
    FILE *f = fopen(path, "re");
    char *text = NULL;
    size_t len = 0;
    int rc;

    *out = NULL;
    if (f == NULL) {
        snprintf(err, errlen, "auth_file %s: %s", path, strerror(errno));
        return PQ_ESYS;
    }
    text = pq_malloc(AUTH_FILE_MAX + 1);
    if (text == NULL) {
        snprintf(err, errlen, "auth_file %s: out of memory", path);
        rc = PQ_ENOMEM;
        goto out;
    }
    len = fread(text, 1, AUTH_FILE_MAX + 1, f);
    if (ferror(f)) {
        snprintf(err, errlen, "auth_file %s: %s", path, strerror(errno));
        rc = PQ_ESYS;
        goto out;
    }
    if (len > AUTH_FILE_MAX) {
        snprintf(err, errlen, "auth_file %s: over %d bytes", path,
                 AUTH_FILE_MAX);
        rc = PQ_EINVAL;
        goto out;
    }
    rc = auth_table_parse(path, text, len, out, err, errlen);
out:
    if (text != NULL) {
        OPENSSL_cleanse(text, len); /* hashes only, but no copies linger */
    }
    pq_free(text);
    fclose(f);
    return rc;
}

/* ---- lookups and checks ---- */

/* auth_lookup: see auth.h. */
const struct auth_token *
auth_lookup(const struct auth_table *t, const char *token)
{
    const struct auth_token *found = NULL;
    uint8_t h[AUTH_HASH_BYTES];

    if (t == NULL || token == NULL || token[0] == '\0' ||
        auth_sha256(token, strlen(token), h) != PQ_OK) {
        return NULL;
    }
    /* Compare with every entry, matched or not. */
    for (size_t i = 0; i < t->n; i++) {
        int diff = CRYPTO_memcmp(t->v[i].hash, h, AUTH_HASH_BYTES);

        found = diff == 0 ? &t->v[i] : found;
    }
    OPENSSL_cleanse(h, sizeof(h));
    return found;
}

/* auth_find: see auth.h. */
const struct auth_token *
auth_find(const struct auth_table *t, const char *name,
          const uint8_t hash[AUTH_HASH_BYTES])
{
    for (size_t i = 0; t != NULL && i < t->n; i++) {
        if (strcmp(t->v[i].name, name) == 0) {
            return CRYPTO_memcmp(t->v[i].hash, hash, AUTH_HASH_BYTES) == 0
                       ? &t->v[i]
                       : NULL;
        }
    }
    return NULL;
}

const char *
auth_token_name(const struct auth_token *tok)
{
    return tok->name;
}

const uint8_t *
auth_token_hash(const struct auth_token *tok)
{
    return tok->hash;
}

bool
auth_token_is_admin(const struct auth_token *tok)
{
    return tok->admin;
}

/* auth_allows: see auth.h. */
bool
auth_allows(const struct auth_token *tok, unsigned perms, const char *queue)
{
    if (tok->admin) {
        return true;
    }
    for (size_t i = 0; i < tok->ngrants; i++) {
        if ((tok->grants[i].perm & perms) != 0 &&
            auth_glob_match(tok->grants[i].glob, queue)) {
            return true;
        }
    }
    return false;
}

/* auth_perm_name: see auth.h. */
const char *
auth_perm_name(unsigned perms)
{
    switch (perms) {
    case AUTH_PUBLISH:
        return "publish";
    case AUTH_CONSUME:
        return "consume";
    case AUTH_MANAGE:
        return "manage";
    case AUTH_CONSUME | AUTH_MANAGE:
        return "consume or manage";
    case AUTH_PUBLISH | AUTH_MANAGE:
        return "publish or manage";
    default:
        return "publish, consume or manage";
    }
}

/* ---- protected mode ---- */

static bool
addr_is_loopback(const struct sockaddr *sa)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;

        return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        const uint8_t *b = in6->sin6_addr.s6_addr;

        if (IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr)) {
            return true;
        }
        /* ::ffff:127.x.y.z */
        return IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) && b[12] == 127;
    }
    return false;
}

/* auth_host_is_loopback: see auth.h. */
bool
auth_host_is_loopback(const char *host)
{
    struct addrinfo hints, *ai = NULL;
    bool all = true;

    if (host == NULL || host[0] == '\0') {
        return false; /* the wildcard address */
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    if (getaddrinfo(host, NULL, &hints, &ai) != 0 || ai == NULL) {
        return false;
    }
    for (const struct addrinfo *p = ai; p != NULL; p = p->ai_next) {
        all = all && addr_is_loopback(p->ai_addr);
    }
    freeaddrinfo(ai);
    return all;
}
