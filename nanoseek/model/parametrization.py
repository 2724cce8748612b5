"""muP as the model applies it: the width multipliers, the fan-in multipliers m_in, and the muP initialisation.

What. `init_weights()` (transformer.py) calls `mup_init` after the standard init; `readout` multiplies the logits by
`output_multiplier`. The rules, their table and why each holds are in nanoseek/mup.py, which also builds the
optimizer groups from `fan_in_multipliers` and folds the multipliers on export.
Why here: the model needs these at construction and in its forward; keeping them in model/ lets mup.py sit above
the model (it imports the model, never the reverse). Rejected: a function-level import of mup.py in the model
(the import circle this split removed).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig


def width_multiplier(cfg: ModelConfig) -> float:
    """m = hidden_size / mup_base_width (1.0 under the standard parametrization)."""
    return 1.0 if cfg.mup_base_width is None else cfg.hidden_size / cfg.mup_base_width


def output_multiplier(cfg: ModelConfig) -> float:
    """The factor on the logits: alpha_out / m under muP, alpha_out otherwise (alpha_out defaults to 1)."""
    return cfg.readout_multiplier / width_multiplier(cfg)


def base_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the base-width model: the same class built on the meta device (no memory) from
    `config.with_width(mup_base_width)`, like `mup.set_base_shapes`."""
    cfg: ModelConfig = model.config
    base = type(model)(cfg.with_width(cfg.mup_base_width).replace(mup_base_width=None), device="meta")
    return {n: tuple(p.shape) for n, p in base.named_parameters(remove_duplicate=False)}


def fan_in_multipliers(model: nn.Module) -> dict[str, float]:
    """name -> m_in = fan_in / base fan_in for every parameter (1.0 for vectors, embeddings, the head, SP)."""
    cfg: ModelConfig = model.config
    out = dict.fromkeys((n for n, _ in model.named_parameters(remove_duplicate=False)), 1.0)
    if cfg.mup_base_width is None:
        return out
    base = base_shapes(model)
    embeddings = embedding_names(model)
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() < 2 or name in embeddings or name == "lm_head.weight" or name not in base:
            continue  # (not in base: LoRA factors, which keep the base learning rate)
        out[name] = p.shape[-1] / base[name][-1]
    return out


def embedding_names(model: nn.Module) -> set[str]:
    """Parameter names of the embedding tables (wte, wpe, embed_tokens)."""
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}


def query_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight rows that produce attention queries: GPT-2 c_attn[:H] (and its bias), MLA q_b_proj / q_proj."""
    cfg: ModelConfig = model.config
    out = []
    for name, p in model.named_parameters():
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            out.append(p[: cfg.hidden_size])  # (H, H) / (H,): c_attn is [q; k; v]
        elif name.endswith(("self_attn.q_b_proj.weight", "self_attn.q_proj.weight")):
            out.append(p)
    return out


@torch.no_grad()
def mup_init(model: nn.Module) -> None:
    """After the standard init: muP's 1/sqrt(m_in) rescaling (muP only), then the zero-init switches."""
    cfg: ModelConfig = model.config
    if cfg.mup_base_width is not None:
        rescale_init(model)
    if cfg.zero_init_query:
        for w in query_weights(model):
            w.zero_()
    if cfg.zero_init_readout:
        model.lm_head.weight.zero_()


@torch.no_grad()
def rescale_init(model: nn.Module) -> None:
    """Turn the standard init (constant std) into muP's: hidden matrices get std / sqrt(m_in)."""
    mults = fan_in_multipliers(model)
    for name, p in model.named_parameters():
        if mults[name] != 1.0:
            p.mul_(mults[name] ** -0.5)
