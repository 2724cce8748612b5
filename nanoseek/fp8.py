"""Fine-grained FP8 (DeepSeek-V3 report section 3.3): 1x128 activation tiles, 128x128 weight blocks, E4M3.

What. `quantize_tiles(x)` scales each 1x128 tile of the last dim of x by its own fp32 scale s = amax / 448 and
casts to `torch.float8_e4m3fn`; `quantize_blocks(w)` does the same per 128x128 block of the last two dims.
Sizes that are not multiples of 128 are zero-padded for the scale computation only (the fp8 tensor keeps the
input's shape; the last tile/block is partial). An all-zero tile gets s = 1 (its fp8 values are 0, so any
scale is exact). `dequantize_*` multiply back. `FP8Linear` is the linear `y = x W^T` as an autograd.Function:

    forward  y  = (x in 1x128 tiles) (W in 128x128 blocks)^T            fp32 accumulation
    dgrad    dx = (g in 1x128 tiles along out) (W blocks)                 the same W blocks, transposed
    wgrad    dW = (g re-tiled 128x1, i.e. along tokens)^T (x re-tiled along tokens)

The saved activation is the fp8 tensor + its scales (1 byte + 4/128 bytes per element, not 4). `FP8GroupedMM`
does the same for the routed experts' grouped GEMM (blocks per expert); its wgrad re-tiles x and g along
each expert's tokens, zero-padded per expert to a multiple of 128 so that no tile straddles two experts (as
DeepGEMM pads each expert to 128 rows). `Precision` is the recipe object a model's linears and experts
consult ("plain" or "fp8").

Matmuls. Every FP8 GEMM goes through `fp8_mm(a, sa, b, sb, kind, native)` = deq(a) deq(b)^T, both operands
tiled along the reduction axis: forward (x tiles, W blocks), dgrad (g tiles along N, W^T blocks), wgrad (g^T
and x^T tiles along tokens: kind TILES). CPU, and CUDA where the probe fails: the exact emulation (dequantize,
one fp32 matmul), so every numerical claim is testable without a GPU; on CUDA that warns once per kind. CUDA
where `blockwise_scaled_mm_ok(device, kind)` passes (one tiny real call per kind compared with the emulation,
cached per device on the recipe): `torch._scaled_mm(a, b.t(), scale_a, scale_b, out_dtype=bf16)`. The layouts
its blockwise kernels accept (PyTorch's ScaledBlas.cpp, `is_blockwise_1x128_scaling` / `..._128x128_...`, and
the shape checks of torch/_meta_registrations.py; cuBLASLt >= 12.9, SM90): a row-major, b.t() column-major;
scale_a (M, ceil(K/128)) fp32 outer-dim-major (strides (1, M)); scale_b for 128x128 is (ceil(K/128),
ceil(N/128)) whose transpose is row-major, i.e. `ws.t()` of the (N/128, K/128) block scales; for 1x128 it is
(ceil(K/128), N) row-major (its transpose (N, K/128) outer-dim-major). Pairs accepted: 1x128 x 128x128,
128x128 x 1x128, 1x128 x 1x128. Used only where K % 128 == 0, M % 16 == 0 and N % 128 (blocks) / 16 (tiles)
== 0; other shapes are emulated. The grouped expert GEMM (`fp8_grouped_mm`): `torch._scaled_grouped_mm` in
the installed torch (2.13) takes only rowwise fp32 scales (one per row of A and per column of each expert's
B) or MXFP8 e8m0 1x32 scales (SM100), not 1x128 / 128x128 (its meta checks, GroupedBlas.cpp's dispatch table);
PyTorch main adds 1x128 / 128x128 recipes to `_scaled_grouped_mm_v2` through cuBLASLt's grouped GEMM (CUDA
>= 13.4, SM90) with cuBLASLt's own blocked scale storage, not wired here (unverifiable without a GPU). So on
CUDA the forward and dgrad run one blockwise fp8_mm per expert (a host sync for the group offsets), else the
plain grouped GEMM on the dequantized operands; the wgrad is one fp8_mm (1x128 x 1x128) per expert always.
Not yet run on a GPU (none was lent): the `gpu` tests check it.
The backward re-quantizes W from the parameter (bit-identical blocks) instead of saving an fp8 copy of it:
a training step then holds no per-layer weight copy (a frozen FP8 base saves its blocks, which are the weight).

Scales: exact fp32 amax/448 by default (uses all of E4M3's range: per-element relative error <= 2^-4, the
half-ulp of a 3-bit mantissa); `pow2=True` rounds each scale up to a power of two (dequantizing is then an
exponent shift, and it is what UE8M0 / MX hardware scales need) at the cost of up to one bit of range.

Rejected: per-tensor scales (one outlier flattens every other value to zero: the reason for fine tiles);
E5M2 for gradients (V3 uses E4M3 everywhere thanks to the fine tiles); keeping an fp32 copy of activations.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
TILE = 128
SCALE_INV = "_scale_inv"  # <weight name> + SCALE_INV: its 128x128 block scales (DeepSeek's release naming)


def _pad_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    pad = -x.shape[dim] % TILE
    if pad == 0:
        return x
    spec = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, pad]
    return F.pad(x, spec)


def _scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = amax.float() / FP8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero tile: any scale is exact, keep 1
    return torch.exp2(torch.ceil(torch.log2(s))) if pow2 else s


def quantize_tiles(x: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) -> fp8 (..., K), scales (..., ceil(K/128)) fp32 with x ~ fp8 * scale per 1x128 tile."""
    K = x.shape[-1]
    xp = _pad_to(x.float(), -1)
    t = xp.view(*x.shape[:-1], -1, TILE)  # (..., K/128, 128)
    s = _scale(t.abs().amax(-1), pow2)  # (..., K/128)
    q = (t / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(xp.shape)[..., :K].to(FP8)  # a new tensor, not a view
    return q, s


def dequantize_tiles(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp8 (..., K), scales (..., ceil(K/128)) -> fp32 (..., K)."""
    K = q.shape[-1]
    t = _pad_to(q.float(), -1).view(*q.shape[:-1], -1, TILE)
    return (t * s[..., None]).view(*q.shape[:-1], -1)[..., :K]


def quantize_blocks(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., N, K) -> fp8 (..., N, K), scales (..., ceil(N/128), ceil(K/128)) fp32 per 128x128 block."""
    N, K = w.shape[-2:]
    wp = _pad_to(_pad_to(w.float(), -1), -2)
    b = wp.view(*w.shape[:-2], wp.shape[-2] // TILE, TILE, wp.shape[-1] // TILE, TILE)  # (..., n, 128, k, 128)
    s = _scale(b.abs().amax(dim=(-3, -1)), pow2)  # (..., n, k)
    q = (b / s[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(wp.shape)[..., :N, :K].to(FP8)
    return q, s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp8 (..., N, K), scales (..., ceil(N/128), ceil(K/128)) -> fp32 (..., N, K)."""
    N, K = q.shape[-2:]
    qp = _pad_to(_pad_to(q.float(), -1), -2)
    b = qp.view(*q.shape[:-2], qp.shape[-2] // TILE, TILE, qp.shape[-1] // TILE, TILE)
    return (b * s[..., :, None, :, None]).view(qp.shape)[..., :N, :K]


# ---------------------------------------------------------------------------------------------- matmuls
BLOCKS, TILES = "128x128", "1x128"  # how fp8_mm's second operand is scaled (its first is always 1x128 tiles)


def _dequantize(q: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    return dequantize_blocks(q, s) if kind == BLOCKS else dequantize_tiles(q, s)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 even under autocast (the emulation's fp32 accumulation; autocast would round to bf16)."""
    dtype = torch.promote_types(a.dtype, torch.float32)  # fp32, or fp64 for gradcheck
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


def _native_fits(a: torch.Tensor, b: torch.Tensor, kind: str) -> bool:
    """Shapes the blockwise kernel takes: K whole tiles, M a multiple of 16, N of 128 (blocks) or 16 (tiles)."""
    return a.shape[1] % TILE == 0 and a.shape[0] % 16 == 0 and b.shape[0] % (TILE if kind == BLOCKS else 16) == 0


def _scaled_mm(a, sa, b, sb, kind: str) -> torch.Tensor:
    """torch._scaled_mm(a, b^T) with the scale layouts its blockwise kernels check (ScaledBlas.cpp):
    a's 1x128 scales (M, K/128) outer-dim-major (strides (1, M)); b^T = (K, N) column-major, and b's scales
    given so that their transpose is (N/128, K/128) row-major (128x128) or (N, K/128) outer-dim-major (1x128)."""
    sa = sa.t().contiguous().t()  # (M, K/128), strides (1, M)
    sb = sb.contiguous().t() if kind == BLOCKS else sb.t().contiguous()  # (K/128, N/128) | (K/128, N)
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), sa, sb, out_dtype=torch.bfloat16).float()


def fp8_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, kind: str,
           native: bool) -> torch.Tensor:
    """The one FP8 GEMM: a deq(b)^T in fp32, both operands tiled along the reduction axis K.

    a (M, K) fp8 in 1x128 tiles, sa (M, ceil(K/128)); b (N, K) fp8 in 128x128 blocks (kind BLOCKS, sb
    (ceil(N/128), ceil(K/128))) or in 1x128 tiles (kind TILES, sb (N, ceil(K/128))). Returns (M, N) fp32.
    The forward is (x, W), the dgrad (g, W^T) and the wgrad (g^T, x^T) re-tiled along tokens (TILES).
    `native` (Precision.native: a probe passed for this kind on this device) runs torch._scaled_mm where the
    shapes fit it (bf16 output); otherwise the exact emulation: dequantize both, one fp32 matmul.
    """
    if native and _native_fits(a, b, kind):
        return _scaled_mm(a, sa, b, sb, kind)
    return _mm(dequantize_tiles(a, sa), _dequantize(b, sb, kind).t())


def fp8_grouped_mm(a, sa, wq, ws, offs, mm, native: bool) -> torch.Tensor:
    """Rows of a (M, K) sorted by expert, 1x128 tiles, times each expert's w (E, K, N) in 128x128 blocks
    (ws (E, ceil(K/128), ceil(N/128))); offs (E,) cumulative group ends. Returns (M, N) fp32.

    Emulated: the plain grouped GEMM `mm` on the dequantized operands. Native: one fp8_mm per expert
    (torch._scaled_grouped_mm takes no 1x128 / 128x128 scales; see the module docstring).
    """
    if not native:
        with torch.autocast(a.device.type, enabled=False):
            return mm(dequantize_tiles(a, sa), dequantize_blocks(wq, ws), offs)
    out = a.new_empty(a.shape[0], wq.shape[-1], dtype=torch.float32)  # (M, N)
    lo = 0
    for e, hi in enumerate(offs.tolist()):  # one host sync per GEMM
        out[lo:hi] = fp8_mm(a[lo:hi], sa[lo:hi], wq[e].t(), ws[e].t(), BLOCKS, True)
        lo = hi
    return out


def fp8_grouped_wgrad(x: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, pow2: bool, native: bool) -> torch.Tensor:
    """Per expert dW_e = x_e^T g_e with x_e, g_e re-tiled along that expert's tokens (1x128 tiles of x_e^T and
    g_e^T, kind TILES): x (M, K), g (M, N) rows sorted by expert, offs (E,) ends -> (E, K, N) fp32.

    Each expert's token axis is zero-padded to a multiple of 128 first: tiles never straddle two experts, a
    partial last tile keeps the scale of its real values (zeros change no amax and no sum), and the shapes
    fit the blockwise kernel (DeepGEMM pads each expert to 128 rows for the same reason).
    """
    out = x.new_zeros(offs.shape[0], x.shape[1], g.shape[1], dtype=torch.float32)  # (E, K, N)
    lo = 0
    for e, hi in enumerate(offs.tolist()):
        if hi > lo:
            xt = _pad_to(x[lo:hi].t(), -1)  # (K, M_e padded)
            gt = _pad_to(g[lo:hi].t(), -1)  # (N, M_e padded)
            out[e] = fp8_mm(*quantize_tiles(xt, pow2), *quantize_tiles(gt, pow2), TILES, native)
        lo = hi
    return out


def blockwise_scaled_mm_ok(device: torch.device, kind: str = BLOCKS) -> bool:
    """Does torch._scaled_mm compute 1x128 x `kind` blockwise products on this device? One tiny real call,
    checked against the emulation. Every row of a and of b, and every 128-wide K tile, has its own magnitude
    (so its own scale), balanced so that each contributes alike to the normalized error: a scale layout read
    the wrong way round fails it."""
    if device.type != "cuda":
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        row_a, row_b = torch.logspace(-3, 3, 32, device=device), torch.logspace(3, -3, 256, device=device)
        col = torch.logspace(-2, 2, 2, device=device).repeat_interleave(TILE)  # K = 256: two tiles, 1e-2 and 1e2
        a = torch.randn(32, 256, device=device, generator=g) * row_a[:, None] * col
        b = torch.randn(256, 256, device=device, generator=g) * row_b[:, None] / col
        aq, sa = quantize_tiles(a)
        bq, sb = quantize_blocks(b) if kind == BLOCKS else quantize_tiles(b)
        unit = row_a[:, None] * row_b[None, :]  # (32, 256) the magnitude of each output
        got = _scaled_mm(aq, sa, bq, sb, kind) / unit
        want = _mm(dequantize_tiles(aq, sa), _dequantize(bq, sb, kind).t()) / unit
        return bool((got - want).norm() <= 1e-2 * want.norm())
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


class FP8Linear(torch.autograd.Function):
    """y = x W^T with fine-grained FP8 inputs and fp32 accumulation; see the module docstring.

    apply(x (..., K), weight (N, K) or None, wq, ws, recipe): wq/ws are W's blocks (quantized once by the
    caller, or held frozen by an FP8 base with weight=None: then no wgrad). With recipe.quantize False every
    quantizer is the identity (x and W pass unchanged), which is what gradcheck checks.
    """

    @staticmethod
    def forward(ctx, x, weight, wq, ws, recipe):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if recipe.quantize:
            xq, xs = quantize_tiles(x2, recipe.pow2)
            y = fp8_mm(xq, xs, wq, ws, BLOCKS, recipe.native(x.device, BLOCKS))  # (M, N)
        else:
            xq, xs = x2, None
            y = _mm(x2, wq.t())
        ctx.recipe, ctx.shape, ctx.dtype = recipe, shape, x.dtype
        ctx.wdtype = weight.dtype if weight is not None else wq.dtype
        ctx.requantize = weight is not None and recipe.quantize
        if ctx.requantize:  # fp8 activation + scales (the memory FP8 saves); W itself, re-quantized in backward
            ctx.save_for_backward(xq, xs, weight)
        else:  # frozen FP8 base (the blocks are the weight) or the identity-quantizer check
            ctx.save_for_backward(xq, xs, wq, ws)
        return y.to(x.dtype).view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        if ctx.requantize:
            xq, xs, weight = ctx.saved_tensors
            wq, ws = quantize_blocks(weight.detach(), ctx.recipe.pow2)  # the forward's blocks, bit for bit
        else:
            xq, xs, wq, ws = ctx.saved_tensors
        r = ctx.recipe
        g2 = g.reshape(-1, g.shape[-1])  # (M, N)
        dx = dw = None
        if r.quantize:
            if ctx.needs_input_grad[0]:  # dgrad: g in 1x128 tiles along N, times the same W blocks (as W^T)
                gq, gs = quantize_tiles(g2, r.pow2)
                dx = fp8_mm(gq, gs, wq.t(), ws.t(), BLOCKS, r.native(g.device, BLOCKS))  # (M, K)
            if ctx.needs_input_grad[1]:  # wgrad: g and x re-tiled along the token axis (128x1 tiles)
                gtq, gts = quantize_tiles(g2.t(), r.pow2)  # (N, M)
                xtq, xts = quantize_tiles(dequantize_tiles(xq, xs).t(), r.pow2)  # (K, M)
                dw = fp8_mm(gtq, gts, xtq, xts, TILES, r.native(g.device, TILES))  # (N, K)
        else:
            dx = _mm(g2, wq) if ctx.needs_input_grad[0] else None
            dw = _mm(g2.t(), xq) if ctx.needs_input_grad[1] else None
        dx = None if dx is None else dx.to(ctx.dtype).view(ctx.shape)
        dw = None if dw is None else dw.to(ctx.wdtype)
        return dx, dw, None, None, None


class FrozenFP8Weight(torch.autograd.Function):
    """y = x deq(W)^T for a frozen FP8 base weight (QLoRA-style, weight-only: x stays in its precision).

    Saves only x's shape and the fp8 blocks: deq(W) is rebuilt for the dgrad, never kept. No wgrad.
    """

    @staticmethod
    def forward(ctx, x, wq, ws):
        ctx.save_for_backward(wq, ws)
        ctx.dtype = x.dtype
        return _mm(x, dequantize_blocks(wq, ws).t()).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        wq, ws = ctx.saved_tensors
        return _mm(g, dequantize_blocks(wq, ws)).to(ctx.dtype), None, None


class FrozenFP8GroupedWeight(torch.autograd.Function):
    """The routed experts' grouped GEMM over a frozen FP8 base, weight-only: mm(x, deq(W), offs).

    apply(x (M, K), wq (E, K, N), ws (E, ceil(K/128), ceil(N/128)), offs, mm). The whole stack is dequantized
    per forward (and again for the dgrad) in x's dtype and dropped: only the fp8 blocks stay. No wgrad.
    """

    @staticmethod
    def forward(ctx, x, wq, ws, offs, mm):
        ctx.save_for_backward(wq, ws, offs)
        ctx.mm = mm
        return mm(x, dequantize_blocks(wq, ws).to(x.dtype), offs)  # (M, N)

    @staticmethod
    def backward(ctx, g):
        wq, ws, offs = ctx.saved_tensors
        dx = ctx.mm(g, dequantize_blocks(wq, ws).to(g.dtype).transpose(1, 2), offs)  # (M, K)
        return dx, None, None, None, None


class FP8GroupedMM(torch.autograd.Function):
    """Rows of x sorted by expert times each expert's FP8 matrix: x (M, K) tiles, W (E, K, N) blocks, offs (E,).

    apply(x, w (E, K, N) or None, wq, ws, offs, mm, recipe): like FP8Linear, wq/ws are quantized by the caller
    from the parameter w (re-quantized in backward), or are a frozen FP8 base's blocks (w None: no wgrad).
    Forward and dgrad run `fp8_grouped_mm` (the dgrad with the same blocks, transposed); the wgrad runs
    `fp8_grouped_wgrad` (x and g re-tiled along each expert's tokens, as FP8Linear's wgrad along all tokens).
    """

    @staticmethod
    def forward(ctx, x, w, wq, ws, offs, mm, recipe):
        xq, xs = quantize_tiles(x, recipe.pow2)
        y = fp8_grouped_mm(xq, xs, wq, ws, offs, mm, recipe.native(x.device, BLOCKS))
        ctx.mm, ctx.recipe, ctx.dtypes = mm, recipe, (x.dtype, None if w is None else w.dtype)
        ctx.requantize = w is not None
        if ctx.requantize:  # w: a view of the parameter (no copy), re-quantized in backward
            ctx.save_for_backward(xq, xs, w, offs)
        else:  # a frozen FP8 base: its blocks are the weight
            ctx.save_for_backward(xq, xs, wq, ws, offs)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        if ctx.requantize:
            xq, xs, w, offs = ctx.saved_tensors
            wq, ws = quantize_blocks(w.detach(), ctx.recipe.pow2)
        else:
            xq, xs, wq, ws, offs = ctx.saved_tensors
        gq, gs = quantize_tiles(g, ctx.recipe.pow2)
        dx = dw = None
        if ctx.needs_input_grad[0]:  # (M, K)
            native = ctx.recipe.native(g.device, BLOCKS)
            dx = fp8_grouped_mm(gq, gs, wq.transpose(1, 2), ws.transpose(1, 2), offs, ctx.mm, native).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:  # (E, K, N): per expert x_e^T g_e, both re-tiled along its tokens
            native = ctx.recipe.native(g.device, TILES)
            dw = fp8_grouped_wgrad(dequantize_tiles(xq, xs), g, offs, ctx.recipe.pow2, native).to(ctx.dtypes[1])
        return dx, dw, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- recipe
@dataclass(eq=False)
class Precision:
    """The precision recipe of a model's projections and routed experts ("plain" or "fp8").

    One object per model (set by `Model.set_precision`), consulted by every `linear.Linear.base_forward` and by
    the experts' grouped GEMMs. `quantize=False` keeps the FP8 code path with identity quantizers (gradcheck).
    `recompute` (fp8 only): the MLPs and experts recompute their up-projections and SwiGLU in backward
    (`recomputing`).
    """

    name: str = "plain"
    quantize: bool = True
    pow2: bool = False
    recompute: bool = True
    _native: dict = field(default_factory=dict, repr=False)  # (device, kind) -> blockwise scaled_mm works (probed)

    def __post_init__(self):
        if self.name not in ("plain", "fp8"):
            raise ValueError(f"precision {self.name!r}: must be 'plain' or 'fp8'")

    @property
    def fp8(self) -> bool:
        return self.name == "fp8"

    def native(self, device: torch.device, kind: str = BLOCKS) -> bool:
        """Whether fp8_mm may run torch._scaled_mm for 1x128 x `kind` scales on `device` (probed once, cached)."""
        key = (device, kind)
        if key not in self._native:
            self._native[key] = blockwise_scaled_mm_ok(device, kind)
            if device.type == "cuda" and not self._native[key]:
                warnings.warn(f"blockwise FP8 torch._scaled_mm (1x128 x {kind} scales) is not available on {device}: "
                              "those GEMMs run emulated (dequantize + fp32 matmul), slower than bf16", stacklevel=3)
        return self._native[key]

    def recomputing(self) -> bool:
        """Whether an MLP's a = act(x W_gate^T) * (x W_up^T) runs under activation checkpointing: only x is kept
        (the MoE router keeps x anyway), the FP8 up-projection GEMMs and the SwiGLU are re-run in backward, by
        the same deterministic ops, so values and gradients are those of the plain path bit for bit. Not
        under torch.compile (dynamo cannot trace checkpoint's adapter-replaying context_fn)."""
        return self.fp8 and self.recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (..., K) W^T (+ b); b is added in high precision."""
        if not self.fp8:
            return F.linear(x, weight, bias)
        if self.quantize:
            with torch.no_grad():
                wq, ws = quantize_blocks(weight, self.pow2)
        else:
            wq, ws = weight, None
        y = FP8Linear.apply(x, weight, wq, ws, self)
        return y if bias is None else y + bias

    def frozen_linear(self, x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        """x (..., K) W^T (+ b) for a frozen base held as fp8 blocks wq (N, K) + scales ws: under "fp8" the
        activations are tiled too (FP8Linear, no wgrad); under "plain" only the weight is FP8."""
        if self.fp8 and self.quantize:
            y = FP8Linear.apply(x, None, wq, ws, self)
        else:
            y = FrozenFP8Weight.apply(x, wq, ws)
        return y if bias is None else y + bias

    def grouped(self, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, mm) -> torch.Tensor:
        """The experts' grouped GEMM `mm(x, w, offs)` under this recipe: x (M, K), w (E, K, N)."""
        if not (self.fp8 and self.quantize):
            return mm(x, w, offs)
        with torch.no_grad():
            wq, ws = quantize_blocks(w, self.pow2)  # blocks of (K, N) = the transposes of (N, K)'s blocks
        return FP8GroupedMM.apply(x, w, wq, ws, offs, mm, self)

    def frozen_grouped(self, x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, offs: torch.Tensor,
                       mm) -> torch.Tensor:
        """The grouped GEMM over a frozen FP8 base held as blocks wq (E, K, N) + scales ws: under "fp8" the
        activations are tiled too (FP8GroupedMM, no wgrad); under "plain" only the weight is FP8."""
        if self.fp8 and self.quantize:
            return FP8GroupedMM.apply(x, None, wq, ws, offs, mm, self)
        return FrozenFP8GroupedWeight.apply(x, wq, ws, offs, mm)


PLAIN = Precision("plain")
