"""nanoseek.train.finetune: LoRA and full fine-tuning through the shared optimizer step; exact resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nanoseek import Model, ModelConfig
from nanoseek.data import train_tokenizer
from nanoseek.train.finetune import FinetuneConfig, finetune, main


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny DeepSeek-V3 checkpoint with its tokenizer, and a JSONL of SFT records."""
    d = tmp_path_factory.mktemp("ft")
    lines = [f"def f{i}(x):\n    return x * {i}\n" for i in range(40)]
    tok = train_tokenizer(lines * 5, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      moe_intermediate_size=16, n_routed_experts=4, n_group=2, topk_group=1, intermediate_size=48,
                      max_position_embeddings=64)
    Model(cfg).save_pretrained(d / "base", tokenizer=tok)
    with open(d / "sft.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"def f{i}(x):\n", "completion": f"    return x * {i}\n"}) + "\n")
    return d


def _cfg(base, out, **kw):
    args = dict(r=4, max_steps=4, batch_size=4, seq_len=24, warmup_steps=0, eval_every=2, eval_batches=2,
                save_every=2, plots=False, lr=3e-3)
    return FinetuneConfig(base=str(base / "base"), data=str(base / "sft.jsonl"), out_dir=str(out), **{**args, **kw})


def test_lora_finetune_learns_and_writes_adapter(base, tmp_path):
    s = finetune(_cfg(base, tmp_path / "run", max_steps=12, eval_every=12, save_every=12))
    assert s["val_loss"] < s["initial"]["val_loss"]
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    m = Model.from_pretrained(base / "base")
    m.load_adapter(adapter, "ft")  # a plain PEFT directory that the model reads back
    # the base is untouched: the checkpoint directory holds the adapter, not a model
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000012"
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "adapter_model.safetensors").is_file()


def test_lora_resume_is_exact(base, tmp_path):
    finetune(_cfg(base, tmp_path / "a"))
    want = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    metrics_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "b" / "adapter")
    finetune(_cfg(base, tmp_path / "b", resume="latest"))
    got = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    metrics_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "step_time_s", "max_memory_bytes")}
             for r in metrics_a]
    assert strip == [{k: v for k, v in json.loads(r).items() if k not in ("tokens_per_s", "step_time_s",
                                                                          "max_memory_bytes")} for r in metrics_b]


def test_full_finetune_writes_model(base, tmp_path):
    s = finetune(_cfg(base, tmp_path / "full", full=True, lr=1e-3))
    m = Model.from_pretrained(tmp_path / "full" / "model")
    ref = Model.from_pretrained(base / "base")
    assert any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))
    assert s["output"].endswith("model")


def test_cli_entry_point(base, tmp_path, capsys):
    assert main(["--base", str(base / "base"), "--data", str(base / "sft.jsonl"), "--out-dir", str(tmp_path / "c"),
                 "--max-steps", "2", "--batch-size", "2", "--seq-len", "24", "--r", "2", "--no-plots",
                 "--target-modules", "o_proj,experts", "--eval-every", "0", "--save-every", "0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2 and out["output"].endswith("adapter")
