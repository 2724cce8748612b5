"""Selecting a model's precision recipe at run time: `set_precision(model, "fp8")` (also `Model.set_precision`).

What. One `fp8.Precision` object is attached to every projection made by `linear.linear()` (attention
projections, dense MLPs, shared experts, MTP's eh_proj) and to every routed `Experts`; the embedding, lm_head,
router gate, norms and the attention core keep their own precision (V3 report section 3.3.1). Parameter
names, the state dict and checkpoints do not change, and "plain" restores the exact original computation.

`quantize_base(model)` (finetune --base-fp8) replaces every such projection's weight, in place and under the
same name, by its float8_e4m3fn 128x128 blocks (frozen) plus a `weight_scale_inv` buffer, and frees the
full-precision copy: the QLoRA idea with FP8 blocks (1 + 4/128^2 bytes per weight instead of 2 or 4). LoRA
A/B stay full precision and their adapter is an ordinary PEFT adapter of the unquantized base. Routed experts
keep their full-precision base (not done yet).

Rejected: a config.json field (precision is how a run computes, not what the model is; a checkpoint trained in
FP8 is an ordinary checkpoint); swapping module classes (renames nothing but breaks `isinstance` users).
"""

from __future__ import annotations

import torch
from torch import nn

from ..fp8 import FP8, Precision, quantize_blocks
from .linear import Linear
from .moe import Experts


def set_precision(model: nn.Module, name: str = "plain", quantize: bool = True, pow2: bool = False) -> Precision:
    """Attach one Precision(name) to every projection and routed-expert block of `model` except lm_head."""
    recipe = Precision(name, quantize=quantize, pow2=pow2)
    for m in _targets(model, (Linear, Experts)):
        m.precision = recipe
    return recipe


def _targets(model: nn.Module, kinds: tuple[type, ...]) -> list[nn.Module]:
    """Modules of `kinds` in `model`, lm_head excluded (it stays in high precision)."""
    head = dict(model.named_children()).get("lm_head")
    return [m for m in model.modules() if isinstance(m, kinds) and m is not head]


@torch.no_grad()
def quantize_base(model: nn.Module) -> int:
    """Freeze every projection except lm_head as fp8 128x128 blocks (see above); returns the bytes freed.

    Add the adapters first (their A/B take the base weight's dtype when created). Merging an adapter into an
    FP8 base, or casting the model with `.to(dtype)` afterwards, is not supported.
    """
    freed = 0
    for m in _targets(model, (Linear,)):
        if m.weight.dtype != FP8:
            w = m.weight
            q, s = quantize_blocks(w)
            freed += w.numel() * w.element_size() - q.numel() - s.numel() * s.element_size()
            m.weight = nn.Parameter(q.contiguous(), requires_grad=False)
            m.register_buffer("weight_scale_inv", s)
    return freed
