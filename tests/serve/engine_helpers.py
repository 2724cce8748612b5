"""Shared pieces of the engine tests: a byte-piece tokenizer, saved adapters, and a run-to-completion loop."""

from __future__ import annotations

import torch

from nanoseek.lora import LoraConfig
from nanoseek.serve.engine import Engine, EngineConfig
from nanoseek.serve.sampling import SamplingParams
from tests.tiny import make_model


class ByteTok:
    """Token i is one byte (i + 60) except a few multi-byte pieces; id 1 = eos. Decoding joins the bytes, so a
    UTF-8 character split across tokens shows up as U+FFFD until its last byte arrives."""

    eos_id = 1
    PIECES = {2: "é".encode()[:1], 3: "é".encode()[1:], 4: b"lo w", 5: b"or"}

    def piece(self, i: int) -> bytes:
        return b"" if i == self.eos_id else self.PIECES.get(i, bytes([60 + i % 60]))

    def decode(self, ids, skip_special_tokens=False) -> str:
        return b"".join(self.piece(i) for i in ids).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return [b - 60 for b in text.encode()]


def adapter_dirs(cfg, tmp_path, specs: dict[str, dict]) -> dict[str, str]:
    """Random (non-zero) adapters saved as PEFT directories: {name: dir}."""
    m = make_model(cfg)
    out = {}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(100 + i)
        m.add_adapter(name, LoraConfig(init_lora_weights=False, **kw))
        out[name] = str(m.save_adapter(tmp_path / name, name))
    return out


def reference(cfg, adapters: dict[str, str]):
    """A separate copy of the model with the same adapters, for Model.generate references."""
    m = make_model(cfg)
    for name, path in adapters.items():
        m.load_adapter(path, name)
    return m


def greedy_ref(model, prompt: list[int], n: int, adapter: str | None = None) -> list[int]:
    return model.generate(torch.tensor([prompt]), n, adapter=adapter)[0, len(prompt):].tolist()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def make_engine(cfg, adapters=None, **config) -> Engine:
    config = dict(dict(block_size=4, kv_cache_tokens=512, max_batch_tokens=16), **config)
    return Engine(make_model(cfg), ByteTok(), EngineConfig(**config), adapters)


def run(engine: Engine, arrivals: dict[int, list[tuple]] | None = None, max_steps: int = 10_000) -> dict:
    """Step until done; arrivals {step: [(rid, prompt, params, adapter)]} are added before that step.
    Returns {rid: dict(tokens, text, reason, logprobs, cached)}."""
    arrivals = dict(arrivals or {})
    res: dict = {}
    for step in range(max_steps):
        for rid, prompt, params, adapter in arrivals.pop(step, []):
            engine.add_request(rid, prompt, params, adapter=adapter)
            res[rid] = dict(tokens=[], text="", reason=None, logprobs=[], cached=0)
        if not arrivals and not engine.has_unfinished_requests():
            return res
        for o in engine.step():
            r = res[o.request_id]
            r["tokens"] += o.new_token_ids
            r["text"] += o.new_text
            r["logprobs"] += o.new_logprobs or []
            r["cached"] = o.num_cached_tokens
            assert r["reason"] is None, f"{o.request_id} produced output after finishing"
            if o.finished:
                r["reason"] = o.finish_reason
    raise AssertionError("engine did not finish")
