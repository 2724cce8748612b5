"""DeepSeek-V3's FP8 release format: save_pretrained(..., fp8=True) and loading float8 + weight_scale_inv files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek import Model
from nanoseek.checkpoint import (
    FP8_QUANTIZATION_CONFIG,
    FP8_WEIGHT,
    WEIGHTS,
    from_hf_state_dict,
    read_safetensors_dir,
    to_hf_state_dict,
)
from nanoseek.fp8 import FP8, dequantize_blocks, quantize_blocks
from tests.tiny import ds, gpt2, make_model

# hidden 160 and intermediate 136: several 128x128 blocks per weight, most of them partial (padding path)
CFG = dict(hidden_size=160, intermediate_size=136, moe_intermediate_size=72, q_lora_rank=136)


def fake_quant_model(model: Model) -> Model:
    """The reference: the same model with every on-disk projection weight replaced by dequant(quant(w))."""
    hf = {k: (dequantize_blocks(*quantize_blocks(t)) if FP8_WEIGHT.search(k) and t.dim() == 2 else t)
          for k, t in to_hf_state_dict(model).items()}
    ref = Model(model.config, device="meta")
    ref.load_state_dict(from_hf_state_dict(model.config, hf), strict=True, assign=True)
    ref.tie_weights()
    return ref.eval()


def test_fp8_checkpoint_layout_and_logits_equal_dequantized_weights(tmp_path):
    model = make_model(ds(**CFG), std=0.05)
    model.save_pretrained(tmp_path, fp8=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight")  # (72, 160): blocks 1 x 2
        s = f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv")
        assert w.dtype == FP8 and w.shape == (72, 160) and s.dtype == torch.float32 and s.shape == (1, 2)
        for high in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                     "model.norm.weight"):  # the parts V3 keeps in high precision stay fp32
            assert f.get_tensor(high).dtype == torch.float32 and high + "_scale_inv" not in keys
    quantized = {k for k in keys if k.endswith("_scale_inv")}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in quantized
    assert "model.layers.3.eh_proj.weight_scale_inv" in quantized  # MTP module (layer L)
    loaded = Model.from_pretrained(tmp_path).eval()
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), fake_quant_model(model)(x))  # bit-exact: same weights, same ops
        assert not torch.equal(loaded(x), model(x))  # and FP8 did change the weights


def test_fp8_round_trip_is_exact_on_the_grid(tmp_path):
    """Load an FP8 checkpoint and write it again as FP8: the same bytes and scales (values on the grid)."""
    make_model(ds(**CFG), std=0.05).save_pretrained(tmp_path / "a", fp8=True)
    Model.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b", fp8=True)
    a, b = read_safetensors_dir(tmp_path / "a"), read_safetensors_dir(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def test_bf16_release_checkpoint_loads_in_bf16(tmp_path):
    """A DeepSeek-style file (bf16 tensors, fp8 projections) built by hand: dequantized to the file's bf16."""
    model = make_model(ds(**CFG), std=0.05)
    model.save_pretrained(tmp_path, dtype=torch.bfloat16, fp8=True)
    loaded = Model.from_pretrained(tmp_path)
    assert loaded.model.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert loaded.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    w = model.model.layers[0].self_attn.o_proj.weight
    torch.testing.assert_close(loaded.model.layers[0].self_attn.o_proj.weight.float(),
                               dequantize_blocks(*quantize_blocks(w.bfloat16())).bfloat16().float())


def test_bad_fp8_files_are_refused(tmp_path):
    make_model(ds(**CFG), std=0.05).save_pretrained(tmp_path, fp8=True)
    cfg_path = tmp_path / "config.json"
    config = json.loads(cfg_path.read_text())
    config["quantization_config"] = {**FP8_QUANTIZATION_CONFIG, "weight_block_size": [64, 64]}
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weight_block_size"):
        Model.from_pretrained(tmp_path)
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    cfg_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bitsandbytes"):
        Model.from_pretrained(tmp_path)
    config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    cfg_path.write_text(json.dumps(config))
    sd = read_safetensors_dir(tmp_path)
    del sd["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(sd, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match="o_proj.weight_scale_inv"):
        Model.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        make_model(gpt2()).save_pretrained(tmp_path / "g", fp8=True)


def test_transformers_loads_our_fp8_checkpoint(tmp_path):
    """transformers' FineGrainedFP8 on a machine without a GPU dequantizes on load (its documented CPU path).

    Sizes are multiples of 128 (or a single partial block): transformers 5.24's CPU dequantizer derives the block
    size as rows / scale_rows, so a weight of several blocks with a partial last one (e.g. 160 columns, scales
    for 2 blocks -> it uses 80-wide blocks) is dequantized wrongly there, and one that does not divide raises.
    """
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' FP8 quantizer requires it
    model = make_model(ds(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=256,
                          num_nextn_predict_layers=0), std=0.05)
    model.save_pretrained(tmp_path, fp8=True)
    if torch.cuda.is_available():
        pytest.skip("on a GPU transformers runs its FP8 kernels instead of dequantizing; covered by the CPU case")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits.float() - Model.from_pretrained(tmp_path).eval()(x)).abs().max().item()
    assert diff <= 1e-4, diff
