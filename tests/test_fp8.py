"""Fine-grained FP8 quantizers and the FP8 linear / grouped GEMM (CPU emulation; the CUDA kernel is `gpu`)."""

from __future__ import annotations

import pytest
import torch

from nanoseek.fp8 import (
    BLOCKS,
    FP8,
    FP8_MAX,
    TILES,
    FP8Linear,
    FrozenFP8GroupedWeight,
    Precision,
    blockwise_scaled_mm_ok,
    dequantize_blocks,
    dequantize_tiles,
    fp8_grouped_mm,
    fp8_grouped_wgrad,
    fp8_mm,
    quantize_blocks,
    quantize_tiles,
)
from nanoseek.model.moe import grouped_mm

# E4M3: 3 mantissa bits -> round-to-nearest relative error <= 2^-4 for normals; below the smallest normal
# (2^-6, in scaled units) the grid step is 2^-9, so the absolute error is <= 2^-10 * scale.
REL, SUB = 2.0 ** -4, 2.0 ** -10


def bound(x: torch.Tensor, scale_per_elem: torch.Tensor) -> torch.Tensor:
    return torch.maximum(REL * x.abs(), SUB * scale_per_elem) * (1 + 1e-6) + 1e-30


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("K", [128, 300, 5])
def test_tiles_round_trip_within_e4m3_bound(K, pow2):
    x = torch.randn(7, 3, K) * torch.logspace(-3, 3, K)  # mixed magnitudes inside tiles
    q, s = quantize_tiles(x, pow2)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == (7, 3, -(-K // 128)) and s.dtype == torch.float32
    per_elem = s.repeat_interleave(128, -1)[..., :K]
    err = (dequantize_tiles(q, s) - x).abs()
    assert (err <= bound(x, per_elem)).all()
    amax = torch.nn.functional.pad(x.abs(), (0, -K % 128)).view(7, 3, -1, 128).amax(-1)
    if pow2:
        assert torch.equal(torch.exp2(torch.log2(s).round()), s) and (amax / s <= FP8_MAX).all()
    else:
        torch.testing.assert_close(s, amax / FP8_MAX)  # scale = amax / 448


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 129, 257)])
def test_blocks_round_trip_within_e4m3_bound(shape):
    w = torch.randn(shape) * 0.02
    q, s = quantize_blocks(w)
    N, K = shape[-2:]
    assert q.shape == w.shape and s.shape == (*shape[:-2], -(-N // 128), -(-K // 128))
    per_elem = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :N, :K]
    assert ((dequantize_blocks(q, s) - w).abs() <= bound(w, per_elem)).all()
    blk = w[..., :128, :128].abs().amax(dim=(-2, -1))
    torch.testing.assert_close(s[..., 0, 0], blk / FP8_MAX)


def test_values_on_the_grid_are_exact():
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite()]  # every finite E4M3 value, amax = 448 -> scale 1
    x = grid[torch.randperm(grid.numel())][:128].clone()
    x[0] = 448.0
    q, s = quantize_tiles(x * 2.0 ** -5, pow2=True)  # a power-of-two scale keeps the grid exact
    assert torch.equal(dequantize_tiles(q, s), x * 2.0 ** -5)
    q, s = quantize_tiles(x)
    assert torch.equal(s, torch.ones(1)) and torch.equal(dequantize_tiles(q, s), x)
    w = x.repeat(128, 1)
    qb, sb = quantize_blocks(w)
    assert torch.equal(dequantize_blocks(qb, sb), w)


def test_zero_and_outlier_tiles():
    x = torch.zeros(2, 256)
    x[1, :128] = torch.randn(128) * 1e-3
    x[1, 5] = 1e4  # one outlier: only its own tile loses resolution
    x[1, 128:] = torch.randn(128) * 1e-3
    q, s = quantize_tiles(x)
    assert torch.equal(s[0], torch.ones(2)) and torch.equal(dequantize_tiles(q, s)[0], x[0])  # zeros: exact
    assert s[1, 0] == pytest.approx(1e4 / FP8_MAX) and dequantize_tiles(q, s)[1, 5] == 1e4
    other = dequantize_tiles(q, s)[1, 128:]
    assert ((other - x[1, 128:]).abs() <= REL * x[1, 128:].abs() + SUB * s[1, 1]).all()  # unaffected tile
    assert torch.isfinite(dequantize_tiles(*quantize_tiles(torch.full((4, 128), 1e30)))).all()


def test_fp8_linear_forward_and_grads_vs_fp32():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 320, requires_grad=True)
    w = (torch.randn(200, 320) * 0.05).requires_grad_()
    r = Precision("fp8")
    y = r.linear(x, w, None)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    y0 = x @ w.t()
    dx0, dw0 = torch.autograd.grad(y0, (x, w), g)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    # Each operand carries <= 2^-4 relative error per element (rms ~ 2^-4/sqrt(3) ~ 0.036 for uniform
    # rounding in [-1/2, 1/2] ulp), independent across the K terms: the product's relative Frobenius error is
    # about sqrt(2) * 0.036 / sqrt(...) < 0.05; wgrad re-quantizes x (double rounding), hence 0.06.
    assert rel(y, y0) < 0.05 and rel(dx, dx0) < 0.05 and rel(dw, dw0) < 0.06
    assert rel(y, y0) > 1e-4  # really quantized


def test_saved_activation_is_fp8():
    x = torch.randn(16, 256, requires_grad=True)
    w = torch.randn(128, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        Precision("fp8").linear(x, w, None)
    assert any(t.dtype == FP8 and t.shape == x.shape for t in saved)
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    # no fp8 copy of W is kept: the backward re-quantizes the parameter (itself saved, not copied)
    assert not any(t.dtype == FP8 and t.shape == w.shape for t in saved)
    assert any(t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() for t in saved)


def test_gradcheck_quantization_off():
    torch.manual_seed(0)
    r = Precision("fp8", quantize=False)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: FP8Linear.apply(a, b, b, None, r), (x, w))
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: r.linear(a, c, d), (x, w, b))


def test_grouped_fp8_vs_fp32_and_bias_free_grads():
    torch.manual_seed(0)
    E, K, N = 4, 160, 96
    offs = torch.tensor([10, 10, 37, 50], dtype=torch.int32)  # an empty group too
    x = torch.randn(50, K, requires_grad=True)
    w = (torch.randn(E, K, N) * 0.05).requires_grad_()
    y = Precision("fp8").grouped(x, w, offs, grouped_mm)
    y0 = grouped_mm(x, w, offs)
    g = torch.randn_like(y0)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    dx0, dw0 = torch.autograd.grad(y0, (x, w), g)
    for a, b in ((y, y0), (dx, dx0), (dw, dw0)):
        assert 1e-4 < ((a - b).norm() / b.norm()).item() < 0.05
    assert dw[1].abs().max() == 0  # the empty expert gets no gradient


@pytest.mark.parametrize("M,K,N", [(64, 256, 384), (50, 200, 130)])
def test_fp8_mm_emulation_is_dequantize_then_fp32_matmul(M, K, N):
    torch.manual_seed(0)
    aq, sa = quantize_tiles(torch.randn(M, K))
    bq, sb = quantize_blocks(torch.randn(N, K))
    want = dequantize_tiles(aq, sa) @ dequantize_blocks(bq, sb).t()
    assert torch.equal(fp8_mm(aq, sa, bq, sb, BLOCKS, native=False), want)
    tq, ts = quantize_tiles(torch.randn(N, K))
    want = dequantize_tiles(aq, sa) @ dequantize_tiles(tq, ts).t()
    assert torch.equal(fp8_mm(aq, sa, tq, ts, TILES, native=False), want)


@pytest.mark.parametrize("shape", [(4, 64, 320, 200), (2, 128, 256, 384), (3, 7, 130, 5)])
def test_fp8_linear_unchanged_bit_for_bit_on_cpu(shape):
    """Forward, dgrad and wgrad through fp8_mm equal the formulas the FP8 linear had before it (emulation)."""
    B, T, K, N = shape
    torch.manual_seed(1)
    x = torch.randn(B, T, K, requires_grad=True)
    w = (torch.randn(N, K) * 0.05).requires_grad_()
    y = Precision("fp8").linear(x, w, None)
    g = torch.randn_like(y)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    xq, xs = quantize_tiles(x.detach().reshape(-1, K))
    wq, ws = quantize_blocks(w.detach())
    y0 = dequantize_tiles(xq, xs) @ dequantize_blocks(wq, ws).t()
    gq, gs = quantize_tiles(g.reshape(-1, N))
    dx0 = dequantize_tiles(gq, gs) @ dequantize_blocks(wq, ws)
    gtq, gts = quantize_tiles(g.reshape(-1, N).t())
    xtq, xts = quantize_tiles(dequantize_tiles(xq, xs).t())
    dw0 = dequantize_tiles(gtq, gts) @ dequantize_tiles(xtq, xts).t()
    assert torch.equal(y.reshape(-1, N), y0) and torch.equal(dx.reshape(-1, K), dx0) and torch.equal(dw, dw0)


def test_frozen_grouped_weight_is_the_dequantized_grouped_gemm():
    torch.manual_seed(0)
    E, K, N = 4, 160, 96
    offs = torch.tensor([10, 10, 37, 50], dtype=torch.int32)
    x = torch.randn(50, K, requires_grad=True)
    wq, ws = quantize_blocks(torch.randn(E, N, K) * 0.05)  # stored (E, N, K), used transposed as (E, K, N)
    wq, ws = wq.transpose(1, 2), ws.transpose(1, 2)
    y = FrozenFP8GroupedWeight.apply(x, wq, ws, offs, grouped_mm)
    wd = dequantize_blocks(wq, ws).requires_grad_()
    y0 = grouped_mm(x, wd, offs)
    g = torch.randn_like(y0)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y0, x, g)[0], rtol=1e-6, atol=1e-6)
    yq = Precision("fp8").frozen_grouped(x, wq, ws, offs, grouped_mm)  # activations tiled too
    xq, xs = quantize_tiles(x.detach())
    assert torch.equal(yq, fp8_grouped_mm(xq, xs, wq, ws, offs, grouped_mm, native=False))
    assert torch.autograd.grad(yq, x, g)[0].abs().sum() > 0


def test_grouped_wgrad_retiles_each_expert_along_its_tokens():
    torch.manual_seed(0)
    offs = torch.tensor([10, 10, 150, 170], dtype=torch.int32)  # an empty expert; one with two token tiles
    x, g = torch.randn(170, 96), torch.randn(170, 40)
    dw = fp8_grouped_wgrad(x, g, offs, pow2=False, native=False)
    lo = 0
    for e, hi in enumerate(offs.tolist()):
        xt, gt = quantize_tiles(x[lo:hi].t()), quantize_tiles(g[lo:hi].t())  # no padding: tiles of this expert
        want = dequantize_tiles(*xt) @ dequantize_tiles(*gt).t() if hi > lo else torch.zeros(96, 40)
        torch.testing.assert_close(dw[e], want, rtol=1e-6, atol=1e-6)
        lo = hi
    assert dw[1].abs().max() == 0


@pytest.mark.slow
def test_fp8_linear_compiles_and_matches_eager():
    """torch.compile traces the FP8 autograd.Function (its saved fp8 activation is a new tensor, not a view)."""
    torch.manual_seed(0)
    x = torch.randn(16, 256, requires_grad=True)
    w = (torch.randn(128, 256) * 0.05).requires_grad_()
    r = Precision("fp8")
    grads = []
    for f in (r.linear, torch.compile(r.linear)):
        y = f(x, w, None)
        grads.append((y, *torch.autograd.grad(y.square().sum(), (x, w))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_precision_rejects_unknown_name():
    with pytest.raises(ValueError, match="'fp4'"):
        Precision("fp4")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", [BLOCKS, TILES])
def test_native_fp8_mm_matches_emulation(kind):
    dev = torch.device("cuda")
    if not blockwise_scaled_mm_ok(dev, kind):
        pytest.skip(f"no blockwise torch._scaled_mm for 1x128 x {kind} on this device")
    aq, sa = quantize_tiles(torch.randn(256, 512, device=dev))
    bq, sb = (quantize_blocks if kind == BLOCKS else quantize_tiles)(torch.randn(384, 512, device=dev) * 0.05)
    assert _rel(fp8_mm(aq, sa, bq, sb, kind, native=True), fp8_mm(aq, sa, bq, sb, kind, native=False)) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_native_linear_and_grouped_match_the_cpu_emulation():
    """Forward, dgrad, wgrad of the FP8 linear and forward + dgrad of the grouped GEMM on CUDA (native where the
    probe passes) against the same computation emulated on the CPU: bf16 output rounding only."""
    dev = torch.device("cuda")
    if not Precision("fp8").native(dev):
        pytest.skip("no blockwise torch._scaled_mm on this device")
    torch.manual_seed(0)
    x, w = torch.randn(256, 512), torch.randn(384, 512) * 0.05
    g = torch.randn(256, 384)
    out = {}
    for d in ("cpu", "cuda"):
        xd, wd = x.to(d).requires_grad_(), w.to(d).requires_grad_()
        y = Precision("fp8").linear(xd, wd, None)
        out[d] = (y, *torch.autograd.grad(y, (xd, wd), g.to(d)))
    for a, b in zip(out["cuda"], out["cpu"], strict=True):
        assert _rel(a.cpu(), b) < 1e-2
    offs = torch.tensor([128, 128, 384, 512], dtype=torch.int32)  # an empty expert too
    xe, we, ge = torch.randn(512, 256), torch.randn(4, 256, 384) * 0.05, torch.randn(512, 384)
    res = {}
    for d in ("cpu", "cuda"):
        xd, wd = xe.to(d).requires_grad_(), we.to(d).requires_grad_()
        y = Precision("fp8").grouped(xd, wd, offs.to(d), grouped_mm)
        res[d] = (y, *torch.autograd.grad(y, (xd, wd), ge.to(d)))
    for a, b in zip(res["cuda"], res["cpu"], strict=True):
        assert _rel(a.cpu(), b) < 1e-2
