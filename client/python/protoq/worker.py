"""protoq.Worker: run a Python function once per job, like `protoq work`.

    def train(job):
        start = load(job.checkpoint)            # None on a first attempt
        for epoch in range(start, 100):
            ...
            job.progress(epoch, "epoch %d" % epoch, checkpoint=save(epoch))
            if job.cancelled:
                return

    protoq.Worker("127.0.0.1:7650", "train", train).run()

One job at a time, in the calling (main) thread, never in a forked child
(CUDA does not survive a fork). While the function runs, a background
thread touches the job's lease, and the client's reader thread keeps the
connection alive with heartbeats. The function's return acks the job (a
value other than None is the job's result, sent to its reply_to: bytes,
str, or anything JSON can encode); an
exception nacks it (retried with the queue's backoff, dead-lettered after
max_attempts) with the traceback's tail as the error text; protoq.Reject
dead-letters it at once. SIGTERM (pre-emption) releases the job without
counting a failed attempt and stops the worker. A lost connection is
re-established with exponential backoff.

Sessions: every connection of a Worker names the Worker's random session
(PROTOCOL.md, "Sessions and the disconnect grace"), like `protoq work`.
When the connection that holds the running job is lost and the broker has
a disconnect grace, the job goes on: the touch thread reconnects with the
session, and when the broker says it resumed it, the job is adopted by
the new connection (same delivery token: its touches, progress and final
ack go there, and nothing counts as a failed attempt). Past the grace, or
without one, the job is lost as at any disconnect (job.lease_lost: the
broker fails the attempt and hands the job out again).
"""

import json
import logging
import os
import random
import signal
import threading
import time
import traceback

from . import errors
from .client import Client, Progress, new_session_id

log = logging.getLogger("protoq.worker")

_ERROR_TAIL = 1000  # bytes of traceback kept as the nack's error text
_TOUCH_TICK = 0.1   # how often the touch thread looks at the connection
_RESUME_TRIES = 5   # resumed connections one touch or outcome may take


def decode_payload(payload, headers, mode):
    """bytes -> what the job function gets, by mode: 'bytes', 'str',
    'json', or 'auto' (JSON when the content-type header says so or the
    text is a JSON object or array; else str when it is UTF-8; else bytes)."""
    if mode == "bytes":
        return payload
    if mode == "str":
        return payload.decode("utf-8")
    if mode == "json":
        return json.loads(payload)
    if mode != "auto":
        raise ValueError("decode: 'auto', 'bytes', 'str' or 'json', not %r" % mode)
    if headers.get("content-type", "").startswith("application/json"):
        return json.loads(payload)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


class Job:
    """What the job function gets.

    id, attempt, queue, headers, raw (the payload bytes), payload (decoded),
    previous_progress (the Progress an earlier attempt reported, or None),
    checkpoint (the latest checkpoint: an earlier attempt's until this one
    reports its own), cancelled (a cancel request arrived), lease_lost (a
    touch was refused, or the connection was lost past the broker's
    disconnect grace: another worker may hold the job now), stopping (the
    worker got SIGTERM and is in its shutdown grace).
    """

    def __init__(self, worker, delivery, payload):
        self._worker = worker
        self.delivery = delivery
        self.id = delivery.id
        self.attempt = delivery.attempt
        self.queue = delivery.queue
        self.headers = delivery.headers
        self.raw = delivery.payload
        self.payload = payload
        self.previous_progress = delivery.progress
        p = self.previous_progress
        self.checkpoint = p.checkpoint if p is not None and p.checkpoint else None
        self.lease_lost = False
        self._lock = threading.Lock()
        self._unsent = None  # progress reported while disconnected

    @property
    def cancelled(self):
        return self.delivery.cancelled

    @property
    def stopping(self):
        return self._worker._stopping

    def on_cancel(self, fn):
        """Call fn(job) when a cancel request arrives (from a background
        thread: set a flag or signal your loop; do not block)."""
        self.delivery.on_cancel(lambda _d: fn(self))

    def progress(self, percent=None, text=None, checkpoint=None):
        """Report progress (percent 0-100, text, checkpoint URI) now; the
        broker keeps the latest with the job and hands it to the next
        attempt. Also extends the lease. Returns False if the lease was
        lost (the job may be running elsewhere). While the connection is
        down (within the broker's disconnect grace) it does not wait: the
        touch thread sends the latest progress once the session is back."""
        if checkpoint is not None:
            self.checkpoint = checkpoint
        return self._touch(Progress(percent, text, checkpoint))

    def _touch(self, progress=None, resume=False):
        """Touch the lease (with progress). On a lost connection, resume
        (the touch thread) reconnects the worker's session and touches
        again; without, the progress waits in _unsent for that."""
        for _ in range(_RESUME_TRIES):
            if self.lease_lost:
                return False
            try:
                with self._lock:
                    p = _merge(self._unsent, progress)
                    if p is None:
                        self.delivery.touch()
                    else:
                        self.delivery.touch(p)
                    self._unsent = None
                return True
            except errors.StaleDelivery as e:
                self.lease_lost = True
                log.warning("job %d: lease lost: %s", self.id, e)
                return False
            except errors.Timeout as e:
                log.warning("job %d: touch: %s", self.id, e)
                return True  # tried again at the next interval
            except errors.ConnectionClosed as e:
                with self._lock:
                    self._unsent = _merge(self._unsent, progress)
                progress = None
                if not resume:
                    return True
                if not self._worker._resume(self.delivery):
                    self.lease_lost = True
                    log.warning("job %d: connection lost: %s", self.id, e)
                    return False
        return True


def _merge(old, new):
    """Two Progress reports (or None) as one: new's fields win where set."""
    if old is None or new is None:
        return new if old is None else old
    return Progress(*(n if n is not None else o for o, n in zip(old, new)))


class _Toucher(threading.Thread):
    """Touches a job's lease every interval seconds until stopped, and
    resumes the worker's session as soon as the job's connection is lost."""

    def __init__(self, job, interval):
        super().__init__(name="protoq-touch-%d" % job.id, daemon=True)
        self.job = job
        self.interval = interval
        self.done = threading.Event()

    def run(self):
        job = self.job
        next_at = time.monotonic() + self.interval
        while not self.done.wait(min(self.interval, _TOUCH_TICK)):
            if time.monotonic() < next_at and not job.delivery._client.closed:
                continue
            if not job._touch(resume=True):
                return
            next_at = time.monotonic() + self.interval

    def stop(self):
        self.done.set()
        self.join()


class Worker:
    """Worker(server, queue, fn, *, token=None, tls=None, decode='auto',
    tags=None, touch_interval=None, shutdown_grace=0, on_cancel=None,
    reconnect=(0.5, 30), max_jobs=None, name='protoq-worker')

    fn(job) runs once per job. touch_interval: seconds between touches
    (None: a third of the lease). shutdown_grace: seconds the running job
    may still finish after SIGTERM (job.stopping is True meanwhile) before
    protoq.Shutdown is raised inside it. on_cancel(job): called when a
    cancel request arrives (job.cancelled is set either way). reconnect:
    first and largest delay between connection attempts. max_jobs: stop
    after that many jobs (None: run until stop() or SIGTERM). jobs_done
    counts the jobs fn ran, also one whose outcome was lost with the
    connection (past the broker's disconnect grace).
    """

    def __init__(self, server, queue, fn, *, token=None, tls=None,
                 decode="auto", tags=None, touch_interval=None,
                 shutdown_grace=0, on_cancel=None, reconnect=(0.5, 30.0),
                 max_jobs=None, name="protoq-worker"):
        if decode not in ("auto", "bytes", "str", "json"):
            raise ValueError("decode: 'auto', 'bytes', 'str' or 'json', not %r" % decode)
        self.server, self.queue, self.fn = server, queue, fn
        self.token, self.tls, self.decode, self.tags = token, tls, decode, tags
        self.touch_interval = touch_interval
        self.shutdown_grace = shutdown_grace
        self.on_cancel = on_cancel
        self.reconnect = reconnect
        self.max_jobs = max_jobs
        self.name = name
        self.jobs_done = 0
        self._stopping = False
        self._in_job = False
        self._term_timer = None
        self.session = new_session_id()  # every connection's, resumed
        self._client = None              # the current connection
        self._link_lock = threading.Lock()  # replacing _client

    def stop(self):
        """Stop after the current job (from any thread)."""
        self._stopping = True

    # ---- signals

    def _on_sigterm(self, signum, _frame):
        if not self._in_job:
            self._stopping = True
            return
        if self._stopping or not self.shutdown_grace:
            self._stopping = True
            raise errors.Shutdown("signal %d" % signum)
        self._stopping = True
        log.info("SIGTERM: the running job has %ss to finish", self.shutdown_grace)
        self._term_timer = threading.Timer(
            self.shutdown_grace, os.kill, (os.getpid(), signal.SIGTERM))
        self._term_timer.daemon = True
        self._term_timer.start()

    # ---- the loop

    def run(self):
        """Take jobs until stop(), SIGTERM or max_jobs. Returns the number
        of jobs run. Connection failures are retried with backoff; other
        errors (QueueNotFound, Unauthorized, ...) are raised."""
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            delay = self.reconnect[0]
            while not self._stopping:
                try:
                    self._session()
                    delay = self.reconnect[0]
                except (errors.ConnectionClosed, errors.Timeout) as e:
                    if self._stopping:
                        break
                    pause = delay * (0.5 + random.random() / 2)
                    log.warning("protoq worker: %s; reconnecting in %.1fs", e, pause)
                    self._sleep(pause)
                    delay = min(delay * 2, self.reconnect[1])
        finally:
            if self._term_timer is not None:
                self._term_timer.cancel()
            if old is not None:
                signal.signal(signal.SIGTERM, old)
            with self._link_lock:
                if self._client is not None:
                    self._client.close()
                    self._client = None
        return self.jobs_done

    def _sleep(self, seconds):
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))

    # ---- the connection

    def _connect(self):
        """A new connection of the worker's session, replacing (closing)
        the current one. The caller holds _link_lock."""
        old, self._client = self._client, None
        if old is not None:
            old.close()
        self._client = Client(self.server, token=self.token, tls=self.tls,
                              name=self.name, session=self.session)
        return self._client

    def _link(self):
        """The current connection, made anew if there is none alive."""
        with self._link_lock:
            c = self._client
            if c is None or c.closed:
                c = self._connect()
            return c

    def _resume(self, d):
        """The connection holding delivery d (of the running job) is lost.
        Reconnect with the session, with backoff, until the broker's
        disconnect grace is over (counted from when the connection died).
        True when the broker resumed the session: d is adopted by the new
        connection. False when the job is lost: no grace, not back within
        it, or not resumed. Both the touch thread and the main thread may
        call it: the second finds the connection the first made."""
        with self._link_lock:
            dead = d._client
            end = (dead.closed_at or time.monotonic()) + dead.disconnect_grace
            delay = self.reconnect[0]
            while True:
                c = self._client
                if c is not None and c is not dead and not c.closed:
                    if not c.session_resumed:
                        return False
                    c.adopt(d)
                    log.info("job %d: session resumed, the job goes on", d.id)
                    return True
                left = end - time.monotonic()
                if not dead.disconnect_grace or left <= 0:
                    return False
                try:
                    self._connect()
                except (errors.ConnectionClosed, errors.Timeout) as e:
                    pause = min(delay * (0.5 + random.random() / 2), left)
                    log.warning("job %d: reconnecting: %s; again in %.1fs",
                                d.id, e, pause)
                    time.sleep(pause)
                    delay = min(delay * 2, self.reconnect[1])

    # ---- jobs

    def _session(self):
        """Subscribe on the current connection and run jobs until stopping
        or until a job's connection was replaced (then the caller comes
        back at once to subscribe on the new one)."""
        c = self._link()
        sub = c.consume(self.queue, prefetch=1, tags=self.tags)
        while not self._stopping:
            d = sub.get(timeout=0.2)
            if d is None:
                continue
            self._run_job(sub, d)
            self.jobs_done += 1
            if self.max_jobs is not None and self.jobs_done >= self.max_jobs:
                self._stopping = True
            if self._client is not c:
                return
        # Clean stop, as PROTOCOL.md says: Flow 0 first (nothing more
        # comes after its Ok), then release what was pushed meanwhile
        # (no failed attempt), then unsubscribe.
        sub.pause()
        while True:
            d = sub.get(timeout=0)
            if d is None:
                break
            self._settle(d, "release", reason="shutdown")
        sub.close()

    def _run_job(self, sub, d):
        try:
            payload = decode_payload(d.payload, d.headers, self.decode)
        except ValueError as e:
            log.warning("job %d: payload does not decode as %s: %s", d.id, self.decode, e)
            self._settle(d, "nack", dead_letter=True,
                         error="payload does not decode as %s: %s" % (self.decode, e))
            return
        job = Job(self, d, payload)
        if self.on_cancel is not None:
            job.on_cancel(self.on_cancel)
        interval = self.touch_interval or max(0.05, d.lease / 3)
        toucher = _Toucher(job, interval)
        toucher.start()
        outcome, kw = "ack", {}
        try:
            try:
                self._in_job = True
                ret = self.fn(job)
            finally:
                self._in_job = False
            if ret is not None:
                kw = {"result": _result_bytes(ret)}
        except (errors.Shutdown, KeyboardInterrupt) as e:
            outcome, kw = "release", {"reason": "shutdown"}
            self._stopping = True
            log.info("job %d: released on shutdown (%s)", job.id, type(e).__name__)
        except errors.Reject as e:
            outcome, kw = "nack", {"dead_letter": True, "error": str(e) or "rejected"}
        except Exception:
            tail = traceback.format_exc()[-_ERROR_TAIL:]
            outcome, kw = "nack", {"error": tail}
            log.warning("job %d attempt %d failed:\n%s", job.id, job.attempt, tail)
        finally:
            toucher.stop()
        if job.cancelled:
            log.info("job %d was cancelled", job.id)
        if outcome == "release" and d._client is sub._client:
            try:
                sub.pause()  # else the broker pushes the job right back to us
            except errors.ConnectionClosed:
                pass  # (the release below resumes the session)
        self._settle(d, outcome, **kw)

    def _settle(self, d, outcome, **kw):
        """Ack, nack or release with a durable confirm; a fenced token (lease
        lost, cancelled) is logged, not raised. A result the broker refuses
        (over its max_result_bytes) fails the job for good, so that its
        producer hears why. A lost connection is resumed (_resume) and the
        outcome sent again; a job lost with it is logged."""
        try:
            for _ in range(_RESUME_TRIES):
                try:
                    getattr(d, outcome)(confirm=True, **kw)
                    return
                except errors.ConnectionClosed as e:
                    if not self._resume(d):
                        log.warning("job %d: connection lost, %s not sent "
                                    "(the broker fails the attempt): %s",
                                    d.id, outcome, e)
                        return
            log.warning("job %d: %s not sent: the connection keeps failing",
                        d.id, outcome)
        except errors.StaleDelivery as e:
            log.info("job %d: %s not applied: %s", d.id, outcome, e)
        except errors.MessageTooLarge as e:
            log.warning("job %d: result refused: %s", d.id, e)
            self._settle(d, "nack", dead_letter=True,
                         error="result refused by the broker: %s" % e)


def _result_bytes(ret):
    """A job function's return value as the job's result: bytes as they
    are, str as UTF-8, anything else as JSON (str() if it is not JSON)."""
    if isinstance(ret, (bytes, bytearray, memoryview)):
        return bytes(ret)
    if isinstance(ret, str):
        return ret.encode("utf-8")
    try:
        return json.dumps(ret).encode("utf-8")
    except (TypeError, ValueError):
        return str(ret).encode("utf-8")


def worker(server, queue, **kw):
    """Decorator: @protoq.worker("host:port", "train") def fn(job): ...
    makes fn a Worker (call .run() on it)."""
    def wrap(fn):
        return Worker(server, queue, fn, **kw)
    return wrap
