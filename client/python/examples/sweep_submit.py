#!/usr/bin/env python3
"""Submit a hyperparameter sweep: one training job per combination.

    python3 sweep_submit.py -s 127.0.0.1:7650 --queue train \
        --lr 0.1 0.01 0.001 --batch 32 64 --epochs 5

Each job is a JSON object. Its idempotency key is derived from the sweep
name and the configuration, so running the submitter twice does not queue
a combination twice. Failed jobs (3 attempts) go to QUEUE.dead.
"""
import argparse
import itertools
import json

import protoq


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-s", "--server", default="127.0.0.1:7650")
    ap.add_argument("--token", default=None)
    ap.add_argument("--queue", default="train")
    ap.add_argument("--sweep", default="sweep-1", help="name; part of each job's key")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.01])
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()

    configs = [{"sweep": args.sweep, "lr": lr, "batch": b, "epochs": args.epochs}
               for lr, b in itertools.product(args.lr, args.batch)]
    with protoq.Client(args.server, token=args.token) as c:
        c.create_queue(args.queue + ".dead")
        c.create_queue(args.queue, ack_timeout=60, max_attempts=3,
                       dead_letter=args.queue + ".dead")
        for cfg in configs:
            key = "%s:lr=%g:batch=%d" % (args.sweep, cfg["lr"], cfg["batch"])
            mid, dup = c.publish_ex(args.queue, json.dumps(cfg), key=key,
                                    headers={"content-type": "application/json",
                                             "sweep": args.sweep})
            print("%d %s%s" % (mid, key, " (already queued)" if dup else ""))


if __name__ == "__main__":
    main()
