"""Building blocks: norms, rotary embeddings (default and YaRN), the dense MLPs.

Every projection is made by `linear.linear()`: the one `Linear` type, whose base product follows the model's
precision recipe and which can hold named LoRA adapters (linear.py), with Hugging Face's parameter names.

RoPE follows HF DeepseekV3 exactly: with `rope_interleave` the rotated dimensions are read as interleaved
pairs (x0, x1), (x2, x3), ... and written back de-interleaved ([evens, odds]); queries and keys get the same
permutation, so dot products are those of the interleaved layout. cos/sin are scaled by YaRN's
`attention_factor`; the softmax scale gets YaRN's mscale^2 in the attention module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import Linear, linear, recomputed  # noqa: F401  (Linear: old import path, kept)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 (as HF does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def activation(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class SwiGLU(nn.Module):
    """DeepSeek dense MLP / shared expert: down(act(gate(x)) * up(x)); under "fp8" training the part before
    down is recomputed in backward (`Precision.recomputing`), so only x is kept."""

    def __init__(self, hidden: int, inter: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = linear(hidden, inter)
        self.up_proj = linear(hidden, inter)
        self.down_proj = linear(inter, hidden)
        self.act = activation(act)

    def forward(self, x):  # (..., H) -> (..., H)
        if self.down_proj.precision.recomputing():  # fp8: keep x only, re-run the up-projections in backward
            return self.down_proj(recomputed(self.hidden, self.gate_proj.lora_ctx, x))
        return self.down_proj(self.hidden(x))

    def hidden(self, x):  # (..., H) -> (..., I)
        return self.act(self.gate_proj(x)) * self.up_proj(x)


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.c_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = activation(cfg.hidden_act)
        self.dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


# ---------------------------------------------------------------------------------------------- RoPE / YaRN
def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, float]:
    """inv_freq (dim/2,) and the cos/sin scale (YaRN's attention_factor, else 1), as HF computes them."""
    p = cfg.rope_parameters
    dim, base = cfg.qk_rope_head_dim, float(p["rope_theta"])
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    if p.get("rope_type", "default") != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = p["factor"]
    orig = p["original_max_position_embeddings"]
    mscale, mscale_all = p.get("mscale"), p.get("mscale_all_dim")
    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        attn_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all
                       else yarn_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot):  # the dimension index that completes `rot` rotations over `orig` positions
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    p = cfg.rope_parameters
    if p.get("rope_type", "default") == "yarn" and p.get("mscale_all_dim"):
        scale *= yarn_mscale(p["factor"], p["mscale_all_dim"]) ** 2
    return scale


class Rotary(nn.Module):
    """cos/sin tables for positions; `rotate` rotates (B, H, T, D) tensors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.interleave = cfg.rope_interleave
        # Plain fp32 attributes, not buffers: a model cast to bf16 must not round the frequencies.
        self.inv_freq, self.attn_factor = rope_frequencies(cfg, device="cpu")

    def forward(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, 1, T, D/2) for broadcasting over heads."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        cos, sin = freqs.cos() * self.attn_factor, freqs.sin() * self.attn_factor
        return cos[:, None].to(dtype), sin[:, None].to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
