"""Training checkpoints: a HF model directory plus `trainer_state/`, written atomically; exact resume.

Layout of out_dir/checkpoints/step-{N:07d}/ (one atomic rename, see fileio.atomic_directory):
    config.json, model.safetensors, tokenizer.json ...   the model, loadable by transformers
    trainer_state/optimizer.pt     optimizer.state_dict() (tensors + plain types; loaded weights_only=True)
    trainer_state/rng.pt           python / numpy / torch CPU / CUDA RNG states (weights_only-loadable)
    trainer_state/state.json       step, loader state, metrics.jsonl byte offset, TrainConfig, world size

Why this shape: a checkpoint directory is what inference tools already read; the training-only state sits
in a subfolder that nothing else needs. Resume rebuilds the model exactly as a fresh run does and copies the
saved tensors into it with load_state_dict (so optimizer state binds to the same Parameter objects), which
keeps every later loss bit-identical on CPU. Rejected: one pickled dict (no `weights_only` load; not an HF
directory); saving the LR scheduler (the schedule is a pure function of the step).

Tests kill a run mid-checkpoint by wrapping `write_trainer_state` (it runs inside the write, before the rename).
"""

from __future__ import annotations

import ast
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import from_hf_state_dict, read_safetensors_dir

STEP_DIR = re.compile(r"^step-(\d{7})$")


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """out_dir/checkpoints/step-{step:07d}."""
    return Path(out_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (they hold trainer_state/state.json) in step order. Temp dirs are ignored."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "trainer_state" / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def remove_stale_temps(out_dir: str | Path) -> list[Path]:
    """Delete `.step-*.tmp-*` / `.old-*` directories left by a process killed mid-save; returns them."""
    root = Path(out_dir) / "checkpoints"
    stale = [p for p in root.glob(".step-*") if p.is_dir()] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def resolve_resume(resume: str, out_dir: str | Path) -> Path:
    """'latest' -> newest complete checkpoint in out_dir; otherwise the given checkpoint path."""
    if resume == "latest":
        ckpts = list_checkpoints(out_dir)
        if not ckpts:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint under {Path(out_dir) / 'checkpoints'}")
        return ckpts[-1]
    path = Path(resume)
    if not (path / "trainer_state" / "state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a training checkpoint (no trainer_state/state.json)")
    return path


def rng_state() -> dict:
    """All RNG states, as tensors and plain types (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": repr(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_trainer_state(directory: Path, optimizer_state: dict, rng: dict, state: dict) -> None:
    """directory/trainer_state/{optimizer.pt, rng.pt, state.json}; state.json last: it marks the checkpoint complete."""
    d = directory / "trainer_state"
    d.mkdir()
    torch.save(optimizer_state, d / "optimizer.pt")
    torch.save(rng, d / "rng.pt")
    (d / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def read_trainer_state(path: Path) -> tuple[dict, dict, dict]:
    """(optimizer state dict, RNG state, state.json dict) of checkpoint `path` (tensors loaded weights_only)."""
    ts = path / "trainer_state"
    osd = torch.load(ts / "optimizer.pt", map_location="cpu", weights_only=True)
    rng = torch.load(ts / "rng.pt", map_location="cpu", weights_only=True)
    return osd, rng, json.loads((ts / "state.json").read_text())


def save_checkpoint(out_dir: str | Path, step: int, keep_last: int,
                    write: Callable[[Path, Callable[[Path], None]], Path], optimizer_state: dict, state: dict) -> Path:
    """checkpoints/step-{step:07d}, atomically, then delete all but the newest `keep_last`.

    write(path, extra) writes the checkpoint's content (a model directory: `Model.save_pretrained(path,
    extra=extra)`; an adapter directory: `atomic_directory`) and calls extra(tmp) before its rename; extra adds
    trainer_state/ with `optimizer_state`, the RNG state of this moment and `state` (state.json).
    """
    rng = rng_state()
    path = write(checkpoint_dir(out_dir, step), lambda tmp: write_trainer_state(tmp, optimizer_state, rng, state))
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def gather_fsdp_state(model, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts of an FSDP2-sharded model, on CPU on rank 0 (empty elsewhere).

    Every rank must call it (it all-gathers). The optimizer state is keyed by parameter name (DCP format).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_checkpoint(path: Path, model, optimizer, fsdp: bool = False, shard=None) -> tuple[dict, dict]:
    """Copy a checkpoint's weights (router biases included) and optimizer state into `model`/`optimizer`.

    fsdp: the model is FSDP2-sharded and the checkpoint was written from gathered state (every rank reads the
    full files and keeps its shard). shard(model_sd, optimizer_sd) -> (model_sd, optimizer_sd): this rank's
    part of the full state (expert parallelism, see expert_parallel.py).
    Returns (state.json dict, rng dict); the caller restores the RNG after
    everything else is built.
    """
    sd = from_hf_state_dict(model.config, read_safetensors_dir(path))
    osd, rng, state = read_trainer_state(path)
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(model, optimizer, osd, options=opts)
        return state, rng
    if shard is not None:
        sd, osd = shard(sd, osd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    optimizer.load_state_dict(osd)
    return state, rng
