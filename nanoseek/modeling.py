"""`nanoseek.Model`: the network (model/transformer.py `CausalLM`) plus checkpoints and adapters.

What. The public model class. It adds to `CausalLM` the methods that need the rooms above the network:
    Model.from_pretrained(dir) / model.save_pretrained(dir)        HF model directories (checkpoint.py)
    model.add_adapter / delete_adapter / trainable_adapter          LoRA-family adapters (lora.py)
    model.merge_adapter / unmerge_adapter / merge_and_unload
    model.save_adapter(dir, name) / load_adapter(dir, name)         PEFT directories (lora_io.py)
Everything else (forward, generate, init, set_precision, adapters, the per-row adapter path) is CausalLM's.

Why a subclass above model/: those methods import checkpoint.py, lora.py and lora_io.py, which import the model;
defining them here keeps the import graph a DAG (model/ -> lora, checkpoint, mup -> modeling) with no
function-level import. Every nanoseek code path builds this class, so a model always has them.
Rejected: the methods on CausalLM with imports inside them (the import circle this replaced); monkeypatching them
onto CausalLM from lora.py (invisible to a reader of the class).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from . import checkpoint, lora, lora_io
from .lora_config import LoraConfig, VeraConfig
from .model.transformer import CausalLM


class Model(CausalLM):
    """A GPT-2 or DeepSeek-V3 causal LM with HF checkpoints and PEFT adapters (see CausalLM for the network)."""

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None) -> Model:
        """Load a Hugging Face model directory (written by nanoseek or transformers; safetensors only)."""
        return checkpoint.load_pretrained(path, device=device, dtype=dtype, cls=cls)

    def save_pretrained(self, path, dtype=None, tokenizer=None, **kwargs) -> Path:
        """Write a Hugging Face model directory atomically (see checkpoint.save_pretrained)."""
        return checkpoint.save_pretrained(self, path, dtype=dtype, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ LoRA adapters (lora.py)
    def add_adapter(self, name: str, config: LoraConfig | VeraConfig | None = None) -> None:
        """Create adapter `name` on the weights `config.target_modules` selects (frozen until trainable_adapter)."""
        lora.add_adapter(self, name, config)

    def delete_adapter(self, name: str) -> None:
        lora.delete_adapter(self, name)

    def trainable_adapter(self, name: str | None) -> list[nn.Parameter]:
        """Only adapter `name`'s A/B require grad (None: the base does, adapters don't); returns them."""
        return lora.trainable_adapter(self, name)

    def merge_adapter(self, name: str) -> None:
        """W += gamma B A; afterwards model(x) runs the adapter (and adapter=name too)."""
        lora.merge_adapter(self, name)

    def unmerge_adapter(self, name: str) -> None:
        lora.unmerge_adapter(self, name)

    def merge_and_unload(self, name: str) -> None:
        """Fold adapter `name` into the weights for good and remove it (a new plain base)."""
        lora.merge_and_unload(self, name)

    def save_adapter(self, path, name: str, base_model_name_or_path: str | None = None) -> Path:
        """Write adapter `name` as a PEFT directory (adapter_config.json + adapter_model.safetensors)."""
        return lora_io.save_adapter(self, path, name, base_model_name_or_path)

    def load_adapter(self, path, name: str) -> LoraConfig | VeraConfig:
        """Read a PEFT LoRA / DoRA / VeRA directory (written by nanoseek or peft) as adapter `name`."""
        return lora_io.load_adapter(self, path, name)
