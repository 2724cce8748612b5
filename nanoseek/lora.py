"""LoRA family adapters (LoRA, rsLoRA, DoRA, VeRA) on a Model: targets, add / delete, trainable, merge.

What. A targeted weight W (out, in) computes y = x W^T + gamma * (x A^T) B^T with A (r, in), B (out, r),
gamma = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); only A and B train. DoRA (use_dora) scales the rows of
W + gamma B A to a trained magnitude m; VeRA trains two vectors on a frozen shared random pair (formulas in
lora_variants.py). Several named adapters live on one model; a forward runs the base, one adapter for the whole
batch, or one adapter per row:

    model(x)                                       the base model
    model(x, adapter="email")                      one adapter
    model(x, adapter=rows, adapter_names=names)    rows (B,) long: row b uses names[rows[b]], -1 = the base
    model(x, adapter=rows)                         same, indexing model.adapters (creation order)

    model.add_adapter(name, LoraConfig(...) | VeraConfig(...)) / delete_adapter(name) / adapters
    model.trainable_adapter(name) / merge_adapter(name) / unmerge_adapter(name) / merge_and_unload(name)
    model.save_adapter(dir, name) / load_adapter(dir, name)  PEFT directories, both ways with `peft` (lora_io.py)

Layering. The adapter *state* and the forward (per-row batching included) belong to the layers the model is built
from: model/linear.py (`Linear`, `LinearAdapters`, `ExpertAdapters`, `LoraContext`). This module sits above the
model: it decides which weights an adapter config targets, initialises and validates the tensors, hands them to
the modules' `add_lora` / `add_vera`, and merges; lora_io.py reads and writes them (PEFT format).

Targets. "all-linear" = every projection and the routed experts, not lm_head and not the routers (a router
adapter loads, from peft's own all-linear, and can be named: "gate"). Routed experts get one A/B pair per expert
and projection: gate_up_proj as one pair (A (E, r, H), B (E, 2I, r)) and down_proj (A (E, r, I), B (E, H, r)),
computed as x_sorted A_e^T B_e^T with `grouped_mm`; targeted by "experts" (both), "experts.gate_up_proj" /
"gate_up_proj" or "experts.down_proj"; the plain names "gate_proj"/"up_proj"/"down_proj" target dense MLPs and
shared experts only. What PEFT cannot express is left out of the defaults and refused by name:
  * DoRA: linear layers only (PEFT's parameter wrapper refuses DoRA): experts and routers are refused. On
    DeepseekV3 peft cannot load DoRA on the dense-MLP / shared-expert linears either (it rewrites those names to
    the experts, see peft_format.py): DoRA "all-linear" on DeepseekV3 is the attention projections; naming those
    linears explicitly works in nanoseek and save_adapter warns that peft will not load the adapter.
  * VeRA: linear layers of the main stack only (no experts, router or MTP modules; transformers drops MTP).
lora_dropout acts on linear targets only (as in PEFT, whose expert wrapper refuses dropout); the per-row path
applies none. On disk: see peft_format.py and lora_io.py (MTP module k is `model.layers.{L+k}`: transformers 5
builds no MTP layers and ignores those tensors, nanoseek reads them back).

Rejected: merging per request for serving (it serialises tenants); module-level functions that poke the modules'
adapter dictionaries from here (the modules own their state and its invariants).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .fp8 import FP8
from .lora_config import LoraConfig, VeraConfig
from .lora_variants import dora_norm, vera_projections
from .model.linear import (  # noqa: F401  (expert_delta, LoraContext: old import paths, kept)
    ExpertAdapters,
    Linear,
    LinearAdapters,
    LoraContext,
    adapter_of,
    expert_delta,
    expert_weights,
    is_lora_name,
)
from .peft_format import EXPERT_PROJS, MLP_LEAVES

__all__ = ["LoraConfig", "VeraConfig", "LoraContext", "LoraLinear", "LinearAdapters"]
LoraLinear = Linear  # the old name of the one linear type (model/linear.py), kept for old imports


# ---------------------------------------------------------------------------------------------- targets
def _suffix(path: str, t: str) -> bool:
    return path == t or path.endswith("." + t)


def _disk_path(model, path: str) -> str:
    """In-memory module path -> the on-disk (HF) one: mtp.{k}.* is model.layers.{L+k}.*."""
    m = re.match(r"mtp\.(\d+)\.(.*)", path)
    return f"model.layers.{model.config.num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else path


def _memory_path(model, path: str) -> str:
    cfg = model.config
    m = re.match(r"model\.layers\.(\d+)\.(.*)", path)
    if cfg.model_type == "deepseek_v3" and m and int(m.group(1)) >= cfg.num_hidden_layers:
        return f"mtp.{int(m.group(1)) - cfg.num_hidden_layers}.{m.group(2)}"
    return path


def candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """Every adapter-capable weight: in-memory path -> (module, expert projection or None for a 2-D weight)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, LinearAdapters):
            out[path] = (m, None)
        elif isinstance(m, ExpertAdapters):
            for proj in EXPERT_PROJS:
                out[f"{path}.{proj}"] = (m, proj)
    return out


def _refusal(module: nn.Module, proj: str | None, path: str, cfg) -> str | None:
    """Why `cfg`'s variant cannot go on this weight at all, or None when it can."""
    router = proj is None and not isinstance(module, Linear)
    if isinstance(cfg, VeraConfig):
        if proj is not None or router:
            return "VeRA applies to linear layers only (peft has no VeRA on routed experts or routers)"
        if path.startswith("mtp."):
            return "VeRA is not put on MTP modules (transformers builds none, so peft's shared projection differs)"
    elif cfg.use_dora and (proj is not None or router):
        return "DoRA applies to linear layers only (peft refuses DoRA on the routed experts and routers)"
    return None


def peft_cannot_load(model, path: str, cfg) -> bool:
    """DoRA on a DeepseekV3 dense-MLP / shared-expert linear: nanoseek runs it, but peft 0.21 rewrites every
    gate_proj/up_proj/down_proj target to the routed experts, where it refuses DoRA. Left out of "all-linear";
    an explicit target is allowed and save_adapter says that peft will not load the result."""
    return isinstance(cfg, LoraConfig) and cfg.use_dora and model.config.model_type == "deepseek_v3" and \
        path.rsplit(".", 1)[-1] in MLP_LEAVES


def resolve_targets(model: nn.Module, cfg) -> list[str]:
    """In-memory paths that cfg.target_modules selects; ValueError for a target that matches nothing the variant
    can wrap (naming the module when it exists but is not a linear layer, or why the variant refuses it)."""
    cands = candidates(model)
    if cfg.target_modules == "all-linear":  # not lm_head, not the routers; the variant's own limits
        return [p for p, (m, proj) in cands.items() if p != "lm_head" and
                (proj is not None or isinstance(m, Linear)) and _refusal(m, proj, p, cfg) is None and
                not peft_cannot_load(model, p, cfg)]
    chosen: list[str] = []
    for t in cfg.target_modules:
        t = t.strip(".")
        hits = []
        for path, (_, proj) in cands.items():
            if proj is None:
                ok = _suffix(path, t)
            else:  # experts only by an explicit name: "experts", "[...]experts.<proj>", "gate_up_proj"
                experts_path = path.rsplit(".", 1)[0]
                ok = _suffix(experts_path, t) or (_suffix(path, t) and ("experts" in t or t == "gate_up_proj"))
            if ok:
                hits.append(path)
        if not hits:
            others = [p for p, _ in model.named_modules() if _suffix(p, t)]
            why = f"{others[0]} is a {type(model.get_submodule(others[0])).__name__}, not a linear layer" \
                if others else "no module has that name"
            raise ValueError(f"adapter target {t!r} matches nothing an adapter can wrap in this "
                             f"{model.config.model_type} model ({why})")
        for h in hits:
            why = _refusal(*cands[h], h, cfg)
            if why and not (isinstance(cfg, VeraConfig) and h.startswith("mtp.")):  # VeRA skips MTP silently
                raise ValueError(f"adapter target {t!r} selects {h}: {why}")
        chosen += [h for h in hits if h not in chosen and _refusal(*cands[h], h, cfg) is None]
    if not chosen:
        raise ValueError(f"target_modules={cfg.target_modules!r} selects no weight this adapter type can wrap")
    return chosen


def target_shapes(module: nn.Module, proj: str | None, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (A, B) for a target: 2-D weight (r, in), (out, r); experts (E, r, in), (E, out, r)."""
    if proj is None:
        out, inp = module.weight.shape
        return (r, inp), (out, r)
    E, out, inp = getattr(module, proj).shape
    return (E, r, inp), (E, out, r)


def _base(module: nn.Module, proj: str | None) -> torch.Tensor:
    return module.weight if proj is None else getattr(module, proj)


def _factor_dtype(w: torch.Tensor) -> torch.dtype:
    """Adapter factors take the base weight's dtype; over a frozen FP8 base (quantize_base) they are fp32."""
    return torch.float32 if w.dtype == FP8 else w.dtype


def init_factors(module, proj, r: int, cfg: LoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """New A, B in the base weight's dtype (fp32 over FP8) and device, initialised as PEFT's
    reset_lora_parameters does."""
    w = _base(module, proj)
    sa, sb = target_shapes(module, proj, r)
    A = torch.empty(sa, dtype=torch.float32, device=w.device)
    B = torch.zeros(sb, dtype=torch.float32, device=w.device)
    for a in A.view(-1, *sa[-2:]):  # per expert: each (r, in) slice is one nn.Linear-shaped factor
        if cfg.init_lora_weights == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if cfg.init_lora_weights is False:  # tests: a non-trivial adapter from the start
        for b in B.view(-1, *sb[-2:]):
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return A.to(_factor_dtype(w)), B.to(_factor_dtype(w))


def vera_dims(model, paths: list[str]) -> tuple[int, int]:
    """(in_max, out_max) over VeRA's targets: the size of the shared pair, as peft's `_find_dim` computes it."""
    cands = candidates(model)
    shapes = [cands[p][0].weight.shape for p in paths]
    return max(s[1] for s in shapes), max(s[0] for s in shapes)


# ---------------------------------------------------------------------------------------------- add / delete
def _check_factors(name: str, cfg, path: str, module, proj, f: dict) -> None:
    """Shapes of one target's tensors: A/B (+ m for DoRA) or d/b for VeRA."""
    if isinstance(cfg, VeraConfig):
        out = module.weight.shape[0]
        if tuple(f["d"].shape) != (cfg.r,) or tuple(f["b"].shape) != (out,):
            raise ValueError(f"adapter {name!r}: {path} needs vera_lambda_d ({cfg.r},), vera_lambda_b ({out},); "
                             f"got {tuple(f['d'].shape)}, {tuple(f['b'].shape)}")
        return
    A, B = f["A"], f["B"]
    sa, sb = target_shapes(module, proj, A.shape[-2])
    if tuple(A.shape) != sa or tuple(B.shape) != sb:
        raise ValueError(f"adapter {name!r}: {path} needs A {sa}, B {sb}; got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if cfg.use_dora and tuple(f["m"].shape) != (sb[-2],):
        raise ValueError(f"adapter {name!r}: {path} needs lora_magnitude_vector ({sb[-2]},), got {tuple(f['m'].shape)}")


def attach(model, name: str, cfg, factors: dict[str, dict[str, torch.Tensor]], shared=None) -> None:
    """Register adapter `name` with the given tensors {in-memory path: {"A", "B"[, "m"]} or {"d", "b"}}, and for
    VeRA the shared pair `shared` = (vera_A (r, in_max), vera_B (out_max, r)). Everything is validated before the
    first module changes, so a failure leaves the model as it was."""
    ctx: LoraContext = model.lora_context
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r} must be a non-empty string of letters, digits, '_' or '-'")
    if name in ctx.configs:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter it first")
    if not factors:
        raise ValueError(f"adapter {name!r} targets no weight")
    cands = candidates(model)
    for path, f in factors.items():
        if path not in cands:
            raise ValueError(f"adapter {name!r}: {path} is not an adapter-capable weight of this model")
        why = _refusal(*cands[path], path, cfg)
        if why:
            raise ValueError(f"adapter {name!r}: {path}: {why}")
        _check_factors(name, cfg, path, *cands[path], f)
    if isinstance(cfg, VeraConfig):
        in_max, out_max = vera_dims(model, list(factors))
        if shared is None or shared[0].shape[1] < in_max or shared[1].shape[0] < out_max or \
                shared[0].shape[0] != cfg.r or shared[1].shape[1] != cfg.r:
            raise ValueError(f"adapter {name!r}: VeRA needs vera_A (r={cfg.r}, >= {in_max}) and vera_B (>= {out_max}, "
                             f"r={cfg.r}), got {None if shared is None else [tuple(t.shape) for t in shared]}")
    for path, f in factors.items():
        module, proj = cands[path]
        w = _base(module, proj)
        t = {k: v.to(w.device, _factor_dtype(w)) for k, v in f.items()}
        if isinstance(cfg, VeraConfig):
            va, vb = (s.to(w.device, _factor_dtype(w)) for s in shared)
            module.add_vera(ctx, name, t["d"], t["b"], va, vb, float(cfg.vera_dropout))
            continue
        scale = cfg.scale_for(_disk_path(model, path), t["A"].shape[-2])  # patterns name on-disk paths, as PEFT
        if proj is None:
            module.add_lora(ctx, name, t["A"], t["B"], scale, float(cfg.lora_dropout), t.get("m"))
        else:
            module.add_lora(ctx, name, proj, t["A"], t["B"], scale)
    ctx.configs[name] = cfg
    ctx.changed()


def add_adapter(model, name: str, cfg: LoraConfig | VeraConfig | None = None) -> None:
    cfg = cfg or LoraConfig()
    if not isinstance(cfg, (LoraConfig, VeraConfig)):
        raise TypeError(f"expected a nanoseek LoraConfig or VeraConfig, got {type(cfg).__name__}")
    cands = candidates(model)
    paths = resolve_targets(model, cfg)
    factors, shared = {}, None
    if isinstance(cfg, VeraConfig):
        shared = vera_projections(cfg.projection_prng_key, cfg.r, *vera_dims(model, paths))
        for path in paths:
            w = cands[path][0].weight
            factors[path] = {"d": torch.full((cfg.r,), float(cfg.d_initial)), "b": torch.zeros(w.shape[0])}
    else:
        for path in paths:
            module, proj = cands[path]
            r = cfg.rank_for(_disk_path(model, path))
            A, B = init_factors(module, proj, r, cfg)
            factors[path] = {"A": A, "B": B}
            if cfg.use_dora:  # m = ||W + gamma B A||: the adapter starts as the base model (PEFT's init)
                factors[path]["m"] = dora_norm(module.weight, A, B * cfg.scale_for(_disk_path(model, path), r))
    attach(model, name, cfg, factors, shared)


def delete_adapter(model, name: str) -> None:
    ctx: LoraContext = model.lora_context
    if name not in ctx.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(ctx.configs)}")
    if ctx.merged == name:
        raise ValueError(f"adapter {name!r} is merged: unmerge_adapter it before deleting")
    for module, _ in _owners(model, name):
        module.remove_adapter(name)
    del ctx.configs[name]
    ctx.changed()


def _owners(model, name: str) -> list[tuple[nn.Module, str]]:
    """(module, path) of every module holding adapter `name`."""
    return [(m, p) for p, m in model.named_modules()
            if (isinstance(m, LinearAdapters) or isinstance(m, ExpertAdapters)) and name in m.lora_scale]


def adapter_parameters(model, name: str) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if adapter_of(n) == name]


def trainable_adapter(model, name: str | None) -> list[nn.Parameter]:
    """Make only adapter `name`'s tensors trainable (None: the base trainable, every adapter frozen)."""
    if name is not None and name not in model.lora_context.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {model.adapters}")
    out = []
    for n, p in model.named_parameters():
        on = (not is_lora_name(n)) if name is None else adapter_of(n) == name
        p.requires_grad_(on)
        if on:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------- merge
@torch.no_grad()
def _merge_linear(module: LinearAdapters, name: str, sign: float) -> None:
    """W <- W + gamma B A (LoRA, VeRA via its LoRA form); DoRA: W <- g * (W + gamma B A), g = m / ||W + gamma B A||,
    and back with the norm kept from the merge (the merged rows have norm |m|, so it cannot be recomputed)."""
    w = module.weight
    if name not in module.lora_magnitude_vector:
        A, B = module.lora_weights(name)
        w += sign * (B.float() @ A.float()).to(w.dtype)
        return
    A, B = module.lora_A[name].weight, module.lora_B[name].weight * module.lora_scale[name]
    m = module.lora_magnitude_vector[name].weight.float()
    delta = B.float() @ A.float()
    if sign > 0:
        n = dora_norm(w, A, B)
        module.dora_merged_norm[name] = n
        w.copy_(((m / n)[:, None] * (w.float() + delta)).to(w.dtype))
    else:
        n = module.dora_merged_norm.pop(name)
        w.copy_((w.float() / (m / n)[:, None] - delta).to(w.dtype))


@torch.no_grad()
def merge_adapter(model, name: str, sign: float = 1.0) -> None:
    """Fold adapter `name` into every weight it touches (experts: per expert, one bmm); sign -1 undoes it."""
    ctx: LoraContext = model.lora_context
    if name not in ctx.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(ctx.configs)}")
    if sign > 0 and ctx.merged is not None:
        raise ValueError(f"adapter {ctx.merged!r} is already merged; unmerge it first")
    if sign < 0 and ctx.merged != name:
        raise ValueError(f"adapter {name!r} is not merged (merged: {ctx.merged!r})")
    if model.config.tie_word_embeddings and "lm_head" in dict((p, m) for m, p in _owners(model, name)):
        raise ValueError(f"adapter {name!r} has an adapter on lm_head, whose weight is tied to the input embedding: "
                         "merging would change the embedding too; run it unmerged")
    frozen = [p for m, p in _owners(model, name) if any(t.dtype == FP8 for t in m.parameters(recurse=False))]
    if frozen:
        raise ValueError(f"adapter {name!r}: the base weights of {frozen[0]} ({len(frozen)} modules in all) are frozen "
                         "FP8 blocks (finetune --base-fp8, precision.quantize_base); merging needs ordinary weights: "
                         "call precision.dequantize_base(model) first, or merge into the unquantized base")
    for module, _ in _owners(model, name):
        if isinstance(module, LinearAdapters):
            _merge_linear(module, name, sign)
        else:
            for proj in module.lora_A[name]:
                A, B = expert_weights(module, proj, name)
                w = getattr(module, proj)
                w += sign * torch.bmm(B.float(), A.float()).to(w.dtype)
    ctx.merged = name if sign > 0 else None
    ctx.changed()


def unmerge_adapter(model, name: str) -> None:
    merge_adapter(model, name, sign=-1.0)


def merge_and_unload(model, name: str) -> None:
    """Fold adapter `name` into the weights for good and remove it: the model becomes a new plain base (what
    peft's merge_and_unload gives). Other adapters stay, now on top of the new weights."""
    merge_adapter(model, name)
    for module, _ in _owners(model, name):
        if isinstance(module, LinearAdapters):
            module.dora_merged_norm.pop(name, None)
    model.lora_context.merged = None
    delete_adapter(model, name)
