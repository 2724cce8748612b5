"""LoRA: named adapters on every linear layer and on the routed experts, per-row adapters, merge, PEFT I/O.

What. A targeted weight W (out, in) computes y = x W^T + gamma * (x A^T) B^T with A (r, in), B (out, r),
gamma = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)); only A and B train. Several named adapters live on one
model; a forward runs the base, one adapter for the whole batch, or one adapter per row:

    model(x)                                       the base model
    model(x, adapter="email")                      one adapter
    model(x, adapter=rows, adapter_names=names)    rows (B,) long: row b uses names[rows[b]], -1 = the base
    model(x, adapter=rows)                         same, indexing model.adapters (creation order)

    model.add_adapter(name, LoraConfig(...)) / delete_adapter(name) / adapters / trainable_adapter(name)
    model.merge_adapter(name) / unmerge_adapter(name)        W += gamma B A and back (experts too)
    model.save_adapter(dir, name) / load_adapter(dir, name)  PEFT directories, both ways with `peft`

The seam. Every projection is a `LoraLinear` (an `nn.Linear` made by `layers.linear()`, same parameter names),
and the routed `Experts` carry the same per-adapter dictionaries. Adapter tensors sit *beside* the base weight
under PEFT-like names (`q_a_proj.lora_A.<adapter>.weight`, `experts.lora_A.<adapter>.gate_up_proj`), so base
names never change; they are left out of `Model.state_dict()` (a state-dict hook), so a base checkpoint is the
same file with or without adapters, and they are saved with `save_adapter` only. Which adapter runs is read
from one `LoraContext` owned by the Model and set by `Model.forward` for its duration (try/finally): no module
signature changes, and the MLA absorbed path, the MoE path, the MTP modules and `generate` all see it.

Per-row (multi-tenant) path, the same code the fine-tuning runs:
  * linears (Punica BGMV): the adapters are stacked once per forward and module, ranks zero-padded to the
    largest (exact: padded rows/columns contribute 0), plus an all-zero slot for base rows; each row gathers
    its A (B, r, in), B (B, out, r) and two batched matmuls give the delta. No loop over rows or adapters.
  * routed experts (SGMV): every sorted token copy gets the group slot * E + expert, and the same grouped GEMM
    as the base experts (`moe.grouped_mm`) runs over (slot, expert) groups with the stacked (S+1)*E factors.
  * MLA absorbed decoding: kv_b_proj's delta is folded the same way as its weight, never expanding the cache:
    q_lat += (q_nope . B_uk) A and o += (o_lat A^T) . B_uv, per row (vLLM's absorbed path dropped this term).
  The stacks are rebuilt every forward (a copy of the batch's adapters, small next to the base weights);
  keeping them across decode steps, or paging them (S-LoRA), is the serving engine's job.

Routed experts get one A/B pair per expert and projection: gate_up_proj as one pair (A (E, r, H),
B (E, 2I, r)) and down_proj (A (E, r, I), B (E, H, r)), computed as x_sorted A_e^T B_e^T with `grouped_mm`.
They are targeted by "experts" (both), "experts.gate_up_proj"/"gate_up_proj" or "experts.down_proj"; the
plain names "gate_proj"/"up_proj"/"down_proj" target dense MLPs and shared experts only. lora_dropout acts on
linear targets only (as in PEFT, whose expert wrapper refuses dropout); the per-row path applies none.

On disk (PEFT format): `adapter_config.json` + `adapter_model.safetensors`, linear keys
`base_model.model.<on-disk module path>.lora_{A,B}.weight` (MTP module k is `model.layers.{L+k}`). Routed
experts use PEFT's own `target_parameters` layout for 3-D expert tensors (peft >= 0.17 `ParamWrapper`, the
transformers v5 stacked-experts layout that ours equals): `<path>.mlp.experts.lora_A.weight` (E*r, in), row
e*r + k, and `lora_B.weight` (out, r*E), column k*E + e; when both projections are targeted PEFT nests its
wrappers, so gate_up_proj is `<path>.mlp.experts.base_layer.lora_{A,B}.weight` and down_proj
`<path>.mlp.experts.lora_{A,B}.weight` (on load the projection is recognised by shape either way). The config
lists them in `target_parameters` ("experts.gate_up_proj", "experts.down_proj").

Rejected: wrapping each linear in a LoraLayer module (PEFT's way) — it renames the base weight to
`base_layer.weight`, which breaks checkpoint names and the FP8 in-place swap; merging per request for
serving — it serialises tenants; a Python loop over experts or adapters for the per-row path.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_directory

EXPERT_PROJS = ("gate_up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."
INIT_CHOICES = (True, False, "gaussian")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class LoraConfig:
    """One adapter's hyper-parameters (PEFT's `LoraConfig` field names).

    target_modules: module-name suffixes (PEFT rule: a module matches t if its path is t or ends with ".t"),
        e.g. ["q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "experts"], or
        "all-linear" (every projection and the routed experts, not lm_head).
    init_lora_weights: True = A kaiming-uniform(a=sqrt(5)) (nn.Linear's init, as PEFT), B = 0 (the adapter starts
        as the base model); "gaussian" = A ~ N(0, 1/r), B = 0; False = A and B random (tests only).
    rank_pattern / alpha_pattern: PEFT's per-target overrides {regex: value}, matched against the module path.
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"LoraConfig.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            bad("r", "must be a positive integer")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or \
                not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            bad("lora_alpha", "must be a positive number")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            bad("lora_dropout", "must be in [0, 1)")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                bad("target_modules", "must be a list of module-name suffixes or 'all-linear'")
        else:
            self.target_modules = list(self.target_modules or [])
            if not self.target_modules or not all(isinstance(t, str) and t.strip(".") for t in self.target_modules):
                bad("target_modules", "must be a non-empty list of module names (or 'all-linear')")
        if not isinstance(self.use_rslora, bool):
            bad("use_rslora", "must be True or False")
        if self.init_lora_weights not in INIT_CHOICES or isinstance(self.init_lora_weights, int) and \
                not isinstance(self.init_lora_weights, bool):
            bad("init_lora_weights", f"must be one of {INIT_CHOICES}")
        for k, v in self.rank_pattern.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoraConfig.rank_pattern[{k!r}]={v!r}: must be a positive integer")
        for k, v in self.alpha_pattern.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"LoraConfig.alpha_pattern[{k!r}]={v!r}: must be a positive number")

    def _pattern(self, patterns: dict, path: str):
        for key, value in patterns.items():  # PEFT's get_pattern_key: the regex must match a path suffix
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return None

    def rank_for(self, path: str) -> int:
        return self._pattern(self.rank_pattern, path) or self.r

    def scale_for(self, path: str, r: int | None = None) -> float:
        """gamma = alpha / r (rsLoRA: alpha / sqrt(r)) for the target at `path`."""
        r = r or self.rank_for(path)
        alpha = self._pattern(self.alpha_pattern, path) or self.lora_alpha
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def scale(self) -> float:
        return self.scale_for("")


# ---------------------------------------------------------------------------------------------- context
class LoraContext:
    """The adapters of one Model and which of them the current forward runs.

    `configs` maps adapter name -> LoraConfig (creation order). During a forward either `adapter` (one name
    for every row) or `rows` (B,) long + `names` (per-row slots; slot len(names) is the all-zero base slot) is
    set. Stacked per-row factors are cached per module for that forward only.
    """

    def __init__(self):
        self.configs: dict[str, LoraConfig] = {}
        self.merged: str | None = None
        self.adapter: str | None = None
        self.names: list[str] | None = None
        self.rows: torch.Tensor | None = None  # (B,) slot of each row, base rows = len(names)
        self._stacks: dict = {}
        # Set by a serving engine: stacks kept across forwards, per adapter-name tuple; its owner clears it
        # whenever adapters are loaded, deleted or changed (None: rebuilt every forward).
        self.stack_cache: dict | None = None

    @contextmanager
    def use(self, adapter, adapter_names=None, batch_size: int | None = None):
        """Activate `adapter` (None, a name, or a (B,) index tensor) for the body of the `with`; the previous
        state comes back afterwards (a forward may run inside another one, e.g. a draft model's)."""
        saved = self.adapter, self.names, self.rows, self._stacks
        self.adapter, self.names, self.rows = self._resolve(adapter, adapter_names, batch_size)
        keep = self.stack_cache is not None and self.names is not None
        self._stacks = self.stack_cache.setdefault(tuple(self.names), {}) if keep else {}
        try:
            yield
        finally:
            self.adapter, self.names, self.rows, self._stacks = saved

    def _check(self, name: str) -> None:
        if name not in self.configs:
            raise ValueError(f"unknown adapter {name!r}; this model has {list(self.configs)}")
        if self.merged is not None and name != self.merged:
            raise ValueError(f"adapter {self.merged!r} is merged into the base weights: unmerge it before running "
                             f"adapter {name!r}")

    def _resolve(self, adapter, adapter_names, batch_size):
        if adapter is None:
            return None, None, None
        if isinstance(adapter, str):
            self._check(adapter)
            return (None if adapter == self.merged else adapter), None, None
        if not isinstance(adapter, torch.Tensor) or adapter.dtype not in (torch.int64, torch.int32) or \
                adapter.dim() != 1:
            raise ValueError("adapter must be None, an adapter name, or a (B,) integer tensor of adapter indices")
        names = list(self.configs) if adapter_names is None else list(adapter_names)
        if batch_size is not None and adapter.shape[0] != batch_size:
            raise ValueError(f"adapter index tensor has {adapter.shape[0]} rows, the batch has {batch_size}")
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged into the base weights: per-row adapters need "
                             "an unmerged model")
        for n in names:
            self._check(n)
        lo, hi = (int(adapter.min()), int(adapter.max())) if adapter.numel() else (0, 0)
        if lo < -1 or hi >= len(names):
            raise ValueError(f"adapter indices must be in [-1, {len(names)}) (-1 = base), got [{lo}, {hi}]")
        if lo == hi:  # every row the same: the plain single-adapter path
            return (None if lo == -1 else names[lo]), None, None
        rows = torch.where(adapter < 0, len(names), adapter).long()
        return None, names, rows

    def stacked(self, key, factors) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-slot factors stacked, ranks zero-padded, plus the zero base slot.

        factors(name) -> (A (..., r, in), B (..., out, r) scaled) or None. Returns A (S+1, ..., r_max, in),
        B (S+1, ..., out, r_max) or None when no slot's adapter touches this weight. Cached for this forward.
        """
        if key in self._stacks:
            return self._stacks[key]
        got = [factors(n) for n in self.names]
        present = [f for f in got if f is not None]
        out = None
        if present:
            r = max(a.shape[-2] for a, _ in present)
            a0, b0 = present[0]
            zero_a = a0.new_zeros(*a0.shape[:-2], r, a0.shape[-1])
            zero_b = b0.new_zeros(*b0.shape[:-1], r)
            As = [zero_a if f is None else F.pad(f[0], (0, 0, 0, r - f[0].shape[-2])) for f in got] + [zero_a]
            Bs = [zero_b if f is None else F.pad(f[1], (0, r - f[1].shape[-1])) for f in got] + [zero_b]
            out = torch.stack(As), torch.stack(Bs)
        self._stacks[key] = out
        return out


# ---------------------------------------------------------------------------------------------- modules
class LoraWeight(nn.Module):
    """Holds one LoRA factor as `.weight` (so names read `lora_A.<adapter>.weight`, as in PEFT)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


class LoraLinear(nn.Linear):
    """nn.Linear plus optional named adapters: y = x W^T + b + gamma * dropout(x) A^T B^T.

    With no adapter active this is exactly nn.Linear (same parameters, same state dict).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.ModuleDict()  # adapter -> LoraWeight (r, in)
        self.lora_B = nn.ModuleDict()  # adapter -> LoraWeight (out, r)
        self.lora_scale: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.lora_ctx: LoraContext | None = None

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A (r, in), gamma * B (out, r) of one adapter, or None if it does not touch this layer."""
        if name not in self.lora_A:
            return None
        return self.lora_A[name].weight, self.lora_B[name].weight * self.lora_scale[name]

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The active factors: A (r, in), gamma B (out, r) for one adapter, or per row A (B, r, in),
        gamma B (B, out, r); None when no active adapter touches this layer."""
        ctx = self.lora_ctx
        if ctx is None or not self.lora_A:
            return None
        if ctx.rows is None:
            return None if ctx.adapter is None else self.lora_weights(ctx.adapter)
        st = ctx.stacked(id(self), self.lora_weights)
        return None if st is None else (st[0][ctx.rows], st[1][ctx.rows])

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b: the part an FP8 linear overrides (LoRA then adds its term in the input's precision)."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        f = self.lora_factors()
        if f is None:
            return y
        A, B = f
        if A.dim() == 2:  # one adapter for the batch
            p = self.lora_dropout[self.lora_ctx.adapter]
            x = F.dropout(x, p, self.training) if p else x
            return y + F.linear(F.linear(x, A), B)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, M, in): every input here is batch-first
        return y + torch.bmm(torch.bmm(x3, A.transpose(1, 2)), B.transpose(1, 2)).view(y.shape)  # BGMV


def expert_weights(experts: nn.Module, proj: str, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A (E, r, in), gamma * B (E, out, r) of one adapter on one expert projection, or None."""
    if name not in experts.lora_A or proj not in experts.lora_A[name]:
        return None
    return experts.lora_A[name][proj], experts.lora_B[name][proj] * experts.lora_scale[name][proj]


def expert_delta(experts: nn.Module, proj: str, xs: torch.Tensor, expert: torch.Tensor, token: torch.Tensor,
                 offs: torch.Tensor, num_tokens: int) -> torch.Tensor | None:
    """The LoRA term of one expert projection on the sorted token copies, or None.

    xs (M, in) copies sorted by expert, expert (M,) their expert, token (M,) their source token (of
    num_tokens, row-major over (B, T)), offs (E,) int32 cumulative group ends. Returns (M, out).
    """
    from .model.moe import grouped_mm

    ctx = experts.lora_ctx
    if ctx is None or not experts.lora_A:
        return None
    if ctx.rows is None:
        f = None if ctx.adapter is None else expert_weights(experts, proj, ctx.adapter)
        if f is None:
            return None
        A, B = f
        return grouped_mm(grouped_mm(xs, A.transpose(1, 2), offs), B.transpose(1, 2), offs)
    st = ctx.stacked((id(experts), proj), lambda n: expert_weights(experts, proj, n))
    if st is None:
        return None
    A, B = st  # (S+1, E, r, in), (S+1, E, out, r)
    S1, E = A.shape[:2]
    rows = ctx.rows
    slot = rows.repeat_interleave(num_tokens // rows.shape[0])[token]  # (M,) slot of each copy
    group = slot * E + expert  # (slot, expert) groups: SGMV over the stacked factors
    perm = group.argsort(stable=True)
    goffs = torch.bincount(group, minlength=S1 * E).cumsum(0).to(torch.int32)
    d = grouped_mm(grouped_mm(xs[perm], A.flatten(0, 1).transpose(1, 2), goffs),
                   B.flatten(0, 1).transpose(1, 2), goffs)  # (M, out) in group order
    return torch.empty_like(d).index_copy(0, perm, d)


# ---------------------------------------------------------------------------------------------- targets
def _suffix(path: str, t: str) -> bool:
    return path == t or path.endswith("." + t)


def _is_experts(m: nn.Module) -> bool:
    from .model.moe import Experts

    return isinstance(m, Experts)


def candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """Every LoRA-capable weight: in-memory path -> (module, expert projection or None for a linear)."""
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out[path] = (m, None)
        elif _is_experts(m):
            for proj in EXPERT_PROJS:
                out[f"{path}.{proj}"] = (m, proj)
    return out


def resolve_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """In-memory paths that cfg.target_modules selects; ValueError for a target that matches nothing LoRA can
    wrap (naming the module when it exists but is not a linear layer)."""
    cands = candidates(model)
    if cfg.target_modules == "all-linear":
        return [p for p in cands if p != "lm_head"]
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
            raise ValueError(f"LoRA target {t!r} matches nothing LoRA can wrap in this "
                             f"{model.config.model_type} model ({why})")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def target_shapes(module: nn.Module, proj: str | None, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of (A, B) for a target: linear (r, in), (out, r); experts (E, r, in), (E, out, r)."""
    if proj is None:
        return (r, module.in_features), (module.out_features, r)
    E, out, inp = getattr(module, proj).shape
    return (E, r, inp), (E, out, r)


def _base(module: nn.Module, proj: str | None) -> torch.Tensor:
    return module.weight if proj is None else getattr(module, proj)


def init_factors(module, proj, r: int, cfg: LoraConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """New A, B in the base weight's dtype/device, initialised as PEFT's reset_lora_parameters does."""
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
    return A.to(w.dtype), B.to(w.dtype)


# ---------------------------------------------------------------------------------------------- add / delete
def attach(model, name: str, cfg: LoraConfig, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Register adapter `name` with the given factors {in-memory path: (A, B)}. Everything is validated
    before the first module changes, so a failure leaves the model as it was."""
    ctx: LoraContext = model.lora_context
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r} must be a non-empty string of letters, digits, '_' or '-'")
    if name in ctx.configs:
        raise ValueError(f"adapter {name!r} already exists; delete_adapter it first")
    if not factors:
        raise ValueError(f"adapter {name!r} targets no weight")
    cands = candidates(model)
    for path, (A, B) in factors.items():
        if path not in cands:
            raise ValueError(f"adapter {name!r}: {path} is not a LoRA-capable weight of this model")
        module, proj = cands[path]
        sa, sb = target_shapes(module, proj, A.shape[-2])
        if tuple(A.shape) != sa or tuple(B.shape) != sb:
            raise ValueError(f"adapter {name!r}: {path} needs A {sa}, B {sb}; got A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)}")
    for path, (A, B) in factors.items():
        module, proj = cands[path]
        w = _base(module, proj)
        A, B = A.to(w.device, w.dtype), B.to(w.device, w.dtype)
        scale = cfg.scale_for(_disk_path(model, path), A.shape[-2])  # patterns name on-disk paths, as PEFT
        module.lora_ctx = ctx
        if proj is None:
            module.lora_A[name], module.lora_B[name] = LoraWeight(A), LoraWeight(B)
            module.lora_scale[name], module.lora_dropout[name] = scale, float(cfg.lora_dropout)
        else:
            if name not in module.lora_A:
                module.lora_A[name], module.lora_B[name] = nn.ParameterDict(), nn.ParameterDict()
                module.lora_scale[name] = {}
            module.lora_A[name][proj] = nn.Parameter(A, requires_grad=False)
            module.lora_B[name][proj] = nn.Parameter(B, requires_grad=False)
            module.lora_scale[name][proj] = scale
    ctx.configs[name] = cfg


def add_adapter(model, name: str, cfg: LoraConfig | None = None) -> None:
    cfg = cfg or LoraConfig()
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"expected a nanoseek LoraConfig, got {type(cfg).__name__}")
    cands = candidates(model)
    factors = {}
    for path in resolve_targets(model, cfg):
        module, proj = cands[path]
        factors[path] = init_factors(module, proj, cfg.rank_for(_disk_path(model, path)), cfg)
    attach(model, name, cfg, factors)


def delete_adapter(model, name: str) -> None:
    ctx: LoraContext = model.lora_context
    if name not in ctx.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(ctx.configs)}")
    if ctx.merged == name:
        raise ValueError(f"adapter {name!r} is merged: unmerge_adapter it before deleting")
    for module, _ in _owners(model, name):
        del module.lora_A[name], module.lora_B[name], module.lora_scale[name]
        if isinstance(module, LoraLinear):
            del module.lora_dropout[name]
    del ctx.configs[name]


def _owners(model, name: str) -> list[tuple[nn.Module, str]]:
    """(module, path) of every module holding adapter `name`."""
    return [(m, p) for p, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and name in m.lora_A]


def _is_lora_name(n: str) -> bool:
    return ".lora_A." in n or ".lora_B." in n


def _adapter_of(n: str) -> str | None:
    """`...q_a_proj.lora_A.<adapter>.weight` / `...experts.lora_B.<adapter>.down_proj` -> adapter name."""
    return n.split(".lora_", 1)[1].split(".")[1] if _is_lora_name(n) else None


def adapter_parameters(model, name: str) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if _adapter_of(n) == name]


def trainable_adapter(model, name: str | None) -> list[nn.Parameter]:
    """Make only adapter `name`'s A/B trainable (None: the base trainable, every adapter frozen)."""
    if name is not None and name not in model.lora_context.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {model.adapters}")
    out = []
    for n, p in model.named_parameters():
        on = (not _is_lora_name(n)) if name is None else _adapter_of(n) == name
        p.requires_grad_(on)
        if on:
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------- merge
@torch.no_grad()
def merge_adapter(model, name: str, sign: float = 1.0) -> None:
    """W += sign * gamma B A for every weight adapter `name` touches (experts: per expert, one bmm)."""
    ctx: LoraContext = model.lora_context
    if name not in ctx.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {list(ctx.configs)}")
    if sign > 0 and ctx.merged is not None:
        raise ValueError(f"adapter {ctx.merged!r} is already merged; unmerge it first")
    if sign < 0 and ctx.merged != name:
        raise ValueError(f"adapter {name!r} is not merged (merged: {ctx.merged!r})")
    if model.config.tie_word_embeddings and "lm_head" in dict((p, m) for m, p in _owners(model, name)):
        raise ValueError(f"adapter {name!r} has LoRA on lm_head, whose weight is tied to the input embedding: "
                         "merging would change the embedding too; run it unmerged")
    for module, _ in _owners(model, name):
        if isinstance(module, LoraLinear):
            A, B = module.lora_weights(name)
            module.weight += sign * (B.float() @ A.float()).to(module.weight.dtype)
        else:
            for proj in module.lora_A[name]:
                A, B = expert_weights(module, proj, name)
                w = getattr(module, proj)
                w += sign * torch.bmm(B.float(), A.float()).to(w.dtype)
    ctx.merged = name if sign > 0 else None


def unmerge_adapter(model, name: str) -> None:
    merge_adapter(model, name, sign=-1.0)


def merge_and_unload(model, name: str) -> None:
    """Fold adapter `name` into the weights for good and remove it: the model becomes a new plain base (what
    peft's merge_and_unload gives). Other adapters stay, now on top of the new weights."""
    merge_adapter(model, name)
    model.lora_context.merged = None
    delete_adapter(model, name)


# ---------------------------------------------------------------------------------------------- state dict
def drop_lora_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """state-dict hook: adapters are saved with save_adapter, never in the base checkpoint."""
    for k in [k for k in state_dict if k.startswith(prefix) and _is_lora_name(k)]:
        del state_dict[k]


def ignore_missing_lora(module, incompatible_keys) -> None:
    """load_state_dict post-hook: a base state dict has no adapter keys, and that is not an error."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_lora_name(k)]


# ---------------------------------------------------------------------------------------------- PEFT I/O
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


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """The PEFT-format tensors of adapter `name` (see the module docstring for the expert layout)."""
    if name not in model.lora_context.configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {model.adapters}")
    out = {}
    for module, path in _owners(model, name):
        disk = PEFT_PREFIX + _disk_path(model, path)
        if isinstance(module, LoraLinear):
            out[f"{disk}.lora_A.weight"] = module.lora_A[name].weight.detach().clone().contiguous()
            out[f"{disk}.lora_B.weight"] = module.lora_B[name].weight.detach().clone().contiguous()
            continue
        projs = list(module.lora_A[name])
        for proj in projs:
            A, B = module.lora_A[name][proj].detach(), module.lora_B[name][proj].detach()  # (E, r, in), (E, out, r)
            inner = ".base_layer" if proj == "gate_up_proj" and len(projs) == 2 else ""  # PEFT's nesting
            out[f"{disk}{inner}.lora_A.weight"] = A.flatten(0, 1).contiguous()  # (E*r, in), row e*r + k
            out[f"{disk}{inner}.lora_B.weight"] = B.permute(1, 2, 0).flatten(1).contiguous()  # (out, r*E), k*E + e
    return out


def peft_config_dict(model, name: str, base_model_name_or_path: str | None = None) -> dict:
    cfg: LoraConfig = model.lora_context.configs[name]
    owners = _owners(model, name)
    experts = sorted({f"experts.{p}" for m, _ in owners if not isinstance(m, LoraLinear) for p in m.lora_A[name]})
    # the leaf names of the linears that hold this adapter: PEFT matches them by suffix (a module PEFT would
    # target beyond ours gets B = 0 from its own init, so the logits are the same)
    linear = sorted({p.rsplit(".", 1)[-1] for m, p in owners if isinstance(m, LoraLinear)})
    gpt2 = model.config.model_type == "gpt2"
    d = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "use_rslora": cfg.use_rslora,
        "target_modules": linear, "bias": "none", "fan_in_fan_out": gpt2,
        "init_lora_weights": True,  # what PEFT gives a module it targets beyond ours: B = 0
        "rank_pattern": dict(cfg.rank_pattern), "alpha_pattern": dict(cfg.alpha_pattern), "modules_to_save": None,
        "use_dora": False, "lora_bias": False, "inference_mode": True,
    }
    if experts:
        d["target_parameters"] = experts
    return d


def save_adapter(model, path, name: str, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter `name` as a PEFT LoRA directory, atomically (temp dir + rename)."""
    from safetensors.torch import save_file

    tensors = adapter_state_dict(model, name)
    config = peft_config_dict(model, name, base_model_name_or_path)
    mlp = sorted(set(config["target_modules"]) & {"gate_proj", "up_proj", "down_proj"})
    if mlp and model.config.model_type == "deepseek_v3":
        warnings.warn(f"adapter {name!r} has LoRA on dense-MLP/shared-expert {mlp}: peft 0.21 with transformers 5 "
                      "rewrites these names to the fused routed-expert parameters of DeepseekV3 and will not apply "
                      "them; nanoseek loads them fine", stacklevel=3)

    def fill(tmp: Path):
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})

    return atomic_directory(path, fill)


def config_from_peft(d: dict, where) -> LoraConfig:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: adapter_config.json must hold a JSON object")
    if d.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type is {d.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {"use_dora": False, "lora_bias": False, "bias": "none"}
    for k, ok in unsupported.items():
        if d.get(k, ok) not in (ok, None):
            raise ValueError(f"{where}: {k}={d[k]!r} is not supported (need {ok!r})")
    if d.get("modules_to_save"):
        raise ValueError(f"{where}: modules_to_save={d['modules_to_save']} is not supported")
    targets = d.get("target_modules") or []
    if isinstance(targets, str):
        targets = targets if targets == "all-linear" else [targets]
    params = [f"experts.{t.rsplit('.', 1)[-1]}" for t in d.get("target_parameters") or []]
    if params:
        targets = [*([] if isinstance(targets, str) else targets), *params]
    init = d.get("init_lora_weights", True)
    try:
        return LoraConfig(r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                          target_modules=targets or "all-linear", use_rslora=bool(d.get("use_rslora", False)),
                          init_lora_weights=init if init in INIT_CHOICES else True,
                          rank_pattern=dict(d.get("rank_pattern") or {}),
                          alpha_pattern=dict(d.get("alpha_pattern") or {}))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_adapter(model, path) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Parse and validate a PEFT adapter directory against `model`; returns (config, {in-memory path: (A, B)})."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter directory {path} does not exist")
    if not (path / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path}: no {ADAPTER_CONFIG}; not a PEFT adapter directory")
    try:
        cfg = config_from_peft(json.loads((path / ADAPTER_CONFIG).read_text()), path / ADAPTER_CONFIG)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    wfile = path / ADAPTER_WEIGHTS
    if not wfile.is_file():
        pickles = [f for f in PICKLE_WEIGHTS if (path / f).exists()]
        if pickles:
            raise ValueError(f"{path}: found {pickles[0]} but no {ADAPTER_WEIGHTS}; nanoseek only loads safetensors "
                             "(pickle files can run code). Re-save it with peft's save_pretrained.")
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(wfile), framework="pt", device="cpu") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{wfile}: not a readable safetensors file ({e})") from None

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if not m:
            raise ValueError(f"{wfile}: unexpected tensor {key!r} (only lora_A/lora_B weights are supported)")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{wfile}: {key} contains NaN or infinite values" if t.is_floating_point()
                             else f"{wfile}: {key} is not a floating-point tensor")
        if t.dim() != 2:
            raise ValueError(f"{wfile}: {key} has shape {tuple(t.shape)}; LoRA factors are 2-D")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    if not pairs:
        raise ValueError(f"{wfile}: no LoRA tensors")
    cands = candidates(model)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for disk, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{wfile}: {disk} has lora_{'AB'.replace(next(iter(ab)), '')} missing")
        A, B = ab["A"], ab["B"]
        mem = _memory_path(model, disk.removesuffix(".base_layer"))
        if mem in cands and cands[mem][1] is None:
            target = mem
            module = cands[mem][0]
        elif f"{mem}.gate_up_proj" in cands:  # stacked experts: which projection? (in, out) tell them apart
            module = cands[f"{mem}.gate_up_proj"][0]
            E = module.gate_up_proj.shape[0]
            shapes = {p: (getattr(module, p).shape[2], getattr(module, p).shape[1]) for p in EXPERT_PROJS}
            proj = [p for p, (i, o) in shapes.items() if (A.shape[1], B.shape[0]) == (i, o)]
            if not proj or A.shape[0] % E or A.shape[0] != B.shape[1]:
                raise ValueError(f"{wfile}: {disk} expert factors A {tuple(A.shape)}, B {tuple(B.shape)} fit neither "
                                 f"gate_up_proj nor down_proj of {E} experts {shapes} (in, out)")
            target = f"{mem}.{proj[0]}"
            r = A.shape[0] // E
            A = A.view(E, r, A.shape[1])  # row e*r + k
            B = B.view(B.shape[0], r, E).permute(2, 0, 1)  # column k*E + e -> (E, out, r)
        else:
            raise ValueError(f"{wfile}: {disk} is not a LoRA-capable layer of this {model.config.model_type} model")
        if target in factors:
            raise ValueError(f"{wfile}: {disk} gives a second adapter for {target}")
        r_want = cfg.rank_for(_disk_path(model, target))
        if A.shape[-2] != r_want:
            raise ValueError(f"{wfile}: {disk} has rank {A.shape[-2]}, adapter_config.json says r={r_want}")
        sa, sb = target_shapes(module, cands[target][1], r_want)
        if tuple(A.shape) != sa or tuple(B.shape) != sb:
            raise ValueError(f"{wfile}: {disk} needs lora_A {sa} and lora_B {sb}, got {tuple(A.shape)}, "
                             f"{tuple(B.shape)}")
        factors[target] = (A.contiguous(), B.contiguous())
    return cfg, factors


def load_adapter(model, path, name: str) -> LoraConfig:
    """Load a PEFT LoRA directory as adapter `name`; nothing changes unless everything is valid."""
    cfg, factors = read_adapter(model, path)
    attach(model, name, cfg, factors)
    return cfg



@torch.no_grad()
def copy_adapter_weights_(model, name: str, path) -> None:
    """Overwrite the factors of existing adapter `name` in place from a PEFT directory (resume: the optimizer
    keeps pointing at the same Parameters). The directory must hold exactly that adapter's targets."""
    _, factors = read_adapter(model, path)
    cands = candidates(model)
    have = {}
    for module, p in _owners(model, name):
        if isinstance(module, LoraLinear):
            have[p] = (module.lora_A[name].weight, module.lora_B[name].weight)
        else:
            for proj in module.lora_A[name]:
                have[f"{p}.{proj}"] = (module.lora_A[name][proj], module.lora_B[name][proj])
    if set(have) != set(factors):
        raise ValueError(f"{path}: targets differ from adapter {name!r}: missing {sorted(set(have) - set(factors))[:4]}"
                         f", extra {sorted(set(factors) - set(have))[:4]}")
    for p, (A, B) in factors.items():
        assert p in cands
        if have[p][0].shape != A.shape:
            raise ValueError(f"{path}: {p} has rank {A.shape[-2]}, adapter {name!r} rank {have[p][0].shape[-2]}")
        have[p][0].copy_(A)
        have[p][1].copy_(B)
