"""Selecting a model's precision recipe at run time: `set_precision(model, "fp8")` (also `Model.set_precision`).

What. One `fp8.Precision` object is attached to every projection made by `linear.linear()` (attention
projections, dense MLPs, shared experts, MTP's eh_proj) and to every routed `Experts`; the embedding, lm_head,
router gate, norms and the attention core keep their own precision (V3 report section 3.3.1). Parameter
names, the state dict and checkpoints do not change, and "plain" restores the exact original computation.

`quantize_base(model)` (finetune --base-fp8) replaces every such projection's weight, in place and under the
same name, by its float8_e4m3fn 128x128 blocks (frozen) plus a `weight_scale_inv` buffer, and frees the
full-precision copy: the QLoRA idea with FP8 blocks (1 + 4/128^2 bytes per weight instead of 2 or 4). The
routed experts' stacks `gate_up_proj` (E, 2I, H) / `down_proj` (E, H, I) become fp8 the same way, blocked per
expert, with buffers `gate_up_proj_scale_inv` (E, ceil(2I/128), ceil(H/128)) / `down_proj_scale_inv`; their
grouped GEMM then dequantizes the stack per forward (fp8.FrozenFP8GroupedWeight; under --fp8 the activations
are tiled too). LoRA A/B stay full precision and their adapter is an ordinary PEFT adapter of the unquantized
base. `dequantize_base(model)` turns the blocks back into ordinary weights (merging needs them); saving a model
with an FP8 base writes ordinary weights (checkpoint.to_hf_state_dict dequantizes the `*_scale_inv` pairs).

Rejected: a config.json field (precision is how a run computes, not what the model is; a checkpoint trained in
FP8 is an ordinary checkpoint); swapping module classes (renames nothing but breaks `isinstance` users).
"""

from __future__ import annotations

import torch
from torch import nn

from ..fp8 import FP8, SCALE_INV, Precision, dequantize_blocks, quantize_blocks
from .linear import Linear
from .moe import EXPERT_PROJS, Experts


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


def _frozen_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight quantize_base covers: projections but lm_head, expert stacks."""
    out = []
    for m in _targets(model, (Linear, Experts)):
        out += [(m, "weight")] if isinstance(m, Linear) else [(m, p) for p in EXPERT_PROJS]
    return out


@torch.no_grad()
def quantize_base(model: nn.Module) -> int:
    """Freeze every projection except lm_head, and the routed experts, as fp8 128x128 blocks (see above);
    returns the bytes freed.

    Add the adapters first (their A/B take the base weight's dtype when created). `.to(dtype)` afterwards casts
    everything else and leaves the blocks and their scales as they are (linear.apply_keeping_dtype); merging an
    adapter needs `dequantize_base` first.
    """
    freed = 0
    for m, name in _frozen_weights(model):
        w = getattr(m, name)
        if w.dtype != FP8:
            q, s = quantize_blocks(w)  # (..., N, K), (..., ceil(N/128), ceil(K/128)): per expert for a stack
            freed += w.numel() * w.element_size() - q.numel() - s.numel() * s.element_size()
            setattr(m, name, nn.Parameter(q.contiguous(), requires_grad=False))
            m.register_buffer(name + SCALE_INV, s.contiguous())
    return freed


@torch.no_grad()
def dequantize_base(model: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Undo quantize_base: every frozen fp8 weight becomes its dequantized blocks in `dtype` (still frozen)."""
    for m, name in _frozen_weights(model):
        w = getattr(m, name)
        if w.dtype == FP8:
            s = m._buffers.pop(name + SCALE_INV)
            setattr(m, name, nn.Parameter(dequantize_blocks(w, s).to(dtype), requires_grad=False))
