"""`pip install client/python` into a fresh virtualenv, offline, as the
README says; then the installed package talks to a real broker."""
import os
import subprocess
import sys
import textwrap

PKG = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

USE = textwrap.dedent("""
    import sys, protoq
    assert protoq.__file__.startswith(sys.prefix), protoq.__file__
    assert protoq.wire.__file__.startswith(sys.prefix), protoq.wire.__file__
    with protoq.Client(sys.argv[1]) as c:
        c.create_queue("venv")
        mid = c.publish("venv", b"from the venv")
        d = c.consume("venv").get(timeout=5)
        assert (d.id, d.payload) == (mid, b"from the venv")
        d.ack(confirm=True)
    print("ok")
""")


def test_pip_install_into_a_fresh_venv_offline(broker, tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PROTOQ_PROTO", "PIP_INDEX_URL")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Debian's python3-protobuf is system-wide: the venv sees it.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", PKG],
                       capture_output=True, env=env, timeout=300, cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    r = subprocess.run([py, "-c", USE, broker.addr], capture_output=True, env=env,
                       timeout=60, cwd=str(tmp_path))
    assert r.returncode == 0 and r.stdout.decode().strip() == "ok", r.stderr.decode()
