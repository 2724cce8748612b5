"""The one linear type, its LoRA-family adapters, and the grouped expert matmul: the seam FP8 and LoRA plug into.

What. Every projection of the model is a `Linear` (an `nn.Linear`: parameter names `weight`, `bias`, as in Hugging
Face) whose forward is

    y = base_forward(x) + lora_delta(x)

`base_forward` is chosen by the model's precision recipe (`fp8.Precision`, set by `Model.set_precision`): the
plain matmul, fine-grained FP8, or a frozen FP8 base (`precision.quantize_base`: `weight` float8_e4m3fn (N, K) plus
the buffer `weight_scale_inv` (ceil(N/128), ceil(K/128)), DeepSeek's release names). The routed experts run
`grouped_mm` (sorted token copies times per-expert matrices) under the same recipe, and `ExpertAdapters` adds
their LoRA term with the same grouped GEMM. The MoE router (`moe.Gate`) carries `LinearAdapters` too.

Adapter state. A module holds named adapters *beside* its base weight under PEFT-like names
(`q_a_proj.lora_A.<adapter>.weight`, `.lora_magnitude_vector.<adapter>.weight`, `.vera_lambda_b.<adapter>.weight`,
`experts.lora_A.<adapter>.gate_up_proj`), so base names never change; `drop_lora_from_state_dict` keeps them out of
the base state dict. Which adapter a forward runs is read from one `LoraContext` owned by the model and set by
`Model.forward` for its duration: no module signature changes, and the MLA absorbed path, the MoE path, the MTP
modules and `generate` all see it. Per adapter: LoRA lora_A (r, in), lora_B (out, r), scale gamma; DoRA adds
lora_magnitude_vector (out,); VeRA has vera_lambda_d (r,), vera_lambda_b (out,) and its sliced shared pair. Every
variant has an exact LoRA form (`lora_weights`), used by the per-row path, the absorbed MLA path and merge.
Creating adapters (targets, init, validation), merging and PEFT I/O live above the model, in lora.py / lora_io.py;
they call the `add_*` / `remove_adapter` methods here.

Per-row (multi-tenant) path, the same code fine-tuning runs:
  * linears (Punica BGMV): the adapters are stacked per module, ranks zero-padded to the largest (exact: padded
    rows/columns contribute 0), plus an all-zero slot for base rows; each row gathers its A (B, r, in),
    B (B, out, r) and two batched matmuls give the delta. No loop over rows or adapters. A DoRA adapter in the mix
    raises the padded rank to r + out for that module (exact, slower).
  * routed experts (SGMV): every sorted token copy gets the group slot * E + expert, and `grouped_mm` runs over
    (slot, expert) groups with the stacked (S+1)*E factors.
  * stacks are built once per forward, or kept across forwards in `LoraContext.stack_cache` when the owner (the
    serving engine) enables it; adding, deleting or merging an adapter empties that cache (`LoraContext.changed`).
    Not kept by default: while an adapter trains its weights change every step and the stacks carry autograd.

Why here: the model is built from these modules, so they sit in model/ and import nothing above it.
Rejected: wrapping each linear in a LoraLayer module (PEFT's way): it renames the base weight to
`base_layer.weight`, which breaks checkpoint names and the FP8 in-place recipe; a second FP8 linear class (FP8 is a
recipe: parameter names, checkpoints and LoRA stay the same); a Python loop over experts or adapters per row.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from ..fp8 import FP8, PLAIN, SCALE_INV, Precision
from ..lora_config import LoraConfig, VeraConfig
from ..lora_variants import dora_as_lora, dora_scale

ADAPTER_DICTS = ("lora_A", "lora_B", "lora_magnitude_vector", "vera_lambda_d", "vera_lambda_b")
_ADAPTER_NAME = re.compile(r"\.(?:" + "|".join(ADAPTER_DICTS) + r")\.([^.]+)")


# ---------------------------------------------------------------------------------------------- grouped matmul
def _native_grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    # both kernels need 16-byte aligned rows: K and N a multiple of 4 (fp32) or 8 (bf16) elements
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9  # sm90+


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x sorted by group times each group's matrix.

    x (M, K) with rows of group e in [offs[e-1], offs[e]); w (E, K, N); offs (E,) int32 cumulative ends.
    Returns (M, N). This is the one grouped-matmul entry point that FP8 and LoRA extend.
    """
    if not _native_grouped_ok(x, w):
        return _padded_grouped_mm(x, w, offs)
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return torch.ops.nanoseek.grouped_mm(x, w, offs)  # Inductor lowers bf16 only: keep ATen's kernel
    return torch._grouped_mm(x, w, offs=offs)


# Inductor's lowering of `_grouped_mm` takes bf16 only, and the padded fallback sizes its buffer by the largest
# group (`int(counts.max())`: a host sync and a graph break per MoE layer). Under compile an fp32 grouped GEMM
# is this opaque op instead: ATen's own kernel (the one eager runs), shape known to the compiler, its backward
# two more of them (dx = g W^T per group, dW_e = x_e^T g_e).
@torch.library.custom_op("nanoseek::grouped_mm", mutates_args=(), schema="(Tensor x, Tensor w, Tensor offs) -> Tensor")
def _grouped_mm_op(x, w, offs):
    return torch._grouped_mm(x, w, offs=offs)


@torch.library.custom_op("nanoseek::grouped_mm_wgrad", mutates_args=(),
                         schema="(Tensor x, Tensor g, Tensor offs) -> Tensor")
def _grouped_wgrad_op(x, g, offs):
    return torch._grouped_mm(x.t(), g, offs=offs)  # (E, K, N): each group's x_e^T g_e


@_grouped_mm_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@_grouped_wgrad_op.register_fake
def _(x, g, offs):
    return x.new_empty(offs.shape[0], x.shape[1], g.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, g):
    x, w, offs = ctx.saved_tensors
    g = g.contiguous()  # autograd may hand an expanded gradient; the kernel wants real strides
    dx = torch.ops.nanoseek.grouped_mm(g, w.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None
    dw = torch.ops.nanoseek.grouped_mm_wgrad(x, g, offs) if ctx.needs_input_grad[1] else None
    return dx, dw, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _padded_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Fallback: scatter rows into an (E, C, K) buffer (C = largest group), one bmm, gather back."""
    E = w.shape[0]
    offs = offs.long()
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    group = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # (M,)
    slot = torch.arange(x.shape[0], device=x.device) - (offs - counts)[group]  # row within its group
    C = int(counts.max()) if x.shape[0] else 0
    buf = x.new_zeros(E, C, x.shape[1])
    buf[group, slot] = x
    return torch.bmm(buf, w)[group, slot]


def recomputed(fn, lora_ctx, *args) -> torch.Tensor:
    """fn(*args) under activation checkpointing (only the inputs are kept; fn re-runs in backward with the
    forward's RNG state and adapter state: LoraContext.replay)."""
    context_fn = noop_context_fn if lora_ctx is None else lora_ctx.replay
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)


# ---------------------------------------------------------------------------------------------- context
class LoraContext:
    """The adapters of one Model and which of them the current forward runs.

    `configs` maps adapter name -> LoraConfig (creation order). During a forward either `adapter` (one name
    for every row) or `rows` (B,) long + `names` (per-row slots; slot len(names) is the all-zero base slot) is
    set. Stacked per-row factors are cached per module for that forward only.
    """

    def __init__(self):
        self.configs: dict[str, LoraConfig | VeraConfig] = {}
        self.merged: str | None = None
        self.adapter: str | None = None
        self.names: list[str] | None = None
        self.rows: torch.Tensor | None = None  # (B,) slot of each row, base rows = len(names)
        self._stacks: dict = {}
        # Set by a serving engine: stacks kept across forwards, per adapter-name tuple; its owner clears it
        # whenever adapters are loaded, deleted or changed (None: rebuilt every forward).
        self.stack_cache: dict | None = None

    def changed(self) -> None:
        """Adapters were added, deleted, merged or overwritten: stacks kept across forwards are stale."""
        if self.stack_cache is not None:
            self.stack_cache.clear()

    @contextmanager
    def use(self, adapter, adapter_names=None, batch_size: int | None = None):
        """Activate `adapter` (None, a name, or a (B,) index tensor) for the body of the `with`; the previous
        state comes back afterwards (a forward may run inside another one, e.g. a draft model's)."""
        state = self._resolve(adapter, adapter_names, batch_size)  # (adapter, names, rows)
        names = state[1]
        keep = self.stack_cache is not None and names is not None
        with self._entered(state, self.stack_cache.setdefault(tuple(names), {}) if keep else {}):
            yield

    def replay(self):
        """context_fn for activation checkpointing (`recomputed`): nothing around the forward; around the
        recomputation in backward, which runs after Model.forward has left `use`, this forward's adapter state
        again (with fresh per-forward stacks, as the forward built them)."""
        return nullcontext(), self._entered((self.adapter, self.names, self.rows), {})

    @contextmanager
    def _entered(self, state, stacks: dict):
        """(adapter, names, rows) and the stacks for the body of the `with`; the previous state afterwards."""
        saved = self.adapter, self.names, self.rows, self._stacks
        (self.adapter, self.names, self.rows), self._stacks = state, stacks
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


# ---------------------------------------------------------------------------------------------- linear
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
    """Mixin: named adapters on a module's 2-D `weight` (out, in), read from `lora_ctx` (Linear, moe.Gate).

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

    def add_lora(self, ctx: LoraContext, name: str, A: torch.Tensor, B: torch.Tensor, scale: float,
                 dropout: float, magnitude: torch.Tensor | None = None) -> None:
        """Hold LoRA adapter `name`: A (r, in), B (out, r), gamma = scale; DoRA with `magnitude` (out,)."""
        self.lora_ctx = ctx
        self.lora_A[name], self.lora_B[name] = LoraWeight(A), LoraWeight(B)
        if magnitude is not None:
            self.lora_magnitude_vector[name] = LoraWeight(magnitude)
        self.lora_scale[name], self.lora_dropout[name] = scale, dropout

    def add_vera(self, ctx: LoraContext, name: str, d: torch.Tensor, b: torch.Tensor, vera_A: torch.Tensor,
                 vera_B: torch.Tensor, dropout: float) -> None:
        """Hold VeRA adapter `name`: lambda_d (r,), lambda_b (out,) on the shared pair vera_A (r, >= in),
        vera_B (>= out, r), sliced to this layer's shape."""
        out, inp = self.weight.shape
        self.lora_ctx = ctx
        self.vera_lambda_d[name], self.vera_lambda_b[name] = LoraWeight(d), LoraWeight(b)
        self.vera_proj[name] = VeraProjection(vera_A[:, :inp].contiguous(), vera_B[:out].contiguous())
        self.lora_scale[name], self.lora_dropout[name] = 1.0, dropout

    def remove_adapter(self, name: str) -> None:
        del self.lora_scale[name], self.lora_dropout[name]
        self.dora_merged_norm.pop(name, None)
        for d in (*ADAPTER_DICTS, "vera_proj"):
            if name in getattr(self, d):
                del getattr(self, d)[name]

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


def apply_keeping_dtype(module: nn.Module, apply, fn, recurse: bool, names) -> nn.Module:
    """`nn.Module._apply` (`apply`) under which the parameters / buffers `names` of `module` follow what `fn` does
    to tensors except a cast: the router's fp32 bias (0.001 steps), a frozen FP8 base (fp8 blocks + fp32
    `*_scale_inv`, which `model.to(torch.bfloat16)` would otherwise turn into unscaled numbers)."""
    kept = {n: (module._parameters if n in module._parameters else module._buffers).pop(n) for n in names}
    try:
        apply(fn, recurse)
    finally:
        for n, t in kept.items():
            probe = fn(t[:0])  # what fn makes of t (device, dtype), from an empty slice: no copy
            moved = fn(t) if probe.dtype == t.dtype else t.to(device=probe.device)
            if isinstance(t, nn.Parameter):
                module._parameters[n] = nn.Parameter(moved, requires_grad=t.requires_grad)
            else:
                module._buffers[n] = moved
    return module


def fp8_base_names(module: nn.Module) -> list[str]:
    """The frozen FP8 base weights of `module` (precision.quantize_base) and their scale buffers."""
    weights = [n for n, p in module._parameters.items() if p is not None and p.dtype == FP8]
    return weights + [n + SCALE_INV for n in weights if n + SCALE_INV in module._buffers]


class Linear(nn.Linear, LinearAdapters):
    """The projection type: y = base_forward(x) + the active adapter's term.

    `precision` (a `fp8.Precision`, set per model by `Model.set_precision`) chooses the base product; with the plain
    recipe and no adapter active this is exactly nn.Linear (same parameters, same state dict).
    """

    precision: Precision = PLAIN

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.init_adapters()

    def _apply(self, fn, recurse=True):  # an FP8 base moves but is never cast
        return apply_keeping_dtype(self, super()._apply, fn, recurse, fp8_base_names(self))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b under the precision recipe (LoRA then adds its term in the input's precision)."""
        if self.weight.dtype == FP8:  # a frozen FP8 base (precision.quantize_base)
            return self.precision.frozen_linear(x, self.weight, self.weight_scale_inv, self.bias)
        return self.precision.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        d = self.lora_delta(x, y)
        return y if d is None else y + d


def linear(in_features: int, out_features: int, bias: bool = False) -> Linear:
    return Linear(in_features, out_features, bias=bias)


# ---------------------------------------------------------------------------------------------- experts
class ExpertAdapters:
    """Mixin: named adapters on stacked expert weights (moe.Experts): `lora_A[adapter][proj]` (E, r, in),
    `lora_B[adapter][proj]` (E, out, r), `lora_scale[adapter][proj]` gamma, per projection."""

    def init_adapters(self) -> None:
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()  # adapter -> {proj: factor}
        self.lora_scale: dict[str, dict[str, float]] = {}
        self.lora_ctx: LoraContext | None = None

    def add_lora(self, ctx: LoraContext, name: str, proj: str, A: torch.Tensor, B: torch.Tensor,
                 scale: float) -> None:
        """Hold adapter `name` on expert projection `proj`: A (E, r, in), B (E, out, r), gamma = scale."""
        self.lora_ctx = ctx
        if name not in self.lora_A:
            self.lora_A[name], self.lora_B[name] = nn.ParameterDict(), nn.ParameterDict()
            self.lora_scale[name] = {}
        self.lora_A[name][proj] = nn.Parameter(A, requires_grad=False)
        self.lora_B[name][proj] = nn.Parameter(B, requires_grad=False)
        self.lora_scale[name][proj] = scale

    def remove_adapter(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.lora_scale[name]


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


# ---------------------------------------------------------------------------------------------- state dict
def is_lora_name(n: str) -> bool:
    """Whether parameter / state-dict name `n` is an adapter tensor."""
    return _ADAPTER_NAME.search(n) is not None


def adapter_of(n: str) -> str | None:
    """`...q_a_proj.lora_A.<adapter>.weight` / `...experts.lora_B.<adapter>.down_proj` -> adapter name."""
    m = _ADAPTER_NAME.search(n)
    return m.group(1) if m else None


def drop_lora_from_state_dict(module, state_dict, prefix, local_metadata) -> None:
    """state-dict hook: adapters are saved with save_adapter, never in the base checkpoint."""
    for k in [k for k in state_dict if k.startswith(prefix) and is_lora_name(k)]:
        del state_dict[k]


def ignore_missing_lora(module, incompatible_keys) -> None:
    """load_state_dict post-hook: a base state dict has no adapter keys, and that is not an error."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not is_lora_name(k)]
