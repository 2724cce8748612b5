"""nanoseek: pretrain, tune, fine-tune and serve DeepSeek-V3-style language models, in readable PyTorch."""

from .config import ModelConfig
from .model import KVCache, Model, ModelOutput

__all__ = ["ModelConfig", "Model", "ModelOutput", "KVCache"]
__version__ = "0.1.0"
