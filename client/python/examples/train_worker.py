#!/usr/bin/env python3
"""A training worker with checkpoints: takes jobs from sweep_submit.py.

    python3 train_worker.py -s 127.0.0.1:7650 --queue train --ckpt-dir ./ckpt

Each epoch it writes a checkpoint and reports progress with it; a job that
comes back (the node died, or was pre-empted and released on SIGTERM)
resumes from the checkpoint of the previous attempt. A cancel request
(`protoq cancel QUEUE ID`) stops it after the current step. The "training"
is a stand-in (a loss that decays); put your framework's loop there.
"""
import argparse
import json
import logging
import math
import os
import time

import protoq


def make_train(ckpt_dir, epoch_seconds):
    def train(job):
        cfg = job.payload  # decoded from JSON
        start, loss = 0, 1.0
        if job.checkpoint:  # an earlier attempt got this far
            with open(job.checkpoint) as f:
                state = json.load(f)
            start, loss = state["epoch"] + 1, state["loss"]
            print("job %d attempt %d: resuming at epoch %d" % (job.id, job.attempt, start))
        for epoch in range(start, cfg["epochs"]):
            if job.cancelled:
                print("job %d: cancelled at epoch %d" % (job.id, epoch))
                return
            time.sleep(epoch_seconds)  # one epoch of "training"
            loss *= math.exp(-cfg["lr"] * 10)
            path = os.path.join(ckpt_dir, "job-%d.json" % job.id)
            with open(path + ".tmp", "w") as f:
                json.dump({"epoch": epoch, "loss": loss}, f)
            os.replace(path + ".tmp", path)
            job.progress(100 * (epoch + 1) // cfg["epochs"],
                         "epoch %d loss %.4f" % (epoch, loss), checkpoint=path)
            if job.stopping:  # SIGTERM during the shutdown grace
                raise protoq.Shutdown("pre-empted after epoch %d" % epoch)
        print("job %d: lr=%g batch=%d final loss %.4f"
              % (job.id, cfg["lr"], cfg["batch"], loss), flush=True)
    return train


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-s", "--server", default="127.0.0.1:7650")
    ap.add_argument("--token", default=None)
    ap.add_argument("--queue", default="train")
    ap.add_argument("--ckpt-dir", default="ckpt")
    ap.add_argument("--epoch-seconds", type=float, default=1.0)
    ap.add_argument("--shutdown-grace", type=float, default=30.0,
                    help="seconds a job may run on after SIGTERM")
    ap.add_argument("--max-jobs", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(args.ckpt_dir, exist_ok=True)
    w = protoq.Worker(args.server, args.queue,
                      make_train(args.ckpt_dir, args.epoch_seconds),
                      token=args.token, decode="json",
                      shutdown_grace=args.shutdown_grace, max_jobs=args.max_jobs)
    n = w.run()
    print("worker: %d jobs" % n)


if __name__ == "__main__":
    main()
