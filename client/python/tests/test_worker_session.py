"""protoq.Worker and the broker's disconnect grace: a TCP proxy between the
worker and protoqd cuts the connection while a job runs. Within the grace
the worker resumes its session and the job runs on, once, its ack accepted;
past it the job fails as at any disconnect."""
import socket
import threading

import pytest

import protoq
from conftest import Broker, wait_for
from test_worker import run_worker


class Proxy:
    """A TCP proxy on 127.0.0.1 to a broker's port, one thread per
    direction. cut() closes every connection (both ends); freeze() makes
    every current connection a black hole (what either side sends is
    dropped, nothing is closed: a network failure); while refuse is set,
    new connections are closed at once."""

    def __init__(self, port):
        self.port = port
        self.refuse = False
        self.accepted = 0
        self._pairs = []
        self._frozen = set()
        self._lock = threading.Lock()
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self._lsock.settimeout(0.1)
        self.addr = "127.0.0.1:%d" % self._lsock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._closed:
            try:
                a, _ = self._lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            a.settimeout(None)
            if self.refuse:
                a.close()
                continue
            try:
                b = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                b.settimeout(None)
            except OSError:
                a.close()
                continue
            with self._lock:
                self._pairs.append((a, b))
                self.accepted += 1
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if src not in self._frozen:
                    dst.sendall(data)
        except OSError:
            pass
        if src in self._frozen:
            return  # a black hole forwards no close either
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def freeze(self):
        with self._lock:
            for pair in self._pairs:
                self._frozen.update(pair)

    def cut(self):
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self):
        self._closed = True
        self._lsock.close()
        self._thread.join(5)
        self.cut()


GRACE = "disconnect_grace_ms 3000\n"
# Fast heartbeats: a silent connection is given up in 1.6 s.
SILENT = "heartbeat_ms 200\nheartbeat_timeout_ms 600\ndisconnect_grace_ms 5000\n"


@pytest.fixture
def proxied(request):
    """A broker (conf: the test's parameter, else GRACE), an admin client
    connected directly, a proxy to it."""
    b = Broker(conf=getattr(request, "param", GRACE))
    p = Proxy(b.port)
    c = protoq.Client(b.addr, timeout=10)
    yield b, c, p
    c.close()
    p.close()
    b.close()


def start(worker):
    """worker.run() in a thread (test_worker.run_worker: bounded); finish()
    joins it and returns what run() returned."""
    out = {}
    t = threading.Thread(target=lambda: out.update(n=run_worker(worker, 30)),
                         daemon=True)
    t.start()
    return t, out


def finish(t, out):
    t.join(40)
    assert not t.is_alive() and "n" in out, "the worker failed (see its thread)"
    return out["n"]


@pytest.mark.parametrize("proxied,how", [(GRACE, "cut"), (SILENT, "freeze")],
                         indirect=["proxied"])
def test_job_runs_on_across_a_cut_within_the_grace(proxied, how):
    """how: cut (both ends closed) or freeze (a black hole: the client
    notices the broker's silence)."""
    b, c, proxy = proxied
    # max_attempts 1: a failed attempt would dead-letter the job.
    c.create_queue("dlq")
    c.create_queue("train", max_attempts=1, dead_letter="dlq")
    c.create_queue("replies")
    mid = c.publish("train", b"job", reply_to="replies")
    started, go = threading.Event(), threading.Event()
    runs = []

    def fn(job):
        runs.append(job.attempt)
        started.set()
        assert go.wait(20)
        # Progress reported after the cut reaches the broker.
        assert job.progress(60, "after the cut")
        return "trained"

    w = protoq.Worker(proxy.addr, "train", fn, max_jobs=1, reconnect=(0.05, 0.2))
    t, out = start(w)
    assert started.wait(10)
    getattr(proxy, how)()
    wait_for(lambda: proxy.accepted >= 2, 5, "the worker to reconnect")
    info = wait_for(lambda: (lambda j: j.holder is not None and j)(c.job("train", mid)),
                    5, "the job held again")
    assert (info.state, info.attempt, info.failures) == ("inflight", 1, 0)
    go.set()
    assert finish(t, out) == 1
    assert runs == [1]
    st = c.stat_queue("train")
    assert (st.acked, st.redelivered, st.ready, st.inflight) == (1, 0, 0, 0)
    assert c.stat_queue("dlq").ready == 0
    r = c.consume("replies").get(timeout=5)
    assert (r.headers["protoq-status"], r.headers["protoq-attempt"], r.payload) == \
        ("ok", "1", b"trained")


def test_job_whose_end_comes_in_the_gap_is_acked_after_it(proxied):
    """The job ends while the connection is down (and cannot come back):
    its ack lands once the session is resumed."""
    b, c, proxy = proxied
    c.create_queue("train", max_attempts=1)
    mid = c.publish("train", b"job")
    started = threading.Event()

    def fn(job):
        started.set()
        wait_for(lambda: job.delivery._client.closed, 10, "the cut")
        proxy.refuse = False

    w = protoq.Worker(proxy.addr, "train", fn, max_jobs=1, reconnect=(0.3, 0.3),
                      touch_interval=60)
    t, out = start(w)
    assert started.wait(10)
    proxy.refuse = True
    proxy.cut()
    assert finish(t, out) == 1
    st = c.stat_queue("train")
    assert (st.acked, st.redelivered, st.ready, st.inflight) == (1, 0, 0, 0)
    with pytest.raises(protoq.QueueNotFound):
        c.job("train", mid)


def test_cancel_sent_in_the_gap_reaches_the_job(proxied):
    """A cancel that comes while the worker is disconnected is handed to
    the resumed session: job.cancelled and on_cancel, and the job's end
    is fenced (nothing acked, nothing failed)."""
    b, c, proxy = proxied
    c.create_queue("train")
    mid = c.publish("train", b"job")
    started, cancels = threading.Event(), []

    def fn(job):
        started.set()
        wait_for(lambda: job.cancelled, 10, "the cancel")
        return "not wanted"

    w = protoq.Worker(proxy.addr, "train", fn, max_jobs=1, reconnect=(0.3, 0.3),
                      on_cancel=lambda job: cancels.append(job.id))
    t, out = start(w)
    assert started.wait(10)
    proxy.refuse = True
    proxy.cut()
    c.cancel("train", mid)
    proxy.refuse = False
    assert finish(t, out) == 1
    assert cancels == [mid]
    st = c.stat_queue("train")
    assert (st.acked, st.redelivered, st.ready, st.inflight) == (0, 0, 0, 0)


@pytest.mark.parametrize("proxied", ["disconnect_grace_ms 800\n"], indirect=True)
def test_past_the_grace_the_job_fails_as_at_any_disconnect(proxied):
    b, c, proxy = proxied
    c.create_queue("train", max_attempts=3, no_backoff=True)
    mid = c.publish("train", b"job")
    runs = []
    started = threading.Event()

    def fn(job):
        runs.append(job.attempt)
        started.set()
        if job.attempt == 1:
            wait_for(lambda: job.lease_lost, 10, "the job lost")
        return None

    w = protoq.Worker(proxy.addr, "train", fn, max_jobs=2, reconnect=(0.05, 0.2))
    t, out = start(w)
    assert started.wait(10)
    proxy.refuse = True
    proxy.cut()
    info = wait_for(lambda: (lambda j: j.failures == 1 and j)(c.job("train", mid)),
                    10, "the attempt failed by the broker")
    assert info.attempt == 1
    # Back now, the worker finds its session not resumed (or gave up).
    proxy.refuse = False
    assert finish(t, out) == 2
    assert runs == [1, 2]
    st = c.stat_queue("train")
    assert (st.acked, st.redelivered, st.ready, st.inflight) == (1, 1, 0, 0)


@pytest.mark.parametrize("proxied", [SILENT], indirect=True)
def test_silent_broker_is_noticed_after_three_heartbeats(proxied):
    """A cut without FIN or RST: the client hears nothing, not even the
    broker's heartbeats, and gives the connection up (as the broker does
    with a silent client); a healthy idle connection stays."""
    b, idle, proxy = proxied
    c = protoq.Client(proxy.addr, timeout=10)
    c.create_queue("q")
    proxy.freeze()
    wait_for(lambda: c.closed, 5, "the frozen connection given up")
    with pytest.raises(protoq.ConnectionClosed) as e:
        c.publish("q", b"x")
    assert "sent nothing for" in str(e.value)
    assert not idle.closed  # as long: 1.6 s, 8 heartbeat intervals
    idle.publish("q", b"y")
