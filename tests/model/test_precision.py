"""The precision seam: Model.set_precision("fp8") reaches every projection and routed expert, nothing else."""

from __future__ import annotations

import torch

from nanoseek.model.layers import Linear
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
