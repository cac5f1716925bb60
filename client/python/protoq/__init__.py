"""protoq: Python client of the protoq job and message broker.

    import protoq
    with protoq.Client("127.0.0.1:7650") as c:
        c.create_queue("jobs")
        c.publish("jobs", b"hello")
        for d in c.consume("jobs", prefetch=10, timeout=1):
            print(d.payload)
            d.ack()

See client/python/README.md and the README's Python section.
"""

from .errors import (  # noqa: F401
    Error, RemoteError, ConnectionClosed, Timeout, ProtocolError, JobFailed,
    Shutdown,
    Reject, BadRequest, UnsupportedVersion, FrameTooLarge, MalformedFrame,
    UnknownFrame, UnexpectedFrame, QueueNotFound, QueueExists, QueueFull,
    MessageTooLarge, Unauthorized, Forbidden, DiskFull, Overloaded,
    StaleDelivery, SubscriptionNotFound, Internal, Unsupported)
from .client import (  # noqa: F401
    Client, Delivery, Subscription, QueueInfo, JobInfo, Progress,
    InvalidArgument, new_session_id,
    parse_address, PROTOCOL_VERSION, DEFAULT_PORT)
from .worker import Worker, Job, worker, decode_payload  # noqa: F401
from . import protoq_pb2 as wire  # noqa: F401  the generated messages

__version__ = "0.1.0"
