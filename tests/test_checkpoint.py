"""Checkpoint directories: bit-exact round trips, sharding, atomic writes, and clear errors on bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import Model, ModelConfig
from nanoseek.checkpoint import INDEX, WEIGHTS, atomic_directory, save_pretrained


def tiny(model_type="deepseek_v3", **kw):
    if model_type == "gpt2":
        return ModelConfig.from_preset("gpt2-tiny", vocab_size=64, hidden_size=32, num_hidden_layers=2, **kw)
    return ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
                       qk_rope_head_dim=4, v_head_dim=8, moe_intermediate_size=16, n_routed_experts=4,
                       n_group=2, topk_group=1, num_nextn_predict_layers=1, **kw)


def trained_like(cfg, seed=0):
    torch.manual_seed(seed)
    m = Model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return m


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt2"])
def test_round_trip_is_bit_exact(model_type, tmp_path):
    m = trained_like(tiny(model_type))
    m.save_pretrained(tmp_path / "ck")
    back = Model.from_pretrained(tmp_path / "ck")
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert back.config == m.config
    if model_type == "deepseek_v3":
        assert any(k.startswith("mtp.0.") for k in b)
    x = torch.randint(0, 64, (2, 9))
    assert torch.equal(m.eval()(x), back.eval()(x))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "generation_config.json", WEIGHTS]


def test_tied_weights_stay_tied_after_load(tmp_path):
    m = trained_like(tiny("gpt2"))
    m.save_pretrained(tmp_path)
    back = Model.from_pretrained(tmp_path)
    assert back.lm_head.weight is back.transformer.wte.weight


def test_sharded_round_trip(tmp_path):
    m = trained_like(tiny())
    m.save_pretrained(tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (tmp_path / WEIGHTS).exists()
    back = Model.from_pretrained(tmp_path)
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_bf16_save_keeps_routing_bias_fp32(tmp_path):
    m = trained_like(tiny())
    m.save_pretrained(tmp_path, dtype=torch.bfloat16)
    sd = load_file(str(tmp_path / WEIGHTS))
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert sd["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    back = Model.from_pretrained(tmp_path)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert all(moe.gate.e_score_correction_bias.dtype == torch.float32 for moe in back.moe_layers())
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_load_with_dtype_and_device(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    m = Model.from_pretrained(tmp_path, dtype=torch.float64, device="cpu")
    assert m.lm_head.weight.dtype == torch.float64
    assert all(moe.gate.e_score_correction_bias.dtype == torch.float32 for moe in m.moe_layers())


# ------------------------------------------------------------------------------------------ bad input
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Model.from_pretrained(tmp_path / "nope")


def test_missing_weights_file(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Model.from_pretrained(tmp_path)


def test_missing_config(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        Model.from_pretrained(tmp_path)


def test_pickle_file_is_refused(tmp_path):
    m = trained_like(tiny())
    m.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only loads safetensors"):
        Model.from_pretrained(tmp_path)


def test_pickle_bytes_named_safetensors_are_refused(tmp_path):
    m = trained_like(tiny())
    m.save_pretrained(tmp_path)
    torch.save(m.state_dict(), tmp_path / WEIGHTS)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        Model.from_pretrained(tmp_path)


def test_wrong_shapes(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["kv_lora_rank"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"self_attn\.kv_a_\w+\.weight has shape .* config.json implies"):
        Model.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / WEIGHTS))
    del sd["model.layers.0.self_attn.o_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.self_attn.o_proj.weight'\].*unexpected"):
        Model.from_pretrained(tmp_path)


def test_missing_expert(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / WEIGHTS))
    del sd["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(sd, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match="experts 0..3"):
        Model.from_pretrained(tmp_path)


def test_nan_weights_are_refused(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / WEIGHTS))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(tmp_path / WEIGHTS))
    with pytest.raises(ValueError, match="model.norm.weight contains NaN"):
        Model.from_pretrained(tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path, max_shard_bytes=20_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        Model.from_pretrained(tmp_path)


def test_bad_config_json(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Model.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not supported"):
        Model.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ atomicity
def test_crash_during_write_keeps_the_old_checkpoint(tmp_path):
    old = trained_like(tiny(), seed=0)
    old.save_pretrained(tmp_path / "ck")
    new = trained_like(tiny(), seed=1)

    def crash(_tmp):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="mid-write"):
        save_pretrained(new, tmp_path / "ck", extra=crash)
    back = Model.from_pretrained(tmp_path / "ck")
    assert torch.equal(back.lm_head.weight, old.lm_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary directory left behind


def test_overwrite_replaces_whole_checkpoint(tmp_path):
    trained_like(tiny()).save_pretrained(tmp_path / "ck", max_shard_bytes=20_000)
    m = trained_like(tiny(), seed=3)
    m.save_pretrained(tmp_path / "ck")
    assert not list((tmp_path / "ck").glob("model-*")) and not (tmp_path / "ck" / INDEX).exists()
    assert torch.equal(Model.from_pretrained(tmp_path / "ck").lm_head.weight, m.lm_head.weight)


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="thesis.tex"):
        trained_like(tiny()).save_pretrained(tmp_path)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_atomic_directory_extra_files(tmp_path):
    atomic_directory(tmp_path / "d", lambda p: (p / "trainer_state").mkdir())
    assert (tmp_path / "d" / "trainer_state").is_dir()
