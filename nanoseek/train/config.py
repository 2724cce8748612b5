"""TrainConfig: every knob of a pretraining run, one dataclass that is also the CLI and the --config file.

What. Field names are the flag names (`batch_size` <-> `--batch-size`) and the keys of a `--config`
JSON/YAML file; `help` in each field's metadata is the flag's help text. `validate()` checks values,
`from_dict` rejects unknown keys listing the valid ones, `model_config()` resolves the preset, an optional
full ModelConfig file and the per-field overrides into the ModelConfig to train.

Why one dataclass: the trainer, the checkpoint (trainer_state/train_config.json) and the CLI read the same
names, so a resumed run can compare its config with the saved one field by field.

Rejected: an exec-based configurator (nanoGPT) and free-form dicts (typos pass silently).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import PRESETS, ROUTER_BALANCE, ModelConfig
from .flags import flag
from .optim import SCHEDULES


@dataclass
class TrainConfig:
    """A pretraining run. See `nanoseek pretrain --help` for each field."""

    # model
    preset: str = flag("dsv3-tiny", f"model preset, one of {sorted(PRESETS)}", choices=sorted(PRESETS))
    model_config: str | None = flag(None, "a config.json (HF keys) giving the full ModelConfig; overrides --preset")
    hidden_size: int | None = flag(None, "rescale the model to this width (ModelConfig.with_width)")
    mup_base_width: int | None = flag(None, "turn muP on with this base width (hyperparameters tuned at that width "
                                          "transfer); None: standard parametrization")
    initializer_range: float | None = flag(None, "override the init std (sigma of the init table)")
    embedding_multiplier: float | None = flag(None, "override the input-embedding multiplier (muP's alpha_emb)")
    readout_multiplier: float | None = flag(None, "override the logit multiplier (muP's alpha_out)")
    attention_multiplier: float | None = flag(None, "override the attention-logit multiplier (muP's alpha_attn)")
    embedding_lr_multiplier: float | None = flag(None, "override the embedding tables' Adam lr factor")
    zero_init_query: bool | None = flag(None, "override: start the query projections at 0")
    zero_init_readout: bool | None = flag(None, "override: start an untied lm_head at 0")
    num_hidden_layers: int | None = flag(None, "override the model's num_hidden_layers")
    mtp_loss_weight: float | None = flag(None, "override lambda of the MTP loss (0 turns MTP training off)")
    router_balance: str | None = flag(None, f"override MoE balancing, one of {ROUTER_BALANCE}")
    aux_loss_alpha: float | None = flag(None, "override alpha of the balance loss")
    topk_group: int | None = flag(None, "override topk_group: expert groups (nodes) a token may use; n_group turns "
                                      "node-limited routing off")
    # data
    data: str = flag("stdlib", "corpus: 'stdlib' (built-in), a directory, a .jsonl or a text file")
    vocab_size: int | None = flag(None, "tokenizer/model vocabulary size (default: the preset's)")
    seq_len: int = flag(256, "tokens per training sequence")
    batch_size: int = flag(16, "sequences per micro-batch per rank")
    grad_accum: int = flag(1, "micro-batches per optimizer step (global batch = batch_size*world*grad_accum)")
    # optimisation
    max_steps: int = flag(200, "optimizer steps")
    lr: float = flag(3e-3, "peak learning rate")
    min_lr_ratio: float = flag(0.1, "final lr as a fraction of --lr")
    warmup_steps: int = flag(20, "linear warmup steps")
    schedule: str = flag("cosine", f"lr schedule, one of {SCHEDULES}")
    decay_frac: float = flag(0.2, "wsd: fraction of steps spent decaying at the end")
    weight_decay: float = flag(0.1, "AdamW weight decay (matrices and embeddings only)")
    bf16_moments: bool = flag(False, "keep AdamW's moments m and v in bf16 (DeepSeek-V3 section 3.3.3); the update "
                                   "is fp32")
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: off)")
    bias_update_gamma: float = flag(0.001, "aux-loss-free router bias step gamma")
    bias_update_stop_frac: float = flag(0.1, "gamma becomes 0 for this last fraction of steps (V3: 0.1)")
    # evaluation, checkpoints, logging
    eval_every: int = flag(100, "validate every N steps (and at the end); 0: only at the end")
    eval_batches: int | None = flag(20, "validation batches per evaluation (None: the whole val split)")
    save_every: int = flag(0, "checkpoint every N steps (and at the end); 0: only at the end")
    keep_last: int = flag(2, "checkpoints to keep")
    out_dir: str = flag("out/pretrain", "run directory: metrics.jsonl, plots, checkpoints/")
    resume: str | None = flag(None, "'latest' (newest complete checkpoint in out_dir) or a checkpoint path; bare "
                                    "flag = latest", const="latest")
    log_every: int = flag(10, "print a line every N steps when stdout is not a terminal")
    tensorboard: bool = flag(False, "also write TensorBoard events to out_dir/tb (needs the tensorboard package)")
    plots: bool = flag(True, "write PNG plots to out_dir at each evaluation and at the end")
    # system
    seed: int = flag(1337, "seed for init, data order and dropout")
    device: str = flag("auto", "auto, cpu, cuda, cuda:N")
    dtype: str = flag("auto", "auto (bf16 autocast on CUDA and on CPUs with native bf16 GEMMs, AVX512-BF16 or "
                              "AMX; fp32 otherwise), float32 or bfloat16; weights and loss stay fp32")
    compile: bool = flag(False, "torch.compile the model")
    activation_checkpointing: bool = flag(False, "keep only each block's input and recompute its activations in the "
                                                 "backward: less memory for long sequences, ~1/3 more compute")
    threads: int = flag(0, "CPU threads for torch; 0: OMP_NUM_THREADS if set, else the cores idle now by the load "
                           "average, at least 1 (train/threads.py: oversubscribed OpenMP threads can be 20x slower)")
    fp8: bool = flag(False, "fine-grained FP8 projections and routed experts (1x128 activation tiles, 128x128 "
                          "weight blocks, E4M3, fp32 accumulation; emulated on CPU); checkpoints stay fp32")
    fsdp: bool = flag(False, "shard with FSDP2 (fully_shard) instead of DDP under torchrun")
    expert_parallel: int = flag(1, "under torchrun: spread the routed experts over groups of N ranks (N divides "
                                 "the world size and n_routed_experts); 1: every rank holds every expert")
    cache_dir: str | None = flag(None, "tokenizer/token cache (default $NANOSEEK_CACHE or ~/.cache/nanoseek)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def bad(name, why):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r}: {why}")

        if self.model_config is None and self.preset not in PRESETS:
            bad("preset", f"must be one of {sorted(PRESETS)}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "keep_last", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "must be a non-negative integer")
        if self.eval_batches is not None and self.eval_batches < 1:
            bad("eval_batches", "must be None or a positive integer")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        for name in ("min_lr_ratio", "decay_frac", "bias_update_stop_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must be in [0, 1]")
        for name in ("weight_decay", "grad_clip", "bias_update_gamma"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}")
        if self.router_balance is not None and self.router_balance not in ROUTER_BALANCE:
            bad("router_balance", f"must be one of {ROUTER_BALANCE}")
        if not isinstance(self.expert_parallel, int) or self.expert_parallel < 1:
            bad("expert_parallel", "must be a positive integer")
        if self.expert_parallel > 1 and (self.fsdp or self.compile):
            bad("expert_parallel", "cannot be combined with --fsdp or --compile (not built)")
        if self.threads < 0:
            bad("threads", "must be >= 0 (0: automatic)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            bad("dtype", "must be auto, float32 or bfloat16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", "must be auto, cpu, cuda or cuda:N")

    # ------------------------------------------------------------------ conversions
    @classmethod
    def field_names(cls) -> list[str]:
        """All field names, in declaration order (= the valid --config keys)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a dict of field values; unknown keys raise ValueError listing the valid keys."""
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; valid keys: {', '.join(cls.field_names())}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def model_config_obj(self) -> ModelConfig:
        """The ModelConfig to train: --model-config file or --preset, then the explicit overrides."""
        cfg = ModelConfig.load(self.model_config) if self.model_config else ModelConfig.from_preset(self.preset)
        if self.hidden_size is not None:
            cfg = cfg.with_width(self.hidden_size)
        overrides = {k: getattr(self, k) for k in ("num_hidden_layers", "mtp_loss_weight", "router_balance",
                                                     "aux_loss_alpha", "topk_group", "vocab_size", "mup_base_width",
                                                     "initializer_range", "embedding_multiplier",
                                                     "readout_multiplier", "attention_multiplier",
                                                     "embedding_lr_multiplier", "zero_init_query",
                                                     "zero_init_readout")}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if "num_hidden_layers" in overrides and cfg.first_k_dense_replace > overrides["num_hidden_layers"]:
            overrides["first_k_dense_replace"] = overrides["num_hidden_layers"]
        cfg = cfg.replace(**overrides)
        if self.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        return cfg


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a --config file (.json, .yaml, .yml) into a dict of TrainConfig fields (keys with - become _)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    except Exception as e:
        raise ValueError(f"{path}: cannot parse ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: must hold a mapping of TrainConfig keys")
    return {k.replace("-", "_"): v for k, v in d.items()}
