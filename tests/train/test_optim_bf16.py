"""AdamWBF16: AdamW with bf16 moments (V3 section 3.3.3) tracks torch's AdamW; `pretrain --bf16-moments` runs."""

import torch

from nanoseek.train.metrics import read_metrics
from nanoseek.train.optim import AdamWBF16
from nanoseek.train.trainer import train

from .conftest import tiny_config


def test_bf16_moments_track_adamw():
    torch.manual_seed(0)
    X, Y = torch.randn(64, 16), torch.randn(64, 4)
    w0 = torch.randn(16, 4) * 0.1
    runs = []
    for make in (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)),
                 lambda p: AdamWBF16(p, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))):
        w = w0.clone().requires_grad_()
        opt = make([w])
        for _ in range(50):
            opt.zero_grad()
            ((X @ w - Y) ** 2).mean().backward()
            opt.step()
        runs.append((w.detach(), opt))
    (wa, _), (wb, opt) = runs
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16
    rel = ((wa - wb).norm() / (wa - w0).norm()).item()
    assert 0 < rel < 0.02, rel  # bf16 rounding of m and v only


def test_pretrain_bf16_moments_learns(tiny_corpus, cache_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_corpus, cache_dir, out, max_steps=12, bf16_moments=True, fp8=True))
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < losses[0]
