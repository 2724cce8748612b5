from .attention import KVCache
from .decoding import accept_drafts
from .sampling import filtered_probs, sample
from .transformer import Model, ModelOutput

__all__ = ["KVCache", "Model", "ModelOutput", "accept_drafts", "filtered_probs", "sample"]
