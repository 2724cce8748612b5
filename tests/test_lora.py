"""LoRA: config, adapters on both architectures, per-row mixing, merge, gradients, experts, absorbed MLA, PEFT I/O."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanoseek import LoraConfig, Model, ModelConfig
from nanoseek.lora import expert_delta
from nanoseek.model.moe import Experts

TOL = 1e-4
DSV3_ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def dsv3_config(**kw) -> ModelConfig:
    base = dict(model_type="deepseek_v3", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, intermediate_size=48, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, moe_intermediate_size=16, n_routed_experts=8, q_lora_rank=16,
                n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, num_nextn_predict_layers=1)
    return ModelConfig(**{**base, **kw})


def gpt2_config(**kw) -> ModelConfig:
    base = dict(model_type="gpt2", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, intermediate_size=128, hidden_act="gelu_new", rms_norm_eps=1e-5,
                initializer_range=0.02, tie_word_embeddings=True)
    return ModelConfig(**{**base, **kw})


CONFIGS = {"deepseek_v3": dsv3_config, "gpt2": gpt2_config}


def perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def make(arch: str, seed: int = 0, **kw) -> Model:
    torch.manual_seed(seed)
    m = Model(CONFIGS[arch](**kw)).eval()
    perturb(m, seed + 1)
    return m


def tokens(vocab: int, B: int = 3, T: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def rand_cfg(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kw})


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw", [dict(r=0), dict(r=2.5), dict(r=True), dict(lora_alpha=0), dict(lora_alpha=float("nan")),
                                dict(lora_dropout=1.0), dict(target_modules=[]), dict(target_modules="q_proj"),
                                dict(target_modules=[""]), dict(init_lora_weights="pissa"), dict(use_rslora=1),
                                dict(rank_pattern={"o_proj": 0})])
def test_config_rejects(kw):
    with pytest.raises(ValueError, match="LoraConfig"):
        LoraConfig(**kw)


def test_scale_and_rslora():
    assert LoraConfig(r=8, lora_alpha=16).scale == 2.0
    assert LoraConfig(r=16, lora_alpha=16, use_rslora=True).scale == 4.0
    c = LoraConfig(r=4, lora_alpha=8, rank_pattern={r".*\.o_proj": 8}, alpha_pattern={"o_proj": 32})
    assert c.rank_for("model.layers.0.self_attn.o_proj") == 8 and c.rank_for("x.q_a_proj") == 4
    assert c.scale_for("model.layers.0.self_attn.o_proj") == 4.0
    m = make("deepseek_v3")
    m.add_adapter("rs", LoraConfig(r=16, lora_alpha=8, use_rslora=True, target_modules=["o_proj"]))
    assert m.model.layers[0].self_attn.o_proj.lora_scale["rs"] == 8 / math.sqrt(16)


def test_default_init_matches_peft():
    """A kaiming-uniform(a=sqrt(5)) like nn.Linear (bound 1/sqrt(in)), B zero; gaussian: A ~ N(0, 1/r)."""
    m = make("deepseek_v3")
    m.add_adapter("d", LoraConfig(r=64, target_modules=["q_a_proj"]))
    m.add_adapter("g", LoraConfig(r=64, target_modules=["q_a_proj"], init_lora_weights="gaussian"))
    lin = m.model.layers[0].self_attn.q_a_proj
    A = lin.lora_A["d"].weight
    assert A.abs().max() <= 1 / math.sqrt(lin.in_features) and A.std() > 0.5 / math.sqrt(3 * lin.in_features)
    assert torch.equal(lin.lora_B["d"].weight, torch.zeros_like(lin.lora_B["d"].weight))
    assert abs(lin.lora_A["g"].weight.std().item() - 1 / 64) < 0.3 / 64


# ---------------------------------------------------------------------------------------------- add / delete
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_zero_b_is_base_exactly_and_state_dict_unchanged(arch, tmp_path):
    m = make(arch)
    x = tokens(m.config.vocab_size)
    keys = list(m.state_dict())
    with torch.no_grad():
        base = m(x)
        m.add_adapter("z", LoraConfig(r=4, target_modules="all-linear"))
        m.add_adapter("z2", LoraConfig(r=4, target_modules=["lm_head"]))
        assert torch.equal(m(x, adapter="z"), base)
        assert torch.equal(m(x, adapter="z2"), base)
        assert torch.equal(m(x, adapter=torch.tensor([0, -1, 1])), base)
        cache = m.make_cache(3, 16)
        dec = torch.cat([m(x[:, :6], cache=cache, adapter="z")] +
                        [m(x[:, t:t + 1], cache=cache, adapter="z") for t in range(6, 11)], 1)
        assert maxdiff(dec, base) < TOL
    assert list(m.state_dict()) == keys  # adapters never enter the base state dict / checkpoint
    m.save_pretrained(tmp_path / "base")
    assert torch.equal(Model.from_pretrained(tmp_path / "base").eval()(x), base)


def test_add_delete_and_errors():
    m = make("deepseek_v3")
    n_params = len(list(m.parameters()))
    m.add_adapter("a", rand_cfg(target_modules=["o_proj", "experts"]))
    m.add_adapter("b", rand_cfg(r=2, target_modules=["kv_b_proj"]))
    assert m.adapters == ["a", "b"]
    names = [n for n, _ in m.named_parameters() if ".lora_" in n]
    assert "model.layers.0.self_attn.o_proj.lora_A.a.weight" in names
    assert "model.layers.1.mlp.experts.lora_B.a.down_proj" in names
    assert "mtp.0.self_attn.o_proj.lora_B.a.weight" in names  # MTP's block is targeted too
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("a", rand_cfg())
    with pytest.raises(ValueError, match="matches nothing"):
        m.add_adapter("c", rand_cfg(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="not a linear layer"):
        m.add_adapter("c", rand_cfg(target_modules=["q_a_layernorm"]))
    with pytest.raises(ValueError, match="unknown adapter"):
        m(tokens(96), adapter="nope")
    with pytest.raises(ValueError, match="indices must be in"):
        m(tokens(96), adapter=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="rows"):
        m(tokens(96), adapter=torch.tensor([0, 1]))
    assert m.adapters == ["a", "b"]
    m.delete_adapter("a")
    m.delete_adapter("b")
    assert m.adapters == [] and len(list(m.parameters())) == n_params
    with pytest.raises(ValueError, match="unknown adapter"):
        m.delete_adapter("a")


def test_target_names():
    """Plain gate/up/down_proj name dense MLPs and shared experts; routed experts need an explicit 'experts' name."""
    m = make("deepseek_v3")
    m.add_adapter("mlp", rand_cfg(target_modules=["gate_proj", "up_proj", "down_proj"]))
    m.add_adapter("ex", rand_cfg(target_modules=["experts.down_proj"]))
    m.add_adapter("all", rand_cfg(target_modules="all-linear"))
    experts = m.model.layers[1].mlp.experts
    assert "mlp" not in experts.lora_A and list(experts.lora_A["ex"]) == ["down_proj"]
    assert "mlp" in m.model.layers[1].mlp.shared_experts.gate_proj.lora_A
    assert set(experts.lora_A["all"]) == {"gate_up_proj", "down_proj"} and "all" not in m.lm_head.lora_A
    assert "all" in m.mtp[0].eh_proj.lora_A


# ---------------------------------------------------------------------------------------------- merge / grads
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_merge_equals_unmerged_and_unmerge_restores(arch):
    m = make(arch)
    x = tokens(m.config.vocab_size)
    m.add_adapter("a", rand_cfg(target_modules="all-linear"))
    m.add_adapter("b", rand_cfg())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        want, base = m(x, adapter="a"), m(x)
        assert maxdiff(want, base) > 1e-2
        m.merge_adapter("a")
        assert maxdiff(m(x), want) < TOL
        assert maxdiff(m(x, adapter="a"), want) < TOL  # not applied twice
        with pytest.raises(ValueError, match="merged"):
            m(x, adapter="b")
        with pytest.raises(ValueError, match="already merged"):
            m.merge_adapter("b")
        m.unmerge_adapter("a")
        assert maxdiff(m(x), base) < TOL
    for k, v in m.state_dict().items():
        assert torch.allclose(v, before[k], atol=1e-6), k


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_merge_and_unload_makes_a_new_base(arch):
    m = make(arch)
    x = tokens(m.config.vocab_size)
    m.add_adapter("a", rand_cfg(target_modules="all-linear"))
    m.add_adapter("b", rand_cfg())
    with torch.no_grad():
        want = m(x, adapter="a")
        m.merge_and_unload("a")
        assert maxdiff(m(x), want) < TOL
        assert "a" not in m.lora_context.configs and not any(".a." in k or k.endswith(".a") for k in m.state_dict())
        with pytest.raises(ValueError, match="unknown adapter"):
            m(x, adapter="a")
        assert maxdiff(m(x, adapter="b"), m(x)) > 1e-3  # the other adapter still runs, on the new weights


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_only_adapter_gets_gradients(arch):
    m = make(arch).train()
    m.add_adapter("a", LoraConfig(r=4, target_modules="all-linear"))  # default init: B = 0
    m.add_adapter("b", rand_cfg())
    trainable = m.trainable_adapter("a")
    x = tokens(m.config.vocab_size)
    m(x, targets=x, adapter="a").loss.backward()
    for n, p in m.named_parameters():
        if ".lora_A.a." in n or ".lora_B.a." in n:
            assert p.grad is not None and p.requires_grad, n
            if ".lora_B." in n:
                assert p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None and not p.requires_grad, n
    assert {id(p) for p in trainable} == {id(p) for n, p in m.named_parameters() if ".lora_A.a." in n or
                                           ".lora_B.a." in n}
    m.trainable_adapter(None)
    assert all(p.requires_grad == (".lora_" not in n) for n, p in m.named_parameters())


def test_dropout_only_in_training():
    m = make("gpt2")
    m.add_adapter("d", rand_cfg(lora_dropout=0.5))
    x = tokens(96)
    with torch.no_grad():
        assert torch.equal(m(x, adapter="d"), m(x, adapter="d"))
        m.train()
        assert maxdiff(m(x, adapter="d"), m(x, adapter="d")) > 0


# ---------------------------------------------------------------------------------------------- experts
def test_expert_grouped_path_equals_per_expert_loop():
    """x_sorted A_e^T B_e^T through grouped_mm == a loop over experts with W_e + gamma B_e A_e; forward and grads."""
    torch.manual_seed(0)
    cfg = dsv3_config()
    m = make("deepseek_v3")
    m.add_adapter("a", rand_cfg(r=3, target_modules=["experts"]))  # r=3: the padded fallback path
    m.add_adapter("b", rand_cfg(r=4, target_modules=["experts"]))  # r=4: torch._grouped_mm where available
    experts: Experts = m.model.layers[1].mlp.experts
    N, K, E = 10, cfg.num_experts_per_tok, cfg.n_routed_experts
    x = torch.randn(N, cfg.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.rand(N, K)
    for name in ("a", "b"):
        params = [experts.lora_A[name]["gate_up_proj"], experts.lora_B[name]["down_proj"]]
        for p in params:
            p.requires_grad_(True)
        with m.lora_context.use(name):
            y = experts(x, idx, w)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *params], g)
        s = experts.lora_scale[name]
        ref = torch.zeros_like(y)
        for e in range(E):
            wgu = experts.gate_up_proj[e] + s["gate_up_proj"] * experts.lora_B[name]["gate_up_proj"][e] @ \
                experts.lora_A[name]["gate_up_proj"][e]
            wd = experts.down_proj[e] + s["down_proj"] * experts.lora_B[name]["down_proj"][e] @ \
                experts.lora_A[name]["down_proj"][e]
            for k in range(K):
                rows = idx[:, k] == e
                gate, up = (x[rows] @ wgu.T).chunk(2, dim=-1)
                ref[rows] += w[rows, k, None] * ((torch.nn.functional.silu(gate) * up) @ wd.T)
        want = torch.autograd.grad(ref, [x, *params], g)
        assert maxdiff(y, ref) < 1e-5
        for a, b in zip(got, want):
            assert maxdiff(a, b) < 1e-5
        for p in params:
            p.requires_grad_(False)


def test_expert_delta_none_without_adapter():
    m = make("deepseek_v3")
    experts = m.model.layers[1].mlp.experts
    assert experts.lora_ctx is None  # never touched: the plain path
    m.add_adapter("a", rand_cfg(target_modules=["o_proj"]))
    assert expert_delta(experts, "down_proj", None, None, None, None, 1) is None


# ---------------------------------------------------------------------------------------------- per-row
def _alone(m, x, names, rows, **kw):
    out = []
    for b, r in enumerate(rows.tolist()):
        out.append(m(x[b:b + 1], adapter=None if r < 0 else names[r], **kw))
    return torch.cat(out)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_mixed_batch_equals_rows_alone(arch):
    m = make(arch)
    m.add_adapter("a", rand_cfg(r=4, target_modules="all-linear"))
    m.add_adapter("b", rand_cfg(r=2, target_modules=["o_proj", "kv_b_proj", "experts", "lm_head"]
                                if arch == "deepseek_v3" else ["c_attn", "lm_head"]))
    m.add_adapter("c", rand_cfg(r=7, lora_alpha=3, use_rslora=True, target_modules="all-linear"))
    x = tokens(m.config.vocab_size, B=5)
    rows = torch.tensor([0, 1, -1, 2, 0])
    with torch.no_grad():
        mixed = m(x, adapter=rows)
        assert maxdiff(mixed, _alone(m, x, m.adapters, rows)) < TOL
        names = ["c", "a"]  # explicit slot list
        rows2 = torch.tensor([1, 0, 0, -1, 1])
        assert maxdiff(m(x, adapter=rows2, adapter_names=names), _alone(m, x, names, rows2)) < TOL


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_mixed_batch_cached_decoding(arch):
    """Prefill + one-token steps through the KV cache (absorbed MLA) == full forward of each row alone."""
    m = make(arch)
    m.add_adapter("a", rand_cfg(r=4, target_modules="all-linear"))
    m.add_adapter("b", rand_cfg(r=2, target_modules=["kv_b_proj", "experts"] if arch == "deepseek_v3"
                                else ["c_attn"]))
    x = tokens(m.config.vocab_size, B=4, T=10)
    rows = torch.tensor([1, -1, 0, 1])
    with torch.no_grad():
        want = _alone(m, x, m.adapters, rows)
        for absorb in (True, False):
            assert maxdiff(cached_decode(m, x, rows, prefill=4, absorb=absorb), want) < TOL


def cached_decode(m, x, adapter, prefill: int, absorb: bool = True) -> torch.Tensor:
    """Logits of x (B, T) run as a prefill of `prefill` tokens, then one token at a time through the KV cache."""
    cache = m.make_cache(x.shape[0], x.shape[1] + 4)
    steps = [m(x[:, :prefill], cache=cache, adapter=adapter, absorb=absorb)]
    steps += [m(x[:, t:t + 1], cache=cache, adapter=adapter, absorb=absorb) for t in range(prefill, x.shape[1])]
    return torch.cat(steps, 1)


def test_absorbed_decoding_includes_kv_b_proj_lora():
    """The gap vLLM had: the absorbed path reads kv_b_proj.weight directly and must add the adapter's term."""
    m = make("deepseek_v3")
    m.add_adapter("kvb", rand_cfg(r=4, lora_alpha=16, target_modules=["kv_b_proj"]))
    x = tokens(96, B=2, T=9)
    with torch.no_grad():
        full, base = m(x, adapter="kvb"), m(x)
        assert maxdiff(full, base) > 1e-2
        cache = m.make_cache(2, 12)
        dec = torch.cat([m(x[:, :3], cache=cache, adapter="kvb")] +
                        [m(x[:, t:t + 1], cache=cache, adapter="kvb") for t in range(3, 9)], 1)
        assert maxdiff(dec, full) < TOL
        gen = m.generate(x[:, :5], 4, adapter="kvb")
        ref = x[:, :5]
        for _ in range(4):
            ref = torch.cat([ref, m(ref, adapter="kvb")[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(gen, ref)


def test_mixed_batch_training_gradients_match():
    """The per-row path is differentiable and gives the same gradients as running each adapter's rows alone."""
    m = make("deepseek_v3").train()
    m.add_adapter("a", rand_cfg(r=4, target_modules=["o_proj", "experts"]))
    m.add_adapter("b", rand_cfg(r=2, target_modules=["o_proj", "experts"]))
    for n, p in m.named_parameters():
        p.requires_grad_(".lora_" in n)
    x = tokens(96, B=2)
    ps = [p for _, p in m.named_parameters() if p.requires_grad]
    mixed = torch.autograd.grad(m(x, targets=x, adapter=torch.tensor([0, 1])).loss, ps)
    alone = torch.autograd.grad(m(x[:1], targets=x[:1], adapter="a").loss + m(x[1:], targets=x[1:], adapter="b").loss,
                                ps)
    for g1, g2 in zip(mixed, alone):
        assert maxdiff(g1 * 2, g2) < 1e-4  # the mixed loss is the mean over both rows


# ---------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_save_load_round_trip_bit_exact(arch, tmp_path):
    m = make(arch)
    m.add_adapter("a", rand_cfg(r=3, target_modules="all-linear", rank_pattern={"o_proj": 5, "c_fc": 2}))
    m.save_adapter(tmp_path / "a", "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM" and conf["bias"] == "none"
    assert conf["fan_in_fan_out"] == (arch == "gpt2")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    if arch == "deepseek_v3":
        L = m.config.num_hidden_layers
        assert f"base_model.model.model.layers.{L}.eh_proj.lora_A.weight" in keys  # MTP on disk = layer L
        assert keys["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"].shape == (5, 32)
        assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in keys
        # DeepseekV3's dense-MLP / shared-expert linears are target_parameters (peft rewrites those module names)
        assert conf["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj", "mlp.down_proj.weight",
                                             "mlp.gate_proj.weight", "mlp.up_proj.weight",
                                             "shared_experts.down_proj.weight", "shared_experts.gate_proj.weight",
                                             "shared_experts.up_proj.weight"]
        assert not set(conf["target_modules"]) & {"gate_proj", "up_proj", "down_proj"}
    m2 = make(arch)
    m2.load_adapter(tmp_path / "a", "a")
    sd1 = {n: p for n, p in m.named_parameters() if ".lora_" in n}
    sd2 = {n: p for n, p in m2.named_parameters() if ".lora_" in n}
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = tokens(m.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(m(x, adapter="a"), m2(x, adapter="a"))
    m.save_adapter(tmp_path / "a", "a")  # replacing an adapter directory is allowed
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        m.save_adapter(tmp_path / "other", "a")


def _corrupt(tmp_path, name, edit_config=None, edit_tensors=None):
    src = tmp_path / "good"
    dst = tmp_path / name
    dst.mkdir()
    conf = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    if edit_config:
        edit_config(conf)
    if edit_tensors:
        edit_tensors(tensors)
    (dst / "adapter_config.json").write_text(json.dumps(conf))
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _first(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


BAD = {
    "wrong-shape": (None, lambda t: t.__setitem__(_first(t, "o_proj.lora_A"), torch.zeros(4, 31)), "needs lora_A"),
    "missing-target": (None, lambda t: t.update({"base_model.model.model.layers.0.self_attn.nope.lora_A.weight":
                                                 torch.zeros(4, 32),
                                                 "base_model.model.model.layers.0.self_attn.nope.lora_B.weight":
                                                 torch.zeros(32, 4)}), "not a LoRA-capable"),
    "rank-mismatch": (lambda c: c.update(r=8), None, "adapter_config.json says r=8"),
    "nan": (None, lambda t: t[_first(t, "lora_B")].__setitem__((0, 0), float("nan")), "NaN"),
    "half-pair": (None, lambda t: t.pop(_first(t, "kv_b_proj.lora_B")), "missing"),
    "foreign-key": (None, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}),
                    "unexpected tensor"),
    "dora": (lambda c: c.update(use_dora=True), None, "use_dora"),
    "not-lora": (lambda c: c.update(peft_type="IA3"), None, "only LORA"),
    "bad-expert-shape": (None, lambda t: t.__setitem__(_first(t, "experts.lora_A"), torch.zeros(24, 32)),
                         "fit neither|needs"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_rejected_and_model_unchanged(case, tmp_path):
    m = make("deepseek_v3")
    m.add_adapter("good", rand_cfg(target_modules=[*DSV3_ATTN, "experts"]))
    m.save_adapter(tmp_path / "good", "good")
    edit_config, edit_tensors, msg = BAD[case]
    bad = _corrupt(tmp_path, case, edit_config, edit_tensors)
    params = {n: p.clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match=msg):
        m.load_adapter(bad, "new")
    assert m.adapters == ["good"]
    now = dict(m.named_parameters())
    assert now.keys() == params.keys() and all(torch.equal(now[k], params[k]) for k in now)


def test_bad_adapter_files(tmp_path):
    m = make("gpt2")
    m.add_adapter("good", rand_cfg())
    m.save_adapter(tmp_path / "good", "good")
    nocfg = tmp_path / "nocfg"
    nocfg.mkdir()
    (nocfg / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="no adapter_config.json"):
        m.load_adapter(nocfg, "x")
    pkl = tmp_path / "pickle"
    pkl.mkdir()
    (pkl / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (pkl / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="only loads safetensors"):
        m.load_adapter(pkl, "x")
    (pkl / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        m.load_adapter(pkl, "x")
    with pytest.raises(FileNotFoundError):
        m.load_adapter(tmp_path / "missing", "x")
    with pytest.raises(ValueError, match="already exists"):
        m.load_adapter(tmp_path / "good", "good")
    assert m.adapters == ["good"]


def test_tied_lm_head_adapter_cannot_merge_and_nested_forward_restores():
    m = make("gpt2")
    m.add_adapter("h", rand_cfg(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="tied"):
        m.merge_adapter("h")
    ctx = m.lora_context
    with ctx.use("h"):
        with ctx.use(None):
            assert ctx.adapter is None
        assert ctx.adapter == "h"
    assert ctx.adapter is None


def test_mup_model_with_adapter():
    """Adapters on a muP model: trainable, and the trainer's optimizer takes exactly the adapter's factors."""
    from nanoseek.train.optim import configure_optimizer

    m = Model(dsv3_config(hidden_size=64, mup_base_width=32))
    m.add_adapter("a", rand_cfg())
    ps = m.trainable_adapter("a")
    opt = configure_optimizer(m, 1e-3)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(ps) > 0
