"""Selecting a model's precision recipe at run time: `set_precision(model, "fp8")` (also `Model.set_precision`).

What. One `fp8.Precision` object is attached to every projection made by `layers.linear()` (attention
projections, dense MLPs, shared experts, MTP's eh_proj) and to every routed `Experts`; the embedding, lm_head,
router gate, norms and the attention core keep their own precision (V3 report section 3.3.1). Parameter
names, the state dict and checkpoints do not change, and "plain" restores the exact original computation.

Rejected: a config.json field (precision is how a run computes, not what the model is; a checkpoint trained in
FP8 is an ordinary checkpoint); swapping module classes (renames nothing but breaks `isinstance` users).
"""

from __future__ import annotations

from torch import nn

from ..fp8 import Precision
from .layers import Linear
from .moe import Experts


def set_precision(model: nn.Module, name: str = "plain", quantize: bool = True, pow2: bool = False) -> Precision:
    """Attach one Precision(name) to every projection and routed-expert block of `model` except lm_head."""
    recipe = Precision(name, quantize=quantize, pow2=pow2)
    keep = {id(model.get_submodule("lm_head"))} if "lm_head" in dict(model.named_children()) else set()
    for m in model.modules():
        if isinstance(m, (Linear, Experts)) and id(m) not in keep:
            m.precision = recipe
    return recipe
