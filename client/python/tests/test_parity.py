"""Parity with the C client (libprotoq through the protoq CLI) on the same
queue, in both directions."""
import base64
import json
import os
import subprocess

import protoq
from conftest import PROTOQ


def cli(broker, *args, input=None):
    r = subprocess.run([PROTOQ, "-s", broker.addr] + list(args), input=input,
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def test_python_publishes_c_consumes(broker, client):
    client.create_queue("q")
    payloads = [os.urandom(64) for _ in range(300)] + [("text %d é" % i).encode()
                                                      for i in range(700)]
    ids = client.publish_many("q", payloads, window=64)
    hid = client.publish("q", b"with headers", headers={"run": "7", "lr": "0.1"}, priority=9)
    out = cli(broker, "consume", "q", "--json", "--count", "1001", "--wait", "5s")
    rows = [json.loads(line) for line in out.decode().splitlines()]
    assert len(rows) == 1001
    first = rows[0]  # priority 9 comes first
    # --json writes ids as strings (64-bit ids do not fit a JSON number).
    assert (first["id"], first["priority"], first["headers"], first["payload"]) == \
        (str(hid), 9, {"run": "7", "lr": "0.1"}, "with headers")
    got = {}
    for r in rows[1:]:
        assert r["attempt"] == 1 and r["queue"] == "q"
        got[int(r["id"])] = (base64.b64decode(r["payload_base64"]) if "payload_base64" in r
                        else r["payload"].encode())
    assert got == dict(zip(ids, payloads))
    info = client.stat_queue("q")
    assert (info.acked, info.ready, info.inflight) == (1001, 0, 0)


def test_c_publishes_python_consumes(broker, client, tmp_path):
    client.create_queue("q")
    blob = bytes(range(256)) * 8
    f = tmp_path / "blob"
    f.write_bytes(blob)
    id_file = int(cli(broker, "pub", "q", "--file", str(f), "--header", "k=v",
                      "--header", "stage=2", "--priority", "4"))
    lines = ["line %d" % i for i in range(500)]
    cli(broker, "pub", "q", "--lines", input=("\n".join(lines) + "\n").encode())
    id_k1 = int(cli(broker, "pub", "q", "keyed", "--key", "K1"))
    id_k2 = int(cli(broker, "pub", "q", "keyed again", "--key", "K1"))
    assert id_k1 == id_k2
    seen = []
    for d in client.consume("q", prefetch=100, timeout=5):
        seen.append(d)
        d.ack()
        if len(seen) == 502:
            break
    assert (seen[0].id, seen[0].payload, seen[0].headers, seen[0].priority) == \
        (id_file, blob, {"k": "v", "stage": "2"}, 4)
    assert [d.payload.decode() for d in seen[1:501]] == lines
    assert (seen[501].id, seen[501].payload, seen[501].idempotency_key) == \
        (id_k1, b"keyed", "K1")
    client.close()


def test_c_queue_admin_sees_python_queues(broker, client):
    client.create_queue("py", max_length=5, ack_timeout=12)
    stat = dict(line.split(": ", 1) for line in
                cli(broker, "queue", "stat", "py").decode().splitlines())
    assert (stat["max_length"], stat["ack_timeout_ms"]) == ("5", "12000")
    cli(broker, "queue", "create", "c", "--max-attempts", "3", "--ack-timeout", "7s")
    info = client.stat_queue("c")
    assert (info.max_attempts, info.ack_timeout) == (3, 7.0)
