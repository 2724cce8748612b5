"""Pretraining: the packed corpus stream through the shared run loop (loop.py).

What this file supplies to loop.py (everything else, the step, resume, metrics, plots, checkpoints and the NaN
stop, is the loop's): the data (corpus, tokenizer, `PackedLoader`), the model built from the TrainConfig (with
its precision recipe), its wrapper (DDP, FSDP2 or expert parallelism, then torch.compile), and the checkpoint
content: a Hugging Face model directory (experts and FSDP shards gathered first) + trainer_state/ (state.py).
Validation is bits per byte and perplexity on the held-out split (evaluate.py).

Why: pretraining and fine-tuning differ in data and in what a checkpoint holds, not in the loop.
Rejected: HF Trainer / Lightning (hide the step; no aux-free bias update).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import PackedLoader, get_or_train_tokenizer, load_corpus, tokenize_corpus
from ..modeling import Model
from .config import TrainConfig
from .distributed import Dist, distributed_run, wrap_model
from .evaluate import evaluate
from .expert_parallel import ExpertParallel, check_mesh
from .loop import LOSS_PARTS, Job, Run, TrainingDiverged, autocast_context, begin, optimizer_step, resume, run_loop
from .metrics import flops_per_token
from .optim import configure_optimizer
from .state import gather_fsdp_state, load_checkpoint
from .threads import default_threads

__all__ = ["train", "TrainingDiverged", "LOSS_PARTS", "autocast_context", "optimizer_step"]


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a pretraining run; returns a summary dict. Under torchrun, every rank calls this."""
    return distributed_run(_train, cfg)


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
    if device.type == "cpu":
        # small-init models (std 0.006) produce denormal floats in the first steps, which run ~30x slower
        # on x86 CPUs (13 s vs 0.4 s per dsv3-tiny step); flushing them to zero changes nothing measurable
        torch.set_flush_denormal(True)
        torch.set_num_threads(cfg.threads or default_threads())  # never more threads than idle cores (threads.py)
    resume_path = begin(cfg)

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
    model.activation_checkpointing = cfg.activation_checkpointing
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
    fsdp = cfg.fsdp and d.enabled
    run = Run(cfg, d, device, model, wrapped, optimizer, loader, autocast_context(cfg, device), fsdp=cfg.fsdp)
    fpt, fpt_source = flops_per_token(mcfg, cfg.seq_len)
    job = Job(
        "pretrain",
        # every rank evaluates the same global-batch-sized windows (same numbers for any world size)
        evaluate=lambda: {k: v for k, v in evaluate(model, val_tokens, cfg.seq_len, cfg.batch_size * d.world_size,
                                                     cfg.eval_batches, device, val_bytes,
                                                     autocast_context(cfg, device)).items()
                          if k in ("val_loss", "val_ppl", "val_bpb")},
        load=lambda path: _load(run, cfg, path),
        write=lambda path, extra, gathered: model.save_pretrained(
            path, tokenizer=tok, extra=extra, state_dict=None if gathered is None else gathered[0]),
        gather=lambda: _gather(run, fsdp),
        state={"fsdp": fsdp, "expert_parallel": cfg.expert_parallel, "train_config": cfg.to_dict()},
        flops_per_token=fpt)
    start_step, metrics_offset = resume(run, job, resume_path) if resume_path is not None else (0, None)
    if cfg.compile:
        run.wrapped = torch.compile(wrapped)

    if d.is_main:
        (out_dir / "train_config.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * d.world_size
    header = (f"nanoseek pretrain: {n_params / 1e6:.2f}M params, {d.world_size} rank(s) on {device}, "
              f"{tokens_per_step:,} tokens/step, FLOPs/token {fpt:.3g} ({fpt_source}); "
              + (f"resuming from {resume_path} at step {start_step}" if resume_path else "fresh start"))
    summary = run_loop(run, job, start_step, metrics_offset, header)
    summary["val_unigram_byte_entropy"] = corpus.unigram_byte_entropy("val")
    return summary


def _load(run: Run, cfg: TrainConfig, path: Path) -> tuple[dict, dict]:
    """Copy checkpoint `path` (a model directory + trainer_state/) into the model and the optimizer."""
    fsdp = cfg.fsdp and run.d.enabled
    shard = (lambda sd, osd: run.wrapped.shard_state(sd, osd, run.optimizer)) if cfg.expert_parallel > 1 else None
    state, rng = load_checkpoint(path, run.model, run.optimizer, fsdp=fsdp, shard=shard)
    if bool(state.get("fsdp")) != fsdp:
        raise ValueError(f"{path} was written {'with' if state.get('fsdp') else 'without'} FSDP: "
                         "resume it the same way (its optimizer state is stored differently)")
    return state, rng


def _gather(run: Run, fsdp: bool) -> tuple[dict, dict] | None:
    """Full (model, optimizer) state from FSDP2 shards or expert-parallel ranks (every rank takes part); else None."""
    if isinstance(run.wrapped, ExpertParallel):
        return run.wrapped.full_state(run.optimizer)  # experts gathered: the 1-process layout
    return gather_fsdp_state(run.model, run.optimizer) if fsdp else None
