"""Dispatch/combine on 2 gloo processes equals the 1-process MoE layer: output, input and router gradients, and
the expert gradients summed over both ranks' tokens; the collectives' row counts are the deduplicated ones."""

import copy

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from nanoseek.model.expert_parallel import ExpertGroup, shard_experts
from nanoseek.model.moe import MoE

from ..tiny import ds

WORLD = 2


def _worker(rank: int, store_path: str) -> None:
    tdist.init_process_group("gloo", store=tdist.FileStore(store_path, WORLD), rank=rank, world_size=WORLD)
    try:
        _check(rank)
    finally:
        tdist.destroy_process_group()


def _check(rank: int) -> None:
    cfg = ds(n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2)  # 2 groups = 4 experts a rank
    torch.manual_seed(0)
    ref = MoE(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    ep = copy.deepcopy(ref)
    group = ExpertGroup(WORLD, rank, tdist.group.WORLD)
    shard_experts(ep, group)
    torch.manual_seed(1 + rank)  # each rank its own tokens
    x = torch.randn(2, 5, cfg.hidden_size)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()

    y_ref, load_ref, _ = ref(x_ref)
    y_ep, load_ep, _ = ep(x_ep)
    torch.testing.assert_close(y_ep, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(load_ep, load_ref)  # loads count this rank's tokens over all E experts, as before
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_ep.backward(g)
    torch.testing.assert_close(x_ep.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ep.gate.weight.grad, ref.gate.weight.grad, rtol=1e-5, atol=1e-6)
    lo, hi = group.local_experts(cfg.n_routed_experts)
    for name in ("gate_up_proj", "down_proj"):  # shard gradient = sum over both ranks' tokens
        full = getattr(ref.experts, name).grad.clone()
        tdist.all_reduce(full)
        torch.testing.assert_close(getattr(ep.experts, name).grad, full[lo:hi], rtol=1e-5, atol=1e-6)

    _, _, idx, _ = ref.gate(x.view(-1, cfg.hidden_size))
    dest = idx // (cfg.n_routed_experts // WORLD)  # (N, K)
    pairs = {(t, int(r)) for t in range(dest.shape[0]) for r in dest[t]}
    st = group.stats
    assert st.calls == 1 and st.tokens == dest.shape[0] and st.copies == dest.numel()
    assert st.rows == len(pairs) < st.copies  # one row per (token, rank): K=3 copies on 2 ranks dedupe
    assert st.rows_remote == sum(r != rank for _, r in pairs)
    assert st.bytes_remote == st.rows_remote * cfg.hidden_size * 4
    assert st.max_destinations <= cfg.topk_group


def test_dispatch_combine_matches_one_process(tmp_path):
    # spawn, not fork: a child forked after the parent ran OpenMP-parallel ops hangs in its first parallel op
    # (seen in the full suite without OMP_NUM_THREADS=1); spawn re-imports torch (~10 s more on 2 cores)
    mp.start_processes(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True, start_method="spawn")
