"""Fixtures: a real protoqd on an ephemeral 127.0.0.1 port (like
tests/testutil.c): temp data dir, --port-file, stopped by its pid. The
broker gets SIGTERM if this process dies (PR_SET_PDEATHSIG)."""
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
PROTOQD = os.environ.get("PROTOQD") or os.path.join(ROOT, "build", "protoqd")
PROTOQ = os.environ.get("PROTOQ") or os.path.join(ROOT, "build", "protoq")

sys.path.insert(0, os.path.dirname(__file__))


def _pdeathsig():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def wait_for(cond, timeout=5.0, what="condition"):
    """Poll cond() every 10 ms until it is true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(0.01)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    def __init__(self, conf=None, port=0):
        self.dir = tempfile.mkdtemp(prefix="protoq-pytest.")
        self.conf = conf
        self.proc = None
        self.start(port)

    def start(self, port=0):
        portfile = os.path.join(self.dir, "port")
        if os.path.exists(portfile):
            os.unlink(portfile)
        args = [PROTOQD, "--listen", "127.0.0.1:%d" % port, "--port-file", portfile,
                "--data-dir", os.path.join(self.dir, "data"), "--log-level", "warn"]
        if self.conf:
            path = os.path.join(self.dir, "protoqd.conf")
            with open(path, "w") as f:
                f.write(self.conf)
            args[1:1] = ["-c", path]
        log = open(os.path.join(self.dir, "protoqd.log"), "ab")
        self.proc = subprocess.Popen(args, stderr=log, stdin=subprocess.DEVNULL,
                                     preexec_fn=_pdeathsig)
        log.close()

        def port_written():
            if self.proc.poll() is not None:
                raise AssertionError("protoqd exited at start: " + self.log())
            try:
                with open(portfile) as f:
                    return int(f.read().strip() or 0)
            except (OSError, ValueError):
                return 0
        self.port = wait_for(port_written, 5, "protoqd's port file")
        self.addr = "127.0.0.1:%d" % self.port

    def log(self):
        with open(os.path.join(self.dir, "protoqd.log"), errors="replace") as f:
            return f.read()[-4000:]

    def kill9(self):
        """SIGKILL and reap (a crash the test wants)."""
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        """SIGTERM, bounded wait; a clean stop must exit 0 (an ASan leak
        report or a crash would not). A broker a test killed is let be."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("protoqd ignored SIGTERM for 5 s: " + self.log())
        if rc != 0:
            raise AssertionError("protoqd exited %d: %s" % (rc, self.log()))

    def close(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.close()


@pytest.fixture
def client(broker):
    import protoq
    c = protoq.Client(broker.addr, timeout=10)
    yield c
    c.close()
