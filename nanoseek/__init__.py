"""nanoseek: pretrain, tune, fine-tune and serve DeepSeek-V3-style language models, in readable PyTorch."""

from .config import ModelConfig
from .lora import LoraConfig, VeraConfig
from .model import KVCache, Model, ModelOutput
from .train.optim import configure_optimizer

__all__ = ["ModelConfig", "Model", "ModelOutput", "KVCache", "LoraConfig", "VeraConfig",
           "configure_optimizer"]
__version__ = "0.1.0"
