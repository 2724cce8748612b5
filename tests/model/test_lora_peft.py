"""LoRA adapters interoperate with Hugging Face `peft` both ways, at tiny random configs (fp32, <= 1e-4).

nanoseek -> peft: `model.save_pretrained(base)`, `model.save_adapter(dir)`, then
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dir)`.
peft -> nanoseek: `get_peft_model(hf_model, peft.LoraConfig(...))` with B made non-zero, `save_pretrained`, then
`model.load_adapter(dir)`. Routed experts use peft's `target_parameters` (the stacked 3-D expert tensors).
"""

import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from nanoseek import LoraConfig, Model  # noqa: E402
from tests.test_lora import dsv3_config, gpt2_config, perturb, tokens  # noqa: E402

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
    pm = peft.get_peft_model(hf_model(tmp_path / "base"), peft.LoraConfig(r=4, lora_alpha=8, **kw)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    m.load_adapter(tmp_path / "adapter", "p")
    x = tokens(m.config.vocab_size)
    with torch.no_grad():
        ours, theirs = m(x, adapter="p"), pm(x).logits
        assert (ours - m(x)).abs().max() > 1e-2
        assert (ours - theirs).abs().max().item() <= TOL
