"""Sampling: temperature / top-k / top-p filtering and the draws `generate` makes.

What. `filtered_probs` turns logits into the distribution a sampler draws from (after temperature, top-k and
top-p); `sample` draws from it (argmax at temperature 0). Speculative decoding (speculative.py) needs the
distributions themselves (p of the main model, q of the draft), so the filter is its own function.
Why a module of its own: transformer.py (plain generate) and speculative.py both use it, and speculative.py is
imported by transformer.py.
Rejected: filtering inside `sample` only (speculative sampling must compare the very p and q that the plain
sampler would draw from, or the output distribution would differ from ordinary sampling).
"""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be None or >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be None or in (0, 1]")


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """logits (..., V) -> probabilities (..., V) fp32 of softmax(logits / temperature) restricted to the top_k
    tokens and/or the smallest set with probability >= top_p (renormalised). temperature must be > 0."""
    shape = logits.shape
    logits = logits.float().reshape(-1, shape[-1]) / temperature  # (N, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits.softmax(-1).reshape(shape)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(filtered_probs(logits, temperature, top_k, top_p), 1, generator=generator)[:, 0]
