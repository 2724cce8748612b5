"""Fine-tuning: LoRA (default) or full, on SFT data, through the pretraining loop's optimizer step.

    nanoseek finetune --base CKPT --data builtin:email --out-dir runs/email            # LoRA r=16, all layers
    nanoseek finetune --base CKPT --data sft.jsonl --out-dir runs/full --full          # full fine-tuning
    torchrun --nproc-per-node 2 -m nanoseek finetune --base CKPT --data ... --lora-r 8  # data parallel
    python -m nanoseek.train.finetune ...                                               # same, without the CLI

What is reused from the pretraining loop (trainer.py): one optimizer step (`optimizer_step`: grad
accumulation, NaN stop, global grad clipping, AdamW step), the LR schedule, `configure_optimizer` (it takes
every parameter that requires grad: for LoRA only the adapter's A/B), metrics.jsonl + progress display +
plots, and the checkpoint contract of state.py (atomic `checkpoints/step-N/` with `trainer_state/`, exact
resume: weights, optimizer, loader position, RNG). Differences, and why:
  * data: `SFTLoader` (completion-only targets, padding or packing) instead of the packed corpus stream;
    validation = mean completion-token loss on the held-out records (`--eval-tasks` adds other built-in tasks:
    an adapter should lower its own task's loss more than the others').
  * LoRA checkpoints are adapter directories (PEFT format) + trainer_state, not model directories; the final
    result is `out_dir/adapter` (LoRA) or `out_dir/model` (full).
  * the router bias is part of the frozen base, so LoRA runs never update it (gamma = 0); full runs do.
  * data parallel under torchrun (`torchrun --nproc-per-node N -m nanoseek finetune ...`): DDP wraps the
    adapter runner, so only the parameters that train (A/B for LoRA, everything for --full) are all-reduced;
    rank r takes rows [r*B, (r+1)*B) of each global batch, so N processes with batch B follow one process with
    batch N*B. Rank 0 alone logs and writes checkpoints; every rank evaluates the same validation batches.
    No FSDP yet: a LoRA run's trained state is tiny; full fine-tuning of a model too big for one device needs it.
  * `--expert-parallel N` spreads the routed experts over groups of N ranks as in pretraining
    (expert_parallel.py): full fine-tuning, or LoRA on modules other than the routed experts (LoRA on
    experts under expert parallelism is refused with an error: their per-expert A/B are not sharded).
For a JSONL file without --val-data, every 20th record (index % 20 == 19) is held out for validation.

Rejected: a separate fine-tuning loop (a second copy of step/NaN/clip/resume logic to keep in sync); adding an
`adapter` switch inside trainer.py's forward call (another engineer's file; a 10-line wrapper module does it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import lora, lora_io
from ..checkpoint import atomic_directory
from ..data.sft import (
    SFTLoader,
    add_chat_template,
    builtin_task,
    encode_record,
    load_sft,
    read_jsonl,
    sft_eval_batches,
)
from ..data.tokenizer import Tokenizer
from ..model import Model
from ..model.precision import quantize_base
from .distributed import Dist, init_distributed, shutdown_distributed, wrap_model
from .expert_parallel import ExpertParallel
from .metrics import MetricsLog, peak_memory_bytes
from .optim import SCHEDULES, configure_optimizer, lr_at, set_lr
from .state import (
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temps,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .trainer import LOSS_PARTS, autocast_context, optimizer_step

PEFT_METHODS = ("lora", "vera")


@dataclass
class FinetuneConfig:
    base: str  # a checkpoint directory (HF format, with tokenizer.json)
    data: str  # "builtin:<task>" or a JSONL file of {"prompt","completion"} / {"messages"} records
    out_dir: str
    full: bool = False  # full fine-tuning instead of LoRA
    adapter_name: str = "default"
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # or a comma-separated list of module names
    use_rslora: bool = False
    dora: bool = False  # DoRA: a trained magnitude per output row (LoRA only)
    peft: str = "lora"  # lora (LoRA / rsLoRA / DoRA) or vera
    projection_prng_key: int = 0  # VeRA: seed of the shared random pair
    vera_d_initial: float = 0.1  # VeRA: initial lambda_d
    lr: float | None = None  # None: 5e-4 for LoRA, 5e-5 for full ("LoRA Without Regret": ~10x)
    weight_decay: float = 0.0
    max_steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2
    grad_clip: float = 1.0
    bias_update_gamma: float = 0.001  # full fine-tuning only
    pack: bool = False
    val_data: str | None = None
    eval_tasks: str = ""  # comma-separated built-in tasks also evaluated (val split)
    eval_every: int = 50
    eval_batches: int = 20
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    prompt_lines: int = 16
    completion_lines: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA and native-bf16 CPUs (autocast.py), else fp32
    resume: str | None = None
    plots: bool = True
    tensorboard: bool = False
    expert_parallel: int = 1
    fp8: bool = False
    base_fp8: bool = False
    fsdp: bool = False  # read by the shared optimizer step; fine-tuning uses DDP only

    def __post_init__(self):
        if self.lr is None:
            self.lr = 5e-5 if self.full else 5e-4
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "r", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"FinetuneConfig.{name}={getattr(self, name)} must be >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FinetuneConfig.schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError(f"FinetuneConfig.dtype={self.dtype!r} must be auto, bfloat16 or float32")
        if self.expert_parallel < 1:
            raise ValueError(f"FinetuneConfig.expert_parallel={self.expert_parallel} must be >= 1")
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"FinetuneConfig.peft={self.peft!r} must be one of {PEFT_METHODS}")
        if self.peft == "vera" and (self.dora or self.full):
            raise ValueError("FinetuneConfig: --peft vera cannot be combined with --dora or --full")
        if self.base_fp8 and self.full:
            raise ValueError("FinetuneConfig: base_fp8=True (--base-fp8) needs LoRA: a frozen FP8 base cannot be "
                             "fully fine-tuned (drop --full)")
        if self.lr <= 0 or self.warmup_steps < 0 or self.lora_dropout < 0 or self.lora_dropout >= 1:
            raise ValueError(f"FinetuneConfig: need lr > 0, warmup_steps >= 0 and 0 <= lora_dropout < 1 "
                             f"(got {self.lr}, {self.warmup_steps}, {self.lora_dropout})")

    def lora_config(self) -> lora.LoraConfig | lora.VeraConfig:
        targets = self.target_modules if self.target_modules == "all-linear" else \
            [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if self.peft == "vera":
            return lora.VeraConfig(r=self.r, target_modules=targets, projection_prng_key=self.projection_prng_key,
                                   vera_dropout=self.lora_dropout, d_initial=self.vera_d_initial)
        return lora.LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=targets, use_rslora=self.use_rslora, use_dora=self.dora)

    def method(self) -> str:
        """'full', 'LoRA r=16', 'DoRA r=16' or 'VeRA r=256' (for logs)."""
        kind = "VeRA" if self.peft == "vera" else "DoRA" if self.dora else "LoRA"
        return "full" if self.full else f"{kind} r={self.r}"


HELP = {  # --help text of each FinetuneConfig field
    "base": "base checkpoint directory (HF format, with tokenizer.json)",
    "data": 'training data: "builtin:<task>" (a stdlib package, e.g. builtin:email) or a JSONL file of '
            '{"prompt","completion"} or {"messages"} records',
    "out_dir": "run directory: metrics.jsonl, plots, checkpoints/, and the final adapter/ (or model/)",
    "full": "full fine-tuning (every weight) instead of LoRA",
    "adapter_name": "the adapter's name inside the model",
    "r": "LoRA rank (also the DoRA and VeRA rank)",
    "lora_alpha": "LoRA alpha: gamma = alpha / r (alpha / sqrt(r) with --use-rslora)",
    "lora_dropout": "dropout on the adapter's input",
    "target_modules": '"all-linear" or comma-separated module names (q_proj, kv_b_proj, o_proj, experts, ...)',
    "use_rslora": "rank-stabilised scaling gamma = alpha / sqrt(r)",
    "dora": "DoRA: a trained magnitude per output row times the row-normalised W + gamma B A (linear layers only; "
            "on DeepseekV3 the attention projections, see README)",
    "peft": "adapter method: lora (LoRA / rsLoRA / DoRA) or vera (frozen shared random A/B, trained vectors; "
            "--lora-r is its rank, --lora-alpha is unused)",
    "projection_prng_key": "VeRA: seed of the shared random projections (peft's projection_prng_key)",
    "vera_d_initial": "VeRA: initial value of lambda_d (peft's d_initial)",
    "lr": "peak learning rate (default: 5e-4 for LoRA, 5e-5 for --full)",
    "weight_decay": "AdamW weight decay",
    "max_steps": "optimizer steps",
    "batch_size": "sequences per micro-batch per process",
    "seq_len": "tokens per sequence (longer examples are truncated)",
    "grad_accum": "micro-batches per optimizer step",
    "warmup_steps": "linear warm-up steps",
    "schedule": f"lr schedule, one of {SCHEDULES}",
    "min_lr_ratio": "final lr / peak lr",
    "decay_frac": "wsd: fraction of steps in the final decay",
    "grad_clip": "global gradient-norm clip (0 = off)",
    "bias_update_gamma": "router-bias update speed (full fine-tuning only; LoRA keeps the base frozen)",
    "expert_parallel": "under torchrun: spread the routed experts over groups of N ranks (full fine-tuning, or "
                       "LoRA whose --target-modules leave out the experts); 1: every rank holds every expert",
    "pack": "pack examples into full rows instead of one padded example per row",
    "val_data": "validation JSONL (default for a JSONL --data: every 20th record is held out)",
    "eval_tasks": "comma-separated built-in tasks also evaluated (their val split)",
    "eval_every": "validate every N steps (0 = only at the end)",
    "eval_batches": "validation batches per evaluation",
    "save_every": "checkpoint every N steps (0 = only at the end)",
    "keep_last": "checkpoints kept",
    "log_every": "print every N steps",
    "prompt_lines": "built-in tasks: lines of the file in the prompt",
    "completion_lines": "built-in tasks: lines to complete",
    "seed": "seed of the data order and the adapter's initialisation",
    "device": "auto, cpu, cuda",
    "dtype": "auto (bf16 autocast on CUDA and on CPUs with native bf16 GEMMs; fp32 otherwise), bfloat16 or float32",
    "resume": "a checkpoint directory or 'latest' to continue from",
    "plots": "write PNG plots of the metrics",
    "tensorboard": "also log to TensorBoard",
    "base_fp8": "hold the frozen base projections as FP8 128x128 blocks (+ scales), full-precision copy freed; "
                "LoRA only; the adapter is an ordinary PEFT adapter of the unquantized base",
    "fp8": "fine-grained FP8 projections and routed experts (1x128 tiles, 128x128 blocks, E4M3; emulated on CPU)",
}


class AdapterRunner(nn.Module):
    """model(x, targets=y) with one adapter switched on: what the shared optimizer step calls."""

    def __init__(self, model: Model, adapter: str | None):
        super().__init__()
        self.model, self.adapter = model, adapter
        self.config = model.config  # what distributed.wrap_model reads

    def forward(self, x, targets=None, **kw):
        return self.model(x, targets=targets, adapter=self.adapter, **kw)


def _data(cfg: FinetuneConfig, tok: Tokenizer):
    kw = dict(prompt_lines=cfg.prompt_lines, completion_lines=cfg.completion_lines)
    if cfg.data.startswith("builtin:"):
        train, val = load_sft(cfg.data, tok, "train", **kw), load_sft(cfg.data, tok, "val", **kw)
    elif cfg.val_data:
        train, val = load_sft(cfg.data, tok), load_sft(cfg.val_data, tok)
    else:
        recs = read_jsonl(cfg.data)
        train = [encode_record(tok, r) for i, r in enumerate(recs) if i % 20 != 19 or len(recs) < 2]
        val = [encode_record(tok, r) for i, r in enumerate(recs) if i % 20 == 19] or train[-1:]
    extra = {}
    for t in (t.strip() for t in cfg.eval_tasks.split(",")):
        if t:
            extra[t] = [encode_record(tok, r) for r in builtin_task(t, "val", **kw)]
    return train, val, extra


@torch.no_grad()
def sft_loss(runner: AdapterRunner, examples, cfg: FinetuneConfig, device, autocast) -> float:
    """Mean loss over the completion tokens of the first eval_batches padded batches."""
    was = runner.model.training
    runner.model.eval()
    total, count = 0.0, 0
    for x, y in sft_eval_batches(examples, cfg.seq_len, cfg.batch_size, cfg.eval_batches, device):
        with autocast:
            out = runner(x, targets=y)
        n = int((y != -100).sum())
        total, count = total + float(out.main_loss) * n, count + n
    runner.model.train(was)
    return total / max(count, 1)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning run; returns a summary dict. Under torchrun, every rank calls this."""
    d, device = init_distributed(cfg.device)
    try:
        return _finetune(cfg, d, device)
    finally:
        shutdown_distributed()


def _finetune(cfg: FinetuneConfig, d: Dist, device: torch.device) -> dict:
    out_dir = Path(cfg.out_dir)
    resume_path = resolve_resume(cfg.resume, out_dir) if cfg.resume else None
    if resume_path is None and list_checkpoints(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints: pass --resume latest, or choose another --out-dir")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    tok = Tokenizer.load(cfg.base)
    model = Model.from_pretrained(cfg.base, device=device)
    model.set_precision("fp8" if cfg.fp8 else "plain")
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{cfg.base}: tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    name = None
    if cfg.full:
        model.trainable_adapter(None)
    else:
        name = cfg.adapter_name
        model.add_adapter(name, cfg.lora_config())
        model.trainable_adapter(name)
        if cfg.base_fp8:
            quantize_base(model)  # after add_adapter: A/B stay full precision
    torch.manual_seed(cfg.seed + 1 + d.rank)  # the adapter's init above is the same on every rank; dropout differs
    runner = AdapterRunner(model, name)
    if cfg.expert_parallel > 1:  # experts sharded; explicit gradient averaging (expert_parallel.py)
        wrapped = ExpertParallel(runner, d, cfg.expert_parallel, device, model=model)
    else:
        wrapped = wrap_model(runner, d, device)  # DDP over the parameters that train, for world_size > 1
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay)
    train_ex, val_ex, extra_ex = _data(cfg, tok)
    loader = SFTLoader(train_ex, cfg.seq_len, cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world_size,
                       device=device, pack=cfg.pack, pad_id=tok.pad_id)
    autocast = autocast_context(cfg, device)

    start_step, metrics_offset = 0, None
    if resume_path is not None:
        if d.is_main:
            remove_stale_temps(out_dir)  # a checkpoint half-written when the last run was killed
        d.barrier()
        if cfg.full:
            shard = (lambda sd, osd: wrapped.shard_state(sd, osd, optimizer)) if cfg.expert_parallel > 1 else None
            state, rng = load_checkpoint(resume_path, model, optimizer, shard=shard)
        else:
            lora_io.copy_adapter_weights_(model, name, resume_path)
            optimizer.load_state_dict(torch.load(resume_path / "trainer_state" / "optimizer.pt", map_location="cpu",
                                                 weights_only=True))
            rng = torch.load(resume_path / "trainer_state" / "rng.pt", map_location="cpu", weights_only=True)
            state = json.loads((resume_path / "trainer_state" / "state.json").read_text())
        loader.load_state_dict(state["loader"])
        start_step, metrics_offset = int(state["step"]), int(state["metrics_offset"])
        set_rng_state(rng)  # rank 0's state; the other ranks re-seed their dropout streams
        if d.rank > 0:
            torch.manual_seed(cfg.seed + 1 + d.rank + start_step)

    log = _RankLog(MetricsLog(out_dir, cfg.max_steps, start_step, cfg.log_every, metrics_offset, cfg.tensorboard)
                   if d.is_main else None)
    if d.is_main:
        (out_dir / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    n_train = sum(p.numel() for p in {id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
    n_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log.print(f"nanoseek finetune ({cfg.method()}): {n_train / 1e6:.3f}M of "
              f"{n_all / 1e6:.2f}M params trained on {d.world_size} rank(s) on {device}, "
              f"{len(train_ex)} train / {len(val_ex)} val examples, "
              + (f"resuming from {resume_path} at step {start_step}" if resume_path else "fresh start"))

    def evaluate_all(step: int) -> dict:
        ev = {"val_loss": sft_loss(runner, val_ex, cfg, device, autocast)}
        ev.update({f"val_loss/{t}": sft_loss(runner, ex, cfg, device, autocast) for t, ex in extra_ex.items()})
        log.write({"step": step, **ev})
        return ev

    summary: dict = {"start_step": start_step}
    if start_step == 0:
        summary["initial"] = evaluate_all(0)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world_size
    bias_stop = math.ceil(cfg.max_steps * 0.9)
    model.train()
    for step in range(start_step, cfg.max_steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule, cfg.decay_frac)
        set_lr(optimizer, lr)
        gamma = cfg.bias_update_gamma if cfg.full and step < bias_stop else 0.0  # LoRA: the base stays frozen
        parts, grad_norm, _ = optimizer_step(cfg, d, model, wrapped, optimizer, loader, autocast, device,
                                              step, gamma, 0)
        dt = time.perf_counter() - t0
        n = step + 1
        log.write({"step": n, **dict(zip(LOSS_PARTS, parts)), "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                   "max_memory_bytes": peak_memory_bytes(device)})
        summary.update(step=n, loss=parts[0])
        last = n == cfg.max_steps
        if last or (cfg.eval_every and n % cfg.eval_every == 0):
            summary.update(evaluate_all(n))
            if cfg.plots and d.is_main:
                from .plots import plot_run

                plot_run(out_dir)
        if last or (cfg.save_every and n % cfg.save_every == 0):
            state = {"step": n, "loader": loader.state_dict(), "metrics_offset": log.offset(),
                     "world_size": d.world_size, "finetune_config": dataclasses.asdict(cfg)}
            gathered = _gather(cfg, wrapped, optimizer)  # every rank takes part
            if d.is_main:
                _save(cfg, model, name, tok, optimizer, state, n, gathered)
            d.barrier()  # nobody runs ahead of a half-written checkpoint
    log.close()
    summary["output"] = str(out_dir / ("model" if cfg.full else "adapter"))
    gathered = _gather(cfg, wrapped, optimizer)
    if d.is_main:
        if cfg.full:
            model.save_pretrained(out_dir / "model", tokenizer=tok, extra=add_chat_template,
                                  state_dict=None if gathered is None else gathered[0])
        else:
            model.save_adapter(out_dir / "adapter", name, base_model_name_or_path=str(cfg.base))
    d.barrier()
    return summary


class _RankLog:
    """MetricsLog on rank 0; the other ranks' writes and prints go nowhere."""

    def __init__(self, log: MetricsLog | None):
        self.log = log

    def __getattr__(self, name):
        return getattr(self.log, name) if self.log is not None else (lambda *a, **k: None)


def _gather(cfg: FinetuneConfig, wrapped, optimizer) -> tuple[dict, dict] | None:
    """Full fine-tuning under expert parallelism: (model, optimizer) state with the experts gathered; else None
    (a LoRA adapter never holds expert factors there)."""
    return wrapped.full_state(optimizer) if cfg.full and isinstance(wrapped, ExpertParallel) else None


def _save(cfg: FinetuneConfig, model: Model, name: str | None, tok, optimizer, state: dict, step: int,
          gathered: tuple[dict, dict] | None = None) -> Path:
    """checkpoints/step-N: a full model directory (full) or an adapter directory (LoRA), + trainer_state/."""
    if cfg.full:
        return save_checkpoint(model, tok, cfg.out_dir, step, optimizer, state, rng_state(), cfg.keep_last,
                               gathered)
    tensors = lora_io.adapter_state_dict(model, name)
    peft_cfg = lora_io.peft_config_dict(model, name, str(cfg.base))
    rng = rng_state()

    def fill(tmp: Path):
        from safetensors.torch import save_file

        (tmp / lora_io.ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / lora_io.ADAPTER_WEIGHTS), metadata={"format": "pt"})
        tok.save(tmp)
        add_chat_template(tmp)
        d = tmp / "trainer_state"
        d.mkdir()
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        torch.save(rng, d / "rng.pt")
        (d / "state.json").write_text(json.dumps(state, indent=2) + "\n")  # last: marks "complete"

    path = atomic_directory(checkpoint_dir(cfg.out_dir, step), fill)
    for old in list_checkpoints(cfg.out_dir)[:-cfg.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def add_finetune_command(subparsers) -> None:
    """Register `nanoseek finetune` (every FinetuneConfig field is a --flag)."""
    p = subparsers.add_parser("finetune", help="LoRA (default) or full fine-tuning on SFT data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_flags(p)
    p.set_defaults(func=lambda args: _run(args))


def _add_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "fsdp":
            continue
        help_ = HELP[f.name] + ("" if f.default in (dataclasses.MISSING, None, "") else f" (default: {f.default})")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=HELP[f.name])
        elif f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=help_)
        else:
            kind = {"int": int, "float": float, "float | None": float}.get(str(f.type), str)
            # the rank is --lora-r (--r also works, but not after torchrun, which reads it as its own --r...)
            flags = ("--lora-r", "--r") if f.name == "r" else (flag,)
            p.add_argument(*flags, dest=f.name, type=kind, default=f.default, help=help_,
                           choices=PEFT_METHODS if f.name == "peft" else None)


def _run(args: argparse.Namespace) -> int:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})
    summary = finetune(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 prints the one summary line
        print(json.dumps({k: v for k, v in summary.items() if k != "initial"} | {"initial": summary.get("initial")}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_flags(p)
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
