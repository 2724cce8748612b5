"""Real subprocesses killed with SIGKILL, then resumed: metrics.jsonl must equal an uninterrupted run's."""

import json
import signal
import subprocess
import sys
import time

import pytest

from nanoseek.train.metrics import read_metrics
from nanoseek.train.state import list_checkpoints

from .conftest import REPO, cli_args, subprocess_env, tiny_kwargs

FAULTS = REPO / "tests" / "train" / "faults.py"
KEYS = ("step", "loss", "main_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "val_loss", "expert_load")


def run_args(corpus, cache, out, slow_save: float | None = None, **kw):
    """The command line; slow_save: each checkpoint write sleeps that long before its rename (train/faults.py)."""
    launcher = ["-m", "nanoseek"] if slow_save is None else [str(FAULTS), "--slow-save", str(slow_save)]
    return [sys.executable, *launcher, "pretrain",
            *cli_args(tiny_kwargs(corpus, cache, out, max_steps=60, save_every=10, eval_every=15, keep_last=3,
                                  **kw))]


def comparable(out):
    return [{k: r.get(k) for k in KEYS} for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tiny_corpus, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    subprocess.run(run_args(tiny_corpus, cache_dir, out), env=subprocess_env(cache_dir), cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    return comparable(out)


def wait_for(cond, proc, timeout=120.0):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before the kill point:\n"
                                 f"{proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting for the kill point")
        time.sleep(0.005)


def resume(corpus, cache, out):
    r = subprocess.run(run_args(corpus, cache, out, resume="latest"), env=subprocess_env(cache), cwd=REPO,
                       capture_output=True, timeout=300, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["pretrain"]


def test_sigkill_after_checkpoint_then_resume(tiny_corpus, cache_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(run_args(tiny_corpus, cache_dir, out), env=subprocess_env(cache_dir), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: any(p.name == "step-0000010" for p in list_checkpoints(out)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    start = resume(tiny_corpus, cache_dir, out)["start_step"]
    assert start >= 10
    assert comparable(out) == reference


def test_sigkill_mid_checkpoint_write_then_resume(tiny_corpus, cache_dir, tmp_path, reference):
    out = tmp_path / "run"
    proc = subprocess.Popen(run_args(tiny_corpus, cache_dir, out, slow_save=1.5), env=subprocess_env(cache_dir),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = out / "checkpoints"
    wait_for(lambda: any((p / "trainer_state" / "rng.pt").exists() for p in ckpts.glob(".step-0000020.tmp-*")),
             proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in list_checkpoints(out)] == ["step-0000010"]  # the half-written one is not trusted
    assert list(ckpts.glob(".step-0000020.tmp-*"))  # the kill did land mid-write
    assert resume(tiny_corpus, cache_dir, out)["start_step"] == 10
    assert not list(ckpts.glob(".step-*"))  # stale temp dirs cleaned up
    assert comparable(out) == reference
