/*
 * cli_json.c: the one JSON writer of the protoq CLI (consume --json): one
 * object per line, valid JSON on every line whatever the bytes are.
 *
 *   {"id":"117710672494560966","attempt":1,"priority":0,"queue":"q",
 *    "headers":{"k":"v"},"headers_base64":{"<b64 key>":"<b64 value>"},
 *    "payload":"text"}                 (or "payload_base64":"...")
 *
 * Ids are 64-bit: written as strings, since JSON readers (jq, JavaScript)
 * keep only 53 bits of a number. Text that is not valid UTF-8 is written
 * base64-encoded under a *_base64 name: the payload as payload_base64, a
 * header whose key or value is not UTF-8 in headers_base64 (key and value
 * both encoded); "headers_base64" appears only when there is one.
 */
#include "cli.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* cli_json_str: see cli.h. */
void
cli_json_str(FILE *out, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t i;

    fputc('"', out);
    for (i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];

        switch (ch) {
        case '"':
            fputs("\\\"", out);
            break;
        case '\\':
            fputs("\\\\", out);
            break;
        case '\n':
            fputs("\\n", out);
            break;
        case '\r':
            fputs("\\r", out);
            break;
        case '\t':
            fputs("\\t", out);
            break;
        default:
            if (ch < 0x20 || ch == 0x7f) {
                fputs("\\u00", out);
                fputc(hex[ch >> 4], out);
                fputc(hex[ch & 15], out);
            } else {
                fputc(ch, out);
            }
        }
    }
    fputc('"', out);
}

/* utf8_valid: strict UTF-8 (no overlongs, surrogates or > U+10FFFF). */
static bool
utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        uint32_t cp;

        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n) {
            return false;
        }
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) {
                return false;
            }
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
            (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += len;
    }
    return true;
}

static void
base64_out(FILE *out, const unsigned char *p, size_t n)
{
    static const char tbl[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i;

    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];

        fputc(tbl[v >> 18], out);
        fputc(tbl[(v >> 12) & 63], out);
        fputc(tbl[(v >> 6) & 63], out);
        fputc(tbl[v & 63], out);
    }
    if (i < n) {
        uint32_t v = (uint32_t)p[i] << 16;

        if (i + 1 < n) {
            v |= (uint32_t)p[i + 1] << 8;
        }
        fputc(tbl[v >> 18], out);
        fputc(tbl[(v >> 12) & 63], out);
        fputc(i + 1 < n ? tbl[(v >> 6) & 63] : '=', out);
        fputc('=', out);
    }
}

/* header_is_text: key and value both valid UTF-8. */
static bool
header_is_text(const struct protoq_kv *kv)
{
    return utf8_valid((const unsigned char *)kv->key, strlen(kv->key)) &&
           utf8_valid((const unsigned char *)kv->value, strlen(kv->value));
}

/* headers_out: the headers that are text (want_text) or the others
 * (base64-encoded) as the members of one JSON object. */
static void
headers_out(FILE *out, const struct protoq_delivery *d, bool want_text)
{
    bool first = true;

    fputc('{', out);
    for (size_t i = 0; i < d->n_headers; i++) {
        const struct protoq_kv *kv = &d->headers[i];

        if (header_is_text(kv) != want_text) {
            continue;
        }
        if (!first) {
            fputc(',', out);
        }
        first = false;
        if (want_text) {
            cli_json_str(out, kv->key, strlen(kv->key));
            fputc(':', out);
            cli_json_str(out, kv->value, strlen(kv->value));
        } else {
            fputc('"', out);
            base64_out(out, (const unsigned char *)kv->key, strlen(kv->key));
            fputs("\":\"", out);
            base64_out(out, (const unsigned char *)kv->value,
                       strlen(kv->value));
            fputc('"', out);
        }
    }
    fputc('}', out);
}

/* cli_json_delivery: see cli.h. */
void
cli_json_delivery(FILE *out, const struct protoq_delivery *d)
{
    size_t binary = 0;

    fprintf(out,
            "{\"id\":\"%" PRIu64 "\",\"attempt\":%u,\"priority\":%u,"
            "\"queue\":",
            d->message_id, d->attempt, d->priority);
    cli_json_str(out, d->queue, strlen(d->queue));
    fputs(",\"headers\":", out);
    headers_out(out, d, true);
    for (size_t i = 0; i < d->n_headers; i++) {
        binary += !header_is_text(&d->headers[i]);
    }
    if (binary > 0) {
        fputs(",\"headers_base64\":", out);
        headers_out(out, d, false);
    }
    if (utf8_valid(d->payload, d->len)) {
        fputs(",\"payload\":", out);
        cli_json_str(out, d->payload, d->len);
    } else {
        fputs(",\"payload_base64\":\"", out);
        base64_out(out, d->payload, d->len);
        fputc('"', out);
    }
    fputs("}\n", out);
}
