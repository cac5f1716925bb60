"""protoq.Worker against a real protoqd."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import protoq
from conftest import Broker, free_port, wait_for


def run_worker(w, timeout=20):
    """Run w in a thread; fail if it does not finish in time."""
    out = {}

    def target():
        try:
            out["n"] = w.run()
        except BaseException as e:  # surfaced below
            out["exc"] = e
    t = threading.Thread(target=target)
    t.start()
    t.join(timeout)
    if t.is_alive():
        w.stop()
        t.join(5)
        raise AssertionError("worker did not finish within %ss" % timeout)
    if "exc" in out:
        raise out["exc"]
    return out["n"]


def test_lease_is_kept_alive_past_ack_timeout(broker, client):
    client.create_queue("train", ack_timeout=0.3)
    client.publish("train", '{"lr": 0.1}')
    seen = []

    def fn(job):
        seen.append((job.attempt, job.payload))
        time.sleep(1.5)  # five leases long
        assert not job.lease_lost

    assert run_worker(protoq.Worker(broker.addr, "train", fn, max_jobs=1)) == 1
    info = client.stat_queue("train")
    assert seen == [(1, {"lr": 0.1})]
    assert (info.acked, info.redelivered, info.ready, info.inflight) == (1, 0, 0, 0)


def test_progress_and_checkpoint_reach_the_next_attempt(broker, client):
    client.create_queue("train", no_backoff=True)
    client.publish("train", "job")
    seen = []

    def fn(job):
        seen.append((job.attempt, job.checkpoint, job.previous_progress))
        if job.attempt == 1:
            job.progress(50, "epoch 5", checkpoint="file:///ck/5")
            raise RuntimeError("node lost")

    run_worker(protoq.Worker(broker.addr, "train", fn, max_jobs=2))
    assert seen == [(1, None, None),
                    (2, "file:///ck/5", protoq.Progress(50, "epoch 5", "file:///ck/5"))]
    assert client.stat_queue("train").acked == 1


def test_exception_dead_letters_with_the_traceback(broker, client):
    client.create_queue("dlq")
    client.create_queue("train", max_attempts=2, no_backoff=True, dead_letter="dlq")
    client.publish("train", b"\xff\xfe not utf-8")
    payloads = []

    def fn(job):
        payloads.append(job.payload)
        raise ValueError("bad hyperparameter lr=-1")

    run_worker(protoq.Worker(broker.addr, "train", fn, max_jobs=2))
    assert payloads == [b"\xff\xfe not utf-8"] * 2  # bytes when not text
    d = client.consume("dlq").get(timeout=5)
    err = d.headers["x-death-error"]
    assert err.rstrip().endswith("ValueError: bad hyperparameter lr=-1")
    assert "Traceback" in err and "test_worker.py" in err and 'in fn' in err
    assert d.headers["x-death-reason"] == "max_attempts"
    assert d.headers["x-death-attempts"] == "2"


def test_reject_dead_letters_at_once(broker, client):
    client.create_queue("dlq")
    client.create_queue("train", dead_letter="dlq")
    client.publish("train", "x")

    def fn(job):
        raise protoq.Reject("not a valid job")

    run_worker(protoq.Worker(broker.addr, "train", fn, max_jobs=1))
    d = client.consume("dlq").get(timeout=5)
    assert d.headers["x-death-error"] == "not a valid job"
    assert d.headers["x-death-reason"] == "nack"


def test_cancel_sets_the_flag_and_calls_back(broker, client):
    client.create_queue("train")
    mid = client.publish("train", "x")
    calls, started = [], threading.Event()

    def fn(job):
        started.set()
        wait_for(lambda: job.cancelled, 10, "job.cancelled")

    w = protoq.Worker(broker.addr, "train", fn, max_jobs=1,
                      on_cancel=lambda job: calls.append(job.id))
    t = threading.Thread(target=run_worker, args=(w,))
    t.start()
    assert started.wait(10)
    client.cancel("train", mid)
    t.join(15)
    assert not t.is_alive() and calls == [mid]
    info = client.stat_queue("train")
    assert (info.ready, info.inflight, info.acked) == (0, 0, 0)


def test_decode_modes(broker, client):
    client.create_queue("q")
    client.publish("q", '{"a": 1}')
    client.publish("q", "[1, 2]")
    client.publish("q", "plain text")
    client.publish("q", '{"k": 2}', headers={"content-type": "application/json"})
    got = []
    run_worker(protoq.Worker(broker.addr, "q", lambda j: got.append(j.payload), max_jobs=4))
    assert got == [{"a": 1}, [1, 2], "plain text", {"k": 2}]
    client.publish("q", '{"a": 1}')
    run_worker(protoq.Worker(broker.addr, "q", lambda j: got.append(j.payload),
                             decode="bytes", max_jobs=1))
    assert got[-1] == b'{"a": 1}'


WORKER_SCRIPT = textwrap.dedent("""
    import sys, time, protoq
    addr, flag = sys.argv[1], sys.argv[2]
    def fn(job):
        job.progress(30, "epoch 3", checkpoint="file:///ck/3")
        try:  # the flag inside: SIGTERM may come as soon as it exists
            open(flag, "w").write(str(job.attempt))
            time.sleep(60)
        finally:
            open(flag + ".finally", "w").write("saved")  # training code's cleanup runs
    n = protoq.Worker(addr, "train", fn).run()
    print("jobs", n)
""")


def test_sigterm_releases_without_a_failure(broker, client, tmp_path):
    # max_attempts 1: a failed attempt would dead-letter the job.
    client.create_queue("dlq")
    client.create_queue("train", max_attempts=1, dead_letter="dlq")
    mid = client.publish("train", "job")
    flag = tmp_path / "started"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, broker.addr, str(flag)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(flag.exists, 10, "the job to start")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "jobs 1"
    assert (tmp_path / "started.finally").exists()
    assert client.stat_queue("dlq").ready == 0
    d = client.consume("train").get(timeout=5)
    assert (d.id, d.attempt) == (mid, 2)
    assert d.progress == protoq.Progress(30, "epoch 3", "file:///ck/3")


def test_reconnects_after_the_broker_restarts(client):
    port = free_port()
    b = Broker(port=port)
    try:
        with protoq.Client(b.addr) as c:
            c.create_queue("train")
            c.publish("train", "one")
        got = []
        w = protoq.Worker(b.addr, "train", lambda j: got.append(j.payload),
                          max_jobs=2, reconnect=(0.05, 0.2))
        t = threading.Thread(target=run_worker, args=(w, 30))
        t.start()
        wait_for(lambda: got == ["one"], 10, "the first job")
        with protoq.Client(b.addr) as c:  # fn ran; its ack must land first
            wait_for(lambda: c.stat_queue("train").acked == 1, 10, "the ack")
        b.stop()
        time.sleep(0.3)
        b.start(port)
        with protoq.Client(b.addr) as c:
            c.publish("train", "two")
        t.join(20)
        assert not t.is_alive() and got == ["one", "two"]
    finally:
        b.close()


def test_clean_stop_gives_back_the_next_job_unfailed(broker, client):
    # After the last job's ack the broker pushes the next one at once; a
    # worker that stops must release it, not drop the subscription on it.
    client.create_queue("dlq")
    client.create_queue("train", max_attempts=1, dead_letter="dlq")
    client.publish_many("train", ["one", "two"])
    got = []
    run_worker(protoq.Worker(broker.addr, "train", lambda j: got.append(j.payload), max_jobs=1))
    assert got == ["one"]
    assert client.stat_queue("dlq").ready == 0
    d = client.consume("train").get(timeout=5)
    assert d.payload == b"two"


def test_return_value_is_the_result(broker, client):
    client.create_queue("train")
    client.create_queue("replies")
    mid = client.publish("train", '{"lr": 0.1}', reply_to="replies", correlation_id="r1")

    def fn(job):
        return {"acc": 0.9, "lr": job.payload["lr"]}

    assert run_worker(protoq.Worker(broker.addr, "train", fn, max_jobs=1)) == 1
    r = client.consume("replies").get(timeout=5)
    assert r.headers["protoq-status"] == "ok" and r.headers["protoq-job-id"] == str(mid)
    assert r.correlation_id == "r1"
    assert r.payload == b'{"acc": 0.9, "lr": 0.1}'
