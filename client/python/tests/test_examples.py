"""The examples run as the README says: a sweep, a worker that finishes it,
and a pre-empted worker whose job resumes from its checkpoint."""
import os
import signal
import subprocess
import sys

from conftest import wait_for

EX = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples"))


def run(*args, timeout=60):
    r = subprocess.run([sys.executable] + list(args), capture_output=True, timeout=timeout)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def test_sweep_then_workers(broker, client, tmp_path):
    sweep = [os.path.join(EX, "sweep_submit.py"), "-s", broker.addr, "--queue", "train",
             "--lr", "0.1", "0.01", "--batch", "32", "64", "--epochs", "3"]
    first = run(*sweep)
    assert len(first.splitlines()) == 4 and "already" not in first
    again = run(*sweep)  # idempotency keys: nothing queued twice
    assert again.count("(already queued)") == 4
    assert client.stat_queue("train").ready == 4
    out = run(os.path.join(EX, "train_worker.py"), "-s", broker.addr, "--queue", "train",
              "--ckpt-dir", str(tmp_path), "--epoch-seconds", "0.01", "--max-jobs", "4")
    assert out.count("final loss") == 4 and "worker: 4 jobs" in out
    assert client.stat_queue("train").acked == 4


def test_preempted_training_resumes_from_its_checkpoint(broker, client, tmp_path):
    run(os.path.join(EX, "sweep_submit.py"), "-s", broker.addr, "--queue", "train",
        "--lr", "0.1", "--batch", "32", "--epochs", "40")
    worker = [os.path.join(EX, "train_worker.py"), "-s", broker.addr, "--queue", "train",
              "--ckpt-dir", str(tmp_path), "--epoch-seconds", "0.05"]
    p = subprocess.Popen([sys.executable] + worker, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        wait_for(lambda: os.listdir(str(tmp_path)), 20, "a checkpoint")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err.decode()
    assert "worker: 0 jobs" in out.decode() or "worker: 1 jobs" in out.decode()
    info = client.stat_queue("train")
    assert (info.ready, info.inflight, info.acked) == (1, 0, 0)  # released, not failed
    out = run(*worker, "--max-jobs", "1")
    assert "attempt 2: resuming at epoch" in out and "resuming at epoch 0" not in out
    assert "final loss" in out
