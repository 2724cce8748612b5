"""muP: factors agree with Microsoft's `mup`, groups cover every parameter once, export matches transformers,
and the coordinate check is flat under muP while it grows under the standard parametrization."""

import pytest
import torch

from nanoseek import Model, ModelConfig, mup
from nanoseek.mup import fan_in_multipliers, output_multiplier, param_groups


def gpt2(width=64, base=32, **kw):
    return ModelConfig.from_preset("gpt2-tiny", vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=128, max_position_embeddings=64,
                                   **kw).with_width(width).replace(mup_base_width=base)


def dsv3(width=64, base=32, **kw):
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, moe_intermediate_size=16, n_routed_experts=4, n_group=2, topk_group=1,
                      num_nextn_predict_layers=1, **kw)
    return cfg.with_width(width).replace(mup_base_width=base)


@pytest.mark.parametrize("make", [gpt2, dsv3])
def test_groups_cover_every_parameter_once(make):
    model = Model(make())
    groups = param_groups(model, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    by_scale = {g["lr_scale"] for g in groups}
    assert by_scale == {1.0, 0.5}


def test_sp_has_unit_factors():
    model = Model(gpt2().replace(mup_base_width=None))
    assert set(fan_in_multipliers(model).values()) == {1.0}
    assert output_multiplier(model.config) == 1.0


def test_init_std_scales_with_fan_in():
    torch.manual_seed(0)
    wide = Model(dsv3(width=256))
    std = wide.config.initializer_range
    w = wide.model.layers[1].self_attn.o_proj.weight  # fan_in grows 8x from the base
    assert abs(w.std().item() - std / 8 ** 0.5) < 0.1 * std / 8 ** 0.5
    emb = wide.model.embed_tokens.weight  # fixed fan_in: unchanged
    assert abs(emb.std().item() - std) < 0.1 * std
    gate = wide.model.layers[1].mlp.gate.weight  # explicit rule: hidden-like
    assert abs(gate.std().item() - std / 8 ** 0.5) < 0.2 * std / 8 ** 0.5


@pytest.mark.parametrize("make", [gpt2, dsv3])
def test_export_matches_transformers_and_round_trips(make, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = Model(make(width=128)).eval()
    assert output_multiplier(model.config) == 0.25
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    back = Model.from_pretrained(tmp_path)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k  # 1/m = 0.25: folding is exact
    if model.config.tie_word_embeddings:
        assert back.lm_head.weight is back.transformer.wte.weight


def test_agrees_with_microsoft_mup_on_gpt2():
    mup = pytest.importorskip("mup")
    target, base = Model(gpt2(width=128), device="meta"), Model(gpt2(width=32), device="meta")
    mup.set_base_shapes(target, base, rescale_params=False, do_assert=False)
    ours = fan_in_multipliers(target)
    opt = mup.MuAdamW([{"params": [p], "name": n} for n, p in target.named_parameters()], lr=1.0,
                      weight_decay=0.1)
    theirs_lr = {g["name"]: g["lr"] for g in opt.param_groups if g["params"]}
    theirs_wd = {g["name"]: g["weight_decay"] for g in opt.param_groups if g["params"]}
    for name, p in target.named_parameters():
        if name == "lm_head.weight":
            continue  # tied: the embedding's rules apply (MuSharedReadout)
        m_in = ours[name]
        assert theirs_lr[name] == pytest.approx(1.0 / m_in), name
        assert theirs_wd[name] == pytest.approx(0.1 * m_in), name
        # mup.init: (inf, inf) tensors get std * width_mult^-0.5; others keep their std
        init_scale = p.infshape.width_mult() ** -0.5 if p.infshape.ninf() == 2 else 1.0
        assert init_scale == pytest.approx(m_in ** -0.5), name
    # MuSharedReadout multiplies the readout input by output_mult / width_mult
    assert output_multiplier(target.config) == pytest.approx(1 / target.transformer.wte.weight.infshape.width_mult())


def _coord_scales(make, widths, steps=4, lr=1e-2, seed=0):
    """mean |activation| of the last block's output after a few Adam steps, per width."""
    out = []
    for w in widths:
        torch.manual_seed(seed)
        model = Model(make(width=w))
        opt = torch.optim.AdamW([{**g, "lr": lr * g["lr_scale"]} for g in param_groups(model, 0.0)])
        x = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(seed))
        for _ in range(steps):
            loss = model(x, targets=torch.roll(x, -1, 1)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        seen = {}
        block = model.transformer.h[-1] if model.config.model_type == "gpt2" else model.model.layers[-1]

        def grab(module, inputs, output, seen=seen):
            seen["h"] = output[0] if isinstance(output, tuple) else output

        hook = block.register_forward_hook(grab)
        with torch.no_grad():
            logits = model(x)
        hook.remove()
        out.append((seen["h"].abs().mean().item(), logits.abs().mean().item()))
    return out


@pytest.mark.parametrize("make", [gpt2, dsv3])
def test_coordinate_check_flat_under_mup_grows_under_sp(make):
    widths = [32, 64, 128, 256]
    mup_scales = _coord_scales(make, widths)
    sp_scales = _coord_scales(lambda width: make(width=width).replace(mup_base_width=None), widths)
    mup_growth = mup_scales[-1][1] / mup_scales[0][1]  # logits: where SP blows up first
    sp_growth = sp_scales[-1][1] / sp_scales[0][1]
    assert mup_growth < 2.0, mup_scales
    assert sp_growth > 2 * mup_growth, (sp_scales, mup_scales)


def test_coord_check_command_writes_plot_and_json(tmp_path, capsys):
    import json

    from nanoseek.cli import main

    rc = main(["coord-check", "--preset", "gpt2-tiny", "--widths", "32,64,128", "--steps", "2", "--data", "random",
               "--batch-size", "4", "--seq-len", "16", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["coord_check_growth"]
    assert set(summary) == {"sp", "mup"} and summary["sp"]["block"] > summary["mup"]["block"]
    data = json.loads((tmp_path / "coord_check.json").read_text())
    assert len(data["records"]) == 2 * 3 * 2
    assert (tmp_path / "coord_check.png").stat().st_size > 10_000


@pytest.mark.parametrize("make", [gpt2, dsv3])
@pytest.mark.parametrize("mup_on", [False, True])
def test_embedding_multiplier_folds_on_export(make, mup_on, tmp_path):
    """alpha_emb scales the input embeddings; the file holds folded weights that transformers reads as-is."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = make(width=64).replace(embedding_multiplier=4.0, mup_base_width=32 if mup_on else None)
    model = Model(cfg).eval()
    x = torch.randint(0, 128, (2, 11))
    plain = Model(cfg.replace(embedding_multiplier=1.0)).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(model(x), plain(x))  # the multiplier does act
    _assert_export_round_trip(model, x, tmp_path, transformers, atol=0.0)


@pytest.mark.parametrize("make", [gpt2, dsv3])
def test_readout_and_attention_multipliers_fold_on_export(make, tmp_path):
    """alpha_out and alpha_attn act in nanoseek and are folded into lm_head / the queries for transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = make(width=64).replace(readout_multiplier=2.0, attention_multiplier=0.5, initializer_range=0.2)
    model = Model(cfg).eval()
    assert output_multiplier(cfg) == pytest.approx(1.0)  # alpha_out / m = 2 / 2
    x = torch.randint(0, 128, (2, 11))
    for knob in ("readout_multiplier", "attention_multiplier"):
        plain = Model(cfg.replace(**{knob: 1.0})).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (model(x) - plain(x)).abs().max() > 1e-3, knob  # the multiplier does act
    _assert_export_round_trip(model, x, tmp_path, transformers, atol=1e-7)


@pytest.mark.parametrize("make", [gpt2, dsv3])
def test_zero_init_query_and_readout(make):
    tied = make().tie_word_embeddings
    cfg = make().replace(zero_init_query=True, zero_init_readout=not tied)
    model = Model(cfg)
    q = mup.query_weights(model)
    assert q and all(w.abs().sum() == 0 for w in q)
    if model.config.model_type == "gpt2":  # keys and values keep their init
        assert model.transformer.h[0].attn.c_attn.weight[cfg.hidden_size:].abs().sum() > 0
    else:
        assert model.model.layers[0].self_attn.kv_b_proj.weight.abs().sum() > 0
        assert model.lm_head.weight.abs().sum() == 0
    if tied:
        with pytest.raises(ValueError, match="zero_init_readout"):
            make().replace(zero_init_readout=True)


def test_embedding_lr_multiplier_has_its_own_group():
    model = Model(gpt2(width=128).replace(embedding_lr_multiplier=0.25))
    groups = param_groups(model, weight_decay=0.1)
    emb = [g for g in groups if g["name"].endswith("/embedding")]
    assert {id(p) for g in emb for p in g["params"]} == {id(model.transformer.wte.weight),
                                                            id(model.transformer.wpe.weight)}
    assert all(g["lr_scale"] == 0.25 for g in emb)
    hidden = model.transformer.h[0].attn.c_attn.weight  # m_in = 4: lr / 4, independent of eta_emb
    assert [g["lr_scale"] for g in groups if any(p is hidden for p in g["params"])] == [0.25]


def _assert_export_round_trip(model, x, tmp_path, transformers, atol: float) -> None:
    """Exported logits equal transformers' (<= 1e-4) and the reloaded nanoseek model has the same config and
    state (bit-equal when atol is 0: the folds are exact inverses)."""
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (model(x) - hf(x).logits).abs().max().item() <= 1e-4
    back = Model.from_pretrained(tmp_path)
    assert back.config == model.config
    for k, v in model.state_dict().items():
        w = back.state_dict()[k]
        assert (torch.equal(v, w) if atol == 0 else torch.allclose(v, w, atol=atol)), k
