"""AdamW with decay / no-decay (and muP) parameter groups; learning-rate schedules as pure functions of the step.

What. `configure_optimizer` puts every trainable parameter (tied weights counted once) into exactly one
group: "decay" (ndim >= 2: matrices, stacked experts, embeddings) or "no_decay" (norms, biases, other 1-D
tensors), split further under muP by the fan-in multiplier (mup.param_groups). Each group carries `lr_scale`
(1 under SP, 1/m_in for muP's hidden matrices), and `set_lr` gives each group `base_lr * lr_scale`.
`lr_at(step, ...)` is linear warmup then cosine to `min_lr_ratio * lr`, or warmup-stable-decay (WSD:
flat at `lr`, then linear to `min_lr_ratio * lr` over the last `decay_frac`).

Why. A schedule that is a pure function of the step makes resume trivial (no scheduler state to save) and
is easy to plot and test. Grouping by ndim is nanoGPT's rule and matches DeepSeek-V3 (no decay on norms).

`AdamWBF16` (`--bf16-moments`) keeps AdamW's first and second moments in bf16, as DeepSeek-V3 does (report
section 3.3.3: half the optimizer memory); the update itself is computed in fp32 and the master weights stay
fp32.

The step is torch's fused AdamW wherever it runs (`fused_ok`: CPU and CUDA, plain tensors).

Rejected: torch.optim.lr_scheduler (stateful, and it composes badly with per-group muP scales); grouping by
parameter name (breaks whenever a module is renamed).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..mup import param_groups

SCHEDULES = ("cosine", "wsd")


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled decay) whose moments m, v are stored in bf16; the arithmetic of each step is fp32."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                st["step"] += 1
                t, g = st["step"], p.grad.float()
                m = st["exp_avg"].float().lerp_(g, 1 - b1)  # m = b1 m + (1 - b1) g
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)  # v = b2 v + (1 - b2) g^2
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                        betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                        bf16_moments: bool = False) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters; groups and their muP factors come from `mup.param_groups`.

    Under the standard parametrization that is two groups, "decay" (ndim >= 2) and "no_decay"; under muP the
    hidden matrices get their own groups with lr_scale = 1/m_in and weight_decay * m_in (see mup.py).
    """
    seen = {id(p): p for p in model.parameters() if p.requires_grad}  # tied weights appear once
    groups = param_groups(model, weight_decay)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(seen) and len(set(grouped)) == len(grouped), \
        "every trainable parameter must sit in exactly one optimizer group"
    fused = fused_ok(list(seen.values()))
    if bf16_moments:
        opt = AdamWBF16(groups, lr=lr, betas=betas, eps=eps)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    set_lr(opt, lr)
    return opt


def fused_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW (one kernel over all tensors) for plain tensors on one CPU or CUDA device.

    On the CPU it is 4-5x faster than the default multi-tensor ("foreach") step (dsv3 at width 384: 104 vs 507 ms,
    BENCHMARKS.md "Fast by default"), the same update up to rounding. Sharded FSDP2 (DTensor) parameters keep
    the default implementation."""
    if not params or any(isinstance(p, DTensor) for p in params):
        return False
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and \
        all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give each group `lr * group["lr_scale"]` (muP's per-group factors ride on the base schedule)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def lr_at(step: int, lr: float, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
          schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """Base learning rate of optimizer step `step` (0-based; step 0 is the first update).

    cosine: lr * (step+1)/warmup during warmup, then cosine from lr to min_lr_ratio*lr at max_steps - 1.
    wsd:    the same warmup, flat at lr, then linear to min_lr_ratio*lr over the last decay_frac of steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, max_steps - 1 - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))
    decay_steps = max(1, round(decay_frac * max_steps))
    decay_start = max(warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return lr
    t = min(1.0, (step - decay_start + 1) / max(1, max_steps - decay_start))
    return lr + (min_lr - lr) * t
