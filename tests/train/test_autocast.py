"""--dtype auto/float32/bfloat16: the detection, and bf16 autocast staying close to fp32 with fp32 masters/loss."""

import pytest
import torch

from nanoseek.train import trainer
from nanoseek.train.autocast import autocast_context, cpu_has_native_bf16, resolve_dtype
from nanoseek.train.config import TrainConfig
from tests.tiny import ds, make_model


def test_auto_follows_the_hardware():
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_native_bf16() else "float32")
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("float32", "cuda") == "float32" and resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="'fp16'"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="'auto'"):
        autocast_context("auto", "cpu")


def test_bf16_autocast_close_to_fp32_with_fp32_masters_and_loss():
    model = make_model(ds(), std=0.05).train()
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    with autocast_context("float32", "cpu"):
        ref = model(x[:, :-1], targets=x[:, 1:])
    with autocast_context("bfloat16", "cpu"):
        out = model(x[:, :-1], targets=x[:, 1:])
    assert out.logits.dtype == torch.bfloat16 and ref.logits.dtype == torch.float32
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) <= 0.02 * ref.loss.item()
    out.loss.backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in model.parameters())


@pytest.mark.parametrize("dtype", ["auto", "float32", "bfloat16"])
def test_pretrain_dtype_flag_selects_the_autocast(dtype):
    cfg = TrainConfig(dtype=dtype)
    with trainer.autocast_context(cfg, torch.device("cpu")):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16,
                       "auto": torch.bfloat16 if cpu_has_native_bf16() else torch.float32}[dtype]
