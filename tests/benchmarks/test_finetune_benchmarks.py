"""The fine-tuning benchmark scripts run end to end (tiny model, a few steps) and report what they claim to."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, cwd: Path) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_adapter_specificity_reports_the_matrix(sft_base, tmp_path):
    out = _run("adapter_specificity.py", "--base", str(sft_base / "base"), "--tasks", "xml,email", "--steps", "3",
               "--seq-len", "48", "--batch", "2", "--eval-batches", "1", "--lora-r", "2", "--out-dir", "ad",
               "--check-peft", cwd=tmp_path)
    assert out["tasks"] == ["xml", "email"] and set(out["loss"]) == {"xml", "email"}
    for ad in out["tasks"]:
        for t in out["tasks"]:
            assert abs(out["drop"][ad][t] - (out["base_loss"][t] - out["loss"][ad][t])) < 1e-9
    assert (tmp_path / "ad" / "xml" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_specificity.png").is_file()
    assert set(out["peft_max_logit_diff"]) == {"xml", "email"}  # both adapters load in peft, same logits
    assert all(d is not None and d <= 1e-4 for d in out["peft_max_logit_diff"].values())


def test_lora_vs_full_sweep_and_resume(sft_base, tmp_path):
    args = ["--base", str(sft_base / "base"), "--task", "builtin:xml", "--steps", "2", "--seq-len", "48",
            "--batch", "2", "--eval-batches", "1", "--ranks", "2", "--full-lrs", "1e-2",
            "--lora-lrs", "1e-2", "--variant-lora-ranks", "2", "--dora-ranks", "2", "--vera-ranks", "8",
            "--dora-lrs", "1e-2", "--vera-lrs", "1e-1"]
    first = _run("lora_vs_full.py", *args, cwd=tmp_path)
    methods = {"full", "lora r=2", "lora r=2 [linears]", "dora r=2 [linears]", "vera r=8 [linears]"}
    assert {r["method"] for r in first["rows"]} == methods and len(first["rows"]) == 5
    n = {m: b["trainable_params"] for m, b in first["best"].items()}
    # DoRA = LoRA on the same targets + one magnitude per output row; VeRA trains far fewer
    assert n["lora r=2 [linears]"] < n["dora r=2 [linears]"] < n["lora r=2"] < n["full"]
    assert n["vera r=8 [linears]"] < n["lora r=2 [linears]"]
    assert (tmp_path / "lora_vs_full.png").is_file()
    # the rows file makes a rerun reuse every finished run (same numbers, nothing retrained)
    assert len((tmp_path / "lora_vs_full.rows.jsonl").read_text().splitlines()) == 5
    again = _run("lora_vs_full.py", *args, cwd=tmp_path)
    assert [r["val_loss"] for r in again["rows"]] == [r["val_loss"] for r in first["rows"]]
    assert len((tmp_path / "lora_vs_full.rows.jsonl").read_text().splitlines()) == 5


def test_fitted_best_lr():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from lora_vs_full import fitted_best_lr
    finally:
        sys.path.pop(0)
    # a parabola in log(lr) with its minimum at lr = 3e-3 is found exactly from a coarse grid
    import math

    pts = [(lr, (math.log(lr) - math.log(3e-3)) ** 2) for lr in (1e-4, 1e-3, 1e-2, 1e-1)]
    assert math.isclose(fitted_best_lr(pts), 3e-3, rel_tol=1e-9)
    assert fitted_best_lr([(1e-3, 1.0), (1e-2, 2.0), (1e-1, 3.0)]) is None  # minimum at the edge
