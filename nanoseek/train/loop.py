"""The run loop that pretraining (trainer.py) and fine-tuning (finetune.py) both drive.

What. One loop does what every run does, in this order:
    begin     refuse an out_dir that already holds checkpoints unless resuming; seed python / numpy / torch
    resume    delete half-written checkpoints, copy the checkpoint into the model and optimizer (the job's
              `load`), then the loader position, the metrics offset and the RNG state (exact resume)
    for each step: lr = lr_at(step); `optimizer_step` (accumulation, token-weighted loss, NaN stop, clipping,
              AdamW, router-bias update); one metrics record; every eval_every steps and at the end the job's
              `evaluate` + plots; every save_every steps and at the end a checkpoint (atomic, keep_last pruned)
One optimizer step (all ranks in lockstep):
    for each of grad_accum micro-batches: forward, (loss * w_i).backward()
        (w_i = this micro-batch's share of the global batch's target tokens; 1 / grad_accum when packed)
    all-reduce the loss parts (global mean); stop on NaN/inf before touching the weights
    clip the global grad norm; optimizer.step(); all-reduce(SUM) the step's expert loads;
    update_router_bias(gamma)  (gamma = 0 for the last bias_update_stop_frac of steps, as in V3)

What differs between pretraining and fine-tuning is a `Job`: how to evaluate, what a checkpoint holds (a model
directory, or a PEFT adapter directory, plus trainer_state/) and how to read it back, and the router-bias
gamma. Everything else (the `Run`: model, wrapper, optimizer, loader) the caller builds and hands over.

Why a plain function over an object with hooks: the step and the loop each fit on a screen, every statistic is
visible where it is computed, and the two callers differ only in data. Faults (a NaN loss, a slow checkpoint
write) are injected by tests by wrapping `forward_backward` or `state.write_trainer_state`, never by the
product reading a test switch.
Rejected: HF Trainer / Lightning (hide the step; no aux-free bias update); a second loop per task (the copies
drift: resume, pruning and the NaN stop were already implemented twice).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..config import IGNORE_INDEX
from .autocast import autocast_context as dtype_context
from .autocast import resolve_dtype
from .distributed import Dist
from .expert_parallel import ExpertParallel
from .metrics import MetricsLog, max_vio, peak_flops, peak_memory_bytes
from .optim import lr_at, set_lr
from .plots import plot_run
from .state import list_checkpoints, remove_stale_temps, resolve_resume, save_checkpoint, set_rng_state

LOSS_PARTS = ("loss", "main_loss", "mtp_loss", "balance_loss")


class TrainingDiverged(RuntimeError):
    """A loss part or the gradient norm became NaN/inf; raised before the optimizer step."""


class LoopConfig(Protocol):
    """The fields of TrainConfig and FinetuneConfig that the loop reads (same names, same meaning)."""

    out_dir: str
    resume: str | None
    seed: int
    max_steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float
    schedule: str
    decay_frac: float
    batch_size: int
    seq_len: int
    grad_accum: int
    grad_clip: float
    bias_update_gamma: float
    bias_update_stop_frac: float
    eval_every: int
    save_every: int
    keep_last: int
    log_every: int
    plots: bool
    tensorboard: bool


@dataclass
class Run:
    """What the loop drives; the caller builds it (model first, then the wrapper, then the optimizer)."""

    cfg: LoopConfig
    d: Dist
    device: torch.device
    model: nn.Module  # the unwrapped model: parameters, expert loads, router bias
    wrapped: nn.Module  # what a micro-batch runs through: DDP / FSDP2 / ExpertParallel (/ torch.compile) / model
    optimizer: torch.optim.Optimizer
    loader: Any  # next_batch() -> (x, y) (B, T); state_dict() / load_state_dict()
    autocast: Any  # a context manager around each forward
    fsdp: bool = False  # FSDP2 syncs gradients every micro-batch; DDP only on the last (no_sync before)


@dataclass
class Job:
    """What differs between pretraining and fine-tuning.

    evaluate() -> the validation record's fields (every rank calls it). load(path) -> (state.json dict, RNG state):
    copy a checkpoint into the model and optimizer. gather() -> (model sd, optimizer sd) gathered from shards, or
    None (every rank calls it before a save). write(path, extra, gathered) writes a checkpoint directory atomically,
    calling extra(tmp) before the rename (rank 0). state: extra state.json fields. gamma_scale: 1 where the router
    bias trains (0 for LoRA: the base stays frozen). flops_per_token: for MFU (None: not reported).
    """

    name: str
    evaluate: Callable[[], dict]
    load: Callable[[Path], tuple[dict, dict]]
    write: Callable[[Path, Callable[[Path], None], tuple[dict, dict] | None], Path]
    gather: Callable[[], tuple[dict, dict] | None] = lambda: None
    state: dict | None = None
    gamma_scale: float = 1.0
    flops_per_token: float | None = None
    eval_at_start: bool = False


# ---------------------------------------------------------------------------------------------- begin / resume
def begin(cfg: LoopConfig) -> Path | None:
    """Before anything is built: the checkpoint to resume from (None: a fresh run), and the seeded RNGs."""
    out_dir = Path(cfg.out_dir)
    resume_path = resolve_resume(cfg.resume, out_dir) if cfg.resume else None
    if resume_path is None and list_checkpoints(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints: pass --resume latest, or choose another --out-dir")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    return resume_path


def resume(run: Run, job: Job, path: Path) -> tuple[int, int]:
    """Continue from checkpoint `path`: returns (start step, metrics.jsonl byte offset)."""
    d = run.d
    if d.is_main:
        remove_stale_temps(run.cfg.out_dir)  # a checkpoint half-written when the last run was killed
    d.barrier()
    state, rng = job.load(path)
    run.loader.load_state_dict(state["loader"])
    start_step = int(state["step"])
    set_rng_state(rng)  # rank 0's state; the other ranks re-seed their dropout streams
    if d.rank > 0:
        torch.manual_seed(run.cfg.seed + 1 + d.rank + start_step)
    return start_step, int(state["metrics_offset"])


def router_gamma(cfg: LoopConfig, step: int) -> float:
    """The bias-update speed at `step`: bias_update_gamma, 0 for the last bias_update_stop_frac of the steps."""
    return cfg.bias_update_gamma if step < math.ceil(cfg.max_steps * (1 - cfg.bias_update_stop_frac)) else 0.0


# ---------------------------------------------------------------------------------------------- the loop
def run_loop(run: Run, job: Job, start_step: int = 0, metrics_offset: int | None = None,
             header: str = "") -> dict:
    """Steps start_step .. max_steps with metrics, evaluations and checkpoints; returns a summary dict."""
    cfg, d, device = run.cfg, run.d, run.device
    out_dir = Path(cfg.out_dir)
    log = MetricsLog(out_dir, cfg.max_steps, start_step, cfg.log_every, metrics_offset, cfg.tensorboard) \
        if d.is_main else None
    if log is not None:
        log.print(header)
    peak = peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world_size
    summary: dict = {"start_step": start_step}
    if job.eval_at_start and start_step == 0:
        summary["initial"] = _evaluate(run, job, log, 0)
    run.model.train()
    step_times: list[float] = []
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_frac)
        set_lr(run.optimizer, lr)
        gamma = job.gamma_scale * router_gamma(cfg, step)
        parts, grad_norm, load = optimizer_step(run, step, gamma)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        n, tps = step + 1, tokens_per_step / dt  # n: steps completed
        mfu = job.flops_per_token * tps / (peak * d.world_size) if peak and job.flops_per_token else None
        record = {"step": n, **dict(zip(LOSS_PARTS, parts)), "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                  "mfu": mfu, "step_time_s": dt, "max_memory_bytes": peak_memory_bytes(device), "router_gamma": gamma}
        record.update(_step_stats(run.wrapped, load))
        if log is not None:
            log.write(record)
        summary.update({k: record[k] for k in ("step", "loss", "tokens_per_s")})
        last = n == cfg.max_steps
        if last or (cfg.eval_every and n % cfg.eval_every == 0):
            summary.update(_evaluate(run, job, log, n))
            if d.is_main and cfg.plots:
                plot_run(out_dir)
        if last or (cfg.save_every and n % cfg.save_every == 0):
            _save(run, job, log, n)
    if log is not None:
        log.close()
    if step_times:
        warm = step_times[1:] or step_times
        summary["mean_tokens_per_s"] = tokens_per_step * len(warm) / sum(warm)
    return summary


def _evaluate(run: Run, job: Job, log: MetricsLog | None, step: int) -> dict:
    """The job's validation record (every rank evaluates the same batches), logged at `step`."""
    ev = job.evaluate()
    if log is not None:
        log.write({"step": step, **ev})
    return ev


def _step_stats(wrapped: nn.Module, load: torch.Tensor | None) -> dict:
    """Per-step routing statistics: expert loads and MaxVio, and rank 0's expert-parallel dispatch traffic."""
    out = {}
    if isinstance(wrapped, ExpertParallel):  # activation bytes sent to other ranks per token and layer
        st = wrapped.ep.stats
        out["ep_bytes_per_token_layer"] = st.bytes_remote / max(st.tokens, 1)
        st.reset()
    if load is not None:
        out["max_vio"] = max_vio(load).tolist()
        out["expert_load"] = load.round().long().tolist()
    return out


def _save(run: Run, job: Job, log: MetricsLog | None, step: int) -> None:
    """checkpoints/step-N from rank 0 (every rank takes part in a gather first); the others wait at the barrier so
    nobody runs ahead of a half-written checkpoint."""
    d = run.d
    gathered = job.gather()
    if d.is_main:
        state = {"step": step, "loader": run.loader.state_dict(), "metrics_offset": log.offset(),
                 "world_size": d.world_size, **(job.state or {})}
        optimizer_state = run.optimizer.state_dict() if gathered is None else gathered[1]
        save_checkpoint(run.cfg.out_dir, step, run.cfg.keep_last, lambda path, extra: job.write(path, extra, gathered),
                        optimizer_state, state)
    d.barrier()


# ---------------------------------------------------------------------------------------------- one step
def optimizer_step(run: Run, step: int, gamma: float) -> tuple[list[float], float, torch.Tensor | None]:
    """One optimizer step over grad_accum micro-batches, then the router bias update.

    Returns (global-mean loss parts, grad norm, (n_moe_layers, E) global expert loads of the step or None).
    Raises TrainingDiverged before optimizer.step() when a loss part or the grad norm is not finite.
    """
    cfg, d, device, model, wrapped = run.cfg, run.d, run.device, run.model, run.wrapped
    parts = torch.zeros(len(LOSS_PARTS), dtype=torch.float32, device=device)  # (4,) step means
    zero = torch.zeros((), device=device)
    batches = [run.loader.next_batch() for _ in range(cfg.grad_accum)]  # [(x, y) of (B, T)] this rank's
    weights = micro_weights([y for _, y in batches], d)
    for micro, (x, y) in enumerate(batches):
        sync = contextlib.nullcontext()
        if d.enabled and not run.fsdp and micro < cfg.grad_accum - 1:
            sync = wrapped.no_sync()  # all-reduce gradients only on the last micro-batch
        with sync:
            out = forward_backward(run, x, y, weights[micro])
        vals = [out.loss, out.main_loss, out.mtp_loss, out.balance_loss]
        parts += torch.stack([(zero if v is None else v.detach().float()) for v in vals]) * weights[micro]
    d.all_reduce_mean_(parts)
    parts_cpu = parts.tolist()
    bad = [n for n, v in zip(LOSS_PARTS, parts_cpu) if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"step {step + 1}: non-finite {', '.join(bad)} "
                               f"({', '.join(f'{n}={v}' for n, v in zip(LOSS_PARTS, parts_cpu))}); "
                               "stopped before the optimizer step; the last checkpoint is intact")
    grad_norm = _clip(run)
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"step {step + 1}: gradient norm is {grad_norm}; stopped before the "
                               "optimizer step; the last checkpoint is intact")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    load = model.expert_load_accum  # (n_moe_layers, E) summed over this step's micro-batches
    if load is not None:
        d.all_reduce_sum_(load)
        load = load.detach().cpu().clone()
    model.update_router_bias(gamma)  # consumes and resets expert_load_accum
    return parts_cpu, grad_norm, load


def forward_backward(run: Run, x: torch.Tensor, y: torch.Tensor, weight: float):
    """One micro-batch: forward under autocast, (loss * weight).backward(); returns the ModelOutput."""
    with run.autocast:
        out = run.wrapped(x, targets=y)
    (out.loss * weight).backward()
    return out


def _clip(run: Run) -> float:
    """Clip the global gradient norm to cfg.grad_clip (0: measure only); returns the norm before clipping."""
    max_norm = run.cfg.grad_clip
    if isinstance(run.wrapped, ExpertParallel):  # explicit gradient averaging over the (data, expert) mesh
        norm = run.wrapped.reduce_and_clip_(max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm or float("inf"))
    if run.fsdp and run.d.enabled:  # FSDP2: the norm is a DTensor
        norm = norm.full_tensor()
    return float(norm)


def micro_weights(targets: list[torch.Tensor], d: Dist) -> list[float]:
    """Weight of each micro-batch's mean loss so that the step's gradient (after DDP's mean over ranks) is the
    gradient of the mean over *every target token of the global batch*: w_i = n_i * world_size / N, with n_i
    the targets (labels != IGNORE_INDEX) of micro-batch i and N their sum over micro-batches and ranks. Packed
    pretraining batches all hold B*T targets, so w_i = 1 / grad_accum; SFT batches hold different numbers of
    completion tokens, and a plain mean of means would weight a token by its micro-batch's (or rank's) size.
    """
    counts = torch.tensor([float((y != IGNORE_INDEX).sum()) for y in targets], dtype=torch.float64)
    total = d.all_reduce_sum_(counts.sum().to(targets[0].device)).item() if d.enabled else float(counts.sum())
    if total == 0:  # no targets anywhere (cannot come from the loaders): the plain mean, loss 0 and no gradient
        return [1.0 / len(targets)] * len(targets)
    return [float(n) * d.world_size / total for n in counts]


def autocast_context(cfg, device: torch.device):
    """bf16 autocast when cfg.dtype resolves to bfloat16 (auto: CUDA, or a CPU with native bf16; autocast.py)."""
    return dtype_context(resolve_dtype(cfg.dtype, device), device)
