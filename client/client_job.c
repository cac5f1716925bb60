/*
 * client_job.c: libprotoq job visibility (JobGet, JobList) and the route
 * list (protoq.h). Replies are copied into caller-owned structs: strings
 * malloc'ed, freed with protoq_job_fini / protoq_job_list_free.
 */
#include "client_int.h"

#include <stdlib.h>
#include <string.h>

static const char *const state_names[] = {
    [PROTOQ_JOB_ANY] = "any",         [PROTOQ_JOB_READY] = "ready",
    [PROTOQ_JOB_DELAYED] = "delayed", [PROTOQ_JOB_INFLIGHT] = "inflight",
    [PROTOQ_JOB_DEAD] = "dead",
};

const char *
protoq_job_state_name(int state)
{
    if (state < 0 || state > PROTOQ_JOB_DEAD) {
        return "unknown";
    }
    return state_names[state];
}

int
protoq_job_state_parse(const char *name)
{
    for (int i = 0; i <= PROTOQ_JOB_DEAD; i++) {
        if (name != NULL && strcmp(name, state_names[i]) == 0) {
            return i;
        }
    }
    return -1;
}

void
protoq_job_fini(struct protoq_job *j)
{
    if (j == NULL) {
        return;
    }
    for (size_t i = 0; i < j->n_requires; i++) {
        free((char *)j->requires[i].key);
        free((char *)j->requires[i].value);
    }
    free(j->requires);
    free(j->progress_text);
    free(j->checkpoint);
    free(j->last_error);
    memset(j, 0, sizeof(*j));
}

static char *
dup_str(const char *s)
{
    return strdup(s != NULL ? s : "");
}

/* Copy w into o (zeroed first); PQ_ENOMEM leaves nothing to free. */
static int
job_from_wire(struct protoq_job *o, const Protoq__JobInfo *w)
{
    memset(o, 0, sizeof(*o));
    client_copy_str(o->queue, sizeof(o->queue), w->queue);
    o->id = w->message_id;
    o->state = (int)w->state;
    o->attempt = w->attempt;
    o->failures = w->failures;
    o->priority = w->priority;
    o->published_at_ms = w->published_at_ms;
    o->due_at_ms = w->due_at_ms;
    o->cancelled = w->cancelled;
    o->payload_bytes = w->payload_bytes;
    if (w->holder != NULL) {
        o->has_holder = true;
        client_copy_str(o->holder_name, sizeof(o->holder_name),
                        w->holder->client_name);
        client_copy_str(o->holder_address, sizeof(o->holder_address),
                        w->holder->address);
        o->subscription_id = w->holder->subscription_id;
        o->lease_left_ms = w->holder->lease_left_ms;
    }
    if (w->progress != NULL) {
        o->has_progress = true;
        o->progress_percent = w->progress->percent;
    }
    o->progress_text = dup_str(w->progress ? w->progress->text : NULL);
    o->checkpoint = dup_str(w->progress ? w->progress->checkpoint : NULL);
    o->last_error = dup_str(w->last_error);
    if (o->progress_text == NULL || o->checkpoint == NULL ||
        o->last_error == NULL) {
        goto oom;
    }
    if (w->n_requires > 0) {
        o->requires = calloc(w->n_requires, sizeof(*o->requires));
        if (o->requires == NULL) {
            goto oom;
        }
        for (size_t i = 0; i < w->n_requires; i++) {
            o->requires[i].key = dup_str(w->requires[i] -> key);
            o->requires[i].value = dup_str(w->requires[i] -> value);
            o->n_requires++;
            if (o->requires[i].key == NULL || o->requires[i].value == NULL) {
                goto oom;
            }
        }
    }
    return PQ_OK;
oom:
    protoq_job_fini(o);
    return PQ_ENOMEM;
}

int
protoq_job_get(protoq_client *c, const char *queue, uint64_t id,
               struct protoq_job *out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__JobGet jg = PROTOQ__JOB_GET__INIT;
    Protoq__Frame *r;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!client_name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    jg.queue = S(queue);
    jg.message_id = id;
    f.kind_case = PROTOQ__FRAME__KIND_JOB_GET;
    f.job_get = &jg;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_JOB_INFO, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = job_from_wire(out, r->job_info);
    frame_free(r);
    if (rc != PQ_OK) {
        return client_set_err(c, rc, "out of memory (job)");
    }
    return PQ_OK;
}

void
protoq_job_list_free(struct protoq_job *list, size_t n)
{
    for (size_t i = 0; list != NULL && i < n; i++) {
        protoq_job_fini(&list[i]);
    }
    free(list);
}

int
protoq_job_list(protoq_client *c, const char *queue, int state, uint32_t limit,
                uint64_t after_id, struct protoq_job **out, size_t *n,
                uint64_t *next_after_id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__JobList jl = PROTOQ__JOB_LIST__INIT;
    struct protoq_job *list = NULL;
    Protoq__JobListOk *ok;
    Protoq__Frame *r;
    size_t i;
    int rc;

    *out = NULL;
    *n = 0;
    if (next_after_id != NULL) {
        *next_after_id = 0;
    }
    if (!client_name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    if (state < PROTOQ_JOB_ANY || state > PROTOQ_JOB_DEAD) {
        return client_set_err(c, PQ_EINVAL, "unknown job state %d", state);
    }
    jl.queue = S(queue);
    jl.state = (Protoq__JobState)state;
    jl.limit = limit;
    jl.after_id = after_id;
    f.kind_case = PROTOQ__FRAME__KIND_JOB_LIST;
    f.job_list = &jl;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_JOB_LIST_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    ok = r->job_list_ok;
    if (ok->n_jobs > 0 && (list = calloc(ok->n_jobs, sizeof(*list))) == NULL) {
        rc = PQ_ENOMEM;
    }
    for (i = 0; rc == PQ_OK && i < ok->n_jobs; i++) {
        rc = job_from_wire(&list[i], ok->jobs[i]);
    }
    if (rc != PQ_OK) {
        protoq_job_list_free(list, i);
        frame_free(r);
        return client_set_err(c, rc, "out of memory (job list)");
    }
    *out = list;
    *n = ok->n_jobs;
    if (next_after_id != NULL) {
        *next_after_id = ok->next_after_id;
    }
    frame_free(r);
    return PQ_OK;
}

int
protoq_route_list(protoq_client *c, struct protoq_binding **out, size_t *n)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__RouteList rl = PROTOQ__ROUTE_LIST__INIT;
    Protoq__RouteListOk *ok;
    struct protoq_binding *b = NULL;
    Protoq__Frame *r;
    int rc;

    *out = NULL;
    *n = 0;
    f.kind_case = PROTOQ__FRAME__KIND_ROUTE_LIST;
    f.route_list = &rl;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_ROUTE_LIST_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    ok = r->route_list_ok;
    if (ok->n_bindings > 0 &&
        (b = calloc(ok->n_bindings, sizeof(*b))) == NULL) {
        frame_free(r);
        return client_set_err(c, PQ_ENOMEM, "out of memory (route list)");
    }
    for (size_t i = 0; i < ok->n_bindings; i++) {
        client_copy_str(b[i].route, sizeof(b[i].route), ok->bindings[i]->route);
        client_copy_str(b[i].queue, sizeof(b[i].queue), ok->bindings[i]->queue);
        client_copy_str(b[i].pattern, sizeof(b[i].pattern),
                        ok->bindings[i]->pattern);
    }
    *out = b;
    *n = ok->n_bindings;
    frame_free(r);
    return PQ_OK;
}
