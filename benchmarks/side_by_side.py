"""One timed training step of a model that races another on the same batch (benchmarks/fp8.py, bf16.py).

Not a benchmark itself: the shared step of the scripts that train two or more copies of one model side by side,
so that every arm runs exactly the same update (lr, forward under its precision context, clip 1.0, AdamW, the
router-bias update) and only the precision differs.
"""

from __future__ import annotations

import time

import torch

from nanoseek.train.optim import set_lr


def train_step(model, opt, x: torch.Tensor, y: torch.Tensor, lr: float, context) -> tuple[float, float]:
    """One step of `model` on (x, y) at `lr` with its forward under `context`; (main loss, seconds)."""
    set_lr(opt, lr)
    t0 = time.perf_counter()
    with context:
        out = model(x, targets=y, return_output=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.update_router_bias(0.001)
    return out.main_loss.item(), time.perf_counter() - t0
