"""Shared fixtures: a small multi-domain corpus, a per-session token cache, tiny training configs."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

from nanoseek.train.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("json", "urllib", "logging")  # ~390 KB of stdlib text in three domains


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """A directory corpus: <domain>/<file>.py copied from three stdlib packages."""
    root = tmp_path_factory.mktemp("corpus")
    std = Path(sysconfig.get_paths()["stdlib"])
    for d in DOMAINS:
        for f in sorted((std / d).glob("*.py")):
            (root / d).mkdir(exist_ok=True)
            shutil.copy(f, root / d / f.name)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session (also exported as NANOSEEK_CACHE for subprocesses)."""
    d = tmp_path_factory.mktemp("nscache")
    os.environ["NANOSEEK_CACHE"] = str(d)
    return d


def tiny_kwargs(corpus: Path, cache: Path, out_dir: Path, **kw) -> dict:
    """TrainConfig fields of a ~0.3M-parameter DeepSeek-V3 model (1 dense + 1 MoE layer + MTP) that steps
    in ~20 ms on 2 CPU cores."""
    base = dict(data=str(corpus), cache_dir=str(cache), out_dir=str(out_dir), vocab_size=512, hidden_size=64,
                num_hidden_layers=2, seq_len=32, batch_size=8, max_steps=12, warmup_steps=2, lr=3e-3,
                eval_every=0, eval_batches=4, save_every=0, log_every=1, plots=False, seed=7)
    base.update(kw)
    return base


def tiny_config(corpus: Path, cache: Path, out_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(**tiny_kwargs(corpus, cache, out_dir, **kw))


def cli_args(kwargs: dict) -> list[str]:
    """TrainConfig fields -> `nanoseek pretrain` flags."""
    args = []
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


def subprocess_env(cache: Path) -> dict:
    """Environment for `python -m nanoseek` subprocesses: repo importable, shared cache, 1 thread each."""
    env = {**os.environ, "NANOSEEK_CACHE": str(cache), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return env


@pytest.fixture(scope="session")
def trained_checkpoint(tiny_corpus, cache_dir, tmp_path_factory) -> Path:
    """A tiny model trained for 30 steps; its final checkpoint directory."""
    from nanoseek.train.trainer import train

    out = tmp_path_factory.mktemp("trained")
    train(tiny_config(tiny_corpus, cache_dir, out, max_steps=30))
    return out / "checkpoints" / "step-0000030"
