"""benchmarks/peers.py races nanoseek against transformers on the same weights and reports every phase."""

import subprocess
import sys

import pytest

from tests.benchmarks.test_finetune_benchmarks import REPO, _run

pytest.importorskip("transformers")


def test_peers_reports_every_phase_with_identical_greedy_tokens(tmp_path):
    out = _run("peers.py", "--width", "64", "--layers", "2", "--batch", "2", "--seq", "32", "--prompt", "4",
               "--new-tokens", "4", "--decode-batches", "1,3", "--reps", "1", "--warmup", "0", cwd=tmp_path)
    phases = {(r["arch"], r["phase"]) for r in out["rows"]}
    assert phases == {(a, p) for a in ("dsv3", "gpt2") for p in ("train", "prefill", "decode b1", "decode b3")}
    assert all(r["peer"] == "transformers" and r["ratio"] > 0 for r in out["rows"])
    assert out["same_greedy_tokens"] == {f"{a} decode b{b}": True for a in ("dsv3", "gpt2") for b in (1, 3)}
    assert out["skipped"] == ["nanoGPT (no --nanogpt DIR)"]


def test_peers_bad_nanogpt_dir_is_named(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers.py"), "--nanogpt", str(tmp_path / "nope")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nope" in r.stderr and "model.py" in r.stderr
