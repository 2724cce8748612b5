"""nanoseek: pretrain, tune, fine-tune and serve DeepSeek-V3-style language models, in readable PyTorch.

The public names below load on first use (PEP 562 module `__getattr__`), so that importing one room (say
`nanoseek.model`, the network) does not import the rooms above it (lora, checkpoint, mup, train): the package
layering is real and tested (tests/test_layering.py), and `from nanoseek import Model` works as always.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .config import ModelConfig
    from .lora_config import LoraConfig, VeraConfig
    from .model import KVCache, ModelOutput
    from .modeling import Model
    from .train.optim import configure_optimizer

_PUBLIC = {"ModelConfig": "config", "Model": "modeling", "ModelOutput": "model", "KVCache": "model",
           "LoraConfig": "lora_config", "VeraConfig": "lora_config", "configure_optimizer": "train.optim"}
__all__ = ["ModelConfig", "Model", "ModelOutput", "KVCache", "LoraConfig", "VeraConfig",
           "configure_optimizer"]
__version__ = "0.1.0"

# Idle OpenMP workers sleep instead of spinning, unless the user chose otherwise. OpenMP reads this once, when
# torch loads it, so it is set before the first torch import (it has no effect if torch was imported first).
# Measured on the shared 2-core machine (benchmarks/threads.py, BENCHMARKS.md "Fast by default"): 2 spinning
# threads trained 4.6-5.5x slower than 1 thread, 2 passive ones 1.2-1.3x faster.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
