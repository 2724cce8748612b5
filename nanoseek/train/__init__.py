"""Pretraining: TrainConfig, the loop (`trainer.train`), AdamW groups and LR schedules, checkpoints, metrics.

Modules: config (TrainConfig), optim (configure_optimizer, lr_at), trainer (train), state (checkpoints and
exact resume), distributed (torchrun, DDP/FSDP2), evaluate (val loss/bpb, routing by domain), metrics
(metrics.jsonl, MFU, MaxVio), plots (PNGs), commands (`nanoseek pretrain|generate|eval|experts`).
"""

from .config import TrainConfig
from .optim import configure_optimizer, lr_at, set_lr

__all__ = ["TrainConfig", "configure_optimizer", "lr_at", "set_lr"]
