"""torch.compile and the CUDA path: same numbers as eager fp32 on the CPU (slow / gpu tests)."""

import pytest
import torch

from nanoseek import Model
from tests.tiny import ds, gpt2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.slow
@pytest.mark.parametrize("make", [ds, gpt2])
def test_compile_matches_eager(make):
    torch.manual_seed(0)
    model = Model(make(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0) if make is gpt2 else make())
    x = torch.randint(0, 64, (2, 32))
    eager = model(x, targets=x)
    compiled = torch.compile(model)(x, targets=x)
    assert torch.allclose(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    compiled.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("make", [ds, gpt2])
def test_cuda_bf16_close_to_cpu_fp32(make):
    """bf16 autocast on the GPU (native grouped GEMM for experts when aligned) vs the fp32 CPU reference."""
    torch.manual_seed(0)
    cfg = make(hidden_size=64, moe_intermediate_size=32) if make is ds else make(hidden_size=64)
    model = Model(cfg).eval()
    x = torch.randint(0, 64, (4, 48))
    with torch.no_grad():
        ref = model(x).float()
        gpu = model.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(x.cuda()).float().cpu()
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()


@pytest.mark.gpu
@cuda
def test_cuda_generate_matches_full_forward():
    torch.manual_seed(0)
    model = Model(ds()).eval().to("cuda")
    x = torch.randint(0, 64, (2, 8), device="cuda")
    out = model.generate(x, 8)
    with torch.no_grad():
        seq = x
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
