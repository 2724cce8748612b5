"""Fine-tuning: LoRA (default) or full, on SFT data, through the pretraining loop's optimizer step.

    nanoseek finetune --base CKPT --data builtin:email --out-dir runs/email            # LoRA r=16, all layers
    nanoseek finetune --base CKPT --data sft.jsonl --out-dir runs/full --full          # full fine-tuning
    torchrun --nproc-per-node 2 -m nanoseek finetune --base CKPT --data ... --lora-r 8  # data parallel
    python -m nanoseek.train.finetune ...                                               # same, without the CLI

The run loop is pretraining's (loop.py): seeding, exact resume (weights, optimizer, loader position, RNG), the
optimizer step (grad accumulation, token-weighted loss, NaN stop, global grad clipping, AdamW), the LR schedule,
metrics.jsonl + progress display + plots, evaluation and atomic `checkpoints/step-N/` with `trainer_state/`
(state.py). `configure_optimizer` takes every parameter that requires grad: for LoRA only the adapter's A/B.
This file supplies what differs, and why:
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
    (expert_parallel.py): full fine-tuning or LoRA, the routed experts' per-expert LoRA factors sharded as the
    experts (checkpoints and the final adapter hold all of them: the one-process PEFT files).
For a JSONL file without --val-data, every 20th record (index % 20 == 19) is held out for validation.

Rejected: a separate fine-tuning loop (a second copy of step/NaN/clip/resume logic to keep in sync); an
`adapter` switch inside the loop's forward call (`AdapterRunner`, a 10-line wrapper module, does it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import lora_io
from ..config import IGNORE_INDEX
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
from ..fileio import atomic_directory
from ..lora_config import LoraConfig, VeraConfig
from ..model.precision import quantize_base
from ..modeling import Model
from .distributed import Dist, distributed_run, wrap_model
from .expert_parallel import ExpertParallel
from .flags import add_flags, flag
from .loop import Job, Run, autocast_context, begin, resume, run_loop
from .optim import SCHEDULES, configure_optimizer
from .state import load_checkpoint, read_trainer_state

PEFT_METHODS = ("lora", "vera")


@dataclass
class FinetuneConfig:
    base: str = flag(dataclasses.MISSING, "base checkpoint directory (HF format, with tokenizer.json)")
    data: str = flag(dataclasses.MISSING, 'training data: "builtin:<task>" (a stdlib package, e.g. builtin:email) '
                                          'or a JSONL file of {"prompt","completion"} or {"messages"} records')
    out_dir: str = flag(dataclasses.MISSING, "run directory: metrics.jsonl, plots, checkpoints/, and the final "
                                             "adapter/ (or model/)")
    full: bool = flag(False, "full fine-tuning (every weight) instead of LoRA")
    adapter_name: str = flag("default", "the adapter's name inside the model")
    r: int = flag(16, "LoRA rank (also the DoRA and VeRA rank)", names=("--lora-r", "--r"))
    lora_alpha: float = flag(32.0, "LoRA alpha: gamma = alpha / r (alpha / sqrt(r) with --use-rslora)")
    lora_dropout: float = flag(0.0, "dropout on the adapter's input")
    target_modules: str = flag("all-linear", '"all-linear" or comma-separated module names (q_proj, kv_b_proj, '
                                             "o_proj, experts, ...)")
    use_rslora: bool = flag(False, "rank-stabilised scaling gamma = alpha / sqrt(r)")
    dora: bool = flag(False, "DoRA: a trained magnitude per output row times the row-normalised W + gamma B A "
                             "(linear layers only; on DeepseekV3 the attention projections, see README)")
    peft: str = flag("lora", "adapter method: lora (LoRA / rsLoRA / DoRA) or vera (frozen shared random A/B, "
                             "trained vectors; --lora-r is its rank, --lora-alpha is unused)", choices=PEFT_METHODS)
    projection_prng_key: int = flag(0, "VeRA: seed of the shared random projections (peft's projection_prng_key)")
    vera_d_initial: float = flag(0.1, "VeRA: initial value of lambda_d (peft's d_initial)")
    lr: float | None = flag(None, "peak learning rate (default: 5e-4 for LoRA, 5e-5 for --full)")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    max_steps: int = flag(200, "optimizer steps")
    batch_size: int = flag(8, "sequences per micro-batch per process")
    seq_len: int = flag(256, "tokens per sequence (longer examples are truncated)")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    warmup_steps: int = flag(10, "linear warm-up steps")
    schedule: str = flag("cosine", f"lr schedule, one of {SCHEDULES}")
    min_lr_ratio: float = flag(0.1, "final lr / peak lr")
    decay_frac: float = flag(0.2, "wsd: fraction of steps in the final decay")
    grad_clip: float = flag(1.0, "global gradient-norm clip (0 = off)")
    bias_update_gamma: float = flag(0.001, "router-bias update speed (full fine-tuning only; LoRA keeps the base "
                                           "frozen)")
    bias_update_stop_frac: float = flag(0.1, "full fine-tuning: gamma becomes 0 for this last fraction of steps")
    pack: bool = flag(False, "pack examples into full rows instead of one padded example per row")
    val_data: str | None = flag(None, "validation JSONL (default for a JSONL --data: every 20th record is held out)")
    eval_tasks: str = flag("", "comma-separated built-in tasks also evaluated (their val split)")
    eval_every: int = flag(50, "validate every N steps (0 = only at the end)")
    eval_batches: int = flag(20, "validation batches per evaluation")
    save_every: int = flag(100, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = flag(2, "checkpoints kept")
    log_every: int = flag(10, "print every N steps")
    prompt_lines: int = flag(16, "built-in tasks: lines of the file in the prompt")
    completion_lines: int = flag(8, "built-in tasks: lines to complete")
    seed: int = flag(0, "seed of the data order and the adapter's initialisation")
    device: str = flag("auto", "auto, cpu, cuda")
    dtype: str = flag("auto", "auto (bf16 autocast on CUDA and on CPUs with native bf16 GEMMs; fp32 otherwise), "
                              "bfloat16 or float32")
    resume: str | None = flag(None, "a checkpoint directory or 'latest' to continue from; bare flag = latest",
                                const="latest")
    plots: bool = flag(True, "write PNG plots of the metrics")
    tensorboard: bool = flag(False, "also log to TensorBoard")
    activation_checkpointing: bool = flag(False, "recompute each block's activations in the backward instead of "
                                                 "keeping them (less memory, ~1/3 more compute)")
    expert_parallel: int = flag(1, "under torchrun: spread the routed experts (and their LoRA factors) over "
                                   "groups of N ranks; 1: every rank holds every expert")
    fp8: bool = flag(False, "fine-grained FP8 projections and routed experts (1x128 tiles, 128x128 blocks, E4M3; "
                            "emulated on CPU)")
    base_fp8: bool = flag(False, "hold the frozen base projections and routed experts as FP8 128x128 blocks "
                                 "(+ scales), full-precision copy freed; LoRA only; the adapter is an ordinary PEFT "
                                 "adapter of the unquantized base")

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
        if self.base_fp8 and self.dora:
            raise ValueError("FinetuneConfig: base_fp8=True (--base-fp8) cannot be combined with --dora: DoRA needs "
                             "the base weight's row norms, which the FP8 blocks do not keep")
        if not 0 <= self.bias_update_stop_frac <= 1:
            raise ValueError(f"FinetuneConfig.bias_update_stop_frac={self.bias_update_stop_frac} must be in [0, 1]")
        if self.lr <= 0 or self.warmup_steps < 0 or self.lora_dropout < 0 or self.lora_dropout >= 1:
            raise ValueError(f"FinetuneConfig: need lr > 0, warmup_steps >= 0 and 0 <= lora_dropout < 1 "
                             f"(got {self.lr}, {self.warmup_steps}, {self.lora_dropout})")

    def lora_config(self) -> LoraConfig | VeraConfig:
        targets = self.target_modules if self.target_modules == "all-linear" else \
            [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if self.peft == "vera":
            return VeraConfig(r=self.r, target_modules=targets, projection_prng_key=self.projection_prng_key,
                                   vera_dropout=self.lora_dropout, d_initial=self.vera_d_initial)
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=targets, use_rslora=self.use_rslora, use_dora=self.dora)

    def method(self) -> str:
        """'full', 'LoRA r=16', 'DoRA r=16' or 'VeRA r=256' (for logs)."""
        kind = "VeRA" if self.peft == "vera" else "DoRA" if self.dora else "LoRA"
        return "full" if self.full else f"{kind} r={self.r}"


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
        n = int((y != IGNORE_INDEX).sum())
        total, count = total + float(out.main_loss) * n, count + n
    runner.model.train(was)
    return total / max(count, 1)


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning run; returns a summary dict. Under torchrun, every rank calls this."""
    return distributed_run(_finetune, cfg)


def _finetune(cfg: FinetuneConfig, d: Dist, device: torch.device) -> dict:
    out_dir = Path(cfg.out_dir)
    resume_path = begin(cfg)
    tok = Tokenizer.load(cfg.base)
    model = Model.from_pretrained(cfg.base, device=device)
    model.activation_checkpointing = cfg.activation_checkpointing
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
    run = Run(cfg, d, device, model, wrapped, optimizer, loader, autocast_context(cfg, device))

    def evaluate() -> dict:
        ev = {"val_loss": sft_loss(runner, val_ex, cfg, device, run.autocast)}
        ev.update({f"val_loss/{t}": sft_loss(runner, ex, cfg, device, run.autocast) for t, ex in extra_ex.items()})
        return ev

    def gather() -> tuple[dict, dict] | None:
        """Under expert parallelism (every rank takes part): (model state, optimizer state) with the experts
        gathered (full), or (adapter PEFT tensors, optimizer state) with the expert factors gathered (LoRA);
        else None."""
        if not isinstance(wrapped, ExpertParallel):
            return None
        return wrapped.full_state(optimizer) if cfg.full else wrapped.full_adapter_state(name, optimizer)

    job = Job("finetune", evaluate=evaluate, load=lambda path: _load(run, cfg, name, path),
              write=lambda path, extra, gathered: _write(cfg, model, name, tok, path, extra, gathered),
              gather=gather, state={"finetune_config": dataclasses.asdict(cfg)},
              gamma_scale=1.0 if cfg.full else 0.0,  # LoRA: the router bias is part of the frozen base
              eval_at_start=True)
    start_step, metrics_offset = resume(run, job, resume_path) if resume_path is not None else (0, None)

    if d.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    n_train = sum(p.numel() for p in {id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
    n_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    header = (f"nanoseek finetune ({cfg.method()}): {n_train / 1e6:.3f}M of "
              f"{n_all / 1e6:.2f}M params trained on {d.world_size} rank(s) on {device}, "
              f"{len(train_ex)} train / {len(val_ex)} val examples, "
              + (f"resuming from {resume_path} at step {start_step}" if resume_path else "fresh start"))
    summary = run_loop(run, job, start_step, metrics_offset, header)
    summary["output"] = str(out_dir / ("model" if cfg.full else "adapter"))
    gathered = gather() if cfg.full else None
    view = wrapped.adapter_view() if isinstance(wrapped, ExpertParallel) and not cfg.full else nullcontext()
    with view:  # expert parallelism: every rank gathers the expert factors
        if d.is_main and cfg.full:
            model.save_pretrained(out_dir / "model", tokenizer=tok, extra=add_chat_template,
                                  state_dict=None if gathered is None else gathered[0])
        elif d.is_main:
            model.save_adapter(out_dir / "adapter", name, base_model_name_or_path=str(cfg.base))
    d.barrier()
    return summary


def _load(run: Run, cfg: FinetuneConfig, name: str | None, path: Path) -> tuple[dict, dict]:
    """Copy checkpoint `path` into the model (all weights, or the adapter's in place) and the optimizer."""
    if cfg.full:
        shard = (lambda sd, osd: run.wrapped.shard_state(sd, osd, run.optimizer)) if cfg.expert_parallel > 1 else None
        return load_checkpoint(path, run.model, run.optimizer, shard=shard)
    osd, rng, state = read_trainer_state(path)
    if isinstance(run.wrapped, ExpertParallel):  # expert factors sliced for this rank
        run.wrapped.load_adapter_weights_(name, path)
        osd = run.wrapped.shard_state({}, osd, run.optimizer)[1]
    else:
        lora_io.copy_adapter_weights_(run.model, name, path)
    run.optimizer.load_state_dict(osd)
    return state, rng


def _write(cfg: FinetuneConfig, model: Model, name: str | None, tok, path: Path, extra, gathered) -> Path:
    """A checkpoint's content: a full model directory (full) or a PEFT adapter directory + the tokenizer (LoRA);
    extra(tmp) adds trainer_state/ before the atomic rename."""
    if cfg.full:
        return model.save_pretrained(path, tokenizer=tok, extra=extra,
                                     state_dict=None if gathered is None else gathered[0])

    def fill(tmp: Path) -> None:
        lora_io.write_adapter(model, name, tmp, str(cfg.base), None if gathered is None else gathered[0])
        tok.save(tmp)
        add_chat_template(tmp)
        extra(tmp)

    return atomic_directory(path, fill)


# ---------------------------------------------------------------------------------------------- CLI
def add_finetune_command(subparsers) -> None:
    """Register `nanoseek finetune` (every FinetuneConfig field is a --flag)."""
    p = subparsers.add_parser("finetune", help="LoRA (default) or full fine-tuning on SFT data",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, FinetuneConfig)
    p.set_defaults(func=lambda args: _run(args))


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
    add_flags(p, FinetuneConfig)
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
