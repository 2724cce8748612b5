"""The precision seam: Model.set_precision("fp8") reaches every projection and routed expert, nothing else."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import Model
from nanoseek.fp8 import FP8, dequantize_blocks
from nanoseek.lora import LoraConfig
from nanoseek.model.expert_parallel import ExpertGroup, shard_experts
from nanoseek.model.linear import Linear
from nanoseek.model.moe import EXPERT_PROJS, Experts
from nanoseek.model.precision import dequantize_base, quantize_base
from tests.tiny import ds, gpt2, make_model, tokens

ALL_AND_EXPERTS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj", "experts"]


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
    model = make_model(ds(), std=0.05)
    x = tokens(2, 16)
    with torch.no_grad():
        ref = model(x)
    model.add_adapter("a", LoraConfig(r=4, init_lora_weights=False, target_modules=ALL_AND_EXPERTS))
    model.trainable_adapter("a")
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    freed = quantize_base(model)
    after = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("_scale_inv"))
    assert freed > 0 and before - after == freed
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == FP8
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == FP8
    assert model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        y = model(x)
    assert 1e-5 < ((y - ref).norm() / ref.norm()).item() < 0.1  # weight-only FP8 error
    model.train()
    model(x, targets=x, adapter="a").loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    assert "model.layers.1.mlp.experts.lora_A.a.gate_up_proj" in grads  # LoRA on the FP8 experts trains


def test_fp8_experts_take_half_of_bf16():
    model = make_model(ds(hidden_size=256, moe_intermediate_size=128), dtype=torch.bfloat16, std=0.05)
    experts = model.model.layers[1].mlp.experts
    bf16 = sum(getattr(experts, p).numel() * 2 for p in EXPERT_PROJS)
    quantize_base(model)
    fp8 = sum(getattr(experts, p).numel() + getattr(experts, p + "_scale_inv").numel() * 4 for p in EXPERT_PROJS)
    E = experts.gate_up_proj.shape[0]
    assert experts.gate_up_proj.shape == (E, 256, 256) and experts.gate_up_proj_scale_inv.shape == (E, 2, 2)
    assert experts.down_proj.dtype == FP8 and not experts.down_proj.requires_grad
    assert fp8 / bf16 == (1 + 4 / 128**2) / 2  # 1 byte per weight + one fp32 scale per 128x128 block


@pytest.mark.parametrize("recipe", ["plain", "fp8"])
def test_fp8_base_logits_equal_a_model_of_the_dequantized_blocks(recipe):
    base = make_model(ds(), std=0.05)
    base.add_adapter("a", LoraConfig(r=4, init_lora_weights=False, target_modules=ALL_AND_EXPERTS))
    deq = copy.deepcopy(base)
    quantize_base(base)
    with torch.no_grad():  # the reference: ordinary weights equal to the blocks, dequantized
        for (name, p), q in zip(deq.named_parameters(), base.parameters(), strict=True):
            if q.dtype == FP8:
                p.copy_(dequantize_blocks(q, base.get_buffer(name + "_scale_inv")))
    base.set_precision(recipe)
    deq.set_precision(recipe)
    x = tokens(2, 16)
    with torch.no_grad():
        for adapter in (None, "a"):
            torch.testing.assert_close(base(x, adapter=adapter), deq(x, adapter=adapter), rtol=1e-6, atol=1e-6)
    grads = []
    for m in (base, deq):  # the adapter's gradients through the frozen blocks = through the dequantized weights
        m.train()
        m.trainable_adapter("a")
        m(x, targets=x, adapter="a").loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert any(".experts.lora_B.a." in n for n in grads[0]) and grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-5, atol=1e-7)


def test_fp8_base_merge_refuses_and_save_writes_ordinary_weights(tmp_path):
    model = make_model(ds(), std=0.05)
    model.add_adapter("a", LoraConfig(r=4, init_lora_weights=False, target_modules=ALL_AND_EXPERTS))
    quantize_base(model)
    x = tokens(2, 16)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ValueError, match="frozen FP8 blocks.*dequantize_base"):
        model.merge_adapter("a")
    model.save_pretrained(tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in sd.values() if t.is_floating_point())
    assert not any(k.endswith("_scale_inv") for k in sd)
    with torch.no_grad():
        torch.testing.assert_close(Model.from_pretrained(tmp_path / "m")(x), want, rtol=1e-6, atol=1e-6)
        dequantize_base(model)
        assert model.model.layers[1].mlp.experts.down_proj.dtype == torch.float32
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
        y = model(x, adapter="a")
        model.merge_adapter("a")  # ordinary weights again: merging works
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_expert_parallel_shards_the_fp8_experts_scales_too():
    model = make_model(ds(hidden_size=256, moe_intermediate_size=128), std=0.05)
    experts = model.model.layers[1].mlp.experts
    quantize_base(model)
    full = {p: (getattr(experts, p).clone(), getattr(experts, p + "_scale_inv").clone()) for p in EXPERT_PROJS}
    shard_experts(model, ExpertGroup(2, 1))  # rank 1 of 2 keeps experts [4, 8)
    for p, (q, s) in full.items():
        assert torch.equal(getattr(experts, p).view(torch.uint8), q[4:].view(torch.uint8))
        assert torch.equal(getattr(experts, p + "_scale_inv"), s[4:])


def _saved_bytes(model, x, adapter=None) -> tuple[int, torch.Tensor]:
    """Bytes of distinct non-parameter storages autograd saves for one training forward, and the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}  # data_ptr -> (tensor, bytes): holding the tensor keeps its address from being reused

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t, t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, targets=x, adapter=adapter).loss
    return sum(n for _, n in seen.values()), loss


@pytest.mark.parametrize("adapter", [None, "a", "rows"])
def test_fp8_recomputed_mlps_save_less_with_the_same_gradients(adapter):
    """Recomputation in backward runs outside Model.forward: it must replay the forward's adapter state (one
    adapter, or per-row adapters with their stacked factors) to give the same gradients bit for bit."""
    runs = {}
    for recompute in (False, True):
        model = make_model(ds(), std=0.05).train()
        for name in ("a", "b"):
            model.add_adapter(name, LoraConfig(r=4, init_lora_weights=False, lora_dropout=0.1,
                                               target_modules=ALL_AND_EXPERTS))
        model.set_precision("fp8").recompute = recompute
        for p in model.parameters():  # the base and both adapters train
            p.requires_grad_(True)
        x = tokens(2, 16)
        torch.manual_seed(0)  # LoRA dropout draws the same masks in both runs (and again in the recomputation)
        which = torch.tensor([0, 1]) if adapter == "rows" else adapter
        saved, loss = _saved_bytes(model, x, which)
        loss.backward()
        runs[recompute] = saved, loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (s0, l0, g0), (s1, l1, g1) = runs[False], runs[True]
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert adapter is None or any(".experts.lora_A." in n for n in g0)
    assert s1 < 0.85 * s0  # gate/up outputs, act(gate) and the up-projections' fp8 inputs are not kept


def test_casting_a_model_with_an_fp8_base_keeps_the_blocks():
    """model.to(bf16) after quantize_base casts the rest but leaves the fp8 blocks and their fp32 scales (a cast
    would turn them into unscaled numbers); the logits stay those of the fp32 model up to bf16 rounding."""
    model = make_model(ds(), std=0.05)
    quantize_base(model)
    x = tokens(2, 12)
    with torch.no_grad():
        ref = model(x)
    blocks = {n: p.clone() for n, p in model.named_parameters() if p.dtype == FP8}
    scales = {n: b.clone() for n, b in model.named_buffers() if n.endswith("scale_inv")}
    assert len(blocks) > 10 and len(scales) == len(blocks)
    model.to(torch.bfloat16)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for n, b in blocks.items():
        assert params[n].dtype == FP8 and not params[n].requires_grad and torch.equal(params[n].float(), b.float())
    for n, s in scales.items():
        assert buffers[n].dtype == torch.float32 and torch.equal(buffers[n], s)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(x).float()
    assert (got - ref).abs().mean() <= 0.02 * ref.abs().mean()  # bf16 rounding (and a rare routing flip)
