"""DeepSeekMoE: shared experts + fine-grained routed experts with a sigmoid gate (V3 report section 2.1.2).

Routing, for token t with hidden h_t (all in fp32):
    s_t        = sigmoid(h_t @ gate.weight^T)                                  (E,)
    choice     = s_t + e_score_correction_bias      (the bias changes *selection* only)
    group score= sum of the top-2 `choice` values in each of n_group groups; keep topk_group groups,
                 mask the others with -inf (never 0: a masked expert must never win)
    top-k      = argtopk(choice) among kept groups
    weights    = s_t[top-k] (unbiased), / sum when norm_topk_prob, * routed_scaling_factor
No token is dropped: every token reaches its k experts.

Routed experts are stacked weights (`gate_up_proj` (E, 2I, H), `down_proj` (E, H, I), HF's in-memory layout)
run by `linear.grouped_mm`: token copies are sorted by expert once, then one grouped GEMM per projection computes
every expert's rows (`torch._grouped_mm`; a padded batched matmul where that kernel is unavailable). There
is no Python loop over experts, and token counts per expert are a scatter-add (`expert_counts`). In a compiled
step with at most E token copies (decoding a few rows) each copy instead multiplies its expert's gathered
matrices (`Experts.gathered`): no sort, fixed shapes (eager, copying the matrices measured slower than the grouped
GEMM; reading each copy's expert in place with `.item()` measured within noise of both, ±6 %). On disk the
experts are per-expert HF keys (see checkpoint.py). Under expert parallelism (`Experts.ep` set, see
expert_parallel.py) a rank holds E/N of them and tokens are dispatched to them.

Balancing: the forward returns the per-expert load (token count) of the step as data; the model applies the
auxiliary-loss-free update `b_i += gamma * sign(mean_load - load_i)` from it. The balance loss is either the
complementary sequence-wise loss (aux_free) L = alpha * sum_i f_i P_i per sequence, or the classic batch-wise
switch-transformer loss on softmax probabilities (aux_loss), or nothing (none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..fp8 import FP8, PLAIN, SCALE_INV, Precision
from .layers import SwiGLU, activation
from .linear import (
    ExpertAdapters,
    LinearAdapters,
    apply_keeping_dtype,
    expert_delta,
    fp8_base_names,
    grouped_mm,
    recomputed,
)

EXPERT_PROJS = ("gate_up_proj", "down_proj")  # the stacked expert weights


def expert_counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    """How many entries of idx (any shape) name each of n experts: (n,) int64. A scatter-add, not `bincount`:
    its output shape does not depend on the data, so a compiled step does not break its graph here (bincount's
    did, and the break inside a context manager sent whole decode frames back to eager)."""
    flat = idx.flatten()
    return torch.zeros(n, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))


class Gate(nn.Module, LinearAdapters):
    """The router (HF `mlp.gate`): weight (E, H), fp32 bias buffer `e_score_correction_bias` (E,); it can carry a
    LoRA on its weight (peft's all-linear targets `mlp.gate.weight`; see linear.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.init_adapters()

    def _apply(self, fn, recurse=True):
        """Moves/casts like any module, except that the routing bias stays fp32 (0.001 steps need it)."""
        return apply_keeping_dtype(self, super()._apply, fn, recurse, ["e_score_correction_bias"])

    def forward(self, x: torch.Tensor):
        """x (N, H) -> logits (N, E) fp32, scores (N, E) fp32, top-k indices (N, K), weights (N, K) fp32."""
        logits = F.linear(x.float(), self.weight.float())
        d = self.lora_delta(x)  # an adapter on the router, if one is active
        if d is not None:
            logits = logits + d.float()
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        N, E, G = choice.shape[0], self.n_experts, self.n_group
        group_scores = choice.view(N, G, E // G).topk(2, dim=-1).values.sum(-1)  # (N, G)
        keep = group_scores.topk(self.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, scores, idx, weights * self.scaling


class Experts(nn.Module, ExpertAdapters):
    """Stacked routed experts (HF `mlp.experts`): gate_up_proj (E, 2I, H), down_proj (E, H, I).

    LoRA (linear.ExpertAdapters): `lora_A[adapter][proj]` (E, r, in), `lora_B[adapter][proj]` (E, out, r) per
    projection, applied on the sorted token copies with the same grouped GEMM. `precision` (fp8.py, set per model by
    `Model.set_precision`) runs the two base grouped GEMMs (FP8 or plain); the LoRA terms stay plain. After
    `precision.quantize_base` a stack is frozen float8_e4m3fn blocks with `<proj>_scale_inv` (E, n, k) scales.
    Under "fp8" training `hidden` (gather, gate_up GEMM, SwiGLU) is recomputed in backward (`Precision.recomputing`).
    """

    precision: Precision = PLAIN

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.act = activation(cfg.hidden_act)
        self.init_adapters()  # LoRA: lora_A / lora_B / lora_scale per adapter and projection (linear.py)
        self.ep = None  # an expert_parallel.ExpertGroup when this rank holds a shard of the experts

    def _apply(self, fn, recurse=True):  # an FP8 base moves but is never cast
        return apply_keeping_dtype(self, super()._apply, fn, recurse, fp8_base_names(self))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, H), idx/weights (N, K) -> sum_k weights[:, k] * expert_idx[:, k](x)   (N, H)."""
        if self.ep is not None:  # expert parallel: this rank holds experts [lo, hi) only
            self.ep.check_adapters(self)  # LoRA factors sliced as the experts; one adapter per forward
            return self.ep.dispatch_combine(x, idx, weights, self.gate_up_proj.shape[0], self.grouped)
        N, K = idx.shape
        if torch.compiler.is_compiling() and N * K <= self.gate_up_proj.shape[0] and not self.lora_A \
                and not self.precision.fp8 and self.gate_up_proj.dtype != FP8:
            return self.gathered(x, idx, weights)  # a compiled decode step: fixed shapes, no bincount
        flat = idx.flatten()  # (N*K,) expert of each token copy
        order = flat.argsort(stable=True)
        return self.grouped(x, flat, order, order // K, weights.flatten(), N)

    def gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each token copy multiplies its own expert's matrices, gathered: x (N, H), idx/weights (N, K) -> (N, H).

        No sort, bincount or scatter, and every shape is fixed (a compiled decode step needs that); it copies
        N*K expert matrices, so it is used only while that is at most E (batch-1 decoding copies K of them)."""
        h = (self.gate_up_proj[idx] @ x[:, None, :, None])[..., 0]  # (N, K, 2I, H) @ (N, 1, H, 1) -> (N, K, 2I)
        gate, up = h.chunk(2, dim=-1)
        a = self.act(gate) * up  # (N, K, I)
        y = (self.down_proj[idx] @ a[..., None])[..., 0]  # (N, K, H)
        return (y * weights[..., None]).sum(1).to(x.dtype)

    def grouped(self, x, flat, order, token, w, N):
        """The held experts on token copies: x (N, H) rows, flat (C,) expert of each copy, order (C,) sorts them
        by expert, token (C,) row of each sorted copy, w (C,) weight of each copy -> (N, H) weighted sums."""
        offs = expert_counts(flat, self.gate_up_proj.shape[0]).cumsum(0).to(torch.int32)
        if self.precision.recomputing():  # fp8: keep x only (the router keeps it too), re-run in backward
            a = recomputed(self.hidden, self.lora_ctx, x, flat, order, token, offs, N)
        else:
            a = self.hidden(x, flat, order, token, offs, N)  # (N*K, I)
        y = self._base(a, "down_proj", offs)  # (N*K, H)
        y = self._lora(y, "down_proj", a, flat, order, token, offs, N)
        y = y * w[order, None]
        return torch.zeros(N, x.shape[1], device=x.device, dtype=y.dtype).index_add_(0, token, y).to(x.dtype)

    def hidden(self, x, flat, order, token, offs, N):
        """act(gate) * up of every sorted token copy: x (N, H) rows -> (N*K, I)."""
        xs = x[token]  # (N*K, H) token copies sorted by expert
        h = self._base(xs, "gate_up_proj", offs)  # (N*K, 2I)
        h = self._lora(h, "gate_up_proj", xs, flat, order, token, offs, N)
        gate, up = h.chunk(2, dim=-1)
        return self.act(gate) * up

    def _base(self, x: torch.Tensor, proj: str, offs: torch.Tensor) -> torch.Tensor:
        """x (M, in) sorted copies times each expert's base matrix `proj` (E, out, in), under the recipe."""
        w = getattr(self, proj).transpose(1, 2)  # (E, in, out)
        if w.dtype == FP8:  # a frozen FP8 base (precision.quantize_base): blocks + their scales, transposed alike
            s = getattr(self, proj + SCALE_INV).transpose(1, 2)
            return self.precision.frozen_grouped(x, w, s, offs, grouped_mm)
        return self.precision.grouped(x, w, offs, grouped_mm)

    def _lora(self, y, proj, xs, flat, order, token, offs, N):
        """y (N*K, out) + the active adapter's term for `proj` (y itself without one)."""
        if self.lora_ctx is None:
            return y
        d = expert_delta(self, proj, xs, flat[order], token, offs, N)
        return y if d is None else y + d


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        if cfg.n_shared_experts:
            self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                         cfg.hidden_act)

    def forward(self, x: torch.Tensor, want_loss: bool = False):
        """x (B, T, H) -> y (B, T, H), load (E,) token counts, balance loss (scalar or None)."""
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        logits, scores, idx, weights = self.gate(flat)
        y = self.experts(flat, idx, weights).view(B, T, H)
        if self.cfg.n_shared_experts:
            y = y + self.shared_experts(x)
        load = expert_counts(idx, self.gate.n_experts).detach()
        loss = self.balance_loss(logits, scores, idx, B, T) if want_loss else None
        return y, load, loss

    def balance_loss(self, logits, scores, idx, B, T):
        mode, alpha = self.cfg.router_balance, self.cfg.aux_loss_alpha
        if mode == "none" or alpha == 0:
            return None
        E, K = self.gate.n_experts, self.gate.top_k
        chosen = torch.zeros_like(scores).scatter_(1, idx, 1.0)  # (N, E) 1[i in topk(t)]
        if mode == "aux_free":  # complementary sequence-wise loss, averaged over sequences
            f = chosen.view(B, T, E).sum(1) * (E / (K * T))  # (B, E)
            p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # (B, E)
            return alpha * (f * p).sum(-1).mean()
        f = chosen.mean(0) * (E / K)  # batch-wise switch-transformer loss
        p = logits.softmax(-1).mean(0)
        return alpha * (f * p).sum()
