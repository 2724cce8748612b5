"""Expert parallelism, model side: each rank of an expert group holds E/N routed experts; tokens travel.

What. `ExpertGroup` is one rank's view of an expert-parallel group of N ranks (a torch.distributed process
group). Rank r holds the routed experts [r*E/N, (r+1)*E/N). `dispatch_combine` runs one MoE layer's routed
experts for this rank's tokens:
    1. destination rank of each token copy: d = expert // (E/N); one row per (token, destination rank):
       a token routed to several experts of one rank is sent ONCE (with its K local-expert slots and weights)
    2. rows sorted by destination, counts exchanged (all_to_all_single of N ints), then the activations
       (N_send, H), the routing weights (N_send, K) and the local expert ids (N_send, K) with
       all_to_all_single and variable splits
    3. the receiving rank expands its rows into token copies, runs its local grouped experts (the same
       grouped GEMM as one process) and sums each row's copies times their weights: one (H,) row back
    4. results sent back with the reverse splits and added into the source tokens.
Activations and weights go through `torch.distributed.nn.functional.all_to_all_single`, whose backward is the
reverse all-to-all, so gradients flow to the token activations, to the router weights and (locally) to the
experts. No token is ever dropped (no capacity factor).

Node-limited routing (V3 report section 2.1.2) bounds traffic because experts are laid out contiguously:
group g = experts [g*E/G, (g+1)*E/G). With N = G ranks (one "node" per rank) a token reaches at most
`topk_group` ranks; with N = m*G, at most topk_group*m ranks on topk_group nodes of m ranks. `stats` counts
what the real collectives moved (split sizes), so the benchmark measures, not models, the bytes.

LoRA on routed experts. An adapter's per-expert factors A (E, r, in), B (E, out, r) are sharded exactly as the
expert weights: `shard_experts` slices every adapter attached before it (so a fresh adapter has the draws of one
process), and the receiving rank's grouped experts run the adapter's grouped GEMMs on its E/N local experts.
The factors' gradients, like the experts', hold every token of the group. `full_adapter_view` gathers the
factors for the body of a `with` (save_adapter then writes the one-process file; load_adapter / add_adapter /
copy_adapter_weights_ see E experts) and slices them back on exit, new adapters included; outside it, an adapter
attached to a sharded model is refused at the forward (its factors were not sharded from the full set).
Per-row (multi-tenant) adapters on experts are refused under expert parallelism: received rows carry no slot.

Why this shape. The model only needs `Experts.ep` set (see `shard_experts`); with it unset nothing changes
(single-process path bit-identical). The dense parts stay replicated; train/expert_parallel.py averages
their gradients and the experts' (over the data-parallel replicas) and gathers/scatters checkpoints.
Rejected: sending one copy per (token, expert) (K x the bytes when a token picks several experts of a rank);
weighting on the source rank (needs per-copy results back: K x the return traffic); token dropping with a
capacity factor (changes the math vs one process).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from ..fp8 import SCALE_INV
from .moe import EXPERT_PROJS, Experts


@dataclass
class DispatchStats:
    """What the dispatch collectives moved, summed over MoE layer calls (forward only) since reset()."""

    calls: int = 0  # MoE layer forwards
    tokens: int = 0  # tokens routed by this rank
    copies: int = 0  # token copies (tokens * K): what a non-deduplicating dispatch would send
    copies_remote: int = 0  # copies whose expert is on another rank
    rows: int = 0  # rows actually sent (one per token and destination rank), self included
    rows_remote: int = 0  # rows sent to other ranks
    bytes_remote: int = 0  # activation bytes sent to other ranks (rows_remote * H * element size)
    max_destinations: int = 0  # most ranks one token was sent to

    def reset(self) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, 0)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class ExpertGroup:
    """This rank's place in an expert-parallel group: `size` ranks, `rank` within it, its process group."""

    size: int
    rank: int
    group: tdist.ProcessGroup | None = None
    stats: DispatchStats = field(default_factory=DispatchStats)
    shards: dict = field(default_factory=dict)  # id -> weakref of every adapter factor sliced for this group
    full_view: bool = False  # inside full_adapter_view: factors hold all E experts, no forward allowed

    def local_experts(self, n_experts: int) -> tuple[int, int]:
        """[lo, hi) global ids of the routed experts this rank holds."""
        per = n_experts // self.size
        return self.rank * per, (self.rank + 1) * per

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's (E/N, ...) slice -> the group's (E, ...) tensor (all_gather over the group, no grad)."""
        parts = [torch.empty_like(t) for _ in range(self.size)]
        tdist.all_gather(parts, t.detach().contiguous(), group=self.group)
        return torch.cat(parts)

    def mark_sharded(self, p: nn.Parameter) -> nn.Parameter:
        self.shards[id(p)] = weakref.ref(p)
        return p

    def is_shard(self, p: torch.Tensor) -> bool:
        ref = self.shards.get(id(p))
        return ref is not None and ref() is p

    def check_adapters(self, experts: Experts) -> None:
        """ValueError for what the dispatched forward cannot run: a full view, an adapter whose expert factors
        were not sliced for this group, per-row adapters."""
        if self.full_view:
            raise ValueError("no forward inside full_adapter_view (the expert weights are stand-ins there)")
        for name, pd in experts.lora_A.items():
            if not all(self.is_shard(p) for p in (*pd.values(), *experts.lora_B[name].values())):
                raise ValueError(f"adapter {name!r} was put on the routed experts of a model sharded for expert "
                                 "parallelism: add or load it before shard_experts, or inside "
                                 "full_adapter_view, so its per-expert factors are sliced from all E experts")
        if len(experts.lora_A) and experts.lora_ctx is not None and experts.lora_ctx.rows is not None:
            raise ValueError("per-row adapters on routed experts are not supported with expert parallelism (the "
                             "rows a rank receives from other ranks carry no adapter slot); use one adapter")

    def dispatch_combine(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n_local: int,
                         local_fn: Callable) -> torch.Tensor:
        """x (N, H), idx/weights (N, K) global expert ids and routing weights -> (N, H) routed-expert output.

        local_fn(rows (M, H), expert (C,), order (C,), row_of_sorted_copy (C,), weight (C,), M) -> (M, H): this
        rank's grouped experts on C token copies (expert = local id, unsorted; order sorts them by expert).
        """
        N, K = idx.shape
        R = self.size
        dest = idx // n_local  # (N, K) destination rank of each copy
        pair = torch.zeros(N, R, dtype=torch.bool, device=idx.device).scatter_(1, dest, True)  # (N, R)
        dst, tok = pair.t().nonzero(as_tuple=True)  # (S,) rows sorted by destination rank, then token
        hit = dest[tok] == dst[:, None]  # (S, K) which of the token's copies go to that rank
        send_e = torch.where(hit, idx[tok] % n_local, -1)  # (S, K) local expert id, -1 = elsewhere
        send_w = weights[tok] * hit  # (S, K) routing weights (0 where elsewhere)
        send_counts = pair.sum(0)  # (R,)
        recv_counts = torch.empty_like(send_counts)
        tdist.all_to_all_single(recv_counts, send_counts, group=self.group)
        per_token = torch.cat([pair.sum(1), send_counts.new_zeros(1)])  # (N+1,) destinations of each token
        host = torch.cat([send_counts, recv_counts, (dest != self.rank).sum().view(1), per_token.max().view(1)])
        host = host.tolist()  # the one device -> host sync: split sizes and statistics together
        s_split, r_split = host[:R], host[R:2 * R]
        self._count(N, K, x.shape[1] * x.element_size(), s_split, host[-2], host[-1])
        M = sum(r_split)
        rx = all_to_all_single(x.new_empty(M, x.shape[1]), x[tok].contiguous(), r_split, s_split, self.group)
        rw = all_to_all_single(send_w.new_empty(M, K), send_w.contiguous(), r_split, s_split, self.group)
        re = torch.empty(M, K, dtype=send_e.dtype, device=send_e.device)
        tdist.all_to_all_single(re, send_e.contiguous(), r_split, s_split, group=self.group)
        row, k = (re >= 0).nonzero(as_tuple=True)  # (C,) token copies held here, row-major
        expert = re[row, k]  # (C,) local expert of each copy
        order = expert.argsort(stable=True)
        y = local_fn(rx, expert, order, row[order], rw[row, k], M)  # (M, H) weighted sum per received row
        back = all_to_all_single(y.new_empty(len(tok), y.shape[1]), y, s_split, r_split, self.group)  # (S, H)
        return torch.zeros(N, back.shape[1], dtype=back.dtype, device=back.device).index_add_(0, tok, back)

    def _count(self, n_tokens, K, row_bytes, s_split, copies_remote, max_dest) -> None:
        st = self.stats
        remote_rows = sum(s_split) - s_split[self.rank]
        st.calls += 1
        st.tokens += n_tokens
        st.copies += n_tokens * K
        st.copies_remote += copies_remote
        st.rows += sum(s_split)
        st.rows_remote += remote_rows
        st.bytes_remote += remote_rows * row_bytes
        st.max_destinations = max(st.max_destinations, max_dest)


def check_divisible(n_experts: int, size: int) -> None:
    """ValueError unless `size` ranks can split `n_experts` routed experts evenly."""
    if size < 1 or n_experts % size:
        raise ValueError(f"expert parallelism over {size} ranks needs n_routed_experts ({n_experts}) to be "
                         f"divisible by {size}")


def _factors(m: Experts) -> Iterator[tuple[nn.ParameterDict, str]]:
    """(ParameterDict, projection) of every LoRA factor on these experts: lora_A[adapter][proj], lora_B[...]."""
    for d in (m.lora_A, m.lora_B):
        for pd in d.values():
            for proj in list(pd):
                yield pd, proj


def _groups(model: nn.Module) -> list[Experts]:
    return [m for m in model.modules() if isinstance(m, Experts) and m.ep is not None]


def shard_experts(model: nn.Module, ep: ExpertGroup) -> None:
    """Keep only this rank's routed experts in every MoE layer (new, smaller Parameters) and set `.ep`; the
    LoRA factors already on the experts are sliced the same way. Call before building the optimizer."""
    for m in model.modules():
        if not isinstance(m, Experts):
            continue
        check_divisible(m.gate_up_proj.shape[0], ep.size)
        lo, hi = ep.local_experts(m.gate_up_proj.shape[0])
        for proj in EXPERT_PROJS:  # (E/N, ...) slices; frozen stays frozen (LoRA runs)
            full = getattr(m, proj)
            setattr(m, proj, torch.nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
            if proj + SCALE_INV in m._buffers:  # a frozen FP8 base (precision.quantize_base): its block scales
                m._buffers[proj + SCALE_INV] = m._buffers[proj + SCALE_INV][lo:hi].clone()
        for pd, proj in _factors(m):  # A (E/N, r, in), B (E/N, out, r)
            full = pd[proj]
            pd[proj] = ep.mark_sharded(nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        m.ep = ep


@contextmanager
def full_adapter_view(model: nn.Module) -> Iterator[None]:
    """For the body: every routed-expert LoRA factor of the sharded `model` holds all E experts (all-gathered),
    and the expert weights read as (E, ...) stand-ins (a stride-0 view: no memory), so lora.py / lora_io.py
    act as on one process (save_adapter, load_adapter, add_adapter, copy_adapter_weights_). On exit every
    factor is sliced back: existing shards in place (an optimizer keeps pointing at them), new adapters as new
    sharded Parameters. Collective: every rank of the group enters it, with the same adapters. No forward inside.
    """
    saved = []  # (experts, {proj: base shard}, {(id(pd), proj): (pd, factor shard)})
    try:
        for m in _groups(model):
            ep, n = m.ep, m.gate_up_proj.shape[0]
            base = {proj: m._parameters[proj] for proj in EXPERT_PROJS}
            shards = {(id(pd), proj): (pd, pd[proj]) for pd, proj in _factors(m)}
            saved.append((m, base, shards))
            for pd, proj in _factors(m):
                p = pd[proj]
                pd[proj] = nn.Parameter(ep.gather(p), requires_grad=p.requires_grad)  # (E, r, in) / (E, out, r)
            for proj, w in base.items():
                m._parameters[proj] = nn.Parameter(w.detach()[:1].expand(n * ep.size, *w.shape[1:]),
                                                   requires_grad=False)
            ep.full_view = True
        yield
    finally:
        for m, base, shards in saved:
            _slice_back(m, base, shards)


@torch.no_grad()
def _slice_back(m: Experts, base: dict, shards: dict) -> None:
    ep = m.ep
    lo, hi = ep.local_experts(base["gate_up_proj"].shape[0] * ep.size)
    for pd, proj in _factors(m):
        full = pd[proj]
        _, shard = shards.get((id(pd), proj), (None, None))
        if full is shard:  # never gathered (an error while entering the view)
            continue
        if shard is None or shard.shape != full[lo:hi].shape:
            shard = ep.mark_sharded(nn.Parameter(full.detach()[lo:hi].clone()))
        else:
            shard.copy_(full[lo:hi])
        pd[proj] = shard.requires_grad_(full.requires_grad)
    m._parameters.update(base)
    ep.full_view = False
