"""The network: layers, attention, MoE, the one Linear, decoding. Imports nothing above model/ (test_layering.py).

`nanoseek.model.Model` is an old import path of `nanoseek.Model` (modeling.py, which sits above this package):
it still works, through the module `__getattr__` below, with a DeprecationWarning.
"""

import importlib
import warnings

from .attention import KVCache
from .decoding import accept_drafts
from .sampling import filtered_probs, sample
from .transformer import CausalLM, ModelOutput

__all__ = ["CausalLM", "KVCache", "ModelOutput", "accept_drafts", "filtered_probs", "sample"]


def __getattr__(name: str):
    if name == "Model":  # deprecated path: the public Model lives above the network (nanoseek/modeling.py)
        warnings.warn("nanoseek.model.Model moved: import it from nanoseek (nanoseek.Model)", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module("nanoseek.modeling").Model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
