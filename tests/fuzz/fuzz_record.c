/*
 * fuzz_record.c: libFuzzer target for the log record decoder
 * (broker/record.c), which reads whatever a damaged or hostile segment
 * holds. The first input byte is the record type, the rest its body.
 *
 * Properties: record_decode never reads outside the body and answers
 * PQ_OK, PQ_ECORRUPT or PQ_EVERSION; a record it accepts encodes back to
 * exactly the same bytes (the format has one encoding per record), both
 * from the decoded form and from the encode form (host arrays for a
 * purge's ids and a publish's requirements); and an encode into a buffer
 * one byte short fails with PQ_ETOOBIG instead of writing past it.
 */
#include <string.h>

#include "fuzz.h"
#include "pqerr.h"
#include "record.h"

/* Encode r and check that the result is body[0..len). */
static void
check_encodes_to(const struct record *r, const uint8_t *body, size_t len)
{
    uint8_t *buf = malloc(len + 1);

    FUZZ_CHECK(buf != NULL);
    FUZZ_CHECK(record_encoded_size(r) == (ssize_t)len);
    FUZZ_CHECK(record_encode(r, buf, len) == (ssize_t)len);
    FUZZ_CHECK(len == 0 || memcmp(buf, body, len) == 0);
    if (len > 0) {
        FUZZ_CHECK(record_encode(r, buf, len - 1) == PQ_ETOOBIG);
    }
    free(buf);
}

/* The decode form of r turned into the encode form, in host arrays. */
static void
check_encode_form(struct record *r, const uint8_t *body, size_t len)
{
    uint64_t *ids = NULL;
    struct rec_kv *kvs = NULL;
    struct rec_publish *items = NULL;

    if (r->type == REC_QUEUE_PURGE) {
        struct rec_queue_purge *p = &r->u.queue_purge;

        ids = calloc(p->n_keep + 1, sizeof(*ids));
        FUZZ_CHECK(ids != NULL);
        for (uint32_t i = 0; i < p->n_keep; i++) {
            ids[i] = record_purge_keep_id(p, i);
        }
        p->keep_ids = ids;
        p->keep_le = NULL;
    } else if (r->type == REC_PUBLISH) {
        struct rec_publish *p = &r->u.publish;
        size_t cur = 0, n = 0;
        struct rec_kv kv;

        kvs = calloc(p->n_requires + 1, sizeof(*kvs));
        FUZZ_CHECK(kvs != NULL);
        while (record_publish_next_require(p, &cur, &kv)) {
            FUZZ_CHECK(n < p->n_requires);
            kvs[n++] = kv;
        }
        FUZZ_CHECK(n == p->n_requires);
        p->requires = kvs;
        p->requires_raw = (struct rec_bytes){NULL, 0};
    } else if (r->type == REC_PUBLISH_BATCH) {
        struct rec_publish_batch *b = &r->u.batch;
        size_t cur = 0, n = 0;

        items = calloc(b->n, sizeof(*items));
        FUZZ_CHECK(items != NULL);
        while (n < b->n && record_batch_next(b, &cur, &items[n])) {
            n++;
        }
        FUZZ_CHECK(n == b->n && !record_batch_next(b, &cur, &items[0]));
        b->items = items;
        b->raw = (struct rec_bytes){NULL, 0};
    }
    check_encodes_to(r, body, len);
    free(ids);
    free(kvs);
    free(items);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct record r;
    uint8_t *body;
    size_t len;
    int rc;

    if (size < 1) {
        return 0;
    }
    /* A copy of exactly the body's size, so that ASan sees any overread. */
    len = size - 1;
    body = malloc(len + 1);
    FUZZ_CHECK(body != NULL);
    memcpy(body, data + 1, len);
    FUZZ_CHECK(record_type_name(data[0]) != NULL);
    memset(&r, 0, sizeof(r));
    rc = record_decode(data[0], body, len, &r);
    if (rc != PQ_OK) {
        FUZZ_CHECK(rc == PQ_ECORRUPT || rc == PQ_EVERSION);
        FUZZ_CHECK(rc != PQ_EVERSION || !record_type_known(data[0]));
        free(body);
        return 0;
    }
    FUZZ_CHECK(r.type == data[0]);
    check_encodes_to(&r, body, len);
    check_encode_form(&r, body, len);
    free(body);
    return 0;
}
