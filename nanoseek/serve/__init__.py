"""Serving: a continuous-batching engine over a paged latent KV cache with many LoRA adapters per batch.

    from nanoseek.serve import LLM, SamplingParams
    LLM("ckpt", adapters={"email": "adapters/email"}).generate(["Hi"], SamplingParams(temperature=0))
"""

from .engine import Engine, EngineConfig, RequestOutput
from .llm import LLM, Completion
from .sampling import SamplingParams

__all__ = ["LLM", "Completion", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]
