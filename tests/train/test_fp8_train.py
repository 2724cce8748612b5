"""`pretrain --fp8` (CPU emulation) tracks the fp32 run: final training loss within 1% relative."""

from __future__ import annotations

import pytest

from nanoseek.train.metrics import read_metrics
from nanoseek.train.trainer import train

from .conftest import tiny_config


def _tail_loss(out_dir, n: int = 5) -> float:
    losses = [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r]
    return sum(losses[-n:]) / n  # mean of the last n steps: one step's noise is not the recipe's error


def _compare(tiny_corpus, cache_dir, tmp_path, steps: int, **kw) -> tuple[float, float]:
    train(tiny_config(tiny_corpus, cache_dir, tmp_path / "fp32", max_steps=steps, **kw))
    train(tiny_config(tiny_corpus, cache_dir, tmp_path / "fp8", max_steps=steps, fp8=True, **kw))
    return _tail_loss(tmp_path / "fp32"), _tail_loss(tmp_path / "fp8")


def test_fp8_pretrain_tracks_fp32(tiny_corpus, cache_dir, tmp_path):
    ref, fp8 = _compare(tiny_corpus, cache_dir, tmp_path, 30)
    assert ref != fp8 and abs(fp8 - ref) / ref < 0.01, (ref, fp8)


@pytest.mark.slow
def test_fp8_pretrain_tracks_fp32_200_steps(tiny_corpus, cache_dir, tmp_path):
    # lr 1e-3: at the tiny config's 3e-3 two fp32 runs that differ only in the seed end 6% apart at step 200
    # (loss plateaus escaped at different steps), so any perturbation, FP8 or not, moves the curve by percents;
    # measured here (shared 2-core machine, 2026-12-03): fp32 6.259, fp8 6.247 (0.2%) at lr 1e-3.
    ref, fp8 = _compare(tiny_corpus, cache_dir, tmp_path, 200, lr=1e-3)
    assert ref != fp8 and abs(fp8 - ref) / ref < 0.01, (ref, fp8)
