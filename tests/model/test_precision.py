"""The precision seam: Model.set_precision("fp8") reaches every projection and routed expert, nothing else."""

from __future__ import annotations

import torch

from nanoseek.model.linear import Linear
from nanoseek.model.moe import Experts
from tests.tiny import ds, gpt2, make_model, tokens


def test_fp8_reaches_projections_and_experts_only():
    model = make_model(ds(), std=0.05)
    recipe = model.set_precision("fp8")
    got = {n for n, m in model.named_modules() if isinstance(m, (Linear, Experts)) and m.precision is recipe}
    assert "model.layers.0.self_attn.q_a_proj" in got and "model.layers.0.mlp.down_proj" in got
    assert "model.layers.1.mlp.experts" in got and "model.layers.1.mlp.shared_experts.up_proj" in got
    assert "mtp.0.eh_proj" in got or any(n.endswith("eh_proj") for n in got)
    assert "lm_head" not in got and not any(n.endswith("mlp.gate") for n in got)
    assert model.lm_head.precision.name == "plain"


def test_fp8_logits_close_and_plain_restores_exactly():
    model = make_model(ds(), std=0.05)
    x = tokens(2, 16)
    with torch.no_grad():
        ref = model(x)
        model.set_precision("fp8")
        y = model(x)
        model.set_precision("plain")
        back = model(x)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < 0.15, rel  # quantized (~7%: ~10 FP8 GEMMs deep, some routing flips), but close
    assert torch.equal(back, ref)
    assert set(model.state_dict()) == set(make_model(ds()).state_dict())  # names unchanged


def test_fp8_backward_reaches_every_weight_gpt2():
    model = make_model(gpt2(), std=0.05).train()
    model.set_precision("fp8")
    x = tokens(2, 16)
    model(x, targets=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_quantize_base_frees_memory_and_trains_only_the_adapter():
    from nanoseek.fp8 import FP8
    from nanoseek.lora import LoraConfig
    from nanoseek.model.precision import quantize_base

    model = make_model(ds(), std=0.05)
    x = tokens(2, 16)
    with torch.no_grad():
        ref = model(x)
    model.add_adapter("a", LoraConfig(r=4, init_lora_weights=False))
    model.trainable_adapter("a")
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    freed = quantize_base(model)
    after = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("weight_scale_inv"))
    assert freed > 0 and before - after == freed
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == FP8
    assert model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        y = model(x)
    assert 1e-5 < ((y - ref).norm() / ref.norm()).item() < 0.1  # weight-only FP8 error
    model.train()
    model(x, targets=x, adapter="a").loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
