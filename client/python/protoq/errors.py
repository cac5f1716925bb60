"""Exceptions of the protoq client.

Every error the client raises is a :class:`protoq.Error`. When the broker
answered with an Error frame, the exception is the subclass named after the
wire code (``QueueFull`` for ``QUEUE_FULL``, ...) and carries the code in
``.code`` (an int, the value of ``protoq.ErrorCode`` in protocol/protoq.proto)
and the broker's text in ``.message``. Local failures (connection lost,
timeout, bad argument) have ``code == 0``.

There is one class per ErrorCode value; tests/test_errors.py checks the
list against the generated enum so that it cannot drift from the .proto.
"""


class Error(Exception):
    """Base of every protoq error. code: the wire code (0 = local)."""

    code = 0
    code_name = "LOCAL"

    def __init__(self, message="", code=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self):
        if self.code:
            return "%s (%d): %s" % (self.code_name, self.code, self.message)
        return self.message


class RemoteError(Error):
    """The broker answered with an Error frame (base of the coded classes)."""


def _coded(name, code, code_name, doc):
    return type(name, (RemoteError,), {"code": code, "code_name": code_name,
                                       "__doc__": doc})


BadRequest = _coded("BadRequest", 1, "BAD_REQUEST",
                    "A field is missing, out of range or malformed.")
UnsupportedVersion = _coded("UnsupportedVersion", 2, "UNSUPPORTED_VERSION",
                            "The broker does not speak this protocol version.")
FrameTooLarge = _coded("FrameTooLarge", 3, "FRAME_TOO_LARGE",
                       "A frame over the broker's max_frame_bytes.")
MalformedFrame = _coded("MalformedFrame", 4, "MALFORMED_FRAME",
                        "A frame that does not parse.")
UnknownFrame = _coded("UnknownFrame", 5, "UNKNOWN_FRAME",
                      "A frame kind the broker does not know.")
UnexpectedFrame = _coded("UnexpectedFrame", 6, "UNEXPECTED_FRAME",
                         "A valid frame at the wrong time.")
QueueNotFound = _coded("QueueNotFound", 7, "QUEUE_NOT_FOUND",
                       "The named queue does not exist.")
QueueExists = _coded("QueueExists", 8, "QUEUE_EXISTS",
                     "The queue exists with other attributes.")
QueueFull = _coded("QueueFull", 9, "QUEUE_FULL",
                   "max_length or max_bytes reached; nothing stored.")
MessageTooLarge = _coded("MessageTooLarge", 10, "MESSAGE_TOO_LARGE",
                         "Payload over the broker's max_message_bytes.")
Unauthorized = _coded("Unauthorized", 11, "UNAUTHORIZED",
                      "Bad or missing auth token.")
Forbidden = _coded("Forbidden", 12, "FORBIDDEN",
                   "The token may not do this on this queue.")
DiskFull = _coded("DiskFull", 13, "DISK_FULL",
                  "The broker's log is out of space; nothing stored.")
Overloaded = _coded("Overloaded", 14, "OVERLOADED",
                    "The broker is over a limit; retry later.")
StaleDelivery = _coded("StaleDelivery", 15, "STALE_DELIVERY",
                       "The delivery token is not the current lease holder.")
SubscriptionNotFound = _coded("SubscriptionNotFound", 16,
                              "SUBSCRIPTION_NOT_FOUND",
                              "Unknown subscription id on this connection.")
Internal = _coded("Internal", 17, "INTERNAL",
                  "A broker-side failure; the request had no effect.")
Unsupported = _coded("Unsupported", 18, "UNSUPPORTED",
                     "A valid request this broker does not implement.")

BY_CODE = {cls.code: cls for cls in (
    BadRequest, UnsupportedVersion, FrameTooLarge, MalformedFrame,
    UnknownFrame, UnexpectedFrame, QueueNotFound, QueueExists, QueueFull,
    MessageTooLarge, Unauthorized, Forbidden, DiskFull, Overloaded,
    StaleDelivery, SubscriptionNotFound, Internal, Unsupported)}


def from_wire(code, message):
    """The exception for an Error frame (RemoteError for an unknown code)."""
    cls = BY_CODE.get(code)
    if cls is None:
        err = RemoteError(message, code)
        err.code_name = "UNKNOWN"
        return err
    return cls(message)


class ConnectionClosed(Error, ConnectionError):
    """The connection failed or was closed; the client is dead. For
    publishes still unconfirmed it is unknown whether they were stored."""


class Timeout(Error, TimeoutError):
    """A blocking call did not get its answer in time."""


class ProtocolError(Error):
    """The broker sent something this client cannot understand."""


class JobFailed(Error):
    """Client.submit(wait=True): the job ended without a result. From its
    failure notice (PROTOCOL.md, "Results and failure notices"): job_id,
    queue (where it ended), reason ("max_attempts", "nack", "expired",
    "cancelled"), error (the last nack's error text, "" when none),
    attempt (the last attempt made), dead_letter (the dead-letter queue it
    went to, or None) and headers (all of the notice's)."""

    def __init__(self, job_id, headers):
        self.job_id = job_id
        self.headers = headers
        self.queue = headers.get("protoq-queue", "")
        self.reason = headers.get("protoq-reason", "") or "unknown"
        self.error = headers.get("protoq-error", "")
        self.attempt = int(headers.get("protoq-attempt", "0") or 0)
        self.dead_letter = headers.get("protoq-dead-letter") or None
        text = "job %d failed: %s" % (job_id, self.reason)
        if self.error.strip():
            text += ": " + self.error.strip()
        super().__init__(text)


class Shutdown(BaseException):
    """Raised inside a Worker's job function when the worker must stop
    (SIGTERM): the job is released, not failed. A BaseException, like
    KeyboardInterrupt, so that ``except Exception`` in job code lets it
    through."""


class Reject(Exception):
    """Raise from a Worker's job function to dead-letter the job at once
    (no retry); the text becomes the nack's error."""
