"""protoq.Client(..., tls=...) against protoqd's own TLS listener
(tls_listen), with a throwaway CA made by the openssl CLI: a round trip,
client certificates (mTLS), a wrong CA and a plain client refused."""
import os
import shutil
import ssl
import subprocess

import pytest

import protoq
from conftest import Broker, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="openssl not installed")

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args):
    subprocess.run(["openssl"] + list(args), check=True, capture_output=True)


def _ca(d, name):
    _openssl("req", "-x509", *EC, "-keyout", str(d / (name + ".key")),
             "-out", str(d / (name + ".pem")), "-days", "1",
             "-subj", "/CN=pytest " + name)


def _leaf(d, name, cn, san, ca):
    ext = d / (name + ".ext")
    ext.write_text("subjectAltName=%s\n" % san if san else "")
    _openssl("req", *EC, "-keyout", str(d / (name + ".key")),
             "-out", str(d / (name + ".csr")), "-subj", "/CN=" + cn)
    _openssl("x509", "-req", "-in", str(d / (name + ".csr")),
             "-CA", str(d / (ca + ".pem")), "-CAkey", str(d / (ca + ".key")),
             "-CAcreateserial", "-days", "1", "-extfile", str(ext),
             "-out", str(d / (name + ".pem")))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue")
    _leaf(d, "srv", "localhost", "DNS:localhost,IP:127.0.0.1", "ca")
    _leaf(d, "other", "other.example", "DNS:other.example", "ca")
    _leaf(d, "client", "worker-7", "", "ca")
    return d


def _tls_broker(pki, tmp_path, extra="", leaf="srv"):
    portfile = tmp_path / ("tlsport." + leaf)
    b = Broker(conf="tls_listen 127.0.0.1:0\ntls_port_file %s\n"
                    "tls_cert %s\ntls_key %s\n%s"
               % (portfile, pki / (leaf + ".pem"), pki / (leaf + ".key"), extra))
    b.tls_port = wait_for(lambda: portfile.exists() and
                          int(portfile.read_text().strip() or 0),
                          5, "the TLS port file")
    b.tls_addr = "tls://127.0.0.1:%d" % b.tls_port
    return b


def _round_trip(c, queue, n=500):
    c.create_queue(queue)
    ids = c.publish_many(queue, [b"t%d" % i for i in range(n)], window=100)
    got = []
    for d in c.consume(queue, prefetch=100, timeout=5):
        got.append(d.id)
        d.ack()
        if len(got) == len(ids):
            break
    assert got == ids


def test_round_trip_hostname_verified(pki, tmp_path):
    b = _tls_broker(pki, tmp_path)
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with protoq.Client(b.tls_addr, tls=ctx, timeout=10) as c:
            _round_trip(c, "q")
        # tls=ctx with a plain address also means TLS.
        with protoq.Client("127.0.0.1:%d" % b.tls_port, tls=ctx,
                           timeout=10) as c:
            c.create_queue("q2")
    finally:
        b.close()


def test_client_certificate(pki, tmp_path):
    b = _tls_broker(pki, tmp_path, "tls_client_ca %s\n" % (pki / "ca.pem"))
    try:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        with protoq.Client(b.tls_addr, tls=ctx, timeout=10) as c:
            _round_trip(c, "m", 50)
        bare = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with pytest.raises(protoq.ConnectionClosed) as e:
            with protoq.Client(b.tls_addr, tls=bare, timeout=5) as c:
                c.create_queue("never")
        assert isinstance(e.value.__cause__, OSError)
    finally:
        b.close()


def test_wrong_ca_and_plain_client_refused(pki, tmp_path):
    b = _tls_broker(pki, tmp_path)
    try:
        # Certificate failures are protoq errors too, the ssl one their cause.
        rogue = ssl.create_default_context(cafile=str(pki / "rogue.pem"))
        with pytest.raises(protoq.ConnectionClosed) as e:
            protoq.Client(b.tls_addr, tls=rogue, timeout=5)
        assert isinstance(e.value.__cause__, ssl.SSLCertVerificationError)
        assert "certificate verify failed" in str(e.value)
        assert b.tls_addr in str(e.value)
        # A certificate of our CA for another name: the hostname check.
        other = _tls_broker(pki, tmp_path, leaf="other")
        try:
            ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            with pytest.raises(protoq.ConnectionClosed) as e:
                protoq.Client(other.tls_addr, tls=ctx, timeout=5)
            assert isinstance(e.value.__cause__, ssl.SSLCertVerificationError)
            assert "mismatch" in str(e.value)
        finally:
            other.close()
        with pytest.raises(protoq.Error) as e:
            protoq.Client("127.0.0.1:%d" % b.tls_port, timeout=5)
        assert "tls://" in str(e.value)
    finally:
        b.close()
