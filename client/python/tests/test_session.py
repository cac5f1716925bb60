"""Sessions and the broker's disconnect grace (PROTOCOL.md, "Sessions")."""
import time

import pytest

import protoq
from conftest import Broker, wait_for

GRACE_CONF = "disconnect_grace_ms 1500\n"


@pytest.fixture
def grace_broker():
    b = Broker(conf=GRACE_CONF)
    yield b
    b.close()


def test_resumed_session_settles_old_deliveries(grace_broker):
    adm = protoq.Client(grace_broker.addr, timeout=10)
    adm.create_queue("train")
    for _ in range(3):
        adm.publish("train", b"job")
    sid = protoq.new_session_id()
    a = protoq.Client(grace_broker.addr, timeout=10, session=sid)
    assert not a.session_resumed and a.disconnect_grace == 1.5
    sub = a.consume("train", prefetch=3)
    held = [sub.get(timeout=5) for _ in range(3)]
    a.close()                      # the connection breaks
    adm.cancel("train", held[2].id)  # a cancel in the gap
    b = protoq.Client(grace_broker.addr, timeout=10, session=sid)
    assert b.session_resumed
    wait_for(lambda: (b.adopt(held[2]), held[2].cancelled)[1], 5,
             "the cancel sent in the gap")
    for d in held[:2]:
        b.adopt(d).ack(confirm=True)
    with pytest.raises(protoq.StaleDelivery):
        held[2].ack(confirm=True)  # cancelled: fenced
    st = adm.stat_queue("train")
    assert st.acked == 2 and st.redelivered == 0
    assert st.ready + st.inflight + st.delayed == 0
    b.close()
    adm.close()


def test_past_grace_not_resumed_and_other_values(grace_broker):
    adm = protoq.Client(grace_broker.addr, timeout=10)
    adm.create_queue("train")
    adm.publish("train", b"job")
    a = protoq.Client(grace_broker.addr, timeout=10, session="w-1")
    d = a.consume("train").get(timeout=5)
    a.close()
    time.sleep(2.2)
    b = protoq.Client(grace_broker.addr, timeout=10, session="w-1")
    assert not b.session_resumed
    with pytest.raises(protoq.StaleDelivery):
        b.adopt(d).ack(confirm=True)
    st = adm.stat_queue("train")  # one stat: its backoff may end between two
    assert st.ready + st.delayed == 1
    with pytest.raises(protoq.InvalidArgument):
        protoq.Client(grace_broker.addr, session="has space")
    b.close()
    adm.close()
