"""The blocking client against a real protoqd."""
import os
import threading
import time

import pytest

import protoq
from conftest import Broker, wait_for


def test_one_exception_class_per_wire_error_code():
    names = [v.name for v in protoq.wire.ErrorCode.DESCRIPTOR.values if v.number]
    assert len(names) == len(protoq.errors.BY_CODE)
    for v in protoq.wire.ErrorCode.DESCRIPTOR.values:
        if v.number == 0:
            continue
        cls = protoq.errors.BY_CODE[v.number]
        assert cls.code_name == v.name
        assert cls.__name__ == "".join(w.capitalize() for w in v.name.split("_"))
        assert getattr(protoq, cls.__name__) is cls
        assert issubclass(cls, protoq.Error)


def test_publish_consume_fields(client):
    client.create_queue("q")
    client.create_queue("replies")
    t0 = time.time()
    mid = client.publish("q", b"\x00\xffbin", headers={"k": "v", "x": "y"},
                         priority=7, correlation_id="c-1", reply_to="replies", key="idem-1")
    sub = client.consume("q", prefetch=5)
    d = sub.get(timeout=5)
    assert d.id == mid and d.attempt == 1 and d.queue == "q"
    assert d.payload == b"\x00\xffbin"
    assert d.headers == {"k": "v", "x": "y"}
    assert d.priority == 7 and d.correlation_id == "c-1" and d.reply_to == "replies"
    assert d.idempotency_key == "idem-1" and d.progress is None
    assert abs(d.published_at - t0) < 5 and 25 < d.lease <= 30
    d.ack(confirm=True)
    assert client.stat_queue("q").acked == 1
    assert sub.get(timeout=0.1) is None


def test_idempotency_key_returns_first_id(client):
    client.create_queue("q")
    a, dup_a = client.publish_ex("q", "one", key="k")
    b, dup_b = client.publish_ex("q", "two", key="k")
    assert a == b and not dup_a and dup_b
    assert client.stat_queue("q").ready == 1


def test_queue_admin(client):
    # A dead-letter queue must exist before a queue names it.
    with pytest.raises(protoq.QueueNotFound):
        client.create_queue("a", dead_letter="dlq")
    client.create_queue("dlq")
    client.create_queue("a", max_length=10, ack_timeout=2.5, max_attempts=3,
                        dead_letter="dlq", backoff_base=0.1, no_backoff=False)
    client.create_queue("a", max_length=10, ack_timeout=2.5, max_attempts=3,
                        dead_letter="dlq", backoff_base=0.1)
    with pytest.raises(protoq.QueueExists) as e:
        client.create_queue("a", max_length=11)
    assert e.value.code == 8
    info = client.stat_queue("a")
    assert (info.max_length, info.ack_timeout, info.max_attempts, info.dead_letter,
            info.backoff_base) == (10, 2.5, 3, "dlq", 0.1)
    client.publish_many("a", [b"x"] * 4)
    assert sorted(q.name for q in client.list_queues()) == ["a", "dlq"]
    assert client.purge_queue("a") == 4
    with pytest.raises(protoq.BadRequest):
        client.delete_queue("dlq")  # "a" uses it as its dead letter
    client.delete_queue("a")
    client.delete_queue("dlq")
    with pytest.raises(protoq.QueueNotFound):
        client.stat_queue("a")


def test_publish_many_100k_every_confirm_checked(client):
    client.create_queue("big")
    n = 100_000
    payloads = [b"m%06d" % i for i in range(n)]
    ids = client.publish_many("big", payloads, window=2000)
    assert len(ids) == n and all(isinstance(i, int) for i in ids)
    assert all(a < b for a, b in zip(ids, ids[1:]))  # one confirm each, in order
    info = client.stat_queue("big")
    assert info.published == n and info.ready == n
    seen = {}
    for d in client.consume("big", prefetch=2000, timeout=5):
        seen[d.id] = d.payload
        d.ack()
        if len(seen) == n:
            break
    assert seen == dict(zip(ids, payloads))
    client.close()


def test_publish_many_reports_each_failure(client):
    client.create_queue("small", max_length=10)
    with pytest.raises(protoq.QueueFull) as e:
        client.publish_many("small", [b"%d" % i for i in range(25)], window=8)
    res = e.value.results
    assert [isinstance(r, int) for r in res] == [True] * 10 + [False] * 15
    assert all(isinstance(r, protoq.QueueFull) for r in res[10:])
    res2 = client.publish_many("small", [b"x"], raise_errors=False)
    assert isinstance(res2[0], protoq.QueueFull)


def test_batch_is_all_or_nothing(client):
    client.create_queue("small", max_length=3)
    assert len(client.publish_batch("small", [b"a", b"b"])) == 2
    with pytest.raises(protoq.QueueFull):
        client.publish_batch("small", [b"c", b"d"])
    assert client.stat_queue("small").ready == 2


def test_nack_dead_letter_keeps_error(client):
    client.create_queue("dlq")
    client.create_queue("q", dead_letter="dlq")
    client.publish("q", "job")
    d = client.consume("q").get(timeout=5)
    d.nack(dead_letter=True, error="boom: out of memory", confirm=True)
    dl = client.consume("dlq").get(timeout=5)
    assert dl.payload == b"job"
    assert dl.headers["x-death-error"] == "boom: out of memory"
    assert dl.headers["x-death-reason"] == "nack"


def test_nack_delay_and_retry(client):
    client.create_queue("q")
    client.publish("q", "job")
    sub = client.consume("q")
    d = sub.get(timeout=5)
    t = time.monotonic()
    d.nack(delay=0.3)
    d2 = sub.get(timeout=5)
    assert d2.id == d.id and d2.attempt == 2
    assert time.monotonic() - t >= 0.25


def test_touch_progress_then_release_hands_progress_on(client):
    client.create_queue("q", max_attempts=1)
    mid = client.publish("q", "train")
    sub = client.consume("q")
    d = sub.get(timeout=5)
    assert d.touch(progress=40, text="epoch 4", checkpoint="s3://ck/4", extend=60) == 60
    d.release(reason="preempted", confirm=True)
    d2 = sub.get(timeout=5)
    assert (d2.id, d2.attempt) == (mid, 2)  # not dropped: a release is no failure
    assert d2.progress == protoq.Progress(40, "epoch 4", "s3://ck/4")
    d2.ack()


def test_stale_touch_and_ack_after_lease_expiry(client):
    client.create_queue("q", ack_timeout=0.2)
    client.publish("q", "x")
    sub = client.consume("q", prefetch=1)
    d = sub.get(timeout=5)
    d2 = sub.get(timeout=5)  # the lease ran out: redelivered to us
    assert (d2.id, d2.attempt) == (d.id, 2)
    with pytest.raises(protoq.StaleDelivery) as e:
        d.touch()
    assert e.value.code == 15
    with pytest.raises(protoq.StaleDelivery):
        d.ack(confirm=True)
    d.ack()  # unconfirmed: the error arrives asynchronously
    wait_for(lambda: client.async_errors == 1, what="the async STALE_DELIVERY")
    assert isinstance(client.last_async_error, protoq.StaleDelivery)


def test_cancel_reaches_the_holder(broker, client):
    client.create_queue("q")
    mid = client.publish("q", "long job")
    seen = []
    d = client.consume("q").get(timeout=5)
    d.on_cancel(lambda dd: seen.append(dd.id))
    with protoq.Client(broker.addr) as producer:
        producer.cancel("q", mid)
    wait_for(lambda: d.cancelled, what="CancelRequested")
    assert seen == [mid]
    with pytest.raises(protoq.StaleDelivery):  # fenced
        d.ack(confirm=True)
    assert client.stat_queue("q").ready == 0


def test_heartbeats_keep_an_idle_consumer(tmp_path):
    b = Broker(conf="heartbeat_ms 100\nheartbeat_timeout_ms 400\n")
    try:
        with protoq.Client(b.addr) as c:
            assert c.info.heartbeat_ms == 100
            c.create_queue("q")
            c.publish("q", "x")
            d = c.consume("q").get(timeout=5)
            time.sleep(1.5)  # silent caller: the reader thread sends heartbeats
            d.ack(confirm=True)
            assert c.stat_queue("q").acked == 1
    finally:
        b.close()


def test_ack_result_and_follow_ups(client):
    for q in ("q", "replies", "next"):
        client.create_queue(q)
    with pytest.raises(protoq.QueueNotFound):
        client.publish("q", "x", reply_to="nobody")
    mid = client.publish("q", "x", reply_to="replies", correlation_id="run-1")
    d = client.consume("q").get(timeout=5)
    with pytest.raises(protoq.QueueNotFound):
        d.ack(follow_ups=[("missing", b"step2")])
    ids = d.ack(result=b"accuracy=0.93",
                follow_ups=[("next", b"step2", {"priority": 3})])
    assert len(ids) == 1 and ids[0] > mid
    r = client.consume("replies").get(timeout=5)
    assert r.payload == b"accuracy=0.93" and r.correlation_id == "run-1"
    assert r.headers["protoq-status"] == "ok"
    assert r.headers["protoq-job-id"] == str(mid)
    n = client.consume("next").get(timeout=5)
    assert n.payload == b"step2" and n.priority == 3 and n.id == ids[0]
    assert client.stat_queue("q").acked == 1


def test_bad_input_gives_clear_exceptions(broker, client):
    client.create_queue("q")
    with pytest.raises(protoq.QueueNotFound) as e:
        client.publish("missing", b"x")
    assert e.value.code == 7 and "missing" in str(e.value)
    big = client.info.max_message_bytes
    with pytest.raises(protoq.MessageTooLarge) as e:
        client.publish("q", b"x" * (big + 1))
    assert e.value.code == 10
    with pytest.raises(protoq.FrameTooLarge):  # refused before sending
        client.publish("q", b"x" * (client.max_frame_bytes + 1))
    with pytest.raises(protoq.BadRequest):
        client.publish("q", b"x", priority=10)
    with pytest.raises(protoq.InvalidArgument):
        client.publish("q", 12345)
    with pytest.raises(ValueError):
        client.publish("q", b"x", delay=-1)
    with pytest.raises(protoq.InvalidArgument):
        client.publish("q", b"x", headers={"k": 1})
    with pytest.raises(protoq.InvalidArgument):
        protoq.Client("127.0.0.1:notaport")
    assert client.publish("q", b"still works") > 0  # the connection survived
    broker.stop()
    with pytest.raises(protoq.ConnectionClosed):
        protoq.Client(broker.addr, connect_timeout=2)


def test_lost_connection_ends_iteration_and_calls(broker, client):
    client.create_queue("q")
    sub = client.consume("q")
    got = []

    def consume():
        try:
            for d in sub:
                got.append(d)
        except protoq.ConnectionClosed as e:
            got.append(e)
    t = threading.Thread(target=consume)
    t.start()
    broker.kill9()
    t.join(5)
    assert not t.is_alive() and isinstance(got[-1], protoq.ConnectionClosed)
    with pytest.raises(protoq.ConnectionClosed):
        client.publish("q", b"x")


def test_broker_death_during_publish_many_fails_fast(broker, client):
    client.create_queue("q")
    killer = threading.Timer(0.3, broker.kill9)
    killer.start()
    start = time.monotonic()
    with pytest.raises(protoq.ConnectionClosed):
        client.publish_many("q", [b"x" * 1024] * 2_000_000, window=1000)
    killer.join()
    assert time.monotonic() - start < 10  # not the 10 s request timeout


def test_token_goes_in_hello_and_unauthorized_is_raised():
    """protoqd does not check tokens yet: a stand-in broker checks what the
    client sends and refuses it the way PROTOCOL.md says (Error, close)."""
    import socket
    import struct
    wire = protoq.wire
    lsock = socket.create_server(("127.0.0.1", 0))
    seen = {}

    def fake_broker():
        conn, _ = lsock.accept()
        with conn:
            (n,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
            hello = wire.Frame.FromString(conn.recv(n, socket.MSG_WAITALL))
            seen["hello"] = hello
            reply = wire.Frame(request_id=hello.request_id)
            reply.error.code = wire.UNAUTHORIZED
            reply.error.message = "bad token"
            data = reply.SerializeToString()
            conn.sendall(struct.pack(">I", len(data)) + data)
    t = threading.Thread(target=fake_broker)
    t.start()
    with pytest.raises(protoq.Unauthorized) as e:
        protoq.Client("127.0.0.1:%d" % lsock.getsockname()[1], token="s3cret",
                      name="trainer-7", heartbeat=2)
    t.join(5)
    lsock.close()
    h = seen["hello"].hello
    assert (h.protocol_version, h.auth_token, h.client_name, h.heartbeat_ms) == \
        (1, "s3cret", "trainer-7", 2000)
    assert e.value.code == 11 and e.value.message == "bad token"


def test_not_a_broker_is_a_clear_error():
    import socket
    lsock = socket.create_server(("127.0.0.1", 0))

    def http_server():
        conn, _ = lsock.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    t = threading.Thread(target=http_server)
    t.start()
    with pytest.raises(protoq.ProtocolError, match="is this a protoq broker"):
        protoq.Client("127.0.0.1:%d" % lsock.getsockname()[1])
    t.join(5)
    lsock.close()
