#!/usr/bin/env python3
"""Throughput of the Python client, to set beside protoq-bench's:

    python3 bench.py -s 127.0.0.1:7650 --messages 100000 --size 1024

Phase 1: publish_many of N messages of SIZE bytes (durable queue, every
confirm waited for) with --window unconfirmed at once. Phase 2: consume
them with --prefetch and ack each. Prints messages/s of each phase.
"""
import argparse
import os
import time

import protoq


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-s", "--server", default="127.0.0.1:7650")
    ap.add_argument("--messages", type=int, default=100000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--prefetch", type=int, default=1000)
    ap.add_argument("--queue", default="pybench")
    args = ap.parse_args()
    n = args.messages
    payload = os.urandom(args.size)
    with protoq.Client(args.server) as c:
        c.create_queue(args.queue)
        c.purge_queue(args.queue)
        t = time.perf_counter()
        ids = c.publish_many(args.queue, [payload] * n, window=args.window)
        pub = time.perf_counter() - t
        assert len(set(ids)) == n
        t = time.perf_counter()
        got = 0
        for d in c.consume(args.queue, prefetch=args.prefetch, timeout=10):
            d.ack()
            got += 1
            if got == n:
                break
        c.flush()
        con = time.perf_counter() - t
        c.delete_queue(args.queue)
    print("publish_many: %d msgs x %d B in %.2fs = %.0f msg/s (window %d)"
          % (n, args.size, pub, n / pub, args.window))
    print("consume+ack:  %d msgs in %.2fs = %.0f msg/s (prefetch %d)"
          % (got, con, got / con, args.prefetch))


if __name__ == "__main__":
    main()
