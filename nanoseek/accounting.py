"""Parameter, FLOP and KV-cache accounting, counted from a model built on the meta device (no memory).

Conventions (stated, because published numbers differ by them):
  * params_total: unique parameters of the main model, embeddings and head included, MTP excluded
    (DeepSeek-V3: 671B main + 14B MTP). params_mtp: MTP modules (their embedding/head are shared: not counted).
  * params_active: parameters one token touches: params_total minus the (E - K) unchosen routed experts of
    every MoE layer (V3's "37B activated" includes embedding and head).
  * flops_per_token: training FLOPs per token = 6 * (active matmul parameters) + attention, PaLM-style
    (forward 2 * n_heads * seq * (d_qk + d_v) per layer for QK^T and AV, no causal discount, times 3 for
    forward + backward). Embedding lookups are not matmuls and are excluded (a tied embedding is counted once,
    as the head). Training runs the MTP modules, so they are included; flops_per_token_main leaves them out.
  * kv_cache_bytes_per_token: bf16 bytes cached per token over all layers. MLA caches [c_kv ; k_pe]
    (kv_lora_rank + qk_rope_head_dim per layer); the MHA-equivalent caches per-head K and V.
"""

from __future__ import annotations

from .config import ModelConfig
from .model import CausalLM
from .model.moe import MoE

BF16_BYTES = 2


def default_seq_len(cfg: ModelConfig) -> int:
    return min(cfg.max_position_embeddings, 4096)


def model_stats(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    seq = seq_len or default_seq_len(cfg)
    model = CausalLM(cfg, device="meta")
    seen, main, mtp = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.startswith("mtp."):
            mtp += p.numel()
        else:
            main += p.numel()
    embed = model.embedding().weight.numel()
    lookups = 0 if cfg.tie_word_embeddings else embed  # a tied table is also the head matmul
    if cfg.model_type == "gpt2":
        lookups += model.transformer.wpe.weight.numel()
    head = model.lm_head.weight.numel()

    inactive_main = inactive_mtp = 0
    for name, moe in ((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
        per_expert = (moe.experts.gate_up_proj.numel() + moe.experts.down_proj.numel()) // cfg.n_routed_experts
        unused = (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
        if name.startswith("mtp."):
            inactive_mtp += unused
        else:
            inactive_main += unused

    if cfg.model_type == "gpt2":
        heads, d_qk, d_v = cfg.num_attention_heads, cfg.head_dim, cfg.head_dim
        kv = mha = cfg.kv_cache_values_per_layer * cfg.num_hidden_layers * BF16_BYTES
    else:
        heads, d_qk, d_v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
        kv = cfg.kv_cache_values_per_layer * cfg.num_hidden_layers * BF16_BYTES
        mha = heads * (d_qk + d_v) * cfg.num_hidden_layers * BF16_BYTES
    attn_per_layer = 3 * 2 * heads * seq * (d_qk + d_v)
    active_main = main - inactive_main
    active_mtp = mtp - inactive_mtp
    n_mtp = cfg.num_nextn_predict_layers if cfg.model_type == "deepseek_v3" else 0
    flops_main = 6 * (active_main - lookups) + attn_per_layer * cfg.num_hidden_layers
    flops_mtp = 6 * (active_mtp + n_mtp * head) + attn_per_layer * n_mtp  # each depth reuses the head
    return {
        "model_type": cfg.model_type,
        "params_total": main,
        "params_active": active_main,
        "params_embedding": embed,
        "params_mtp": mtp,
        "params_mtp_active": active_mtp,
        "seq_len": seq,
        "flops_per_token": flops_main + flops_mtp,
        "flops_per_token_main": flops_main,
        "kv_cache_bytes_per_token": kv,
        "kv_cache_bytes_per_token_mha": mha,
        "kv_cache_ratio_mha_over_ours": round(mha / kv, 2),
    }
