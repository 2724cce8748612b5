"""finetune --base-fp8 (LoRA over a frozen FP8 base) and --fp8; the adapter works on the unquantized base."""

import peft
import pytest
import torch
import transformers

from nanoseek import Model
from nanoseek.train.finetune import FinetuneConfig, finetune

from .test_finetune import _cfg


@pytest.fixture(scope="module")
def base(sft_base):
    return sft_base


def test_base_fp8_trains_and_adapter_loads_on_unquantized_base(base, tmp_path):
    # attention targets only: on this tiny base PEFT reads an adapter on experts (shape mismatch) or on
    # gate/up/down_proj (logits differ by 0.16, no FP8 involved) differently: a LoRA-I/O matter, reported
    targets = "q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj"
    s = finetune(_cfg(base, tmp_path / "run", max_steps=12, eval_every=12, save_every=12, base_fp8=True,
                      target_modules=targets))
    assert s["val_loss"] < s["initial"]["val_loss"]
    adapter = tmp_path / "run" / "adapter"
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
