/*
 * dispatch.h: the protocol state machine. One handler per request kind;
 * the only module that calls both queue.c and store.c, and it decides the
 * order: append the record, change the queue, answer once it is durable.
 * It also owns subscriptions (struct sub), the waits for durability, and
 * the delivery pass. Maps internal PQ_* codes to wire error codes.
 */
#ifndef PQ_DISPATCH_H
#define PQ_DISPATCH_H

#include <stdbool.h>
#include <stddef.h>

#include "protoq.pb-c.h"

struct conn;
struct server;

/* dispatch_frame: handle one decoded frame from c (which owns nothing of f). */
void dispatch_frame(void *srv, struct conn *c, const Protoq__Frame *f);

/* dispatch_conn_closed: c stops: drop its subscriptions (their deliveries
 * are failed attempts and go back to their queues). Idempotent. */
void dispatch_conn_closed(void *srv, struct conn *c);

/* dispatch_conn_output: c's output went over (full) or back under the
 * high-water mark: pause or resume deliveries to its consumers. */
void dispatch_conn_output(void *srv, struct conn *c, bool full);

/* dispatch_open: create the queue set, open the store and replay the log
 * into it (recover.c). Writes a message into err on failure. */
int dispatch_open(struct server *srv, char *err, size_t errlen);

/* dispatch_pass: the post-loop work of one pass: deliver to consumers of
 * dirty queues, hand the pending batch to the storage thread, answer what
 * became durable. Returns true when work is left for another pass. */
bool dispatch_pass(struct server *srv);

/* dispatch_store_event: the store's eventfd fired: answer what became
 * durable (or refuse what could not be stored). */
void dispatch_store_event(struct server *srv);

/* dispatch_tick: the deadline timer fired: expire leases, wake delays. */
void dispatch_tick(struct server *srv);

/* dispatch_housekeeping: once a second: compact the log if worth it. */
void dispatch_housekeeping(struct server *srv);

/* dispatch_close: flush the store and free the queue set and waits. */
void dispatch_close(struct server *srv);

#endif
