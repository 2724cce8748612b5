"""Decoding's fast path: a static-shape cache and an optionally compiled one-token step.

What. Plain decoding (decoding.plain_decode) runs one forward per new token. At batch 1 that forward is a few
hundred tiny ops, so its time is Python and dispatch overhead, not arithmetic (issue 16 measured ~8 % of one
core's GEMM rate). This module and its callers remove what they can:
  * a static KVCache (`KVCache(static=True)`) when compiling and on CUDA: every step attends over all
    `max_len` slots with the unwritten ones masked, so the step's shapes never change and `begin` reads nothing
    back from the device (no `int(lengths.max())` per step); `max_len` is rounded up to a multiple of BUCKET so
    calls with nearby lengths share one shape. An eager CPU step keeps the growing cache (fewer slots to read;
    the sync costs nothing there);
  * MLA's absorbed attention runs the heads as queries of one shared key (attention.py), not an expanded key;
  * in a compiled step the routed experts use `Experts.gathered` for the few token copies (no sort/bincount);
  * `compile=True` (on a CPU up to batch 8: `worth_compiling`):
    the one-token step `model(ids (B, 1), cache) -> logits (B, V)` goes through
    `torch.compile(dynamic=False)` once per (batch, cache length) shape; Inductor fuses the small elementwise
    ops around the GEMMs; on a CPU its C++ wrapper calls the kernels, and a loop's steps after its first skip
    Dynamo's guards (`same_step_again`). Prefill stays eager (one call); adapters and speculative decoding
    stay eager.
Outputs equal the plain path's: masked slots get exactly zero attention weight, so the same tokens come out
(tests/model/test_fastdecode.py compares logits and greedy tokens).

Measured (BENCHMARKS.md, "Fast by default"): on the shared 2-core machine the first compile of a 23M-parameter
DeepSeek-V3 step took minutes, so `compile` is off by default on CPU; `generate(compile=True)` turns it on.

Rejected: CUDA graphs (`mode="reduce-overhead"`, untested without a GPU: `step_function(mode=...)` takes it);
compiling prefill too (one call, variable length: a recompile per prompt length); compiling the
speculative loop (ragged per-row catch-up shapes).
"""

from __future__ import annotations

import torch

from .attention import KVCache

BUCKET = 64  # static cache lengths are rounded up to a multiple of this


def static_length(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def make_cache(model: torch.nn.Module, batch_size: int, length: int, static: bool = True) -> KVCache:
    """A cache for `length` tokens per row; static: rounded up to a BUCKET multiple within the model's limit."""
    if not static:
        return model.make_cache(batch_size, length)
    limit = max(length, model.config.max_position_embeddings)
    p = next(model.parameters())
    return KVCache(model.config, batch_size, min(static_length(length), limit), device=p.device, dtype=p.dtype,
                   static=True)


def wants_static(compile: bool, device: torch.device) -> bool:
    """Static shapes pay when compiling (one graph) and on CUDA (no device sync per token); an eager CPU step
    attends over fewer slots with the growing cache."""
    return compile or device.type == "cuda"


COMPILE_MAX_BATCH_CPU = 8  # on a CPU the compiled step stops paying above this batch (worth_compiling)


def worth_compiling(model: torch.nn.Module, batch_size: int, device: torch.device) -> bool:
    """Whether `compile=True` compiles the step here: on a CPU up to COMPILE_MAX_BATCH_CPU rows, where it pays;
    other devices compile as asked. Measured on the 2-core CPU, 6 x 384 models, 64 new tokens, compiled vs eager
    step (BENCHMARKS.md, "Fast by default, third session"): DeepSeek-V3 2.4x at batch 1 (2.35x `transformers
    generate` against 0.98x), 1.61x at 4, 1.43x at 8, 1.01x at 32; GPT-2 about 1.1x at 1, 1.2x at 4, 1.03x at 8,
    0.9x at 32. Above it the eager step (with its growing cache) runs instead."""
    del model  # the rule holds for both architectures
    return device.type != "cpu" or batch_size <= COMPILE_MAX_BATCH_CPU


def step(model: torch.nn.Module, ids: torch.Tensor, cache: KVCache, adapter=None, adapter_names=None) -> torch.Tensor:
    """One decode forward: ids (B, 1) -> logits (B, V) of the next token; the cache advances by one.
    `adapter`/`adapter_names` as in Model.forward."""
    return model(ids, cache=cache, adapter=adapter, adapter_names=adapter_names)[:, -1]


def step_function(compile: bool, device: torch.device | None = None, mode: str | None = None):
    """`step`, or `step` under torch.compile. Dynamo keeps compiled code on `step`'s code object, so a later
    generate call with the same model and shapes reuses it (and Inductor's on-disk cache serves later runs).
    On a CPU the graph is called through Inductor's C++ wrapper: a batch-1 step is ~100 small kernels, and
    calling them from Python cost ~1 ms of a ~6 ms step (BENCHMARKS.md, "Fast by default, third session")."""
    if not compile:
        return step
    if mode is None and device is not None and device.type == "cpu":
        return torch.compile(step, dynamic=False, options={"cpp_wrapper": True})
    return torch.compile(step, dynamic=False, mode=mode)


def same_step_again():
    """Context for the steps of one decode loop after its first compiled step: nothing Dynamo guards on changes
    between them (the same model, the same static cache object and shapes; only tensor values move), so the
    guards are not evaluated again (~0.3 ms a step at batch 1). A loop that changes adapters, shapes or the
    model must not run under it."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
