"""Tokens against a real protoqd with an auth_file (README, "Running
protoq on a network"): Client(token=...) gets in, no or a wrong token is
refused with Unauthorized, and a request outside the token's permissions
raises Forbidden without closing the connection."""
import hashlib
import os

import pytest

import protoq
from conftest import Broker

ADMIN = "py-admin-token"
WORKER = "py-worker-token"


def _line(name, token, perms):
    return "%s %s %s\n" % (name, hashlib.sha256(token.encode()).hexdigest(), perms)


@pytest.fixture
def token_broker(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(_line("ops", ADMIN, "admin") +
                      _line("worker", WORKER, "consume:jobs*"))
    b = Broker(conf="auth_file %s\n" % tokens)
    yield b
    b.close()


def test_token_gets_in_and_none_or_wrong_is_unauthorized(token_broker):
    with protoq.Client(token_broker.addr, token=ADMIN, timeout=10) as c:
        c.create_queue("jobs")
        assert [q.name for q in c.list_queues()] == ["jobs"]
    for bad in (None, "", "py-admin-token2"):
        with pytest.raises(protoq.Unauthorized):
            protoq.Client(token_broker.addr, token=bad, timeout=10)


def test_outside_permissions_is_forbidden_and_connection_stays(token_broker):
    with protoq.Client(token_broker.addr, token=ADMIN, timeout=10) as admin:
        admin.create_queue("jobs")
        admin.create_queue("secret")
        with protoq.Client(token_broker.addr, token=WORKER, timeout=10) as w:
            with pytest.raises(protoq.Forbidden):
                w.publish("jobs", b"x")
            with pytest.raises(protoq.Forbidden):
                w.delete_queue("jobs")
            # the connection stays; the listing hides what it may not see
            assert [q.name for q in w.list_queues()] == ["jobs"]
