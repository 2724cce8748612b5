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
    differ by a width-independent constant; we keep 1/sqrt(d_head), which makes muP equal SP at the base width
    (`attention_multiplier = d_head ** -0.5` gives `mup`'s 1/d_head exactly).
  * tied embeddings (GPT-2): the shared table is an embedding (lr, init unchanged); the 1/m multiplier acts
    on the logits only, as `MuSharedReadout` does.
Width-independent multipliers (TP5 section 7.3 tunes these on the proxy with the learning rate; `nanoseek sweep
--search` does too, and `--transfer-to` writes them all). Each defaults to 1 / off, which is the table above:
  * alpha_emb  `embedding_multiplier`: input embeddings times alpha_emb (folded into the tables on export).
  * alpha_out  `readout_multiplier`: logits times alpha_out / m (folded into lm_head on export).
  * alpha_attn `attention_multiplier`: attention logits times alpha_attn (folded into the query on export).
  * eta_emb    `embedding_lr_multiplier`: the embedding tables' Adam lr is lr * eta_emb (a tied GPT-2 head is
    the same tensor, so it shares the factor). Under Adam, alpha_emb scales the embedding's init *and* its
    update; eta_emb scales the update alone.
  * `zero_init_query`, `zero_init_readout`: TP5's recommended zero init of the query projections (q part of
    GPT-2's c_attn, MLA's q_b_proj / q_proj) and of an untied lm_head.
  * sigma `initializer_range`, and the base width itself (a larger base width b' = the same model with hidden
    lr * b'/b, hidden init * sqrt(b'/b) and alpha_out * b'/b).
Weight decay follows MuAdam (wd * m_in for hidden matrices, so the decoupled decay lr*wd does not change with
width).

Where the rules live: the model applies its half (width multipliers, m_in, the muP init) from
model/parametrization.py, re-exported here; this module adds the optimizer groups and the export folding.

Export: `output_multiplier` is folded into lm_head on save (a tied head is written untied), so a muP
checkpoint is a standard HF model; loading it into nanoseek unfolds it again (checkpoint.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .model.parametrization import (  # noqa: F401  (the model's half of muP, re-exported under its old names)
    base_shapes,
    embedding_names,
    fan_in_multipliers,
    mup_init,
    output_multiplier,
    query_weights,
    rescale_init,
    width_multiplier,
)

QUERY_KEYS = ("attn.c_attn.weight", "attn.c_attn.bias", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight")


def scale_queries(cfg: ModelConfig, sd: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """A copy of the in-memory state dict `sd` with the query rows times `factor` (folds alpha_attn on export:
    q.k * alpha_attn = (alpha_attn q).k; every query row of MLA, nope and rope parts alike, feeds only q.k)."""
    out = dict(sd)
    for key, t in sd.items():
        if key.endswith(QUERY_KEYS):
            t = t.clone()
            (t[: cfg.hidden_size] if ".c_attn." in key else t).mul_(factor)  # c_attn is [q; k; v]
            out[key] = t
    return out


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups keyed by (lr factor, weight decay): each dict has params, lr_scale, weight_decay, name.

    Vectors (norms, biases) get no weight decay; matrices get `weight_decay * m_in`; lr_scale = 1 / m_in, and
    eta_emb (`embedding_lr_multiplier`) for the embedding tables. Tied parameters appear once.
    """
    mults, embeddings = fan_in_multipliers(model), embedding_names(model)
    eta_emb = model.config.embedding_lr_multiplier
    groups: dict[tuple[float, bool, bool], dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        m_in, decay, emb = mults[name], p.dim() >= 2, name in embeddings and eta_emb != 1.0
        g = groups.setdefault((m_in, decay, emb), {
            "params": [], "lr_scale": (eta_emb if emb else 1.0) / m_in,
            "weight_decay": weight_decay * m_in if decay else 0.0,
            "name": f"{'decay' if decay else 'no_decay'}{'' if m_in == 1 else f'/m_in={m_in:g}'}"
                    f"{'/embedding' if emb else ''}"})
        g["params"].append(p)
    return list(groups.values())
