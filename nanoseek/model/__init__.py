from .attention import KVCache
from .transformer import Model, ModelOutput, sample

__all__ = ["KVCache", "Model", "ModelOutput", "sample"]
