"""finetune --base-fp8 (LoRA over a frozen FP8 base) and --fp8; the adapter works on the unquantized base."""

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from nanoseek import Model
from nanoseek.train.finetune import FinetuneConfig, finetune

from .test_finetune import _cfg


@pytest.fixture(scope="module")
def base(sft_base):
    return sft_base


def test_base_fp8_trains_and_adapter_loads_on_unquantized_base(base, tmp_path):
    # default targets: every projection and the routed experts, whose frozen stacks are FP8 blocks too
    s = finetune(_cfg(base, tmp_path / "run", max_steps=12, eval_every=12, save_every=12, base_fp8=True))
    assert s["val_loss"] < s["initial"]["val_loss"]
    adapter = tmp_path / "run" / "adapter"
    assert any(".experts." in k for k in load_file(adapter / "adapter_model.safetensors"))
    x = torch.randint(0, 64, (2, 12))
    m = Model.from_pretrained(base / "base").eval()  # the unquantized base
    m.load_adapter(adapter, "ft")
    with torch.no_grad():
        plain, ours = m(x), m(x, adapter="ft")
    assert not torch.allclose(plain, ours)  # the adapter changes the output
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "base").eval()
    pm = peft.PeftModel.from_pretrained(hf, adapter).eval()
    with torch.no_grad():
        theirs = pm(x).logits
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)


def test_fp8_finetune_runs(base, tmp_path):
    s = finetune(_cfg(base, tmp_path / "run", max_steps=4, fp8=True))
    assert s["val_loss"] < s["initial"]["val_loss"]


def test_base_fp8_refuses_full():
    with pytest.raises(ValueError, match="base_fp8"):
        FinetuneConfig(base="b", data="d", out_dir="o", full=True, base_fp8=True)


def test_base_fp8_refuses_dora():
    with pytest.raises(ValueError, match="--dora"):
        FinetuneConfig(base="b", data="d", out_dir="o", dora=True, base_fp8=True)
