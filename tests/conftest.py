"""Fixtures shared by the whole suite."""

import json

import pytest
import torch

from nanoseek import Model, ModelConfig
from nanoseek.data import train_tokenizer


@pytest.fixture(scope="module")
def single_thread():
    """Tiny matmuls: one thread is faster, and 2 OpenMP threads on a busy 2-core machine are ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sft_base(tmp_path_factory):
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
