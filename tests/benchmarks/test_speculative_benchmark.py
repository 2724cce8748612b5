"""benchmarks/speculative.py runs end to end on a tiny checkpoint and reports consistent numbers."""

import subprocess
import sys

from tests.benchmarks.test_finetune_benchmarks import REPO, _run


def test_speculative_benchmark_reports_acceptance_and_speed(sft_base, tmp_path):
    out = _run("speculative.py", "--checkpoint", str(sft_base / "base"), "--ks", "1,2", "--temperatures", "0,1",
               "--batch", "2", "--prompt-len", "8", "--new-tokens", "6", "--forced-len", "16", "--repeats", "1",
               cwd=tmp_path)
    assert out["greedy_identical"] and out["files"] == 2
    assert set(out["acceptance"]) == {"k=1,T=0", "k=1,T=1", "k=2,T=0", "k=2,T=1"}
    for r in out["acceptance"].values():
        assert abs(r["mean_accepted_length"] - 1 - sum(r["acceptance_by_position"])) < 1e-9
    assert set(out["speed"]) == {"batch1", "batch2"}
    assert set(out["speed"]["batch1"]["speedup"]) == {"spec_k1", "spec_k2"}
    assert 0 <= out["teacher_forced"]["mtp_agrees_with_main"] <= 1


def test_speculative_benchmark_missing_checkpoint_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speculative.py")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no checkpoint under runs/main" in r.stderr
