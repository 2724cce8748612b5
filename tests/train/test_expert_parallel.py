"""Expert parallelism under torchrun (gloo on CPU) follows the 1-process run with the same global batch:
losses, expert loads and the updated weights (experts gathered into the ordinary HF checkpoint)."""

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import Model
from nanoseek.checkpoint import read_safetensors_dir
from nanoseek.model.expert_parallel import ExpertGroup, shard_experts
from nanoseek.train.config import TrainConfig
from nanoseek.train.expert_parallel import check_mesh
from nanoseek.train.metrics import read_metrics
from nanoseek.train.state import list_checkpoints

from ..tiny import ds
from .conftest import REPO, cli_args, subprocess_env, tiny_kwargs
from .test_distributed import assert_same_curve, torchrun
from .test_finetune import _launch as finetune_launch
from .test_kill import KEYS, wait_for

STEPS = dict(max_steps=10, eval_every=5, save_every=5)  # dsv3-tiny at width 64: 8 experts top-2, 4 groups keep 2


def launch(nproc, corpus, cache, out, **kw):
    """`nanoseek pretrain` on nproc processes (torchrun) or one; returns metrics.jsonl's records."""
    args = cli_args(tiny_kwargs(corpus, cache, out, **kw))
    cmd = (torchrun() + ["--standalone", "--nproc-per-node", str(nproc), "-m", "nanoseek", "pretrain"]
           if nproc > 1 else [sys.executable, "-m", "nanoseek", "pretrain"]) + args
    r = subprocess.run(cmd, env=subprocess_env(cache), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return read_metrics(out / "metrics.jsonl")


def final_weights(out, step=10):
    return read_safetensors_dir(out / "checkpoints" / f"step-{step:07d}")


def assert_same_weights(a, b):
    assert sorted(a) == sorted(b)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in a  # every expert, per-expert HF keys
    for k in a:  # atol: Adam divides by sqrt(v), so for a tiny gradient the summation order's rounding shows
        # up as ~1e-3 of one lr step (seen: 2.5e-6 on 1 of 32,768 embedding entries with 4 ranks)
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def one_process(tiny_corpus, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_one")
    return launch(1, tiny_corpus, cache_dir, out, batch_size=8, **STEPS), out


@pytest.fixture(scope="module")
def two_ranks(tiny_corpus, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_two")
    return launch(2, tiny_corpus, cache_dir, out, batch_size=4, expert_parallel=2, **STEPS), out


def test_two_ranks_expert_parallel_match_one(one_process, two_ranks):
    """2 ranks, 4 experts each, node-limited routing (2 of 4 groups; a rank holds 2 groups), MTP on."""
    (one, one_dir), (two, two_dir) = one_process, two_ranks
    assert_same_curve(one, two)
    assert_same_weights(final_weights(one_dir), final_weights(two_dir))
    assert all(r["mtp_loss"] > 0 and r["ep_bytes_per_token_layer"] > 0 for r in two if "loss" in r)
    assert not any("ep_bytes_per_token_layer" in r for r in one)


def test_resume_with_other_rank_count(tiny_corpus, cache_dir, tmp_path, one_process, two_ranks):
    """Saved with 2 expert-parallel ranks at step 5, resumed by one process (N -> 1 resharding): the rest of
    the run and the final weights equal the uninterrupted run's."""
    one, one_dir = one_process
    shutil.copytree(two_ranks[1], tmp_path / "ep2")
    shutil.rmtree(tmp_path / "ep2" / "checkpoints" / "step-0000010")  # as if killed after the step-5 save
    resumed = launch(1, tiny_corpus, cache_dir, tmp_path / "ep2", batch_size=8, resume="latest", **STEPS)
    assert_same_curve(one, resumed)
    assert_same_weights(final_weights(one_dir), final_weights(tmp_path / "ep2"))


@pytest.mark.slow
def test_no_node_limit_two_ranks_match_one(tiny_corpus, cache_dir, tmp_path):
    """topk_group = n_group (no node limit): still the 1-process curve and weights."""
    one = launch(1, tiny_corpus, cache_dir, tmp_path / "one", batch_size=8, topk_group=4, **STEPS)
    two = launch(2, tiny_corpus, cache_dir, tmp_path / "two", batch_size=4, topk_group=4, expert_parallel=2,
                 **STEPS)
    assert_same_curve(one, two)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))


@pytest.mark.slow
@pytest.mark.parametrize("ep", [4, 2])
def test_four_ranks_match_one(tiny_corpus, cache_dir, tmp_path, one_process, ep):
    """4 ranks: mesh (1, 4) (2 experts per rank) and (2, 2) (experts replicated over 2 data-parallel ranks,
    their gradients averaged over that column; there with 2 micro-batches of 1 per step)."""
    one, one_dir = one_process
    # evaluation takes batches of batch_size x world windows: 8 x 4 windows = the 1-process run's 4 x 8
    batch = dict(batch_size=2) if ep == 4 else dict(batch_size=1, grad_accum=2, eval_batches=8)
    four = launch(4, tiny_corpus, cache_dir, tmp_path / "ep4", expert_parallel=ep, **batch, **STEPS)
    assert_same_curve(one, four)
    assert_same_weights(final_weights(one_dir), final_weights(tmp_path / "ep4"))


@pytest.mark.slow
def test_reshard_two_to_four(tiny_corpus, cache_dir, tmp_path, one_process, two_ranks):
    """Saved by 2 ranks (EP 2) at step 5, resumed by 4 ranks (EP 4): the same run."""
    one, one_dir = one_process
    shutil.copytree(two_ranks[1], tmp_path / "r")
    shutil.rmtree(tmp_path / "r" / "checkpoints" / "step-0000010")
    resumed = launch(4, tiny_corpus, cache_dir, tmp_path / "r", batch_size=2, expert_parallel=4, resume="latest",
                     **STEPS)
    assert_same_curve(one, resumed)
    assert_same_weights(final_weights(one_dir), final_weights(tmp_path / "r"))


def test_mesh_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="does not fit 3 process"):
        check_mesh(3, 2, 8)
    with pytest.raises(ValueError, match=r"n_routed_experts \(8\) to be divisible by 3"):
        check_mesh(3, 3, 8)
    with pytest.raises(ValueError, match="does not fit 1 process"):
        check_mesh(1, 2, 8)  # --expert-parallel 2 without torchrun
    with pytest.raises(ValueError, match="expert_parallel"):
        TrainConfig(**tiny_kwargs("x", "y", "z", expert_parallel=2, fsdp=True))


def test_shard_keeps_this_ranks_experts():
    model = Model(ds())
    full = model.model.layers[1].mlp.experts.down_proj.detach().clone()  # (8, H, I)
    model.model.layers[2].mlp.experts.gate_up_proj.requires_grad_(False)
    shard_experts(model, ExpertGroup(size=4, rank=1))
    torch.testing.assert_close(model.model.layers[1].mlp.experts.down_proj, full[2:4], rtol=0, atol=0)
    assert model.model.layers[1].mlp.experts.down_proj.requires_grad
    assert not model.model.layers[2].mlp.experts.gate_up_proj.requires_grad  # a frozen base stays frozen


@pytest.mark.slow
def test_sigkill_under_torchrun_then_resume_is_exact(tiny_corpus, cache_dir, tmp_path, two_ranks):
    """SIGKILL the whole torchrun job while it writes the step-10 checkpoint; resuming on 2 ranks from step 5
    reproduces the uninterrupted 2-rank run exactly (same collectives in the same order)."""
    ref, _ = two_ranks
    out = tmp_path / "run"
    args = cli_args(tiny_kwargs(tiny_corpus, cache_dir, out, batch_size=4, expert_parallel=2, **STEPS))
    faults = [str(REPO / "tests" / "train" / "faults.py"), "--slow-save", "2"]  # each save sleeps before its rename
    proc = subprocess.Popen(torchrun() + ["--standalone", "--nproc-per-node", "2", *faults, "pretrain"]
                            + args, env=subprocess_env(cache_dir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    ckpts = out / "checkpoints"
    wait_for(lambda: list(ckpts.glob(".step-0000010.tmp-*")), proc, timeout=240)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [p.name for p in list_checkpoints(out)] == ["step-0000005"]
    resumed = launch(2, tiny_corpus, cache_dir, out, batch_size=4, expert_parallel=2, resume="latest", **STEPS)
    assert [{k: r.get(k) for k in KEYS} for r in resumed] == [{k: r.get(k) for k in KEYS} for r in ref]


def assert_same_finetune(one, two, dir_one, dir_two, out):
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    w1, w2 = load_file(dir_one / out), load_file(dir_two / out)
    assert w1.keys() == w2.keys()
    for k in w1:  # atol as in test_finetune's DDP test: lr 3e-3 Adam steps on tiny gradients (seen: 2e-5)
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


ADAPTER = "adapter/adapter_model.safetensors"


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--full"], ["--target-modules", "o_proj,kv_b_proj"],
                                   ["--target-modules", "all-linear"]], ids=["full", "lora", "lora-experts"])
def test_finetune_two_ranks_match_one(sft_base, tmp_path, flags):
    """`finetune --expert-parallel 2` (4 experts, 2 per rank; node-limited: 1 of 2 groups; MTP on) follows one
    process: full fine-tuning (experts trained, gathered into model/), LoRA on non-expert modules (experts
    frozen, tokens still dispatched) and LoRA on every linear and the routed experts (factors sharded, gathered
    into the one-process adapter file)."""
    one = finetune_launch(1, sft_base, tmp_path / "one", "--batch-size", "4", *flags)
    two = finetune_launch(2, sft_base, tmp_path / "two", "--batch-size", "2", "--expert-parallel", "2", *flags)
    out = "model/model.safetensors" if flags == ["--full"] else ADAPTER
    assert_same_finetune(one, two, tmp_path / "one", tmp_path / "two", out)
    if "all-linear" in flags:
        assert any(".experts." in k for k in load_file(tmp_path / "two" / out))
        ckpt = "checkpoints/step-0000004/adapter_model.safetensors"  # the checkpoint holds every expert too
        assert load_file(tmp_path / "two" / ckpt).keys() == load_file(tmp_path / "one" / ckpt).keys()


@pytest.mark.slow
def test_finetune_lora_on_experts_resumes_across_rank_counts(sft_base, tmp_path):
    """LoRA on the experts: saved by 2 expert-parallel ranks at step 2 and resumed by one process (2 -> 1), and
    saved by one process and resumed by 2 expert-parallel ranks (1 -> 2): both finish as the uninterrupted run."""
    flags = ("--target-modules", "all-linear", "--save-every", "2")
    one = finetune_launch(1, sft_base, tmp_path / "one", "--batch-size", "4", *flags)
    finetune_launch(2, sft_base, tmp_path / "two", "--batch-size", "2", "--expert-parallel", "2", *flags)
    for src, dst, n, more in (("two", "2to1", 1, ("--batch-size", "4")),
                              ("one", "1to2", 2, ("--batch-size", "2", "--expert-parallel", "2"))):
        shutil.copytree(tmp_path / src, tmp_path / dst)
        shutil.rmtree(tmp_path / dst / "checkpoints" / "step-0000004")  # as if killed after the step-2 save
        shutil.rmtree(tmp_path / dst / "adapter")
        resumed = finetune_launch(n, sft_base, tmp_path / dst, *more, *flags, "--resume", "latest")
        assert_same_finetune(one, resumed, tmp_path / "one", tmp_path / dst, ADAPTER)
