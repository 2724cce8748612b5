"""`nanoseek info` figures: the published DeepSeek-V3 and GPT-2 counts, and the CLI around them."""

import json
import subprocess
import sys

import pytest

from nanoseek import Model, ModelConfig
from nanoseek.accounting import model_stats
from nanoseek.cli import main


def test_deepseek_v3_671b_matches_the_report():
    s = model_stats(ModelConfig.from_preset("dsv3-671b"))
    assert abs(s["params_total"] - 671e9) / 671e9 < 0.01
    assert abs(s["params_active"] - 37e9) / 37e9 < 0.02
    assert 11e9 < s["params_mtp"] < 14e9  # 14B published includes the MTP copies of embedding and head
    assert s["kv_cache_bytes_per_token"] == 70_272  # (512 + 64) * 61 layers * 2 bytes
    assert s["kv_cache_bytes_per_token_mha"] == 128 * (192 + 128) * 61 * 2


def test_gpt2_124m_matches_nanogpt_convention():
    cfg = ModelConfig.from_preset("gpt2-124m")
    s = model_stats(cfg, seq_len=1024)
    assert s["params_total"] == s["params_active"] == 124_439_808
    n = s["params_total"] - 1024 * 768  # position embeddings are a lookup, not a matmul
    assert s["flops_per_token"] == 6 * n + 12 * 12 * 12 * 64 * 1024
    assert s["kv_cache_bytes_per_token"] == 2 * 768 * 12 * 2


def test_counts_agree_with_a_built_model():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=48, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=8, moe_intermediate_size=16, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                      num_nextn_predict_layers=1)
    m = Model(cfg)
    s = model_stats(cfg, seq_len=16)
    main_params = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("mtp."))
    assert s["params_total"] == main_params
    assert s["params_mtp"] == sum(p.numel() for p in m.mtp.parameters())
    per_expert = 3 * 32 * 16
    assert s["params_active"] == main_params - 2 * (8 - 2) * per_expert  # two MoE layers in the main model
    assert s["params_mtp_active"] == s["params_mtp"] - (8 - 2) * per_expert
    # FLOPs: 6 x active matmul params (embedding lookup excluded) + 6 * H * T * (dqk + dv) per layer
    attn = 6 * 4 * 16 * (12 + 8)
    assert s["flops_per_token_main"] == 6 * (s["params_active"] - 64 * 32) + 3 * attn
    assert s["flops_per_token"] == s["flops_per_token_main"] + 6 * (s["params_mtp_active"] + 64 * 32) + attn


def test_info_cli_json(capsys):
    assert main(["info", "--preset", "dsv3-tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "flops_per_token", "kv_cache_bytes_per_token",
                "kv_cache_bytes_per_token_mha"):
        assert isinstance(out[key], int) and out[key] > 0
    assert out["params_active"] < out["params_total"]


def test_info_cli_checkpoint_and_errors(tmp_path, capsys):
    Model(ModelConfig.from_preset("gpt2-tiny")).save_pretrained(tmp_path)
    assert main(["info", "--checkpoint", str(tmp_path)]) == 0
    assert "params_total" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info"])
    assert main(["info", "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "nanoseek", "info", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--preset" in r.stdout
