"""The pretraining loop: data -> model -> AdamW step -> router bias update -> metrics, evals, checkpoints.

One optimizer step (all ranks in lockstep):
    lr = lr_at(step); for each of grad_accum micro-batches: forward, (loss * w_i).backward()
        (w_i = this micro-batch's share of the global batch's target tokens; 1 / grad_accum when packed)
    all-reduce the loss parts (global mean); stop on NaN/inf before touching the weights
    clip the global grad norm; optimizer.step(); all-reduce(SUM) the step's expert loads;
    update_router_bias(gamma)  (gamma = 0 for the last bias_update_stop_frac of steps, as in V3)
Rank 0 appends one record per step to metrics.jsonl and, every eval_every / save_every steps and at the
end, a validation record, PNG plots and a checkpoint (see state.py for the exact-resume contract).

Why a plain function over an object with hooks: the whole step fits on one screen and every statistic is
visible where it is computed. Rejected: HF Trainer / Lightning (hide the step; no aux-free bias update).

Test hook: NANOSEEK_TEST_NAN_AT_STEP=<n> makes step n's main loss NaN (to test the divergence stop).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..data import PackedLoader, get_or_train_tokenizer, load_corpus, tokenize_corpus
from ..model import Model
from .autocast import autocast_context as dtype_context
from .autocast import resolve_dtype
from .config import TrainConfig
from .distributed import Dist, init_distributed, shutdown_distributed, wrap_model
from .evaluate import evaluate
from .expert_parallel import ExpertParallel, check_mesh
from .metrics import MetricsLog, flops_per_token, max_vio, peak_flops, peak_memory_bytes
from .optim import configure_optimizer, lr_at, set_lr
from .state import (
    gather_fsdp_state,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temps,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .threads import default_threads

LOSS_PARTS = ("loss", "main_loss", "mtp_loss", "balance_loss")


class TrainingDiverged(RuntimeError):
    """A loss part or the gradient norm became NaN/inf; raised before the optimizer step."""


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a pretraining run; returns a summary dict. Under torchrun, every rank calls this."""
    d, device = init_distributed(cfg.device)
    try:
        return _train(cfg, d, device)
    finally:
        shutdown_distributed()


def autocast_context(cfg, device: torch.device):
    """bf16 autocast when cfg.dtype resolves to bfloat16 (auto: CUDA, or a CPU with native bf16; autocast.py)."""
    return dtype_context(resolve_dtype(cfg.dtype, device), device)


def _prepare_data(cfg: TrainConfig, d: Dist, vocab_size: int):
    """Corpus, tokenizer and token streams; rank 0 trains/caches first so ranks never race on the cache."""
    corpus = load_corpus(None if cfg.data == "stdlib" else cfg.data)
    result = None
    for turn in (0, 1):
        if (turn == 0) == d.is_main:
            tok = get_or_train_tokenizer(corpus, vocab_size, cfg.cache_dir)
            result = (corpus, tok, tokenize_corpus(corpus, tok, "train", cfg.cache_dir),
                      tokenize_corpus(corpus, tok, "val", cfg.cache_dir))
        d.barrier()
    return result


def _train(cfg: TrainConfig, d: Dist, device: torch.device) -> dict:
    out_dir = Path(cfg.out_dir)
    resume_path = resolve_resume(cfg.resume, out_dir) if cfg.resume else None
    if resume_path is None and list_checkpoints(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints: pass --resume latest, or choose another --out-dir")
    if device.type == "cpu":
        # small-init models (std 0.006) produce denormal floats in the first steps, which run ~30x slower
        # on x86 CPUs (13 s vs 0.4 s per dsv3-tiny step); flushing them to zero changes nothing measurable
        torch.set_flush_denormal(True)
        torch.set_num_threads(cfg.threads or default_threads())  # never more threads than idle cores (threads.py)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    mcfg = cfg.model_config_obj()
    corpus, tok, train_tokens, val_tokens = _prepare_data(cfg, d, mcfg.vocab_size)
    if tok.vocab_size > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens, the model's vocab_size is {mcfg.vocab_size}")
    mcfg = mcfg.replace(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    val_bytes = corpus.num_bytes("val")

    if cfg.expert_parallel > 1:  # fail before building anything
        check_mesh(d.world_size, cfg.expert_parallel, mcfg.n_routed_experts)
    model = Model(mcfg, device=device)  # init consumes the seeded torch RNG identically on every rank
    model.set_precision("fp8" if cfg.fp8 else "plain")
    torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout streams differ per rank
    # wrap before building the optimizer: FSDP2 swaps the parameters for sharded DTensor ones, expert
    # parallelism keeps only this rank's experts
    if cfg.expert_parallel > 1:
        wrapped = ExpertParallel(model, d, cfg.expert_parallel, device)
    else:
        wrapped = wrap_model(model, d, device, cfg.fsdp)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, bf16_moments=cfg.bf16_moments)
    loader = PackedLoader(train_tokens, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=d.rank,
                          world_size=d.world_size, device=device)
    start_step, metrics_offset = 0, None
    if resume_path is not None:
        if d.is_main:
            remove_stale_temps(out_dir)
        d.barrier()
        shard = (lambda sd, osd: wrapped.shard_state(sd, osd, optimizer)) if cfg.expert_parallel > 1 else None
        state, rng = load_checkpoint(resume_path, model, optimizer, fsdp=cfg.fsdp and d.enabled, shard=shard)
        if bool(state.get("fsdp")) != (cfg.fsdp and d.enabled):
            raise ValueError(f"{resume_path} was written {'with' if state.get('fsdp') else 'without'} FSDP: "
                             "resume it the same way (its optimizer state is stored differently)")
        loader.load_state_dict(state["loader"])
        start_step, metrics_offset = int(state["step"]), int(state["metrics_offset"])
        set_rng_state(rng)
        if d.rank > 0:
            torch.manual_seed(cfg.seed + 1 + d.rank + start_step)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    autocast = autocast_context(cfg, device)

    fpt, fpt_source = flops_per_token(mcfg, cfg.seq_len)
    peak = peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world_size
    bias_stop = math.ceil(cfg.max_steps * (1 - cfg.bias_update_stop_frac))
    nan_step = int(os.environ.get("NANOSEEK_TEST_NAN_AT_STEP", "0") or 0)

    log = None
    if d.is_main:
        log = MetricsLog(out_dir, cfg.max_steps, start_step, cfg.log_every, metrics_offset, cfg.tensorboard)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        log.print(f"nanoseek pretrain: {n_params / 1e6:.2f}M params, {d.world_size} rank(s) on {device}, "
                  f"{tokens_per_step:,} tokens/step, FLOPs/token {fpt:.3g} ({fpt_source}); "
                  + (f"resuming from {resume_path} at step {start_step}" if resume_path else "fresh start"))

    model.train()
    summary: dict = {"start_step": start_step}
    step_times: list[float] = []
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_frac)
        set_lr(optimizer, lr)
        gamma = cfg.bias_update_gamma if step < bias_stop else 0.0
        parts_cpu, grad_norm, load = optimizer_step(cfg, d, model, wrapped, optimizer, loader, autocast, device,
                                                     step, gamma, nan_step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)

        n = step + 1  # steps completed
        tps = tokens_per_step / dt
        record = {"step": n, **dict(zip(LOSS_PARTS, parts_cpu)), "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tps, "mfu": (fpt * tps / (peak * d.world_size)) if peak else None,
                  "step_time_s": dt, "max_memory_bytes": peak_memory_bytes(device), "router_gamma": gamma}
        if isinstance(wrapped, ExpertParallel):  # rank 0's dispatch traffic (activation bytes to other ranks)
            st = wrapped.ep.stats
            record["ep_bytes_per_token_layer"] = st.bytes_remote / max(st.tokens, 1)
            st.reset()
        if load is not None:
            record["max_vio"] = max_vio(load).tolist()
            record["expert_load"] = load.round().long().tolist()
        if log is not None:
            log.write(record)
        summary.update({k: record[k] for k in ("step", "loss", "tokens_per_s")})

        last = n == cfg.max_steps
        if last or (cfg.eval_every and n % cfg.eval_every == 0):
            # every rank evaluates the same global-batch-sized windows (same numbers for any world size)
            ev = evaluate(model, val_tokens, cfg.seq_len, cfg.batch_size * d.world_size, cfg.eval_batches,
                          device, val_bytes, autocast_context(cfg, device))
            if log is not None:
                log.write({"step": n, **{k: ev[k] for k in ("val_loss", "val_ppl", "val_bpb")}})
            summary.update({k: ev[k] for k in ("val_loss", "val_ppl", "val_bpb")})
            if d.is_main and cfg.plots:
                from .plots import plot_run

                plot_run(out_dir)
        if last or (cfg.save_every and n % cfg.save_every == 0):
            _save(cfg, d, model, wrapped, tok, optimizer, loader, n, log)
    if log is not None:
        log.close()
    if step_times:
        warm = step_times[1:] or step_times
        summary["mean_tokens_per_s"] = tokens_per_step * len(warm) / sum(warm)
    summary["val_unigram_byte_entropy"] = corpus.unigram_byte_entropy("val")
    return summary


def optimizer_step(cfg: TrainConfig, d: Dist, model, wrapped, optimizer, loader, autocast, device, step: int,
                    gamma: float, nan_step: int) -> tuple[list[float], float, torch.Tensor | None]:
    """One optimizer step over grad_accum micro-batches, then the router bias update.

    Returns (global-mean loss parts, grad norm, (n_moe_layers, E) global expert loads of the step or None).
    Raises TrainingDiverged before optimizer.step() when a loss part or the grad norm is not finite.
    """
    parts = torch.zeros(len(LOSS_PARTS), dtype=torch.float32, device=device)  # (4,) step means
    zero = torch.zeros((), device=device)
    batches = [loader.next_batch() for _ in range(cfg.grad_accum)]  # [(x, y) of (B, T)] this rank's micro-batches
    weights = _micro_weights([y for _, y in batches], d)
    for micro, (x, y) in enumerate(batches):
        sync = contextlib.nullcontext()
        if d.enabled and not cfg.fsdp and micro < cfg.grad_accum - 1:
            sync = wrapped.no_sync()  # all-reduce gradients only on the last micro-batch
        with sync:
            with autocast:
                out = wrapped(x, targets=y)
            if nan_step == step + 1:  # test hook
                out.main_loss, out.loss = out.main_loss * float("nan"), out.loss * float("nan")
            (out.loss * weights[micro]).backward()
        vals = [out.loss, out.main_loss, out.mtp_loss, out.balance_loss]
        parts += torch.stack([(zero if v is None else v.detach().float()) for v in vals]) * weights[micro]
    d.all_reduce_mean_(parts)
    parts_cpu = parts.tolist()
    bad = [n for n, v in zip(LOSS_PARTS, parts_cpu) if not math.isfinite(v)]
    if bad:
        raise TrainingDiverged(f"step {step + 1}: non-finite {', '.join(bad)} "
                               f"({', '.join(f'{n}={v}' for n, v in zip(LOSS_PARTS, parts_cpu))}); "
                               "stopped before the optimizer step; the last checkpoint is intact")
    if isinstance(wrapped, ExpertParallel):  # explicit gradient averaging over the (data, expert) mesh
        grad_norm = wrapped.reduce_and_clip_(cfg.grad_clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(f"step {step + 1}: gradient norm is {grad_norm}; stopped before the "
                               "optimizer step; the last checkpoint is intact")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    load = model.expert_load_accum  # (n_moe_layers, E) summed over this step's micro-batches
    if load is not None:
        d.all_reduce_sum_(load)
        load = load.detach().cpu().clone()
    model.update_router_bias(gamma)  # consumes and resets expert_load_accum
    return parts_cpu, grad_norm, load


def _micro_weights(targets: list[torch.Tensor], d: Dist) -> list[float]:
    """Weight of each micro-batch's mean loss so that the step's gradient (after DDP's mean over ranks) is the
    gradient of the mean over *every target token of the global batch*: w_i = n_i * world_size / N, with n_i
    the targets (labels != -100) of micro-batch i and N their sum over micro-batches and ranks. Packed
    pretraining batches all hold B*T targets, so w_i = 1 / grad_accum; SFT batches hold different numbers of
    completion tokens, and a plain mean of means would weight a token by its micro-batch's (or rank's) size.
    """
    counts = torch.tensor([float((y != -100).sum()) for y in targets], dtype=torch.float64)
    total = d.all_reduce_sum_(counts.sum().to(targets[0].device)).item() if d.enabled else float(counts.sum())
    if total == 0:  # no targets anywhere (cannot come from the loaders): the plain mean, loss 0 and no gradient
        return [1.0 / len(targets)] * len(targets)
    return [float(n) * d.world_size / total for n in counts]


def _save(cfg: TrainConfig, d: Dist, model, wrapped, tok, optimizer, loader, step: int,
          log: MetricsLog | None) -> None:
    """Rank 0 writes checkpoints/step-{step}; the others wait so nobody runs ahead of a half-written one."""
    fsdp = cfg.fsdp and d.enabled
    gathered = gather_fsdp_state(model, optimizer) if fsdp else None  # every rank takes part in the gather
    if isinstance(wrapped, ExpertParallel):
        gathered = wrapped.full_state(optimizer)  # experts gathered: the 1-process layout
    if d.is_main:
        state = {"step": step, "loader": loader.state_dict(), "metrics_offset": log.offset(),
                 "world_size": d.world_size, "fsdp": fsdp, "expert_parallel": cfg.expert_parallel,
                 "train_config": cfg.to_dict()}
        save_checkpoint(model, tok, cfg.out_dir, step, optimizer, state, rng_state(), cfg.keep_last, gathered)
    d.barrier()
