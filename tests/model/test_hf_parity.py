"""Parity with Hugging Face transformers, both directions, at tiny random configurations (fp32, <= 1e-4)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoseek import Model, ModelConfig  # noqa: E402

TOL = 1e-4

DSV3_CASES = {
    "qlora-groups-mtp": dict(q_lora_rank=16, n_group=4, topk_group=2, first_k_dense_replace=1,
                             norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    "plain-q-no-groups": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                              norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0),
    "two-dense-topk1-group": dict(q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=2,
                                  num_hidden_layers=3, norm_topk_prob=True, routed_scaling_factor=1.7,
                                  num_experts_per_tok=2, num_nextn_predict_layers=2),
    "yarn-no-interleave-tied": dict(rope_interleave=False, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                     "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}),
}

GPT2_CASES = {
    "tied": dict(tie_word_embeddings=True),
    "untied-ninner": dict(tie_word_embeddings=False, intermediate_size=80),
    "deeper": dict(num_hidden_layers=3, num_attention_heads=2),
}


def dsv3_config(**kw) -> ModelConfig:
    base = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, intermediate_size=48, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, moe_intermediate_size=16, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2)
    return ModelConfig(**{**base, **kw})


def gpt2_config(**kw) -> ModelConfig:
    base = dict(model_type="gpt2", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, intermediate_size=128, hidden_act="gelu_new", rms_norm_eps=1e-5,
                initializer_range=0.02)
    return ModelConfig(**{**base, **kw})


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter and the routing bias off its init (norms off 1, biases off 0, bias non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 21), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", sorted(DSV3_CASES))
def test_deepseek_nanoseek_to_hf(case, tmp_path):
    torch.manual_seed(0)
    model = Model(dsv3_config(**DSV3_CASES[case])).eval()
    perturb(model, 1)
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= TOL, diff


@pytest.mark.parametrize("case", sorted(DSV3_CASES))
def test_deepseek_hf_to_nanoseek(case, tmp_path):
    ours = dsv3_config(**DSV3_CASES[case])
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in ours.to_hf_dict().items()
                                              if k not in ("architectures", "nanoseek")})
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    perturb(hf, 2)
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="MTP") if ours.num_nextn_predict_layers else _no_warning():
        model = Model.from_pretrained(tmp_path).eval()
    x = tokens(ours.vocab_size, seed=1)
    with torch.no_grad():
        diff = (model(x) - hf(x).logits).abs().max().item()
    assert diff <= TOL, diff
    biases = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    assert biases and all(b.dtype == torch.float32 and b.abs().sum() > 0 for b in biases)


@pytest.mark.parametrize("case", sorted(GPT2_CASES))
def test_gpt2_both_directions(case, tmp_path):
    torch.manual_seed(0)
    model = Model(gpt2_config(**GPT2_CASES[case])).eval()
    perturb(model, 3)
    model.save_pretrained(tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = tokens(model.config.vocab_size, seed=2)
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= TOL
    perturb(hf, 4)  # now the other way: a checkpoint written by transformers
    hf.save_pretrained(tmp_path / "theirs")
    back = Model.from_pretrained(tmp_path / "theirs").eval()
    with torch.no_grad():
        assert (back(x) - hf(x).logits).abs().max().item() <= TOL
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_mtp_layers_written_after_the_last_layer(tmp_path):
    from safetensors import safe_open

    model = Model(dsv3_config(num_nextn_predict_layers=2))
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    L = model.config.num_hidden_layers
    for k in (L, L + 1):
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                     "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{k}.{name}" in keys
    assert not any(k.startswith("mtp.") or k.endswith("gate_up_proj") for k in keys)


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
