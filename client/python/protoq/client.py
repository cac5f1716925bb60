"""protoq.Client: one TCP (or TLS) connection to one protoqd.

Model: every public call blocks until the broker has answered (bounded by
``timeout``), like libprotoq. A background thread per client reads every
frame the broker sends: it matches replies to requests by request_id (so
requests may be pipelined), queues deliveries for their subscription,
records cancel requests, and sends Heartbeats while the caller is busy, so
a consumer that runs a job for hours keeps its connection. The client may
be used from several threads at once (the Worker touches leases from a
background thread); frames from different threads never interleave.

Acks, nacks and releases without ``confirm`` are buffered and pipelined:
they go out with the next request, before a consuming iterator waits, or
within 50 ms. A failure the broker reports for them later is counted in
``client.async_errors`` and passed to ``on_error(exc, request_id)``.

All durations in this API are seconds (int or float).
"""

import collections
import errno
import logging
import os
import queue as _queue
import select
import socket
import ssl
import struct
import threading
import time

from . import errors
from . import protoq_pb2 as pb

log = logging.getLogger("protoq")

PROTOCOL_VERSION = 1
DEFAULT_PORT = 7650
_HELLO_LIMIT = 64 * 1024        # largest Welcome we accept
_READ_LIMIT = 256 * 1024 * 1024  # largest frame we accept from a broker
_LAZY_FLUSH_BYTES = 64 * 1024   # buffered acks are written past this
_TICK = 0.05                    # reader wake-up: lazy flush and heartbeats
_SILENT_BEATS = 3               # heartbeat intervals of broker silence = dead,
_SILENT_SLACK = 1.0             # plus the broker's housekeeping tick (1 s)
_LEN = struct.Struct(">I")

Progress = collections.namedtuple("Progress", "percent text checkpoint")
Progress.__doc__ = "Progress of a job: percent (0-100), text, checkpoint."

RELEASE_REASONS = {
    None: pb.RELEASE_UNSPECIFIED,
    "unspecified": pb.RELEASE_UNSPECIFIED,
    "preempted": pb.RELEASE_PREEMPTED,
    "shutdown": pb.RELEASE_SHUTDOWN,
}


class InvalidArgument(errors.Error, ValueError):
    """A bad argument, refused before anything was sent."""


# ------------------------------------------------------------ conversions

def _ms(name, seconds):
    """Seconds (None = 0 = default) to whole ms; at least 1 ms if > 0."""
    if seconds is None:
        return 0
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise InvalidArgument("%s: a number of seconds, not %r" % (name, seconds))
    if seconds < 0:
        raise InvalidArgument("%s: negative duration %r" % (name, seconds))
    ms = int(round(seconds * 1000))
    return ms if ms > 0 or seconds == 0 else 1


def _sec(ms):
    return ms / 1000.0


def _bytes(name, value):
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise InvalidArgument("%s: bytes or str, not %s" % (name, type(value).__name__))


def _kvs(name, pairs, out):
    """Fill a repeated KeyValue from a dict or a list of pairs."""
    if not pairs:
        return
    items = pairs.items() if isinstance(pairs, dict) else pairs
    for k, v in items:
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument("%s: keys and values must be str (%r=%r)"
                                  % (name, k, v))
        kv = out.add()
        kv.key = k
        kv.value = v


def _check_name(name):
    if not isinstance(name, str):
        raise InvalidArgument("queue name: a str, not %s" % type(name).__name__)


def _session_valid(s):
    return (isinstance(s, str) and 1 <= len(s) <= 64 and
            all(0x20 < ord(ch) < 0x7f for ch in s))


def new_session_id():
    """A random session id (32 hex digits, 128 bits) for Client(session=)."""
    return os.urandom(16).hex()


def parse_address(server):
    """'host:port', '[v6]:port', 'host' or 'tls://host:port' ->
    (host, port, tls)."""
    if not isinstance(server, str) or not server:
        raise InvalidArgument("server: 'HOST:PORT', not %r" % (server,))
    tls = False
    if server.startswith("tls://"):
        tls, server = True, server[6:]
    elif server.startswith("tcp://"):
        server = server[6:]
    port = DEFAULT_PORT
    if server.startswith("["):
        end = server.find("]")
        if end < 0:
            raise InvalidArgument("server: unclosed '[' in %r" % server)
        host, rest = server[1:end], server[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgument("server: junk after ']' in %r" % server)
            port = rest[1:]
    elif server.count(":") == 1:
        host, port = server.split(":")
    else:
        host = server
    try:
        port = int(port)
    except ValueError:
        raise InvalidArgument("server: bad port in %r" % server) from None
    if not host or not 0 < port < 65536:
        raise InvalidArgument("server: bad address %r" % server)
    return host, port, tls


def _message(msg, payload, headers=None, priority=0, delay=None,
             deliver_at=None, ttl=None, key=None, correlation_id=None,
             reply_to=None, requires=None):
    """Fill a pb.Message from the publish keyword arguments."""
    msg.payload = _bytes("payload", payload)
    _kvs("headers", headers, msg.headers)
    if priority:
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidArgument("priority: an int 0-9, not %r" % (priority,))
        msg.priority = priority
    msg.delay_ms = _ms("delay", delay)
    if deliver_at is not None:
        if hasattr(deliver_at, "timestamp"):
            deliver_at = deliver_at.timestamp()
        msg.deliver_at_ms = _ms("deliver_at", deliver_at)
    msg.ttl_ms = _ms("ttl", ttl)
    if key is not None:
        msg.idempotency_key = key
    if correlation_id is not None:
        msg.correlation_id = correlation_id
    if reply_to is not None:
        msg.reply_to = reply_to
    _kvs("requires", requires, msg.requires)


def _progress(out, percent=None, text=None, checkpoint=None):
    """Fill a pb.Progress; False when nothing was given."""
    if isinstance(percent, Progress):
        percent, text, checkpoint = percent
    if percent is None and text is None and checkpoint is None:
        return False
    if percent is not None:
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) \
                or not 0 <= percent <= 100:
            raise InvalidArgument("progress: a percent 0-100, not %r" % (percent,))
        out.percent = int(percent)
    if text is not None:
        out.text = text
    if checkpoint is not None:
        out.checkpoint = checkpoint
    out.SetInParent()
    return True


# ------------------------------------------------------------ queue info

_ATTR_SECONDS = ("ack_timeout", "backoff_base", "backoff_cap", "ttl",
                 "dedup_window", "max_lease")
_ATTR_PLAIN = ("transient", "max_length", "max_bytes", "max_attempts",
               "dead_letter", "dead_letter_expired", "no_backoff")
_COUNTERS = ("ready", "delayed", "inflight", "consumers", "bytes",
             "published", "acked", "nacked", "redelivered", "expired",
             "dead_lettered", "dropped")


class QueueInfo:
    """A queue's effective attributes (durations in seconds) and counters."""

    __slots__ = ("name",) + _ATTR_SECONDS + _ATTR_PLAIN + _COUNTERS

    def __init__(self, info):
        self.name = info.name
        for a in _ATTR_SECONDS:
            setattr(self, a, _sec(getattr(info.attrs, a + "_ms")))
        for a in _ATTR_PLAIN:
            setattr(self, a, getattr(info.attrs, a))
        for c in _COUNTERS:
            setattr(self, c, getattr(info, c))

    def __repr__(self):
        return "QueueInfo(%s)" % ", ".join(
            "%s=%r" % (s, getattr(self, s)) for s in self.__slots__)


def _queue_attrs(out, kw):
    for k, v in kw.items():
        if k in _ATTR_SECONDS:
            setattr(out, k + "_ms", _ms(k, v))
        elif k in _ATTR_PLAIN:
            if v is not None:
                setattr(out, k, v)
        else:
            raise InvalidArgument("create_queue: unknown attribute %r" % k)


# ------------------------------------------------------------ replies

class _Waiter:
    """One blocking request's reply slot (set by the reader thread)."""

    __slots__ = ("event", "frame", "exc")

    def __init__(self):
        self.event = threading.Event()
        self.frame = None
        self.exc = None

    def on_reply(self, _arg, frame, exc):
        self.frame, self.exc = frame, exc
        self.event.set()


class _Batch:
    """Confirms of one publish_many call."""

    def __init__(self, n):
        self.results = [None] * n
        self.outstanding = 0
        self.failed = 0
        self.cond = threading.Condition(threading.Lock())
        self.window_wait = None  # outstanding count a waiter waits below

    def on_reply(self, i, frame, exc):
        if exc is None and frame.WhichOneof("kind") == "publish_ok" \
                and frame.publish_ok.message_ids:
            self.results[i] = frame.publish_ok.message_ids[0]
        else:
            self.results[i] = exc or errors.ProtocolError(
                "unexpected reply to a publish: %s" % frame.WhichOneof("kind"))
            self.failed += 1
        with self.cond:
            self.outstanding -= 1
            if self.window_wait is not None and self.outstanding < self.window_wait:
                self.cond.notify()


# ------------------------------------------------------------ deliveries

class Delivery:
    """One delivered message. (id, attempt) is the delivery token.

    Attributes: id, attempt, queue, payload (bytes), headers (dict),
    priority, correlation_id, reply_to, idempotency_key, published_at (Unix
    seconds), lease (seconds, from when it was sent), progress (the last
    Progress an earlier attempt reported, or None), cancelled (True once
    a cancel request arrived for it).
    """

    def __init__(self, client, d):
        self._client = client
        self._d = d
        self.id = d.message_id
        self.attempt = d.attempt
        self.cancelled = False
        self._on_cancel = []
        self._headers = None

    queue = property(lambda self: self._d.queue)
    payload = property(lambda self: self._d.message.payload)
    priority = property(lambda self: self._d.message.priority)
    correlation_id = property(lambda self: self._d.message.correlation_id)
    reply_to = property(lambda self: self._d.message.reply_to)
    idempotency_key = property(lambda self: self._d.message.idempotency_key)
    published_at = property(lambda self: _sec(self._d.published_at_ms))
    lease = property(lambda self: _sec(self._d.lease_ms))
    subscription_id = property(lambda self: self._d.subscription_id)

    @property
    def headers(self):
        if self._headers is None:
            self._headers = {kv.key: kv.value for kv in self._d.message.headers}
        return self._headers

    @property
    def progress(self):
        if not self._d.HasField("progress"):
            return None
        p = self._d.progress
        return Progress(p.percent, p.text, p.checkpoint)

    def text(self, encoding="utf-8"):
        return self.payload.decode(encoding)

    def json(self):
        import json
        return json.loads(self.payload)

    def on_cancel(self, fn):
        """Call fn(delivery) (from the client's reader thread) when a cancel
        request arrives for this delivery; at once if one already did."""
        self._on_cancel.append(fn)
        if self.cancelled:
            fn(self)

    def ack(self, result=None, follow_ups=None, confirm=False):
        """Done: the message is removed. confirm: wait until the ack is
        durable. result (bytes or str, up to the broker's max_result_bytes):
        sent to the producer's reply_to queue. follow_ups: publishes stored
        in the same log record as the ack, each (queue, payload) or
        (queue, payload, {publish options}); any one refused refuses the ack
        (it raises, and the job stays held). Both wait for the answer.
        Returns the follow-ups' message ids (a list, in order), else None."""
        if result is None and not follow_ups and not confirm:
            self._client._ack_lazy(self)
            return
        f = pb.Frame()
        f.ack.message_id, f.ack.attempt = self.id, self.attempt
        if result is not None:
            f.ack.result = _bytes("result", result)
            confirm = True
        for fu in follow_ups or ():
            queue, payload = fu[0], fu[1]
            _check_name(queue)
            item = f.ack.follow_ups.add()
            item.queue = queue
            _message(item.message, payload, **(fu[2] if len(fu) > 2 else {}))
            confirm = True
        f.ack.confirm = confirm
        if follow_ups:
            r = self._client._call(f, "ack_ok")
            self._client._held.pop((self.id, self.attempt), None)
            return list(r.ack_ok.follow_up_ids)
        self._client._settle(self, f, confirm)
        return None

    def nack(self, delay=None, dead_letter=False, error=None, confirm=False):
        """A failed attempt: retry after delay seconds (None: the queue's
        backoff) or dead-letter now; error (text, 1 KiB kept) goes to the
        dead letter's x-death-error header."""
        f = pb.Frame()
        n = f.nack
        n.message_id, n.attempt, n.confirm = self.id, self.attempt, confirm
        n.delay_ms = _ms("delay", delay)
        n.dead_letter = bool(dead_letter)
        if error is not None:
            n.error = _trim_utf8(str(error), 1024)
        self._client._settle(self, f, confirm)

    def touch(self, progress=None, text=None, checkpoint=None, extend=None):
        """Extend the lease to extend seconds from now (None: the queue's
        ack_timeout), storing progress (a percent 0-100 or a Progress), text
        and checkpoint if given. Returns the new lease in seconds. A lease
        already lost raises StaleDelivery."""
        f = pb.Frame()
        t = f.touch
        t.message_id, t.attempt = self.id, self.attempt
        t.extend_ms = _ms("extend", extend)
        _progress(t.progress, progress, text, checkpoint)
        reply = self._client._call(f, "touch_ok")
        return _sec(reply.touch_ok.lease_ms)

    def release(self, reason="shutdown", progress=None, text=None,
                checkpoint=None, confirm=False):
        """Give the job back without counting a failed attempt (reason:
        'shutdown', 'preempted' or None); progress is kept for the next
        attempt."""
        if reason not in RELEASE_REASONS:
            raise InvalidArgument("release: reason is one of %s, not %r"
                                  % (sorted(k for k in RELEASE_REASONS if k), reason))
        f = pb.Frame()
        r = f.release
        r.message_id, r.attempt, r.confirm = self.id, self.attempt, confirm
        r.reason = RELEASE_REASONS[reason]
        _progress(r.progress, progress, text, checkpoint)
        self._client._settle(self, f, confirm)

    def __repr__(self):
        return "Delivery(id=%d, attempt=%d, queue=%r, %d bytes)" % (
            self.id, self.attempt, self.queue, len(self.payload))


def _trim_utf8(s, limit):
    b = s.encode("utf-8")
    if len(b) <= limit:
        return s
    return b[len(b) - limit:].decode("utf-8", "ignore")


class Subscription:
    """An iterator of Deliveries from one queue (from Client.consume).

    Iterating blocks until the next delivery; with ``timeout`` it stops
    when nothing arrived for that many seconds. A lost connection raises
    ConnectionClosed from the iterator.
    """

    def __init__(self, client, queue, prefetch, timeout):
        self._client = client
        self.queue = queue
        self.prefetch = prefetch
        self.timeout = timeout
        self.id = None
        self._q = _queue.SimpleQueue()
        self._closed = False

    def _push(self, item):
        self._q.put(item)

    def get(self, timeout=None):
        """The next Delivery, or None after timeout seconds (None: wait
        for ever)."""
        try:
            item = self._q.get_nowait()
        except _queue.Empty:
            self._client._flush_lazy()
            try:
                item = self._q.get(timeout=timeout)
            except _queue.Empty:
                return None
        if isinstance(item, BaseException):
            self._q.put(item)  # every later get raises too
            raise item
        return item

    def __iter__(self):
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        d = self.get(self.timeout)
        if d is None:
            raise StopIteration
        return d

    def flow(self, prefetch):
        """Change the prefetch; 0 pauses the subscription."""
        f = pb.Frame()
        f.flow.subscription_id, f.flow.prefetch = self.id, prefetch
        self._client._call(f, "ok")
        self.prefetch = prefetch

    def pause(self):
        self.flow(0)

    def close(self):
        """Unsubscribe: deliveries not yet acked go back to the queue (a
        failed attempt each; release them first to avoid that)."""
        if self._closed:
            return
        self._closed = True
        c = self._client
        if c._dead is None and self.id is not None:
            f = pb.Frame()
            f.unsubscribe.subscription_id = self.id
            try:
                c._call(f, "ok")
            finally:
                c._subs.pop(self.id, None)

    cancel = close

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        except errors.ConnectionClosed:
            pass


# ------------------------------------------------------------ the client

class Client:
    """A connection to protoqd.

    Client(server="127.0.0.1:7650", token=None, tls=None, name=...,
    timeout=30, connect_timeout=5, heartbeat=None, on_error=None,
    on_cancel=None, session=None, session_fresh=False)

    session: a session id (1-64 printable ASCII bytes, e.g.
    protoq.new_session_id()) for the broker's disconnect grace: when this
    connection breaks, what it holds stays leased to the session for the
    broker's disconnect_grace_ms, and a new Client with the same session
    takes it over (session_resumed; adopt() the old deliveries to settle
    them). session_fresh ends what the broker still kept for the session.

    tls: None/False for plain TCP (unless server starts with tls://), True
    for the default SSLContext (certificate and hostname verified against
    the system's CAs), or an ssl.SSLContext, e.g.
    ssl.create_default_context(cafile="ca.pem") with load_cert_chain() for
    a client certificate; for protoqd's tls_listen port.
    """

    def __init__(self, server="127.0.0.1:7650", token=None, tls=None,
                 name="protoq-python", timeout=30.0, connect_timeout=5.0,
                 heartbeat=None, on_error=None, on_cancel=None,
                 session=None, session_fresh=False):
        host, port, want_tls = parse_address(server)
        if session is not None and not _session_valid(session):
            raise InvalidArgument("session: want 1-64 printable ASCII "
                                  "bytes without spaces")
        self.server = server
        self.timeout = timeout
        self.on_error = on_error
        self.on_cancel = on_cancel
        self.async_errors = 0
        self.last_async_error = None
        self._wlock = threading.Lock()
        self._out = bytearray()      # lazily buffered frames (acks)
        self._pending = {}           # request_id -> (fn, arg)
        self._subs = {}              # subscription_id -> Subscription
        self._held = {}              # (message_id, attempt) -> Delivery
        self._early_cancels = set()  # tokens cancelled before adopt()
        self._rid = 0
        self._dead = None            # the exception once the connection died
        self.closed_at = None        # time.monotonic() when it died
        self._last_send = time.monotonic()
        self._sock = None
        self._tls = None
        self._iolock = None          # TLS only: one SSL call at a time
        self._ack_frame = pb.Frame()  # reused by _ack_lazy (under _wlock)
        self._ack_frame.ack.SetInParent()
        try:
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise errors.ConnectionClosed("connect %s: %s" % (server, e)) from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls or want_tls:
                sock = self._start_tls(sock, tls, host)
            self._sock = sock
            self.info = self._handshake(token, name, heartbeat, connect_timeout,
                                        session, session_fresh)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.max_frame_bytes = self.info.max_frame_bytes or 4 * 1024 * 1024
        self.session = session
        self.session_resumed = self.info.session_resumed
        self.disconnect_grace = _sec(self.info.disconnect_grace_ms)
        self._hb = self.info.heartbeat_ms / 1000.0
        self._last_recv = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop,
                                        name="protoq-reader", daemon=True)
        self._reader.start()

    def _start_tls(self, sock, tls, host):
        """The TLS handshake on connected sock (certificate and hostname
        checked); returns the SSLSocket. Its failures (a certificate that
        does not verify, a plain port, a timeout) are ConnectionClosed or
        Timeout, with the ssl exception as __cause__. On failure the
        caller closes sock."""
        ctx = tls if isinstance(tls, ssl.SSLContext) else ssl.create_default_context()
        try:
            sock = ctx.wrap_socket(sock, server_hostname=host)
        except socket.timeout as e:
            raise errors.Timeout("TLS handshake with %s timed out"
                                 % self.server) from e
        except (OSError, ValueError) as e:
            # ssl.SSLError is an OSError; ValueError: a bad context.
            raise errors.ConnectionClosed("TLS handshake with %s: %s"
                                          % (self.server, e)) from e
        self._tls = sock
        self._iolock = threading.Lock()
        return sock

    # ---- handshake (blocking socket, before the reader starts)

    def _handshake(self, token, name, heartbeat, timeout, session,
                   session_fresh):
        f = pb.Frame()
        f.request_id = self._next_rid()
        h = f.hello
        h.protocol_version = PROTOCOL_VERSION
        h.client_name = name
        if token:
            h.auth_token = token
        h.heartbeat_ms = _ms("heartbeat", heartbeat)
        if session is not None:
            h.session_id = session
            h.session_resume = not session_fresh
        data = f.SerializeToString()
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(_LEN.pack(len(data)) + data)
            head = self._recv_exact(4)
            (n,) = _LEN.unpack(head)
            if n == 0 or n > _HELLO_LIMIT:
                raise errors.ProtocolError("handshake: bad frame length %d "
                                           "(is this a protoq broker?)" % n)
            reply = pb.Frame.FromString(self._recv_exact(n))
        except socket.timeout as e:
            raise errors.Timeout("handshake with %s timed out" % self.server) from e
        except OSError as e:
            raise errors.ConnectionClosed("handshake with %s: %s"
                                          % (self.server, e)) from e
        except Exception as e:
            if isinstance(e, errors.Error):
                raise
            raise errors.ProtocolError("handshake: %s" % e) from e
        kind = reply.WhichOneof("kind")
        if kind == "error":
            raise errors.from_wire(reply.error.code, reply.error.message)
        if kind != "welcome":
            raise errors.ProtocolError("handshake: expected Welcome, got %s" % kind)
        return reply.welcome

    def _recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise errors.ConnectionClosed("the broker closed the connection "
                                              "during the handshake")
            buf += chunk
        return bytes(buf)

    # ---- sending

    def _next_rid(self):
        self._rid += 1
        return self._rid

    def _check_alive(self):
        if self._dead is not None:
            raise self._dead

    def _encode(self, f):
        data = f.SerializeToString()
        if len(data) > self.max_frame_bytes:
            raise errors.FrameTooLarge(
                "a %d-byte frame is over the broker's max_frame_bytes (%d); "
                "nothing was sent" % (len(data), self.max_frame_bytes))
        return _LEN.pack(len(data)) + data

    def _write_locked(self, data, wait=True):
        """Write self._out then data (holding _wlock). wait=False: write
        what fits now and keep the rest in self._out (reader thread)."""
        if self._out:
            if data:
                self._out += data
            buf = self._out
        elif data:
            buf = data  # nothing buffered: send it without a copy
        else:
            return
        sock = self._sock
        step = 1024 * 1024 if self._iolock is None else 256 * 1024
        sent = 0
        with memoryview(buf) as view:
            try:
                while sent < len(view):
                    try:
                        if self._iolock is None:
                            sent += sock.send(view[sent:sent + step])
                        else:
                            with self._iolock:
                                sent += sock.send(view[sent:sent + step])
                    except (BlockingIOError, ssl.SSLWantWriteError,
                            ssl.SSLWantReadError):
                        if not wait:
                            break
                        self._wait_writable()
            except OSError as e:
                self._die(errors.ConnectionClosed("write to %s: %s" % (self.server, e)))
                raise self._dead from e
        if buf is self._out:
            del self._out[:sent]
        elif sent < len(buf):
            self._out += buf[sent:]
        self._last_send = time.monotonic()

    def _wait_writable(self):
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            if self._dead is not None:
                raise self._dead
            _, w, _ = select.select([], [self._sock], [], 0.5)
            if w:
                return
            if deadline is not None and time.monotonic() > deadline:
                self._die(errors.Timeout("write to %s blocked for %ss"
                                         % (self.server, self.timeout)))
                raise self._dead

    def _send(self, f, handler=None, lazy=False):
        """Assign f a request id, register handler (fn, arg) for its reply,
        and write it (lazy: buffer it for the next flush)."""
        with self._wlock:
            self._check_alive()
            f.request_id = self._next_rid()
            data = self._encode(f)
            if handler is not None:
                self._pending[f.request_id] = handler
                if self._dead is not None:  # _die ran after _check_alive
                    self._pending.pop(f.request_id, None)
                    raise self._dead
            if lazy and len(self._out) + len(data) < _LAZY_FLUSH_BYTES:
                self._out += data
            else:
                try:
                    self._write_locked(data)
                except errors.Error:
                    self._pending.pop(f.request_id, None)
                    raise
            return f.request_id

    def _ack_lazy(self, d):
        """The hot path of a consumer: an unconfirmed Ack, buffered."""
        with self._wlock:
            self._check_alive()
            self._rid += 1
            f = self._ack_frame
            f.request_id = self._rid
            f.ack.message_id = d.id
            f.ack.attempt = d.attempt
            data = f.SerializeToString()
            out = self._out
            out += _LEN.pack(len(data))
            out += data
            if len(out) >= _LAZY_FLUSH_BYTES:
                self._write_locked(b"")
        self._held.pop((d.id, d.attempt), None)

    def _flush_lazy(self):
        if self._out and self._dead is None:
            with self._wlock:
                self._write_locked(b"")

    def _call(self, f, want, timeout=-1):
        """Send a request and wait for its reply of kind want."""
        w = _Waiter()
        rid = self._send(f, (w.on_reply, None))
        if timeout == -1:
            timeout = self.timeout
        if not w.event.wait(timeout):
            self._pending.pop(rid, None)
            raise errors.Timeout("no answer from %s within %ss"
                                 % (self.server, timeout))
        if w.exc is not None:
            raise w.exc
        kind = w.frame.WhichOneof("kind")
        if kind != want:
            raise errors.ProtocolError("expected %s, got %s" % (want, kind))
        return w.frame

    def _settle(self, d, f, confirm):
        """Ack / nack / release of a delivery."""
        if confirm:
            self._call(f, "ok")
        else:
            self._send(f, lazy=True)
        self._held.pop((d.id, d.attempt), None)

    # ---- the reader thread

    def _read_loop(self):
        buf = bytearray()
        sock = self._sock
        exc = None
        try:
            while self._dead is None:
                iolock = self._iolock
                if iolock is None or not self._tls.pending():
                    r, _, _ = select.select([sock], [], [], _TICK)
                    self._tick()
                    if not r:
                        self._check_silence()
                        continue
                try:
                    if iolock is None:
                        chunk = sock.recv(256 * 1024)
                    else:
                        with iolock:
                            chunk = sock.recv(256 * 1024)
                except (BlockingIOError, ssl.SSLWantReadError,
                        ssl.SSLWantWriteError):
                    continue
                if not chunk:
                    exc = errors.ConnectionClosed("%s closed the connection"
                                                  % self.server)
                    break
                self._last_recv = time.monotonic()
                buf += chunk
                off = self._parse(buf)
                if off:
                    del buf[:off]
        except errors.Error as e:
            exc = e
        except (OSError, ValueError) as e:
            # ValueError: select() on a socket closed by close() or a
            # failed write in another thread (then _dead is set already).
            exc = errors.ConnectionClosed("read from %s: %s" % (self.server, e))
        except Exception as e:  # a bug here must not hang the callers
            log.exception("protoq reader failed")
            exc = errors.ProtocolError("reader failed: %r" % e)
        self._die(exc or errors.ConnectionClosed("client closed"))

    def _check_silence(self):
        """Called when nothing is there to read. A broker silent for
        _SILENT_BEATS heartbeat intervals (+ _SILENT_SLACK) is gone: it
        sends a Heartbeat whenever it sent nothing for one, checked once a
        second. Raise ConnectionClosed, as the
        broker closes a silent client, so that a connection cut without a
        FIN or RST (a network failure) is noticed in seconds. (Only when
        the socket is empty: a reader that was not scheduled for a while
        finds the broker's frames waiting.)"""
        silent = time.monotonic() - self._last_recv
        if self._hb and silent > _SILENT_BEATS * self._hb + _SILENT_SLACK:
            raise errors.ConnectionClosed(
                "%s sent nothing for %.1fs (heartbeat interval %gs): "
                "connection lost" % (self.server, silent, self._hb))

    def _tick(self):
        """Flush lazy output and send a heartbeat when one is due; never
        blocks (the reader must keep reading)."""
        due = self._hb and time.monotonic() - self._last_send >= self._hb / 2
        if not (self._out or due):
            return
        if not self._wlock.acquire(blocking=False):
            return  # someone is writing: that is a sign of life too
        try:
            if due and not self._out:
                f = pb.Frame()
                f.heartbeat.SetInParent()
                self._out += self._encode(f)
            self._write_locked(b"", wait=False)
        finally:
            self._wlock.release()

    def _parse(self, buf):
        off, end = 0, len(buf)
        while end - off >= 4:
            (n,) = _LEN.unpack_from(buf, off)
            if n == 0 or n > _READ_LIMIT:
                raise errors.ProtocolError("bad frame length %d from %s" % (n, self.server))
            if end - off - 4 < n:
                break
            f = pb.Frame.FromString(bytes(buf[off + 4:off + 4 + n]))
            off += 4 + n
            self._dispatch(f)
        return off

    def _dispatch(self, f):
        kind = f.WhichOneof("kind")
        if kind == "deliver":
            sub = self._subs.get(f.deliver.subscription_id)
            if sub is not None:
                d = Delivery(self, f.deliver)
                self._held[(d.id, d.attempt)] = d
                sub._push(d)
            return
        if kind == "heartbeat":
            return
        if kind == "cancel_requested":
            self._on_cancel_requested(f.cancel_requested)
            return
        handler = self._pending.pop(f.request_id, None) if f.request_id else None
        exc = None
        if kind == "error":
            exc = errors.from_wire(f.error.code, f.error.message)
        if handler is not None:
            handler[0](handler[1], f, exc)
        elif exc is not None:
            self.async_errors += 1
            self.last_async_error = exc
            if f.request_id == 0:
                log.warning("protoq: broker error: %s", exc)
            if self.on_error is not None:
                self.on_error(exc, f.request_id)

    def adopt(self, delivery):
        """Make a delivery of an earlier Client of this session (resumed:
        session_resumed) this one's: its ack, nack, touch and release go
        through this connection, and a cancel request for it (also one that
        came while the session was disconnected) marks it and runs its
        on_cancel callbacks. A delivery whose lease ran out meanwhile is
        refused by the broker (StaleDelivery) when settled."""
        token = (delivery.id, delivery.attempt)
        delivery._client = self
        with self._wlock:
            self._held[token] = delivery
            early = token in self._early_cancels
            self._early_cancels.discard(token)
        if early:
            self._cancel_delivery(delivery)
        return delivery

    def _cancel_delivery(self, d):
        d.cancelled = True
        for fn in list(d._on_cancel):
            try:
                fn(d)
            except Exception:
                log.exception("protoq: cancel callback failed")

    def _on_cancel_requested(self, cr):
        with self._wlock:
            d = self._held.get((cr.message_id, cr.attempt))
            if d is None and self.session is not None and \
                    len(self._early_cancels) < 100000:
                # a resumed session's delivery not adopted yet
                self._early_cancels.add((cr.message_id, cr.attempt))
        if d is not None:
            self._cancel_delivery(d)
        if self.on_cancel is not None:
            self.on_cancel(cr.queue, cr.message_id, cr.attempt)

    def _die(self, exc):
        if self._dead is not None:
            return
        self._dead = exc  # first: _send checks it after registering
        self.closed_at = time.monotonic()
        pending, self._pending = self._pending, {}
        for fn, arg in pending.values():
            fn(arg, None, exc)
        for sub in list(self._subs.values()):
            sub._push(exc)
        try:
            self._sock.close()
        except OSError:
            pass

    # ---- public: lifecycle

    def flush(self):
        """Write buffered acks, nacks and releases now (they also go out
        with the next request, or within 50 ms)."""
        self._check_alive()
        self._flush_lazy()

    @property
    def closed(self):
        return self._dead is not None

    def close(self):
        """Flush buffered acks and close. Unconfirmed publishes and held
        deliveries are the broker's to handle (deliveries go back)."""
        if self._dead is None:
            try:
                self._flush_lazy()
            except errors.Error:
                pass
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._die(errors.ConnectionClosed("client closed"))
        if self._reader is not threading.current_thread():
            self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- public: queues

    def create_queue(self, name, **attrs):
        """Declare a queue. Attributes (durations in seconds): transient,
        max_length, max_bytes, ack_timeout, max_attempts, dead_letter,
        backoff_base, backoff_cap, no_backoff, ttl, dedup_window,
        max_lease, dead_letter_expired. Succeeds when it exists with the
        same attributes; QueueExists when with others."""
        _check_name(name)
        f = pb.Frame()
        f.queue_create.name = name
        _queue_attrs(f.queue_create.attrs, attrs)
        self._call(f, "ok")

    def delete_queue(self, name):
        _check_name(name)
        f = pb.Frame()
        f.queue_delete.name = name
        self._call(f, "ok")

    def purge_queue(self, name):
        """Drop every ready and delayed message; returns how many."""
        _check_name(name)
        f = pb.Frame()
        f.queue_purge.name = name
        return self._call(f, "ok").ok.count

    def list_queues(self):
        f = pb.Frame()
        f.queue_list.SetInParent()
        return [QueueInfo(q) for q in self._call(f, "queue_list_ok").queue_list_ok.queues]

    def stat_queue(self, name):
        _check_name(name)
        f = pb.Frame()
        f.queue_stat.name = name
        return QueueInfo(self._call(f, "queue_stat_ok").queue_stat_ok.queue)

    # ---- public: publishing

    def publish(self, queue, payload, **opts):
        """Publish one message and wait until the broker has it durable.
        Returns its id. opts: headers (dict), priority (0-9), delay,
        deliver_at (Unix seconds or datetime), ttl, key (idempotency key),
        correlation_id, reply_to, requires (dict of tags)."""
        return self.publish_ex(queue, payload, **opts)[0]

    def publish_ex(self, queue, payload, **opts):
        """publish() that returns (id, duplicate): duplicate is True when
        the idempotency key matched an earlier message."""
        _check_name(queue)
        f = pb.Frame()
        f.publish.queue = queue
        _message(f.publish.message, payload, **opts)
        ok = self._call(f, "publish_ok").publish_ok
        return ok.message_ids[0], bool(ok.duplicate and ok.duplicate[0])

    def publish_batch(self, queue, payloads, **opts):
        """Publish every payload in one atomic PublishBatch frame (all are
        stored or none; at most Welcome.max_batch). Returns the ids."""
        _check_name(queue)
        f = pb.Frame()
        for p in payloads:
            item = f.publish_batch.items.add()
            item.queue = queue
            _message(item.message, p, **opts)
        return list(self._call(f, "publish_ok").publish_ok.message_ids)

    def publish_many(self, queue, payloads, window=1000, raise_errors=True,
                     **opts):
        """Publish each payload as its own message, pipelined: up to
        ``window`` unconfirmed at once, then wait for every confirm.

        Returns a list with one entry per payload: its message id. When a
        publish failed and raise_errors is true, the first failure's
        exception is raised with ``.results`` (id or exception per payload)
        attached; with raise_errors=False the list holds the exceptions."""
        _check_name(queue)
        if window < 1:
            raise InvalidArgument("publish_many: window must be >= 1")
        payloads = payloads if isinstance(payloads, (list, tuple)) else list(payloads)
        batch = _Batch(len(payloads))
        f = pb.Frame()
        f.publish.queue = queue
        _message(f.publish.message, b"", **opts)
        pmsg = f.publish.message
        chunk = max(1, min(window // 4 or 1, 256))
        pending = self._pending
        i, n = 0, len(payloads)
        while i < n:
            with batch.cond:
                room = window - batch.outstanding
                if room <= 0:
                    batch.window_wait = window
                    while batch.outstanding >= window and self._dead is None:
                        batch.cond.wait(0.5)
                    batch.window_wait = None
                    continue
            take = min(room, chunk, n - i)
            with self._wlock:
                self._check_alive()
                parts = []
                for j in range(i, i + take):
                    rid = self._next_rid()
                    f.request_id = rid
                    pmsg.payload = _bytes("payload", payloads[j])
                    parts.append(self._encode(f))
                    pending[rid] = (batch.on_reply, j)
                with batch.cond:
                    batch.outstanding += take
                self._write_locked(b"".join(parts))
            i += take
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        with batch.cond:
            batch.window_wait = 1
            while batch.outstanding > 0:
                if batch.cond.wait(0.5):
                    continue
                if self._dead is not None and batch.outstanding > 0:
                    # Registered as the connection died: nobody answers.
                    for j, r in enumerate(batch.results):
                        if r is None:
                            batch.results[j] = self._dead
                            batch.failed += 1
                    batch.outstanding = 0
                elif deadline is not None and time.monotonic() > deadline:
                    raise errors.Timeout("publish_many: %d confirms missing after %ss"
                                         % (batch.outstanding, self.timeout))
        if batch.failed and raise_errors:
            first = next(r for r in batch.results if isinstance(r, BaseException))
            first.results = batch.results
            raise first
        return batch.results

    # ---- public: submitting a job and waiting for its end

    def submit(self, queue, payload, wait=True, timeout=None, **opts):
        """Publish a job; with wait, block until it ends, like `protoq pub
        --wait`: return its result (the result message's payload, bytes;
        b"" when the job was acked without one), or raise JobFailed with the
        failure notice's reason and error text.

        The answer comes back on a private reply queue
        (protoq.reply.PID.RANDOM), created here and removed at the end,
        also after a timeout or an exception. timeout: seconds to wait for
        the end (None: for ever); past it protoq.Timeout is raised, with
        .job_id: the job goes on, but its result is not kept. A connection
        lost meanwhile raises ConnectionClosed and leaves the reply queue
        behind (delete_queue it). An idempotency key (key=) that matches an
        earlier job raises InvalidArgument with .job_id at once: that job
        reports to its own publisher. With an auth_file the token needs manage
        and publish on protoq.reply.*. opts: those of publish(), but not
        reply_to. wait=False: publish() (returns the id)."""
        if not wait:
            return self.publish(queue, payload, **opts)
        if opts.get("reply_to") is not None:
            raise InvalidArgument("submit: wait=True makes its own reply "
                                  "queue; reply_to is not allowed")
        if timeout is not None:
            _ms("timeout", timeout)  # a number >= 0
        _check_name(queue)
        end = None if timeout is None else time.monotonic() + timeout
        rq = "protoq.reply.%d.%s" % (os.getpid(), os.urandom(6).hex())
        self.create_queue(rq)
        done = False
        try:
            job_id, duplicate = self.publish_ex(queue, payload, reply_to=rq, **opts)
            if duplicate:
                # That job reports to the reply queue of its own publish:
                # nothing would ever come here.
                err = InvalidArgument("submit: idempotency key %r matched job "
                                      "%d, published earlier: its result goes "
                                      "to that publisher's reply_to, not here"
                                      % (opts.get("key"), job_id))
                err.job_id = job_id
                raise err
            with self.consume(rq, prefetch=1) as sub:
                result = self._await_end(sub, job_id, end, timeout)
            done = True
            return result
        finally:
            self._drop_reply_queue(rq, done)

    def _await_end(self, sub, job_id, end, timeout):
        """The result or failure notice of job_id from reply queue sub."""
        while True:
            left = 1.0 if end is None else min(1.0, end - time.monotonic())
            if left <= 0:
                err = errors.Timeout("submit: no result within %ss; job %d "
                                     "goes on, its result is not kept"
                                     % (timeout, job_id))
                err.job_id = job_id
                raise err
            d = sub.get(timeout=left)
            if d is None:
                continue
            d.ack()
            h = d.headers
            if h.get("protoq-job-id") != str(job_id):
                continue  # not ours: dropped, as `pub --wait` does
            if h.get("protoq-status") == "ok":
                return d.payload
            raise errors.JobFailed(job_id, h)

    def _drop_reply_queue(self, rq, raise_errors):
        """Delete submit's reply queue; a failure is raised only when
        nothing else is (raise_errors), else logged."""
        if self._dead is not None:
            log.warning("protoq: submit: reply queue %s left behind: %s",
                        rq, self._dead)
            return
        try:
            self.delete_queue(rq)
        except errors.Error as e:
            if raise_errors:
                raise
            log.warning("protoq: submit: reply queue %s left behind: %s", rq, e)

    # ---- public: consuming

    def consume(self, queue, prefetch=1, tags=None, timeout=None):
        """Subscribe to queue with a credit of prefetch unacked deliveries,
        as a consumer with tags (dict). Returns a Subscription: iterate it
        for Delivery objects (timeout: stop after that many idle
        seconds)."""
        _check_name(queue)
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise InvalidArgument("prefetch: an int >= 0, not %r" % (prefetch,))
        sub = Subscription(self, queue, prefetch, timeout)
        f = pb.Frame()
        f.subscribe.queue = queue
        f.subscribe.prefetch = prefetch
        _kvs("tags", tags, f.subscribe.tags)
        w = _Waiter()

        def on_reply(_arg, frame, exc):
            # Runs in the reader thread, before any Deliver that follows.
            if exc is None and frame.WhichOneof("kind") == "subscribe_ok":
                sub.id = frame.subscribe_ok.subscription_id
                self._subs[sub.id] = sub
            w.on_reply(None, frame, exc)

        rid = self._send(f, (on_reply, None))
        if not w.event.wait(self.timeout):
            self._pending.pop(rid, None)
            raise errors.Timeout("subscribe %s: no answer within %ss" % (queue, self.timeout))
        if w.exc is not None:
            raise w.exc
        if sub.id is None:
            raise errors.ProtocolError("subscribe: expected SubscribeOk, got %s"
                                       % w.frame.WhichOneof("kind"))
        return sub

    def cancel(self, queue, message_id):
        """Cancel a job: a ready one is removed, one in flight gets a cancel
        request pushed to its holder and its later ack is fenced."""
        _check_name(queue)
        f = pb.Frame()
        f.cancel.queue, f.cancel.message_id = queue, message_id
        self._call(f, "ok")

    # ---- public: routes

    def route_bind(self, route, queue, pattern=""):
        """Bind queue to route; a publish to the route with a routing key
        matching pattern (AMQP topic: "*" one dot-separated word, "#" zero
        or more; "" every key) stores a copy in queue. Returns True when
        the binding is new, False when it existed."""
        _check_name(route)
        _check_name(queue)
        f = pb.Frame()
        f.route_bind.route, f.route_bind.queue = route, queue
        f.route_bind.pattern = pattern or ""
        return self._call(f, "ok").ok.count == 1

    def route_unbind(self, route, queue, pattern=""):
        """Remove that exact binding; True when there was one."""
        _check_name(route)
        _check_name(queue)
        f = pb.Frame()
        f.route_unbind.route, f.route_unbind.queue = route, queue
        f.route_unbind.pattern = pattern or ""
        return self._call(f, "ok").ok.count == 1

    def routes(self):
        """Every binding as (route, queue, pattern), by route then bind
        order."""
        f = pb.Frame()
        f.route_list.SetInParent()
        ok = self._call(f, "route_list_ok").route_list_ok
        return [(b.route, b.queue, b.pattern) for b in ok.bindings]

    def publish_route(self, route, payload, routing_key="",
                      allow_unrouted=False, **opts):
        """Publish through a route: one copy in every queue whose binding
        matches routing_key, all in one log record. Returns the copies'
        ids (one per queue; [] only with allow_unrouted). A route that
        matches nothing raises QueueNotFound unless allow_unrouted."""
        _check_name(route)
        f = pb.Frame()
        f.publish.route = route
        f.publish.routing_key = routing_key or ""
        f.publish.allow_unrouted = bool(allow_unrouted)
        _message(f.publish.message, payload, **opts)
        return list(self._call(f, "publish_ok").publish_ok.message_ids)

    # ---- public: job visibility

    def job(self, queue, message_id):
        """Look at one job without changing it: a JobInfo (state "ready",
        "delayed", "inflight" or "dead", attempt, failures, holder, ...).
        QueueNotFound when the queue or the job is not there."""
        _check_name(queue)
        f = pb.Frame()
        f.job_get.queue, f.job_get.message_id = queue, message_id
        return JobInfo(self._call(f, "job_info").job_info)

    def jobs(self, queue, state=None, limit=100, after_id=0):
        """A queue's jobs in id order, at most limit (fetched a page of up
        to 1000 at a time), only those in state ("ready", "delayed",
        "inflight", "dead": the dead-letter queue's) if given, ids above
        after_id. Nothing is delivered or counted."""
        _check_name(queue)
        if state is not None and state not in _JOB_STATES[1:]:
            raise InvalidArgument("state: one of %s, not %r"
                                  % (", ".join(_JOB_STATES[1:]), state))
        out = []
        while len(out) < limit:
            f = pb.Frame()
            f.job_list.queue = queue
            f.job_list.state = _JOB_STATES.index(state) if state else 0
            f.job_list.limit = min(limit - len(out), 1000)
            f.job_list.after_id = after_id
            ok = self._call(f, "job_list_ok").job_list_ok
            out.extend(JobInfo(j) for j in ok.jobs)
            after_id = ok.next_after_id
            if after_id == 0:
                break
        return out


_JOB_STATES = ("any", "ready", "delayed", "inflight", "dead")


class JobInfo:
    """What the broker knows of one job (JobInfo). Times are Unix seconds
    (None when not set); lease_left in seconds."""

    __slots__ = ("queue", "id", "state", "attempt", "failures", "priority",
                 "requires", "holder", "holder_address", "lease_left",
                 "progress", "last_error", "published_at", "due_at",
                 "cancelled", "payload_bytes")

    def __init__(self, j):
        self.queue = j.queue
        self.id = j.message_id
        self.state = _JOB_STATES[j.state] if j.state < len(_JOB_STATES) \
            else "unknown"
        self.attempt = j.attempt
        self.failures = j.failures
        self.priority = j.priority
        self.requires = {kv.key: kv.value for kv in j.requires}
        held = j.HasField("holder")
        self.holder = j.holder.client_name if held else None
        self.holder_address = j.holder.address if held else None
        self.lease_left = j.holder.lease_left_ms / 1000.0 if held else None
        self.progress = Progress(j.progress.percent, j.progress.text,
                                 j.progress.checkpoint) \
            if j.HasField("progress") else None
        self.last_error = j.last_error or None
        self.published_at = j.published_at_ms / 1000.0
        self.due_at = j.due_at_ms / 1000.0 if j.due_at_ms else None
        self.cancelled = j.cancelled
        self.payload_bytes = j.payload_bytes

    def __repr__(self):
        return "JobInfo(%s)" % ", ".join(
            "%s=%r" % (s, getattr(self, s)) for s in self.__slots__)

