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

Why this shape. The model only needs `Experts.ep` set (see `shard_experts`); with it unset nothing changes
(single-process path bit-identical). The dense parts stay replicated; train/expert_parallel.py averages
their gradients and the experts' (over the data-parallel replicas) and gathers/scatters checkpoints.
Rejected: sending one copy per (token, expert) (K x the bytes when a token picks several experts of a rank);
weighting on the source rank (needs per-copy results back: K x the return traffic); token dropping with a
capacity factor (changes the math vs one process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch.distributed.nn.functional import all_to_all_single

from .moe import Experts


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

    def local_experts(self, n_experts: int) -> tuple[int, int]:
        """[lo, hi) global ids of the routed experts this rank holds."""
        per = n_experts // self.size
        return self.rank * per, (self.rank + 1) * per

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


def shard_experts(model: torch.nn.Module, ep: ExpertGroup) -> None:
    """Keep only this rank's routed experts in every MoE layer (new, smaller Parameters) and set `.ep`.

    Call before building the optimizer. LoRA factors on experts are not sharded: refused here.
    """
    for name, m in model.named_modules():
        if not isinstance(m, Experts):
            continue
        if len(m.lora_A):
            raise ValueError(f"{name}: LoRA adapters on routed experts are not supported with expert parallelism "
                             "(their per-expert A/B would need sharding); target the other modules, or train "
                             "without --expert-parallel")
        check_divisible(m.gate_up_proj.shape[0], ep.size)
        lo, hi = ep.local_experts(m.gate_up_proj.shape[0])
        for proj in ("gate_up_proj", "down_proj"):  # (E/N, ...) slices; frozen stays frozen (LoRA runs)
            full = getattr(m, proj)
            setattr(m, proj, torch.nn.Parameter(full.detach()[lo:hi].clone(), requires_grad=full.requires_grad))
        m.ep = ep
