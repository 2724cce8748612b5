"""The math of the LoRA variants, as pure tensor functions: DoRA's magnitude scale and VeRA's shared projections.

What.
  DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): W' = m * V / ||V||_row with V = W + gamma B A
  (W (out, in), one norm per output row: the paper's "column-wise" norm of W^T). As in the paper (section 4.3)
  and PEFT, ||V|| is detached: it scales the forward, no gradient flows through it. With g = m / ||V|| (out,):
      y = b + g * (x W^T + gamma (x A^T) B^T)  =  (x W^T + b) + [(g - 1) * x W^T + g * gamma (x A^T) B^T]
  which is also an exact LoRA of rank r + out: A' = [A ; W] (r+out, in), B' = [g*gamma*B , diag(g - 1)]
  (`dora_as_lora`), the form the per-row path and the absorbed MLA path take.
  VeRA (Kopiczko et al. 2024): vera_A (r, in_max), vera_B (out_max, r) drawn with PEFT's `_kaiming_init` from one
  CPU torch.Generator seeded with projection_prng_key, A first, then B (the same numbers PEFT draws).
  A VeRA target is the LoRA with A_eff = lambda_d[:, None] * A[:, :in], B_eff = lambda_b[:, None] * B[:out], gamma 1.
Why here: model/linear.py holds the modules and the per-row path; these formulas are what must match PEFT, kept short
  and testable on their own.
Rejected: DoRA with a non-detached norm (the paper shows equal accuracy and it costs the memory of V's graph);
  generating VeRA's projections on the model's device (a CUDA generator draws different numbers than PEFT's CPU one).
"""

from __future__ import annotations

import math

import torch


def dora_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||W + B A|| per output row, detached, fp32 -> (out,). B is already scaled by gamma."""
    with torch.no_grad():
        return torch.linalg.norm(weight.float() + B.float() @ A.float(), dim=1)


def dora_scale(magnitude: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """g = m / ||W + gamma B A||_row (out,), in the magnitude's dtype; the norm carries no gradient."""
    return magnitude / dora_norm(weight, A, B).to(magnitude.dtype)


def dora_as_lora(g: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """The DoRA delta as exact LoRA factors: A' (r+out, in) = [A ; W], B' (out, r+out) = [g*B , diag(g-1)]."""
    A2 = torch.cat([A, weight.to(A.dtype)], dim=0)
    B2 = torch.cat([g[:, None].to(B.dtype) * B, torch.diag(g - 1).to(B.dtype)], dim=1)
    return A2, B2


def kaiming_init(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's vera `_kaiming_init`: U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    std = math.sqrt(2) / math.sqrt(shape[1])  # the same float operations, in the same order, as PEFT
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(key: int, r: int, in_max: int, out_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared frozen pair, exactly as PEFT draws it: vera_A (r, in_max), vera_B (out_max, r), fp32 CPU."""
    g = torch.Generator(device="cpu").manual_seed(key)
    A = kaiming_init((r, in_max), g)
    B = kaiming_init((out_max, r), g)
    return A, B
