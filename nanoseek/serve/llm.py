"""Offline batch generation: `LLM(checkpoint, adapters={...}).generate(prompts, params, adapter=...)`.

What. vLLM's offline shape over the same `Engine` the server drives: all prompts are added at once and the
engine steps until every one has finished; completions come back in prompt order.
Why: batch jobs (evaluation, synthetic data) get continuous batching and many adapters without HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass

from .engine import Engine
from .sampling import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[tuple[float, dict[int, float]]] | None = None
    num_cached_tokens: int = 0


class LLM:
    def __init__(self, checkpoint=None, adapters: dict[str, str] | None = None, engine: Engine | None = None,
                 **engine_config):
        if (checkpoint is None) == (engine is None):
            raise ValueError("LLM: give a checkpoint directory or an engine, not both")
        self.engine = engine or Engine.from_checkpoint(checkpoint, adapters=adapters, **engine_config)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 adapter: str | None | list[str | None] = None) -> list[Completion]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params = params or SamplingParams()
        params = params if isinstance(params, list) else [params] * n
        adapters = adapter if isinstance(adapter, list) else [adapter] * n
        if len(params) != n or len(adapters) != n:
            raise ValueError(f"{n} prompts but {len(params)} sampling params and {len(adapters)} adapters")
        ids = [f"llm-{id(self)}-{i}" for i in range(n)]
        for rid, prompt, p, a in zip(ids, prompts, params, adapters):
            self.engine.add_request(rid, prompt, p, adapter=a)
        done = {rid: Completion("", [], None, None if p.logprobs is None else []) for rid, p in zip(ids, params)}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                c = done.get(out.request_id)
                if c is None:
                    continue
                c.text += out.new_text
                c.token_ids += out.new_token_ids
                if out.new_logprobs is not None and c.logprobs is not None:
                    c.logprobs += out.new_logprobs
                c.num_cached_tokens = out.num_cached_tokens
                if out.finished:
                    c.finish_reason = out.finish_reason
        return [done[rid] for rid in ids]
