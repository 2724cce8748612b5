"""ModelConfig: validation, presets, width scaling and the Hugging Face config.json round trip."""

from __future__ import annotations

import json

import pytest
import torch

from nanoseek import Model, ModelConfig
from nanoseek.config import PRESETS
from tests import tiny
from tests.tiny import (
    YARN,
    ds,  # noqa: F401
)


def gpt2(**kw) -> ModelConfig:
    return tiny.gpt2(**{"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": None, **kw})


# ---------------------------------------------------------------------- validation
INVALID = [
    # (builder, overrides, field named in the message)
    (gpt2, dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
    (ds, dict(n_group=1, topk_group=1, num_experts_per_tok=9), "num_experts_per_tok"),
    (ds, dict(num_experts_per_tok=0), "num_experts_per_tok"),
    (ds, dict(n_group=3, topk_group=1), "n_group"),
    (ds, dict(n_group=0, topk_group=1), "n_group"),
    (ds, dict(n_group=8, topk_group=1, num_experts_per_tok=1), "n_group"),  # 1 expert per group
    (ds, dict(n_group=4, topk_group=5), "topk_group"),
    (ds, dict(n_group=4, topk_group=0), "topk_group"),
    (ds, dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok"),  # 2 experts left
    (ds, dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
    (ds, dict(model_type="llama"), "model_type"),
    (gpt2, dict(model_type="GPT2"), "model_type"),
    (ds, dict(router_balance="sinkhorn"), "router_balance"),
    (ds, dict(rope_parameters={k: v for k, v in YARN.items() if k != "factor"}), "rope_parameters"),
    (ds, dict(rope_parameters={k: v for k, v in YARN.items() if k != "original_max_position_embeddings"}),
     "rope_parameters"),
    (ds, dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_parameters"),
    (ds, dict(rope_parameters={"rope_type": "default"}), "rope_parameters"),
    (ds, dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (ds, dict(first_k_dense_replace=-1), "first_k_dense_replace"),
    (ds, dict(hidden_size=-32), "hidden_size"),
    (gpt2, dict(hidden_size=0), "hidden_size"),
    (ds, dict(vocab_size=0), "vocab_size"),
    (ds, dict(num_hidden_layers=-1), "num_hidden_layers"),
    (ds, dict(intermediate_size=-1), "intermediate_size"),
    (ds, dict(max_position_embeddings=0), "max_position_embeddings"),
    (ds, dict(kv_lora_rank=-16), "kv_lora_rank"),
    (ds, dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
    (ds, dict(v_head_dim=-8), "v_head_dim"),
    (ds, dict(q_lora_rank=0), "q_lora_rank"),
    (ds, dict(moe_intermediate_size=-16), "moe_intermediate_size"),
    (ds, dict(n_shared_experts=-1), "n_shared_experts"),
    (ds, dict(n_routed_experts=1, n_group=1, topk_group=1, num_experts_per_tok=1), "n_routed_experts"),
    (ds, dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (ds, dict(hidden_size=32.0), "hidden_size"),
    (ds, dict(bos_token_id=64), "bos_token_id"),
    (ds, dict(bos_token_id=-1), "bos_token_id"),
    (gpt2, dict(eos_token_id=64), "eos_token_id"),
    (ds, dict(pad_token_id=100), "pad_token_id"),
    (ds, dict(num_key_value_heads=2), "num_key_value_heads"),
    (gpt2, dict(num_key_value_heads=1), "num_key_value_heads"),
    (ds, dict(hidden_act="relu6"), "hidden_act"),
    (gpt2, dict(attn_pdrop=1.0), "attn_pdrop"),
    (ds, dict(attention_dropout=-0.1), "attention_dropout"),
    (ds, dict(mup_base_width=0), "mup_base_width"),
]


@pytest.mark.parametrize("build,overrides,name", INVALID,
                         ids=[f"{b.__name__}-{n}-{i}" for i, (b, _, n) in enumerate(INVALID)])
def test_invalid_config_raises_naming_the_field(build, overrides, name):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{name}="):
        build(**overrides)


def test_valid_edge_configs_pass():
    ds(n_group=4, topk_group=1, num_experts_per_tok=2)  # exactly the experts of one kept group
    ds(n_group=1, topk_group=1, num_experts_per_tok=8)  # every expert
    ds(first_k_dense_replace=3, num_nextn_predict_layers=0)  # no MoE at all: MoE fields unchecked
    ds(first_k_dense_replace=3, num_nextn_predict_layers=0, n_group=3)
    ds(num_key_value_heads=4)
    ds(bos_token_id=None, eos_token_id=63, pad_token_id=None)
    ds(rope_parameters=dict(YARN))
    gpt2(hidden_size=36, num_attention_heads=6, kv_lora_rank=-1)  # GPT-2 ignores MLA fields


def test_replace_and_validate_recheck():
    cfg = ds()
    with pytest.raises(ValueError, match=r"ModelConfig\.n_group="):
        cfg.replace(n_group=3)
    cfg.topk_group = 7
    with pytest.raises(ValueError, match=r"ModelConfig\.topk_group="):
        cfg.validate()


# ---------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_config_and_a_meta_model(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.model_type in ("gpt2", "deepseek_v3")
    model = Model(cfg, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    # from_preset must not share the preset's mutable dicts
    cfg.rope_parameters["rope_theta"] = -1.0
    assert ModelConfig.from_preset(name).rope_parameters["rope_theta"] != -1.0


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_preset("gpt5")


def test_preset_overrides():
    cfg = ModelConfig.from_preset("dsv3-tiny", num_hidden_layers=2, vocab_size=100)
    assert (cfg.num_hidden_layers, cfg.vocab_size) == (2, 100)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once


def test_gpt2_124m_parameter_count():
    cfg = ModelConfig.from_preset("gpt2-124m")
    model = Model(cfg, device="meta")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert _n_params(model) == 124_439_808


def _dsv3_expected_count(c: ModelConfig) -> tuple[int, int]:
    """Independent count of DeepSeek-V3 parameters: (main model, MTP modules without shared emb/head)."""
    H, nh = c.hidden_size, c.num_attention_heads
    attn = (H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * c.qk_head_dim
            + H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim) + nh * c.v_head_dim * H)
    dense = 3 * H * c.intermediate_size
    moe = (c.n_routed_experts * H + c.n_routed_experts * 3 * H * c.moe_intermediate_size
           + 3 * H * c.moe_intermediate_size * c.n_shared_experts)
    norms = 2 * H
    L, k = c.num_hidden_layers, c.first_k_dense_replace
    main = (2 * c.vocab_size * H + k * (attn + dense + norms) + (L - k) * (attn + moe + norms) + H)
    mtp = c.num_nextn_predict_layers * (attn + moe + norms + 3 * H + 2 * H * H)
    return main, mtp


def test_dsv3_671b_on_meta_device():
    cfg = ModelConfig.from_preset("dsv3-671b")
    model = Model(cfg, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    main, mtp = _dsv3_expected_count(cfg)
    n_mtp = _n_params(model.mtp)
    assert _n_params(model) - n_mtp == main
    assert n_mtp == mtp
    assert 670e9 < main < 672e9  # "671B"
    assert model.num_moe_layers == 61 - 3 + 1


def test_small_presets_build_and_run():
    for name in ("gpt2-tiny", "dsv3-tiny"):
        cfg = ModelConfig.from_preset(name, num_hidden_layers=2, max_position_embeddings=16)
        torch.manual_seed(0)
        model = Model(cfg)
        logits = model(torch.randint(0, cfg.vocab_size, (1, 5)))
        assert logits.shape == (1, 5, cfg.vocab_size) and torch.isfinite(logits).all()
        if name == "dsv3-tiny":
            main, mtp = _dsv3_expected_count(cfg)
            assert _n_params(model) == main + mtp


# ---------------------------------------------------------------------- with_width
def test_with_width_deepseek_doubles_width_like_fields():
    cfg = ModelConfig.from_preset("dsv3-tiny")
    w = cfg.with_width(2 * cfg.hidden_size)
    assert w.hidden_size == 2 * cfg.hidden_size
    assert w.intermediate_size == 2 * cfg.intermediate_size
    assert w.moe_intermediate_size == 2 * cfg.moe_intermediate_size
    assert w.num_attention_heads == 2 * cfg.num_attention_heads
    assert w.q_lora_rank == 2 * cfg.q_lora_rank
    assert w.kv_lora_rank == 2 * cfg.kv_lora_rank
    for f in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
              "num_experts_per_tok", "n_group", "topk_group", "vocab_size", "num_hidden_layers",
              "first_k_dense_replace", "num_nextn_predict_layers", "max_position_embeddings",
              "rope_parameters", "mup_base_width", "num_key_value_heads"):
        assert getattr(w, f) == getattr(cfg, f), f
    w.validate()
    assert cfg.with_width(cfg.hidden_size) == cfg
    half = cfg.with_width(cfg.hidden_size // 2)
    assert (half.num_attention_heads, half.kv_lora_rank) == (2, 32)
    # num_key_value_heads, when set, follows the head count
    assert ds(num_key_value_heads=4).with_width(64).num_key_value_heads == 8
    assert ds(q_lora_rank=None).with_width(64).q_lora_rank is None


def test_with_width_gpt2():
    cfg = ModelConfig.from_preset("gpt2-tiny")
    w = cfg.with_width(256)
    assert (w.hidden_size, w.num_attention_heads, w.intermediate_size) == (256, 8, 1024)
    assert w.head_dim == cfg.head_dim
    assert (w.vocab_size, w.num_hidden_layers) == (cfg.vocab_size, cfg.num_hidden_layers)
    w.validate()
    # 32 -> 44: 4 heads become round(5.5) = 6, which does not divide 44
    with pytest.raises(ValueError, match=r"ModelConfig\.num_attention_heads="):
        gpt2(hidden_size=32, num_attention_heads=4).with_width(44)


# ---------------------------------------------------------------------- HF config.json
ROUND_TRIP = {
    "ds-default": lambda: ds(),
    "ds-yarn-noq": lambda: ds(q_lora_rank=None, rope_parameters=dict(YARN),
                              tie_word_embeddings=True, rope_interleave=False, attention_bias=True),
    "ds-nonmoe": lambda: ds(first_k_dense_replace=3, num_nextn_predict_layers=0,
                            mtp_loss_weight=0.0, router_balance="none", mup_base_width=16),
    "ds-extras": lambda: ds(norm_topk_prob=False, routed_scaling_factor=2.5,
                            router_balance="aux_loss", aux_loss_alpha=0.01, mtp_loss_weight=0.1,
                            num_nextn_predict_layers=2, bos_token_id=None, pad_token_id=None),
    "gpt2-tied": lambda: gpt2(),
    "gpt2-untied": lambda: gpt2(tie_word_embeddings=False, intermediate_size=96, hidden_act="gelu",
                                embd_pdrop=0.1, resid_pdrop=0.2, attn_pdrop=0.3, rms_norm_eps=1e-6,
                                mup_base_width=8, pad_token_id=5, initializer_range=0.01),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_hf_dict_round_trip(name, tmp_path):
    cfg = ROUND_TRIP[name]()
    d = cfg.to_hf_dict()
    json.dumps(d)  # serialisable
    assert ModelConfig.from_hf_dict(d) == cfg
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(d))) == cfg
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == cfg
    assert ModelConfig.load(tmp_path / "config.json") == cfg


def test_hf_dict_num_key_value_heads_is_normalised():
    # MLA has no GQA: an explicit num_key_value_heads == heads reads back as the equivalent None
    cfg = ds(num_key_value_heads=4)
    assert cfg.to_hf_dict()["num_key_value_heads"] == 4
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(num_key_value_heads=None)


def test_to_hf_dict_uses_hf_key_names():
    d = gpt2().to_hf_dict()
    assert d["model_type"] == "gpt2" and d["architectures"] == ["GPT2LMHeadModel"]
    assert (d["n_embd"], d["n_layer"], d["n_head"], d["n_positions"], d["n_inner"]) == (32, 2, 4, 64, 128)
    assert d["activation_function"] == "gelu_new" and d["layer_norm_epsilon"] == 1e-5
    assert "hidden_size" not in d and "q_lora_rank" not in d
    d = ds(rope_parameters=dict(YARN)).to_hf_dict()
    assert d["architectures"] == ["DeepseekV3ForCausalLM"] and d["model_type"] == "deepseek_v3"
    assert d["rope_parameters"] == YARN and d["num_key_value_heads"] == 4
    assert d["num_nextn_predict_layers"] == 1
    assert set(d["nanoseek"]) == {"mtp_loss_weight", "aux_loss_alpha", "router_balance", "mup_base_width",
                                  "embedding_multiplier", "readout_multiplier", "attention_multiplier",
                                  "embedding_lr_multiplier", "zero_init_query", "zero_init_readout"}
    assert "router_balance" not in d and "embd_pdrop" not in d


def test_reads_transformers_deepseek_v3_config():
    from transformers.models.deepseek_v3 import DeepseekV3Config

    hf = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                          n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16,
                          q_lora_rank=None,
                          qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_group=4, topk_group=2,
                          num_experts_per_tok=3, first_k_dense_replace=2, norm_topk_prob=False,
                          max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          rope_parameters=dict(YARN), rope_interleave=True, num_mtp_layers=1,
                          bos_token_id=0, eos_token_id=1, pad_token_id=None)
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    expect = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48,
                  moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4, n_shared_experts=2,
                  n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=None,
                  qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_group=4, topk_group=2,
                  num_experts_per_tok=3, first_k_dense_replace=2, norm_topk_prob=False,
                  max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  rope_interleave=True, num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
                  pad_token_id=None, hidden_act="silu")
    for k, v in expect.items():
        assert getattr(cfg, k) == v, k
    assert cfg.rope_parameters["rope_type"] == "yarn"
    for k in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim", "rope_theta"):
        assert cfg.rope_parameters[k] == YARN[k], k
    Model(cfg, device="meta")


def test_reads_transformers_defaults_that_do_not_fit():
    """transformers writes num_key_value_heads=128 and bos/eos 50256 by default, whatever the model's size."""
    from transformers import GPT2Config
    from transformers.models.deepseek_v3 import DeepseekV3Config

    hf = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                          num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24,
                          qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_routed_experts=8, n_group=4,
                          topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1)
    assert hf.to_dict()["num_key_value_heads"] == 128
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.num_key_value_heads in (None, 4) and cfg.num_attention_heads == 4
    cfg = ModelConfig.from_hf_dict(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4).to_dict())
    assert cfg.vocab_size == 64
    for tok in (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id):
        assert tok is None or 0 <= tok < 64


def test_reads_legacy_rope_scaling_keys():
    d = ds().to_hf_dict()
    del d["rope_parameters"]
    d["rope_theta"] = 50000.0
    d["rope_scaling"] = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                         "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    del d["num_nextn_predict_layers"]
    d["num_mtp_layers"] = 2
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.rope_parameters["rope_type"] == "yarn" and "type" not in cfg.rope_parameters
    assert cfg.rope_parameters["rope_theta"] == 50000.0 and cfg.rope_parameters["factor"] == 40.0
    assert cfg.num_nextn_predict_layers == 2
    d.pop("rope_scaling")
    d.pop("rope_theta")
    assert ModelConfig.from_hf_dict(d).rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}


def test_reads_transformers_gpt2_config():
    from transformers import GPT2Config

    hf = GPT2Config(vocab_size=64, n_positions=48, n_embd=32, n_layer=3, n_head=4, n_inner=None,
                    activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02,
                    bos_token_id=10, eos_token_id=11, resid_pdrop=0.1, embd_pdrop=0.2, attn_pdrop=0.3)
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.model_type == "gpt2"
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, cfg.num_hidden_layers,
            cfg.num_attention_heads) == (64, 48, 32, 3, 4)
    assert cfg.intermediate_size == 128  # n_inner None -> 4 * n_embd
    assert cfg.hidden_act == "gelu_new" and cfg.rms_norm_eps == 1e-5 and cfg.initializer_range == 0.02
    assert cfg.tie_word_embeddings is True
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (10, 11, None)
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.1, 0.2, 0.3)
    # minimal dict (keys absent): GPT-2 defaults
    cfg = ModelConfig.from_hf_dict({"model_type": "gpt2", "vocab_size": 100, "n_embd": 64, "n_layer": 1,
                                    "n_head": 2})
    assert (cfg.intermediate_size, cfg.hidden_act, cfg.rms_norm_eps, cfg.max_position_embeddings) == \
        (256, "gelu_new", 1e-5, 1024)
    assert cfg.tie_word_embeddings is True and cfg.pad_token_id is None


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        ModelConfig.load(tmp_path)  # a directory without config.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.load(bad)
    other = tmp_path / "llama.json"
    other.write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        ModelConfig.load(other)
    missing = tmp_path / "none.json"
    missing.write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type=None"):
        ModelConfig.load(missing)
    invalid = tmp_path / "invalid.json"
    d = ds().to_hf_dict()
    d["n_group"] = 3
    invalid.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"ModelConfig\.n_group="):
        ModelConfig.load(invalid)
