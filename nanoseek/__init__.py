"""nanoseek: pretrain, tune, fine-tune and serve DeepSeek-V3-style language models, in readable PyTorch."""

import os

# Idle OpenMP workers sleep instead of spinning, unless the user chose otherwise. OpenMP reads this once, when
# torch loads it, so it is set before the first torch import (it has no effect if torch was imported first).
# Measured on the shared 2-core machine (benchmarks/threads.py, BENCHMARKS.md "Fast by default"): 2 spinning
# threads trained 4.6-5.5x slower than 1 thread, 2 passive ones 1.2-1.3x faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ModelConfig  # noqa: E402
from .lora import LoraConfig, VeraConfig  # noqa: E402
from .model import KVCache, Model, ModelOutput  # noqa: E402
from .train.optim import configure_optimizer  # noqa: E402

__all__ = ["ModelConfig", "Model", "ModelOutput", "KVCache", "LoraConfig", "VeraConfig",
           "configure_optimizer"]
__version__ = "0.1.0"
