"""Routes (fan-out) and job visibility through the Python client, against
a real protoqd."""
import pytest

import protoq


def test_route_fanout_and_bindings(broker, client):
    for q in ("gpu", "cpu", "all"):
        client.create_queue(q)
    assert client.route_bind("train", "gpu", "*.gpu") is True
    assert client.route_bind("train", "gpu", "*.gpu") is False
    client.route_bind("train", "cpu", "#.cpu")
    client.route_bind("train", "all")
    assert client.routes() == [("train", "gpu", "*.gpu"),
                               ("train", "cpu", "#.cpu"),
                               ("train", "all", "")]
    ids = client.publish_route("train", b"x", routing_key="big.gpu", priority=3)
    assert len(ids) == 2
    assert client.job("gpu", ids[0]).priority == 3
    assert client.job("all", ids[1]).state == "ready"
    assert client.route_unbind("train", "all") is True
    assert client.route_unbind("train", "all") is False
    with pytest.raises(protoq.QueueNotFound):
        client.publish_route("train", b"x", routing_key="nothing")
    assert client.publish_route("train", b"x", routing_key="nothing",
                                allow_unrouted=True) == []
    # bindings survive kill -9 and go with their queue
    client.close()
    broker.kill9()
    broker.start()
    with protoq.Client(broker.addr) as c:
        assert c.routes() == [("train", "gpu", "*.gpu"), ("train", "cpu", "#.cpu")]
        c.delete_queue("gpu")
        assert c.routes() == [("train", "cpu", "#.cpu")]


def test_job_and_jobs(client):
    client.create_queue("dlq")
    client.create_queue("q", max_attempts=1, dead_letter="dlq")
    first = client.publish("q", b"a", requires={"gpu": "a100"})
    later = client.publish("q", b"b", delay=60)
    j = client.job("q", first)
    assert (j.state, j.attempt, j.failures, j.holder) == ("ready", 0, 0, None)
    assert j.requires == {"gpu": "a100"}
    assert client.job("q", later).state == "delayed"
    assert client.job("q", later).due_at > j.published_at + 50

    sub = client.consume("q", prefetch=1, tags={"gpu": "a100"}, timeout=5)
    d = sub.get(timeout=5)
    d.touch(progress=25, text="warming up")
    j = client.job("q", first)
    assert (j.state, j.attempt) == ("inflight", 1)
    assert j.holder and j.holder_address.startswith("127.0.0.1:")
    assert 0 < j.lease_left <= 30
    assert j.progress.percent == 25 and j.progress.text == "warming up"
    assert [x.id for x in client.jobs("q")] == [first, later]
    assert [x.id for x in client.jobs("q", state="delayed")] == [later]
    assert [x.id for x in client.jobs("q", limit=1, after_id=first)] == [later]
    d.nack(error="boom", confirm=True)
    sub.close()
    j = client.job("q", first)
    assert (j.state, j.queue) == ("dead", "dlq")
    assert [x.id for x in client.jobs("q", state="dead")] == [first]
    with pytest.raises(protoq.QueueNotFound):
        client.job("q", 1)
    with pytest.raises(protoq.InvalidArgument):
        client.jobs("q", state="sleeping")
