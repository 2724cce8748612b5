"""LoRA on the routed experts under expert parallelism (gloo processes) follows one process: 10 AdamW steps give
the same losses and LoRA factors (MTP on, with and without node-limited routing); the saved adapter and its
optimizer state are the one-process files; a one-process adapter loads back sliced; an adapter put on the
sharded experts behind the group's back is refused."""

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from nanoseek import LoraConfig, Model
from nanoseek.lora_io import adapter_state_dict
from nanoseek.model.expert_parallel import ExpertGroup, full_adapter_view, shard_experts
from nanoseek.train.distributed import Dist
from nanoseek.train.expert_parallel import ExpertParallel
from nanoseek.train.optim import configure_optimizer

from ..tiny import ds, tokens

STEPS, B, T = 10, 2, 12  # B sequences per rank; the one-process reference takes all W*B


def _model(topk_group: int) -> Model:
    torch.manual_seed(0)
    model = Model(ds(topk_group=topk_group))  # 8 experts in 4 groups, top-2, one MTP module
    model.add_adapter("a", LoraConfig(r=2, target_modules="all-linear"))  # B = 0: PEFT's init
    model.trainable_adapter("a")
    return model


def _step(model, optimizer, x, reduce) -> float:
    out = model(x[:, :-1], targets=x[:, 1:], adapter="a")
    out.loss.backward()
    reduce()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.detach()


def _worker(rank: int, world: int, ep_size: int, topk_group: int, store: str, out_dir: str) -> None:
    tdist.init_process_group("gloo", store=tdist.FileStore(store, world), rank=rank, world_size=world)
    try:
        _check(rank, world, ep_size, topk_group, out_dir)
    finally:
        tdist.destroy_process_group()


def _check(rank, world, ep_size, topk_group, out_dir) -> None:
    ref, model = _model(topk_group), _model(topk_group)
    wrapped = ExpertParallel(model, Dist(rank, world), ep_size, torch.device("cpu"))
    opt_ref = configure_optimizer(ref, 3e-3, 0.0)
    opt = configure_optimizer(model, 3e-3, 0.0)
    for step in range(STEPS):
        x = tokens(world * B, T + 1, seed=step)  # the global batch; this rank reads rows [rank*B, (rank+1)*B)
        want = _step(ref, opt_ref, x, lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
        got = _step(model, opt, x[rank * B:(rank + 1) * B], lambda: wrapped.reduce_and_clip_(1.0))
        tdist.all_reduce(got)
        assert float(got) / world == pytest.approx(float(want), rel=1e-5), step

    lo, hi = wrapped.ep.local_experts(8)
    experts, full = wrapped.expert_names, dict(ref.named_parameters())
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts.lora_B.a." in n for n in lora_names) and all(".lora_" in n for n in lora_names)
    for n in lora_names:  # expert factors: this rank's slice of the one-process factors
        p = dict(model.named_parameters())[n]
        assert (n in experts) == (p.dim() == 3) and (n not in experts or p.shape[0] == hi - lo)
        want = full[n][lo:hi] if n in experts else full[n]
        torch.testing.assert_close(p, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")

    # the saved adapter and optimizer state are one process's
    tensors, osd = wrapped.full_adapter_state("a", opt)
    ref_tensors, ref_osd = adapter_state_dict(ref, "a"), opt_ref.state_dict()
    assert tensors.keys() == ref_tensors.keys()
    for k, v in ref_tensors.items():
        torch.testing.assert_close(tensors[k], v, rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    for i, s in ref_osd["state"].items():
        torch.testing.assert_close(osd["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    assert wrapped.shard_state({}, osd, opt)[1]["state"].keys() == opt.state_dict()["state"].keys()
    if rank == 0:
        ref.save_adapter(f"{out_dir}/ref", "a")
        with wrapped.adapter_view():
            model.save_adapter(f"{out_dir}/ep", "a")
    else:
        with wrapped.adapter_view():
            pass
    tdist.barrier()

    # resume: shards overwritten in place (the optimizer's Parameters), from the one-process directory
    held = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in held:
            p.zero_()
    wrapped.load_adapter_weights_("a", f"{out_dir}/ref")
    assert [p for p in model.parameters() if p.requires_grad] == held
    assert all(p.abs().sum() > 0 for p in held)
    # a new adapter loaded inside the view is sliced; its dispatched forward equals one process's
    with full_adapter_view(model):
        model.load_adapter(f"{out_dir}/ref", "b")
    x = tokens(B, T, seed=99 + rank)
    with torch.no_grad():
        torch.testing.assert_close(model(x, adapter="b"), ref(x, adapter="a"), rtol=1e-5, atol=1e-5)
    model.add_adapter("late", LoraConfig(r=2, target_modules=["experts"]))  # behind the group's back
    with pytest.raises(ValueError, match="'late' was put on the routed experts of a model sharded"):
        model(x, adapter="late")


def _run(tmp_path, world, ep_size, topk_group):
    # spawn, not fork (see tests/model/test_expert_parallel.py)
    mp.start_processes(_worker, args=(world, ep_size, topk_group, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=world, join=True, start_method="spawn")
    from safetensors.torch import load_file

    ref, ep = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(tmp_path / "ep" /
                                                                                     "adapter_model.safetensors")
    assert ref.keys() == ep.keys() and any("experts" in k for k in ref)
    for k in ref:
        torch.testing.assert_close(ep[k], ref[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert (tmp_path / "ref" / "adapter_config.json").read_text() == (tmp_path / "ep" / "adapter_config.json"
                                                                       ).read_text()


def test_two_ranks_lora_on_experts_match_one(tmp_path):
    """2 ranks, 4 experts each, node-limited routing (2 of 4 groups), MTP on."""
    _run(tmp_path, 2, 2, topk_group=2)


@pytest.mark.slow
@pytest.mark.parametrize("world,ep_size,topk_group", [(2, 2, 4), (4, 4, 2), (4, 2, 2)],
                         ids=["no-node-limit", "ep4", "dp2xep2"])
def test_more_ranks_lora_on_experts_match_one(tmp_path, world, ep_size, topk_group):
    _run(tmp_path, world, ep_size, topk_group)


def test_shard_slices_attached_factors_and_refuses_what_cannot_run():
    model = Model(ds())
    model.add_adapter("a", LoraConfig(r=2, target_modules=["experts"], init_lora_weights=False))
    A = model.model.layers[1].mlp.experts.lora_A["a"]["down_proj"].detach().clone()  # (8, r, I)
    model.trainable_adapter("a")
    shard_experts(model, ExpertGroup(size=4, rank=1))
    A1 = model.model.layers[1].mlp.experts.lora_A["a"]["down_proj"]
    torch.testing.assert_close(A1, A[2:4], rtol=0, atol=0)
    assert A1.requires_grad
    x = torch.zeros(2, 4, dtype=torch.long)
    # checked before any collective: per-row adapters, then an adapter added after sharding
    with pytest.raises(ValueError, match="per-row adapters on routed experts are not supported"):
        model(x, adapter=torch.tensor([0, -1]))
    model.add_adapter("late", LoraConfig(r=2, target_modules=["experts"]))
    with pytest.raises(ValueError, match="'late' was put on the routed experts of a model sharded"):
        model(x, adapter="a")
