/*
 * cli_help.c: `protoq CMD --help` (also -h anywhere before "--", and
 * `protoq help CMD`): a short text per command with its synopsis, its
 * options and examples. A new command adds its entry to topics[] (and its
 * name to cli_commands[] in cli.c).
 */
#include "cli.h"

#include <stdio.h>
#include <string.h>

struct topic {
    const char *name; /* "pub", "queue create" */
    const char *text;
};

static const struct topic topics[] = {
    {"queue",
     "usage: protoq queue create|ls|stat|purge|rm ...\n"
     "\n"
     "  queue create NAME [OPTIONS]  declare a queue (same attributes: "
     "no-op)\n"
     "  queue ls                     queues and their counts\n"
     "  queue stat NAME              every attribute and counter\n"
     "  queue purge NAME             drop ready and delayed messages\n"
     "  queue rm NAME                delete the queue and its messages\n"
     "\n"
     "Examples:\n"
     "  protoq queue create jobs --ack-timeout 5m --dead-letter "
     "jobs.dead\n"
     "  protoq queue ls\n"
     "See 'protoq queue create --help'.\n"},
    {"queue create",
     "usage: protoq queue create NAME [OPTIONS]\n"
     "\n"
     "  --max-length N        refuse publishes past N messages (QUEUE_FULL)\n"
     "  --max-bytes N[k|m|g]  refuse publishes past N payload bytes\n"
     "  --ack-timeout D       lease of a delivery (10ms-30d; default 30s)\n"
     "  --max-attempts N      then dead-letter (1-1000; default 5)\n"
     "  --dead-letter Q       where failed and expired messages go\n"
     "  --backoff BASE[:CAP]  retry delay, doubling (BASE <= 1d, CAP <= 7d;\n"
     "                        0: retry at once; default 1s:60s)\n"
     "  --ttl D               default message time to live (0: none)\n"
     "  --dedup-window D      idempotency keys kept (1ms-365d; default 1d)\n"
     "  --max-lease D         cap on touches (0: none; up to 365d)\n"
     "  --dead-letter-expired expired messages go to --dead-letter too\n"
     "  --transient           kept in memory only\n"
     "Durations (D): 500ms, 30s, 5m, 1h30m, 2d; a plain number is ms.\n"
     "\n"
     "Examples:\n"
     "  protoq queue create jobs --ack-timeout 10m --max-attempts 3\n"
     "  protoq queue create events --transient --max-length 100000\n"},
    {"queue ls", "usage: protoq queue ls\n"
                 "\n"
                 "One line per queue: NAME READY DELAYED INFLIGHT CONSUMERS.\n"
                 "\n"
                 "Example:\n"
                 "  protoq queue ls\n"},
    {"queue stat", "usage: protoq queue stat NAME\n"
                   "\n"
                   "Every attribute and counter, one 'key: value' a line.\n"
                   "\n"
                   "Example:\n"
                   "  protoq queue stat jobs | grep ready\n"},
    {"queue purge", "usage: protoq queue purge NAME\n"
                    "\n"
                    "Drops the ready and delayed messages (not those in "
                    "flight);\n"
                    "prints 'purged N'.\n"
                    "\n"
                    "Example:\n"
                    "  protoq queue purge jobs\n"},
    {"queue rm", "usage: protoq queue rm NAME\n"
                 "\n"
                 "Deletes the queue and every message in it; prints\n"
                 "'deleted queue NAME'.\n"
                 "\n"
                 "Example:\n"
                 "  protoq queue rm jobs\n"},
    {"pub",
     "usage: protoq pub QUEUE [DATA] [OPTIONS]\n"
     "\n"
     "One message from DATA, --file F (bytes as they are) or stdin (one\n"
     "trailing newline stripped, unless --binary); prints its id.\n"
     "  --lines            each stdin line is a message (pipelined)\n"
     "  --binary           keep stdin exactly, trailing newline too\n"
     "  --priority P       0-9, higher first\n"
     "  --delay D, --ttl D deliver later; expire after D\n"
     "  --header K=V       repeatable\n"
     "  --require K=V      only consumers with this tag get it\n"
     "  --key KEY          idempotency key (before pub: the TLS key)\n"
     "  --route R --routing-key K [--allow-unrouted]  instead of QUEUE: a\n"
     "                     copy to each queue of R whose pattern matches K\n"
     "  --reply-to Q, --correlation-id ID  where the result goes\n"
     "  --wait [TIMEOUT]   wait for the job's end: result on stdout (exit\n"
     "                     0) or failure on stderr (exit 3)\n"
     "\n"
     "Examples:\n"
     "  protoq pub jobs 'train model=a lr=0.1' --priority 5 --wait 1h\n"
     "  protoq pub --route train --routing-key train.bert.a100 'lr=0.1'\n"
     "  echo hello | protoq pub jobs\n"
     "  seq 1000 | protoq pub jobs --lines\n"},
    {"consume",
     "usage: protoq consume QUEUE [OPTIONS]\n"
     "\n"
     "Prints each payload followed by a newline, then acks it. Stops after\n"
     "--count messages, or when nothing arrived for --wait (default 5s;\n"
     "with --count and no --wait it waits until --count arrived).\n"
     "  --count N, --wait D, --prefetch N, --tag K=V\n"
     "  --json        one JSON object a line (id as a string)\n"
     "  --raw         the payload's bytes only (needs --count 1)\n"
     "  --framed      each payload as a 4-byte big-endian length + bytes\n"
     "  --no-ack      ack nothing (they return to the queue)\n"
     "  --nack        nack each (retried with the queue's backoff)\n"
     "\n"
     "Examples:\n"
     "  protoq consume jobs --count 10 --json | jq -r .id\n"
     "  protoq consume jobs --count 1 --raw > job.bin\n"
     "  protoq consume jobs --wait 1m --tag gpu=a100\n"},
    {"work",
     "usage: protoq work QUEUE [OPTIONS] -- COMMAND [ARG]...\n"
     "\n"
     "Runs COMMAND once per job: payload on stdin, PROTOQ_MESSAGE_ID,\n"
     "PROTOQ_ATTEMPT, PROTOQ_HEADER_<KEY>, PROTOQ_PROGRESS in the\n"
     "environment. Exit 0 acks (stdout is the result); else nacks.\n"
     "Running jobs survive a lost connection for the broker's\n"
     "disconnect_grace_ms (work reconnects with the same session).\n"
     "  --concurrency N       jobs at once (1-4096; default 1)\n"
     "  --tag K=V             this worker's tags\n"
     "  --timeout D           per job\n"
     "  --shutdown-grace D    on SIGTERM (default 30s)\n"
     "  --kill-grace D        SIGTERM to SIGKILL (default 10s)\n"
     "  --max-result N        stdout bytes sent as the result\n"
     "                        (default 1 MiB)\n"
     "\n"
     "Examples:\n"
     "  protoq work jobs --concurrency 4 -- ./train.sh\n"
     "  protoq work gpu-jobs --tag gpu=a100 -- python3 run.py\n"
     "  protoq work jobs -s tls://broker:7643 --ca ca.pem -- ./run.sh\n"},
    {"cancel", "usage: protoq cancel QUEUE ID\n"
               "\n"
               "Removes a ready job; a running one gets a cancel request.\n"
               "\n"
               "Example:\n"
               "  protoq cancel jobs 117710672494560966\n"},
    {"job",
     "usage: protoq job QUEUE ID\n"
     "\n"
     "One job as key: value lines: state (ready|delayed|inflight|dead),\n"
     "attempt, failures, priority, holder, lease_left_ms,\n"
     "progress_percent, progress_text, checkpoint, last_error,\n"
     "published_at, due_at. Changes nothing.\n"
     "\n"
     "Example:\n"
     "  protoq job jobs 117710672494560966\n"},
    {"jobs", "usage: protoq jobs QUEUE [--state S] [--limit N] [--json]\n"
             "\n"
             "  --state S   ready, delayed, inflight or dead\n"
             "  --limit N   at most N jobs (default 100)\n"
             "  --json      one object per line, ids as strings\n"
             "The queue's jobs in id order; changes nothing.\n"
             "\n"
             "Examples:\n"
             "  protoq jobs jobs --state inflight\n"
             "  protoq jobs jobs --json --limit 1000\n"},
    {"route", "usage: protoq route bind|unbind ROUTE QUEUE [--pattern P]\n"
              "       protoq route ls\n"
              "\n"
              "A route is a name bound to queues; a publish to it (protoq\n"
              "pub --route R --routing-key K) stores one copy in each queue\n"
              "whose pattern matches K (words split on '.', '*' one word,\n"
              "'#' any number; no pattern: every key).\n"
              "\n"
              "Examples:\n"
              "  protoq route bind train gpu-a100 --pattern 'train.*.a100'\n"
              "  protoq route bind broadcast worker-1\n"
              "  protoq route ls\n"},
    {"progress", "usage: protoq progress PERCENT [TEXT]\n"
                 "       protoq progress --checkpoint URI\n"
                 "\n"
                 "Inside a job run by 'protoq work': report progress; the\n"
                 "next attempt finds it in PROTOQ_PROGRESS_*.\n"
                 "\n"
                 "Examples:\n"
                 "  protoq progress 40 epoch 4 of 10\n"
                 "  protoq progress --checkpoint s3://bucket/ckpt-4\n"},
};

/* cli_help: see cli.h. */
const char *
cli_help(const char *topic)
{
    for (size_t i = 0; i < sizeof(topics) / sizeof(topics[0]); i++) {
        if (strcmp(topics[i].name, topic) == 0) {
            return topics[i].text;
        }
    }
    return NULL;
}
