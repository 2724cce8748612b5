"""Tiny model configurations shared by the tests (fp32, a few thousand parameters, fast on 2 cores)."""

from __future__ import annotations

import torch

from nanoseek import Model, ModelConfig

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}


def ds(**kw) -> ModelConfig:
    """DeepSeek-V3: 1 dense + 2 MoE layers (8 experts, top-2, 4 groups keep 2), MLA with q_lora, one MTP module."""
    base = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, num_hidden_layers=3,
                num_attention_heads=4, intermediate_size=48, moe_intermediate_size=16, q_lora_rank=24,
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                num_nextn_predict_layers=1, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def gpt2(**kw) -> ModelConfig:
    """GPT-2: 2 blocks, 4 heads, tied embeddings."""
    base = dict(model_type="gpt2", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=128, hidden_act="gelu_new", rms_norm_eps=1e-5, initializer_range=0.02,
                tie_word_embeddings=True, max_position_embeddings=64)
    return ModelConfig(**{**base, **kw})


def make_model(cfg: ModelConfig, dtype=torch.float32, seed: int = 0, std: float = 0.2) -> Model:
    """Weights larger than the default init, so that attention is far from uniform and routing varies; eval mode."""
    torch.manual_seed(seed)
    model = Model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.to(dtype).eval()


def tokens(B: int, T: int, seed: int = 0, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))
