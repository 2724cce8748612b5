"""LoRA family adapters (LoRA, rsLoRA, DoRA, VeRA): named adapters on every linear layer, the routers and the
routed experts, per-row adapters, merge, PEFT I/O.

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

The seam. Every projection is a `LoraLinear` (an `nn.Linear` made by `layers.linear()`, same parameter names);
the MoE router (`moe.Gate`) carries the same `LinearAdapters`, and the routed `Experts` carry per-adapter
dictionaries of their own. Adapter tensors sit *beside* the base weight under PEFT-like names
(`q_a_proj.lora_A.<adapter>.weight`, `.lora_magnitude_vector.<adapter>.weight`, `.vera_lambda_b.<adapter>.weight`,
`experts.lora_A.<adapter>.gate_up_proj`), so base names never change; they are left out of `Model.state_dict()`
(a state-dict hook), so a base checkpoint is the same file with or without adapters, and they are saved with
`save_adapter` only. Which adapter runs is read from one `LoraContext` owned by the Model and set by
`Model.forward` for its duration (try/finally): no module signature changes, and the MLA absorbed path, the MoE
path, the MTP modules and `generate` all see it.

Every variant has an exact LoRA form (`lora_weights`): VeRA is A = lambda_d * vera_A, B = lambda_b * vera_B, gamma 1;
DoRA is the rank r + out LoRA of lora_variants.dora_as_lora. The per-row path, the absorbed MLA path and merge
use that form, so they are exact for every variant; a single-adapter DoRA forward uses PEFT's direct formula.

Per-row (multi-tenant) path, the same code the fine-tuning runs:
  * linears (Punica BGMV): the adapters are stacked once per forward and module, ranks zero-padded to the
    largest (exact: padded rows/columns contribute 0), plus an all-zero slot for base rows; each row gathers
    its A (B, r, in), B (B, out, r) and two batched matmuls give the delta. No loop over rows or adapters.
    A DoRA adapter in the mix raises the padded rank to r + out for that module (exact, slower).
  * routed experts (SGMV): every sorted token copy gets the group slot * E + expert, and the same grouped GEMM
    as the base experts (`moe.grouped_mm`) runs over (slot, expert) groups with the stacked (S+1)*E factors.
  * MLA absorbed decoding: kv_b_proj's delta is folded the same way as its weight, never expanding the cache:
    q_lat += (q_nope . B_uk) A and o += (o_lat A^T) . B_uv, per row (vLLM's absorbed path dropped this term).
  The stacks are rebuilt every forward (a copy of the batch's adapters, small next to the base weights);
  keeping them across decode steps, or paging them (S-LoRA), is the serving engine's job.

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

Rejected: wrapping each linear in a LoraLayer module (PEFT's way) — it renames the base weight to
`base_layer.weight`, which breaks checkpoint names and the FP8 in-place swap; merging per request for
serving — it serialises tenants; a Python loop over experts or adapters for the per-row path.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .lora_config import LoraConfig, VeraConfig
from .lora_variants import dora_as_lora, dora_norm, dora_scale, vera_projections
from .peft_format import EXPERT_PROJS, MLP_LEAVES

__all__ = ["LoraConfig", "VeraConfig", "LoraContext", "LoraLinear", "LinearAdapters"]
ADAPTER_DICTS = ("lora_A", "lora_B", "lora_magnitude_vector", "vera_lambda_d", "vera_lambda_b")
_ADAPTER_NAME = re.compile(r"\.(?:" + "|".join(ADAPTER_DICTS) + r")\.([^.]+)")


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
    """Holds one adapter tensor as `.weight` (so names read `lora_A.<adapter>.weight`, as in PEFT)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)


class VeraProjection(nn.Module):
    """VeRA's frozen shared pair, sliced for one layer: A (r, in), B (out, r); buffers, never saved in the state dict
    (save_adapter writes the whole shared pair once, as PEFT does)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)


class LinearAdapters:
    """Mixin: named adapters on a module's 2-D `weight` (out, in), read from `lora_ctx` (LoraLinear, moe.Gate).

    Per adapter: LoRA lora_A (r, in), lora_B (out, r), scale gamma; DoRA adds lora_magnitude_vector (out,);
    VeRA has vera_lambda_d (r,), vera_lambda_b (out,) and its sliced shared pair in vera_proj.
    """

    def init_adapters(self) -> None:
        self.lora_A = nn.ModuleDict()  # adapter -> LoraWeight (r, in)
        self.lora_B = nn.ModuleDict()  # adapter -> LoraWeight (out, r)
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA: adapter -> LoraWeight (out,)
        self.vera_lambda_d = nn.ModuleDict()  # VeRA: adapter -> LoraWeight (r,)
        self.vera_lambda_b = nn.ModuleDict()  # VeRA: adapter -> LoraWeight (out,)
        self.vera_proj = nn.ModuleDict()  # VeRA: adapter -> VeraProjection
        self.lora_scale: dict[str, float] = {}  # every adapter on this module has an entry
        self.lora_dropout: dict[str, float] = {}
        self.dora_merged_norm: dict[str, torch.Tensor] = {}  # DoRA: ||W + gamma B A|| at merge time, for unmerge
        self.lora_ctx: LoraContext | None = None

    def lora_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact LoRA form of one adapter: A (r', in), B (out, r') with gamma folded into B; None if the
        adapter does not touch this layer. DoRA: r' = r + out (lora_variants.dora_as_lora); VeRA: r' = r."""
        if name in self.lora_A:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight * self.lora_scale[name]
            if name in self.lora_magnitude_vector:
                g = dora_scale(self.lora_magnitude_vector[name].weight, self.weight, A, B)  # (out,)
                return dora_as_lora(g, self.weight, A, B)
            return A, B
        if name in self.vera_lambda_d:
            p = self.vera_proj[name]
            return self.vera_lambda_d[name].weight[:, None] * p.A, self.vera_lambda_b[name].weight[:, None] * p.B
        return None

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The active factors: A (r, in), gamma B (out, r) for one adapter, or per row A (B, r, in),
        gamma B (B, out, r); None when no active adapter touches this layer."""
        ctx = self.lora_ctx
        if ctx is None or not self.lora_scale:
            return None
        if ctx.rows is None:
            return None if ctx.adapter is None else self.lora_weights(ctx.adapter)
        st = ctx.stacked(id(self), self.lora_weights)
        return None if st is None else (st[0][ctx.rows], st[1][ctx.rows])

    def lora_delta(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor | None:
        """The active adapter's term for input x (..., in), or None. y = x W^T + b (DoRA reuses it)."""
        ctx = self.lora_ctx
        if ctx is None or not self.lora_scale:
            return None
        name = ctx.adapter
        if ctx.rows is None:
            if name is None or name not in self.lora_scale:
                return None
            p = self.lora_dropout[name]
            xd = F.dropout(x, p, self.training) if p else x
            if name in self.lora_magnitude_vector:
                return self._dora_delta(name, x, xd, y)
            A, B = self.lora_weights(name)
            return F.linear(F.linear(xd, A), B)
        f = self.lora_factors()
        if f is None:
            return None
        A, B = f  # (B, r, in), (B, out, r)
        x3 = x.reshape(A.shape[0], -1, x.shape[-1])  # (B, M, in): inputs are batch-first (the router's row-major)
        return torch.bmm(torch.bmm(x3, A.transpose(1, 2)), B.transpose(1, 2)).view(*x.shape[:-1], B.shape[1])  # BGMV

    def _dora_delta(self, name, x, xd, y) -> torch.Tensor:
        """PEFT's DoRA forward: (g - 1) * x W^T + g * gamma (x A^T) B^T with g = m / ||W + gamma B A|| (detached)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight * self.lora_scale[name]
        g = dora_scale(self.lora_magnitude_vector[name].weight, self.weight, A, B)  # (out,)
        if xd is x and y is not None:
            base = y if self.bias is None else y - self.bias  # x W^T
        else:  # dropout active: PEFT recomputes the base term on the dropped-out input
            base = F.linear(xd, self.weight)
        return (g - 1) * base + g * F.linear(F.linear(xd, A), B)


class LoraLinear(nn.Linear, LinearAdapters):
    """nn.Linear plus optional named adapters: y = x W^T + b + the active adapter's term.

    With no adapter active this is exactly nn.Linear (same parameters, same state dict).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.init_adapters()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b: the part an FP8 linear overrides (LoRA then adds its term in the input's precision)."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        d = self.lora_delta(x, y)
        return y if d is None else y + d


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
        elif _is_experts(m):
            for proj in EXPERT_PROJS:
                out[f"{path}.{proj}"] = (m, proj)
    return out


def _refusal(module: nn.Module, proj: str | None, path: str, cfg) -> str | None:
    """Why `cfg`'s variant cannot go on this weight at all, or None when it can."""
    router = proj is None and not isinstance(module, LoraLinear)
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
                (proj is not None or isinstance(m, LoraLinear)) and _refusal(m, proj, p, cfg) is None and
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
        t = {k: v.to(w.device, w.dtype) for k, v in f.items()}
        module.lora_ctx = ctx
        if isinstance(cfg, VeraConfig):
            out, inp = module.weight.shape
            va, vb = (s.to(w.device, w.dtype) for s in shared)
            module.vera_lambda_d[name], module.vera_lambda_b[name] = LoraWeight(t["d"]), LoraWeight(t["b"])
            module.vera_proj[name] = VeraProjection(va[:, :inp].contiguous(), vb[:out].contiguous())
            module.lora_scale[name], module.lora_dropout[name] = 1.0, float(cfg.vera_dropout)
            continue
        scale = cfg.scale_for(_disk_path(model, path), t["A"].shape[-2])  # patterns name on-disk paths, as PEFT
        if proj is None:
            module.lora_A[name], module.lora_B[name] = LoraWeight(t["A"]), LoraWeight(t["B"])
            if cfg.use_dora:
                module.lora_magnitude_vector[name] = LoraWeight(t["m"])
            module.lora_scale[name], module.lora_dropout[name] = scale, float(cfg.lora_dropout)
        else:
            if name not in module.lora_A:
                module.lora_A[name], module.lora_B[name] = nn.ParameterDict(), nn.ParameterDict()
                module.lora_scale[name] = {}
            module.lora_A[name][proj] = nn.Parameter(t["A"], requires_grad=False)
            module.lora_B[name][proj] = nn.Parameter(t["B"], requires_grad=False)
            module.lora_scale[name][proj] = scale
    ctx.configs[name] = cfg


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
        del module.lora_scale[name]
        if isinstance(module, LinearAdapters):
            del module.lora_dropout[name]
            for d in (*ADAPTER_DICTS, "vera_proj"):
                if name in getattr(module, d):
                    del getattr(module, d)[name]
        else:
            del module.lora_A[name], module.lora_B[name]
    del ctx.configs[name]


def _owners(model, name: str) -> list[tuple[nn.Module, str]]:
    """(module, path) of every module holding adapter `name`."""
    return [(m, p) for p, m in model.named_modules()
            if (isinstance(m, LinearAdapters) or _is_experts(m)) and name in m.lora_scale]


def _is_lora_name(n: str) -> bool:
    return _ADAPTER_NAME.search(n) is not None


def _adapter_of(n: str) -> str | None:
    """`...q_a_proj.lora_A.<adapter>.weight` / `...experts.lora_B.<adapter>.down_proj` -> adapter name."""
    m = _ADAPTER_NAME.search(n)
    return m.group(1) if m else None


def adapter_parameters(model, name: str) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if _adapter_of(n) == name]


def trainable_adapter(model, name: str | None) -> list[nn.Parameter]:
    """Make only adapter `name`'s tensors trainable (None: the base trainable, every adapter frozen)."""
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
    for module, _ in _owners(model, name):
        if isinstance(module, LinearAdapters):
            _merge_linear(module, name, sign)
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
    for module, _ in _owners(model, name):
        if isinstance(module, LinearAdapters):
            module.dora_merged_norm.pop(name, None)
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
