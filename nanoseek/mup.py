"""muP (Maximal Update Parametrization, Tensor Programs V) for both architectures: every rule in one place.

What. With `ModelConfig.mup_base_width = b`, the model of width w is parametrized so that its best learning
rate and init scale are those of the base model of width b (muTransfer). For each parameter we compare its
shape with the same parameter of the base model (`config.with_width(b)`, built on the meta device: like
`mup.set_base_shapes`) and take m_in = fan_in / base_fan_in (fan_in = last dimension). Then, for Adam:

| parameter                                              | init std          | Adam lr    | weight decay  |
|--------------------------------------------------------|-------------------|------------|---------------|
| matrices whose fan_in grows with width ("hidden"):     | sigma / sqrt(m_in)| lr / m_in  | wd * m_in     |
|   attention and MLP projections, MLA q_a/q_b/kv_a/kv_b |                   |            | (lr*wd fixed) |
|   (latent ranks scale with width), routed and shared   |                   |            |               |
|   experts, MTP eh_proj, the MoE router gate.weight     |                   |            |               |
| matrices with a fixed fan_in (m_in = 1): embeddings,   | sigma             | lr         | wd            |
|   wpe, q_b/kv_b when a latent rank is held fixed       |                   |            |               |
| output head lm_head (tied or not)                      | sigma             | lr         | wd            |
|   + logits multiplied by 1/m, m = width / base width   |                   |            |               |
| norms, biases (vectors)                                | 1 / 0             | lr         | 0             |

These are exactly the factors of Microsoft's `mup` package (MuAdam, mup.init, MuReadout/MuSharedReadout)
wherever that package has a rule; a test checks agreement for GPT-2. Explicit rules where it has none:
  * router `gate.weight` (E, H): its output dimension (the expert count) does not grow, which `mup` would call
    vector-like (lr unscaled). We treat it as hidden (lr/m_in, init 1/sqrt(m_in)): a fan_in-sized sum of
    correlated Adam updates grows like m_in otherwise, and router logits must stay O(1) at every width.
  * latent ranks: `with_width` scales q_lora_rank and kv_lora_rank with width, so those projections are
    hidden; a model that holds a rank fixed gets m_in = 1 for the projection reading that rank (the table's
    rule by fan_in covers both cases).
  * attention scale: muP asks for 1/d_head instead of 1/sqrt(d_head) because d_head grows with width in the
    paper's setting. nanoseek's width scaling keeps head dims fixed and grows the head count, so the two
    differ by a width-independent constant; we keep 1/sqrt(d_head), which makes muP equal SP at the base width.
  * tied embeddings (GPT-2): the shared table is an embedding (lr, init unchanged); the 1/m multiplier acts
    on the logits only, as `MuSharedReadout` does.
Embedding multiplier: `ModelConfig.embedding_multiplier` (alpha_emb, default 1) scales the input embeddings;
like init std and learning rate it is a width-independent hyperparameter to tune on the proxy (`nanoseek
sweep --emb-mults`), folded into the embedding weights on export.
Weight decay follows MuAdam (wd * m_in for hidden matrices, so the decoupled decay lr*wd does not change with
width).

Export: `output_multiplier` is folded into lm_head on save (a tied head is written untied), so a muP
checkpoint is a standard HF model; loading it into nanoseek unfolds it again (checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


def width_multiplier(cfg: ModelConfig) -> float:
    """m = hidden_size / mup_base_width (1.0 under the standard parametrization)."""
    return 1.0 if cfg.mup_base_width is None else cfg.hidden_size / cfg.mup_base_width


def output_multiplier(cfg: ModelConfig) -> float:
    """The factor on the logits: 1/m under muP, 1 otherwise."""
    return 1.0 / width_multiplier(cfg)


def base_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the base-width model (built on the meta device: no memory)."""
    from .model import Model

    base = Model(cfg.with_width(cfg.mup_base_width).replace(mup_base_width=None), device="meta")
    return {n: tuple(p.shape) for n, p in base.named_parameters(remove_duplicate=False)}


def fan_in_multipliers(model: nn.Module) -> dict[str, float]:
    """name -> m_in = fan_in / base fan_in for every parameter (1.0 for vectors, embeddings, the head, SP)."""
    cfg: ModelConfig = model.config
    out = dict.fromkeys((n for n, _ in model.named_parameters(remove_duplicate=False)), 1.0)
    if cfg.mup_base_width is None:
        return out
    base = base_shapes(cfg)
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() < 2 or name in embeddings or name == "lm_head.weight" or name not in base:
            continue  # (not in base: LoRA factors, which keep the base learning rate)
        out[name] = p.shape[-1] / base[name][-1]
    return out


@torch.no_grad()
def rescale_init(model: nn.Module) -> None:
    """Turn the standard init (constant std) into muP's: hidden matrices get std / sqrt(m_in)."""
    mults = fan_in_multipliers(model)
    for name, p in model.named_parameters():
        if mults[name] != 1.0:
            p.mul_(mults[name] ** -0.5)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups keyed by (lr factor, weight decay): each dict has params, lr_scale, weight_decay, name.

    Vectors (norms, biases) get no weight decay; matrices get `weight_decay * m_in`; lr_scale = 1 / m_in.
    Tied parameters appear once.
    """
    mults = fan_in_multipliers(model)
    groups: dict[tuple[float, bool], dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        m_in, decay = mults[name], p.dim() >= 2
        g = groups.setdefault((m_in, decay), {
            "params": [], "lr_scale": 1.0 / m_in, "weight_decay": weight_decay * m_in if decay else 0.0,
            "name": f"{'decay' if decay else 'no_decay'}{'' if m_in == 1 else f'/m_in={m_in:g}'}"})
        g["params"].append(p)
    return list(groups.values())
