"""2 processes (torchrun, gloo on CPU) follow the 1-process run with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest

from nanoseek.train.metrics import read_metrics

from .conftest import REPO, cli_args, subprocess_env, tiny_kwargs


def torchrun():
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def launch(nproc, corpus, cache, out, **kw):
    """Run `nanoseek pretrain` (8 steps, eval every 4, save every 4 and at the end) on nproc processes."""
    args = cli_args(tiny_kwargs(corpus, cache, out, max_steps=8, eval_every=4, save_every=4, **kw))
    cmd = (torchrun() + ["--standalone", "--nproc-per-node", str(nproc), "-m", "nanoseek", "pretrain"]
           if nproc > 1 else [sys.executable, "-m", "nanoseek", "pretrain"]) + args
    r = subprocess.run(cmd, env=subprocess_env(cache), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return read_metrics(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def one_process(tiny_corpus, cache_dir, tmp_path_factory):
    return launch(1, tiny_corpus, cache_dir, tmp_path_factory.mktemp("one"), batch_size=8)


def assert_same_curve(one, two):
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "main_loss", "mtp_loss", "balance_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
        if "expert_load" in a:  # global loads (all-reduced) drive the same router-bias updates
            assert a["expert_load"] == b["expert_load"]


def test_two_processes_ddp_match_one(tiny_corpus, cache_dir, tmp_path, one_process):
    two = launch(2, tiny_corpus, cache_dir, tmp_path / "two", batch_size=4)
    assert_same_curve(one_process, two)
    assert (tmp_path / "two" / "checkpoints" / "step-0000008" / "model.safetensors").exists()
    assert not (tmp_path / "two" / "checkpoints" / "step-0000008" / "trainer_state" / "rank1").exists()


def test_two_processes_fsdp2_match_one(tiny_corpus, cache_dir, tmp_path, one_process):
    """FSDP2 (fully_shard) trains on CPU/gloo, follows the same curve, and writes a full HF checkpoint
    (gathered from the shards) equal to the 1-process one."""
    two = launch(2, tiny_corpus, cache_dir, tmp_path / "fsdp", batch_size=4, fsdp=True)
    assert_same_curve(one_process, two)
    from nanoseek import Model

    ck = Model.from_pretrained(tmp_path / "fsdp" / "checkpoints" / "step-0000008")
    assert ck.config.num_hidden_layers == 2 and any(n.startswith("mtp.") for n, _ in ck.named_parameters())


def test_fsdp2_resume_matches_uninterrupted(tiny_corpus, cache_dir, tmp_path):
    """Resume an FSDP2 run from its step-4 checkpoint (gathered model + name-keyed optimizer state): the
    losses after resuming equal those of the uninterrupted run."""
    import shutil

    full = launch(2, tiny_corpus, cache_dir, tmp_path / "full", batch_size=4, fsdp=True)
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000008")  # as if killed after the step-4 save
    resumed = launch(2, tiny_corpus, cache_dir, tmp_path / "cut", batch_size=4, fsdp=True, resume="latest")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        for key in ("loss", "main_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
