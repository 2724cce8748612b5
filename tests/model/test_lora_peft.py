"""LoRA adapters interoperate with Hugging Face `peft` both ways, at tiny random configs (fp32, <= 1e-4).

nanoseek -> peft: `model.save_pretrained(base)`, `model.save_adapter(dir)`, then
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)`.
peft -> nanoseek: `get_peft_model(hf_model, peft.LoraConfig(...))` with B made non-zero, `save_pretrained`, then
`model.load_adapter(dir)`. Routed experts use peft's `target_parameters` (the stacked 3-D expert tensors).
Then: the default adapters of every kind (LoRA, DoRA, VeRA) both ways, peft's own defaults, the main job's
adapter (a short finetune), and adapters in the old layout.
"""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from nanoseek import LoraConfig, Model, VeraConfig  # noqa: E402
from tests.test_lora import dsv3_config, gpt2_config, perturb, tokens  # noqa: E402
from tests.test_lora_variants import randomize  # noqa: E402

TOL = 1e-4

CASES = {
    "gpt2-all": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-untied-rslora": ("gpt2", dict(target_modules=["attn.c_attn", "mlp.c_proj"], use_rslora=True)),
    "dsv3-attention-experts": ("deepseek_v3", dict(target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                   "kv_b_proj", "o_proj", "experts"])),
    "dsv3-qproj-down-experts": ("deepseek_v3", dict(target_modules=["q_proj", "kv_b_proj", "experts.down_proj"])),
}
MODEL_KW = {"gpt2-untied-rslora": dict(tie_word_embeddings=False), "dsv3-qproj-down-experts": dict(q_lora_rank=None)}


def build(case: str) -> Model:
    arch, _ = CASES[case]
    torch.manual_seed(0)
    kw = MODEL_KW.get(case, {})
    cfg = dsv3_config(num_nextn_predict_layers=0, **kw) if arch == "deepseek_v3" else gpt2_config(**kw)
    m = Model(cfg).eval()
    perturb(m, 1)
    return m


def hf_model(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_nanoseek_adapter_loads_in_peft(case, tmp_path):
    m = build(case)
    m.save_pretrained(tmp_path / "base")
    m.add_adapter("t", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[case][1]))
    m.save_adapter(tmp_path / "adapter", "t")
    pm = peft.PeftModel.from_pretrained(hf_model(tmp_path / "base"), tmp_path / "adapter").eval()
    x = tokens(m.config.vocab_size)
    with torch.no_grad():
        ours, theirs = m(x, adapter="t"), pm(x).logits
        assert (ours - m(x)).abs().max() > 1e-2  # the adapter matters
        assert (ours - theirs).abs().max().item() <= TOL


PEFT_CASES = {
    "gpt2-all": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    # peft rewrites gate/up/down_proj on DeepseekV3 to the routed experts' target_parameters (gate_up at rank 2r)
    "dsv3-attention-mlp-names": ("deepseek_v3", dict(target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                                                                     "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                                                                     "down_proj"])),
    "dsv3-target-parameters-rslora": ("deepseek_v3", dict(target_modules=["kv_b_proj"], use_rslora=True,
                                                          target_parameters=["mlp.experts.down_proj"])),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_loads_in_nanoseek(case, tmp_path):
    arch, kw = PEFT_CASES[case]
    torch.manual_seed(0)
    m = Model(dsv3_config(num_nextn_predict_layers=0) if arch == "deepseek_v3" else gpt2_config()).eval()
    perturb(m, 1)
    m.save_pretrained(tmp_path / "base")
    peft_to_nanoseek(m, tmp_path, peft.LoraConfig(r=4, lora_alpha=8, **kw))


def peft_to_nanoseek(m, tmp_path, peft_config):
    """peft adapter on the saved base (B, VeRA vectors and DoRA magnitudes perturbed) -> nanoseek: equal logits."""
    pm = peft.get_peft_model(hf_model(tmp_path / "base"), peft_config).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "vera_lambda" in n or "magnitude" in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    m.load_adapter(tmp_path / "adapter", "p")
    x = tokens(m.config.vocab_size)
    with torch.no_grad():
        ours, theirs = m(x, adapter="p"), pm(x).logits
        assert (ours - m(x)).abs().max() > 1e-2
        assert (ours - theirs).abs().max().item() <= TOL
    return m


# ---------------------------------------------------------------------------------------------- defaults, variants
# tests.tiny.ds: one dense layer, two MoE layers (shared + routed experts), one MTP module: every kind of target
def tiny(arch: str) -> Model:
    from tests.tiny import ds, gpt2, make_model

    return make_model(ds() if arch == "deepseek_v3" else gpt2(), std=0.1)


def round_trip(m, name: str, base, adapter, tmp_path, min_effect: float) -> None:
    """nanoseek adapter `name` (saved at `adapter`) -> peft on `base`: equal logits; peft's own save of it ->
    nanoseek again: equal logits."""
    x = tokens(m.config.vocab_size)
    pm = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
    with torch.no_grad():
        ours, theirs = m(x, adapter=name), pm(x).logits
        assert (ours - m(x)).abs().max() > min_effect  # the adapter matters
    assert (ours - theirs).abs().max().item() <= TOL
    pm.save_pretrained(tmp_path / "back")
    m.load_adapter(tmp_path / "back", "back")
    with torch.no_grad():
        assert (m(x, adapter="back") - theirs).abs().max().item() <= TOL


DEFAULTS = {"lora": lambda: LoraConfig(r=4, lora_alpha=8, init_lora_weights=False),
            "dora": lambda: LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True),
            "vera": lambda: VeraConfig(r=6)}


@pytest.mark.parametrize("kind", sorted(DEFAULTS))
@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt2"])
def test_default_adapters_load_in_peft_and_back(arch, kind, tmp_path):
    """Default targets (dense MLPs, shared and routed experts, MTP included on DeepseekV3) -> peft, equal logits;
    peft's save of what it loaded -> nanoseek, equal logits again."""
    m = tiny(arch)
    m.save_pretrained(tmp_path / "base")
    m.add_adapter("t", DEFAULTS[kind]())
    randomize(m, "t")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults must not need a warning
        m.save_adapter(tmp_path / "ours", "t")
    round_trip(m, "t", tmp_path / "base", tmp_path / "ours", tmp_path, min_effect=1e-2)


def test_default_dsv3_layout(tmp_path):
    """What makes DeepseekV3 load: no gate/up/down_proj in target_modules (peft would rewrite them to the
    experts), dense-MLP / shared-expert linears as 2-D target_parameters; MTP tensors on disk as layer L."""
    m = tiny("deepseek_v3")
    m.add_adapter("t", LoraConfig(r=4))
    m.save_adapter(tmp_path / "a", "t")
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert not set(conf["target_modules"]) & {"gate_proj", "up_proj", "down_proj"}
    assert {"mlp.gate_proj.weight", "shared_experts.down_proj.weight", "experts.gate_up_proj"} <= \
        set(conf["target_parameters"])
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.3.eh_proj.lora_A.weight" in keys  # MTP: transformers builds no layer 3


@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt2"])
def test_peft_default_all_linear_loads_in_nanoseek(arch, tmp_path):
    """peft's own all-linear: on DeepseekV3 that is attention + routed experts (gate_up at rank 2r) + the routers
    (`gate.weight`), no dense MLP; on GPT-2 every Conv1D but lm_head."""
    m = tiny(arch)
    m.save_pretrained(tmp_path / "base")
    peft_to_nanoseek(m, tmp_path, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if arch == "deepseek_v3":
        assert "p" in m.model.layers[1].mlp.gate.lora_A  # the router adapter


PEFT_VARIANTS = {"dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
                 "vera": lambda: peft.VeraConfig(r=6, target_modules="all-linear", projection_prng_key=7)}


@pytest.mark.parametrize("kind", sorted(PEFT_VARIANTS))
@pytest.mark.parametrize("arch", ["deepseek_v3", "gpt2"])
def test_peft_dora_and_vera_load_in_nanoseek(arch, kind, tmp_path):
    m = tiny(arch)
    m.save_pretrained(tmp_path / "base")
    if kind == "dora" and arch == "deepseek_v3":  # peft itself refuses DoRA on DeepseekV3's all-linear (experts)
        with pytest.raises(ValueError, match="use_dora"):
            peft.get_peft_model(hf_model(tmp_path / "base"), PEFT_VARIANTS[kind]())
        cfg = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_a_proj", "kv_b_proj", "o_proj"])
    else:
        cfg = PEFT_VARIANTS[kind]()
    peft_to_nanoseek(m, tmp_path, cfg)


def test_vera_projections_equal_peft():
    from peft.tuners.vera.model import _kaiming_init

    from nanoseek.lora_variants import vera_projections

    gen = torch.Generator(device="cpu").manual_seed(11)
    A, B = _kaiming_init((8, 48), generator=gen), _kaiming_init((64, 8), generator=gen)
    ours = vera_projections(11, 8, 48, 64)
    assert torch.equal(ours[0], A) and torch.equal(ours[1], B)


def test_old_layout_adapter_still_loads(tmp_path):
    """Adapters written before the target_parameters layout (dense MLP names in target_modules) load unchanged."""
    m = tiny("deepseek_v3")
    m.add_adapter("t", LoraConfig(r=4, init_lora_weights=False))
    m.save_adapter(tmp_path / "new", "t")
    conf = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    conf["target_modules"] += ["gate_proj", "up_proj", "down_proj"]
    conf["target_parameters"] = ["experts.down_proj", "experts.gate_up_proj"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps(conf))
    shutil.copy(tmp_path / "new" / "adapter_model.safetensors", tmp_path / "old")
    m.load_adapter(tmp_path / "old", "old")
    x = tokens(m.config.vocab_size)
    with torch.no_grad():
        assert (m(x, adapter="old") - m(x, adapter="t")).abs().max().item() == 0.0


def test_explicit_dora_on_dsv3_mlp_warns_that_peft_cannot_load_it(tmp_path):
    m = tiny("deepseek_v3")
    m.add_adapter("t", LoraConfig(r=4, use_dora=True, target_modules=["o_proj", "gate_proj"]))
    with pytest.warns(UserWarning, match="peft 0.21 cannot load this adapter"):
        m.save_adapter(tmp_path / "a", "t")
    m.load_adapter(tmp_path / "a", "back")  # nanoseek reads it


def test_main_job_adapter_loads_in_peft_and_back(sft_base, tmp_path):
    """A short `finetune` with the main job's adapter settings (r=16, alpha 32, all-linear + experts, as
    benchmarks/adapter_specificity.py runs it) -> peft on the exported base: equal logits; and back."""
    from nanoseek.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(base=str(sft_base / "base"), data=str(sft_base / "sft.jsonl"), out_dir=str(tmp_path / "run"),
                         adapter_name="email", max_steps=3, batch_size=2, seq_len=24, warmup_steps=0, eval_every=0,
                         eval_batches=1, save_every=0, plots=False, lr=2e-2)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (16, 32.0, "all-linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "peft will not load this" note
        finetune(cfg)
    m = Model.from_pretrained(sft_base / "base")
    m.load_adapter(tmp_path / "run" / "adapter", "email")
    round_trip(m, "email", sft_base / "base", tmp_path / "run" / "adapter", tmp_path, min_effect=1e-4)
