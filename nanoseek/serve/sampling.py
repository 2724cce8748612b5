"""Per-request sampling: the parameters a request carries and the sampler that turns one row of logits into a token.

What. `SamplingParams` (OpenAI/vLLM field names) with `validate()`, and `sample_token(logits, params, counts, gen)`:
penalties on the raw logits (OpenAI: logit[t] -= frequency_penalty * count[t] + presence_penalty * [count[t] > 0],
counts over the generated tokens), then the model's own `sample` (temperature 0 = argmax, else softmax(logits / T)
restricted to top_k and top_p) on that one row, drawn with the request's own `torch.Generator`. `top_logprobs`
reads log-probabilities from the raw model distribution (before penalties and temperature, as vLLM reports them).
Why one row at a time: each request keeps its own generator, so a seeded request draws the same numbers whatever
its batch mates are (a batched multinomial would share one stream). The cost is a few small ops per row per step,
small next to the forward.
Rejected: one `sample` call over the whole batch - it takes one setting and one generator for every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..model import sample

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n log-probabilities per generated token (0: only the chosen token's)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        """Raise ValueError("<field>: reason") for a value out of range."""
        def bad(name, why):
            raise ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            bad("top_k", "must be None or an integer >= 1")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "must be None or an integer")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be a list of non-empty strings")
        if not isinstance(self.stop_token_ids, list) or not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be a list of token ids >= 0")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be true or false")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2.0 <= v <= 2.0:
                bad(name, "must be in [-2, 2]")


def make_generator(seed: int | None, device=None) -> torch.Generator:
    """The request's own generator: seeded, or seeded from the global RNG when the request gives no seed."""
    gen = torch.Generator(device=device or "cpu")
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
    return gen


def penalize(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None) -> torch.Tensor:
    """logits (V,) fp32, counts (V,) of generated tokens -> penalized logits (V,)."""
    if counts is None or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def sample_token(logits: torch.Tensor, params: SamplingParams, counts: torch.Tensor | None,
                 gen: torch.Generator) -> int:
    """One row of logits (V,) -> the next token id under the request's parameters."""
    logits = penalize(logits.float(), params, counts).to(gen.device)  # (V,) where the generator draws
    return int(sample(logits[None], params.temperature, params.top_k, params.top_p, generator=gen)[0])


def top_logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, dict[int, float]]:
    """logits (V,) -> (logprob of `token`, {id: logprob} of the n most likely tokens) under the raw distribution."""
    lp = torch.log_softmax(logits.float(), -1)
    top = {}
    if n:
        values, ids = lp.topk(min(n, lp.shape[-1]))
        top = {int(i): float(v) for v, i in zip(values, ids)}
    return float(lp[token]), top
