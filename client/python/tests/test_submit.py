"""Client.submit(wait=True): a job's result or failure on a private reply
queue (PROTOCOL.md, "Results and failure notices"), like `protoq pub
--wait`; the reply queue is gone afterwards whatever the outcome."""
import contextlib
import signal
import subprocess
import threading

import pytest

import protoq
from conftest import PROTOQ, wait_for


def reply_queues(client):
    return [q.name for q in client.list_queues() if q.name.startswith("protoq.reply.")]


@contextlib.contextmanager
def running(worker):
    """worker.run() in a thread for the with block; stopped and joined
    (bounded) after it."""
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    try:
        yield worker
    finally:
        worker.stop()
        t.join(10)
        assert not t.is_alive(), "the worker did not stop"


@contextlib.contextmanager
def c_worker(broker, queue, *command):
    """`protoq work QUEUE -- COMMAND` for the with block, stopped by its pid."""
    p = subprocess.Popen([PROTOQ, "-s", broker.addr, "work", queue, "--"] + list(command),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_result_of_a_python_worker(broker, client):
    client.create_queue("train")
    seen = []

    def fn(job):
        seen.append((job.attempt, job.payload, job.headers))
        return {"loss": 0.25, "lr": job.payload["lr"]}

    with running(protoq.Worker(broker.addr, "train", fn)):
        res = client.submit("train", b'{"lr": 0.1}', headers={"sweep": "s1"},
                            timeout=20)
        assert res == b'{"loss": 0.25, "lr": 0.1}'
        # A job acked without a result: b"".
        client.create_queue("quiet")
        with running(protoq.Worker(broker.addr, "quiet", lambda job: None)):
            assert client.submit("quiet", b"x", timeout=20) == b""
    assert seen == [(1, {"lr": 0.1}, {"sweep": "s1"})]
    assert reply_queues(client) == []
    assert client.stat_queue("train").acked == 1


def test_failure_raises_job_failed_with_the_error(broker, client):
    client.create_queue("train", max_attempts=2, no_backoff=True)

    def fn(job):
        raise ValueError("bad hyperparameter lr=-1 (attempt %d)" % job.attempt)

    with running(protoq.Worker(broker.addr, "train", fn)):
        with pytest.raises(protoq.JobFailed) as e:
            client.submit("train", b"{}", timeout=20)
    err = e.value
    assert isinstance(err, protoq.Error)
    assert (err.reason, err.attempt, err.queue, err.dead_letter) == \
        ("max_attempts", 2, "train", None)
    assert "ValueError: bad hyperparameter lr=-1 (attempt 2)" in err.error
    assert "failed: max_attempts: " in str(err) and str(err.job_id) in str(err)
    assert reply_queues(client) == []


def test_cancelled_job_raises_job_failed(broker, client):
    client.create_queue("train")
    out = {}

    def submit():
        with protoq.Client(broker.addr, timeout=10) as c:
            try:
                c.submit("train", b"never runs", timeout=20)
            except protoq.Error as e:
                out["exc"] = e

    t = threading.Thread(target=submit)
    t.start()
    wait_for(lambda: client.stat_queue("train").ready == 1, 10, "the job")
    (job,) = client.jobs("train")
    client.cancel("train", job.id)
    t.join(20)
    assert not t.is_alive()
    assert isinstance(out.get("exc"), protoq.JobFailed), out
    assert (out["exc"].job_id, out["exc"].reason, out["exc"].attempt) == \
        (job.id, "cancelled", 0)
    assert reply_queues(client) == []


def test_timeout_removes_the_reply_queue(broker, client):
    client.create_queue("train")
    with pytest.raises(protoq.Timeout) as e:
        client.submit("train", b"nobody works", timeout=0.3)
    assert "no result within 0.3s" in str(e.value)
    assert reply_queues(client) == []
    (job,) = client.jobs("train")  # the job goes on
    assert (job.id, job.state) == (e.value.job_id, "ready")


def test_wait_false_and_bad_arguments(broker, client):
    client.create_queue("train")
    mid = client.submit("train", b"fire and forget", wait=False, priority=3)
    assert isinstance(mid, int) and client.job("train", mid).priority == 3
    with pytest.raises(protoq.InvalidArgument):
        client.submit("train", b"x", reply_to="mine")
    with pytest.raises(protoq.InvalidArgument):
        client.submit("train", b"x", timeout=-1)
    with pytest.raises(protoq.QueueNotFound):
        client.submit("nope", b"x", timeout=5)
    # A key that matches a job published earlier: that job answers its own
    # publisher, so waiting here would never end.
    first = client.submit("train", b"first", key="job-1", wait=False)
    with pytest.raises(protoq.InvalidArgument) as e:
        client.submit("train", b"again", key="job-1", timeout=5)
    assert e.value.job_id == first and "job-1" in str(e.value)
    assert reply_queues(client) == []


def test_parity_with_protoq_work(broker, client):
    """The same reply protocol with the C worker: its stdout is the result,
    the tail of its stderr the failure's error text."""
    client.create_queue("up")
    client.create_queue("bad", max_attempts=1)
    with c_worker(broker, "up", "tr", "a-z", "A-Z"):
        assert client.submit("up", b"hello from python", timeout=20) == \
            b"HELLO FROM PYTHON"
    with c_worker(broker, "bad", "sh", "-c", "echo out of memory >&2; exit 3"):
        with pytest.raises(protoq.JobFailed) as e:
            client.submit("bad", b"x", timeout=20)
    assert e.value.reason == "max_attempts" and "out of memory" in e.value.error
    assert reply_queues(client) == []
