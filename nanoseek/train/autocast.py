"""Which compute dtype a run uses: `--dtype auto` picks bf16 autocast wherever the hardware multiplies bf16 natively.

What. `resolve_dtype(name, device)` turns "auto" / "float32" / "bfloat16" into "float32" or "bfloat16":
auto means bf16 on CUDA, and on a CPU whose instruction set has native bf16 dot products (AVX512-BF16 or AMX,
as `torch.cpu` reports them; oneDNN then runs bf16 GEMMs at about 2.8x the fp32 rate, issue 16); fp32
elsewhere. `autocast_context(dtype, device)` is the matching context: `torch.autocast(bfloat16)` or nothing.
Under autocast the parameters, gradients and optimizer state stay fp32 (master weights); matmuls run in bf16,
and the model computes norms, the router and the cross-entropy in fp32 itself (layers.RMSNorm, moe.Gate,
transformer.cross_entropy), so the loss is fp32.

Why detect rather than always use bf16 on CPU: without those instructions oneDNN emulates bf16 GEMMs by
converting to fp32, which measured ~5x *slower* than fp32 on the AVX512 machine without AVX512-BF16
(BENCHMARKS.md, "Fast by default"). A wrong "auto" would be the slow default this module exists to avoid.

Rejected: reading /proc/cpuinfo (Linux-only, and a hypervisor may hide flags torch's own cpuinfo probe sees);
a config.json field (precision is how a run computes, not what the model is; see model/precision.py).
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = ("auto", "float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX tiles)."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """"auto" | "float32" | "bfloat16" -> the compute dtype of a run on `device` ("float32" or "bfloat16")."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} must be one of {DTYPES}")
    if name != "auto":
        return name
    kind = torch.device(device).type
    native = kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16())
    return "bfloat16" if native else "float32"


def autocast_context(dtype: str, device: torch.device | str):
    """bf16 autocast for "bfloat16", a no-op context for "float32" (resolve "auto" first)."""
    if dtype == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    if dtype != "float32":
        raise ValueError(f"autocast_context: dtype {dtype!r} must be float32 or bfloat16 (resolve auto first)")
    return contextlib.nullcontext()
