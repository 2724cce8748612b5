"""ModelConfig: one dataclass for both architectures, whose field names are Hugging Face `config.json` keys.

What: the shapes and switches of a GPT-2 or DeepSeek-V3 model, validated on construction, with presets and
the conversion to and from a Hugging Face `config.json` (GPT-2's own key names are mapped on save/load).

Why HF names: a state dict and a config written by nanoseek are then a Hugging Face checkpoint with at most a
thin conversion, and users can read our configs with the names they already know. Keys that only nanoseek
uses (loss weights, balancing mode, muP base width) are written as extra keys; `transformers` ignores them.

Rejected: a free-form dict config (typos pass silently) and per-architecture config classes (every consumer
would branch on the class). One class with a `model_type` switch keeps `Model(config)` the single entry point.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("deepseek_v3", "gpt2")
ROUTER_BALANCE = ("aux_free", "aux_loss", "none")
ACTIVATIONS = ("silu", "gelu_new", "gelu")
IGNORE_INDEX = -100  # a target the loss skips (PyTorch's and Hugging Face's convention): prompt, padding, MTP tail

# GPT-2's config.json keys <-> our (DeepSeek-V3 style) field names.
GPT2_KEYS = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
    "n_inner": "intermediate_size",
    "activation_function": "hidden_act",
    "layer_norm_epsilon": "rms_norm_eps",  # one eps field serves both norms
}

# Fields that exist only in nanoseek (written as extra config.json keys).
NANOSEEK_KEYS = ("mtp_loss_weight", "aux_loss_alpha", "router_balance", "mup_base_width", "embedding_multiplier",
                 "readout_multiplier", "attention_multiplier", "embedding_lr_multiplier", "zero_init_query",
                 "zero_init_readout")


@dataclass
class ModelConfig:
    """Shapes and switches of a model. Field names are Hugging Face `config.json` keys.

    Fields used by one architecture only are ignored by the other (GPT-2 ignores MLA/MoE/MTP fields,
    DeepSeek-V3 ignores the dropout fields). `rms_norm_eps` is GPT-2's `layer_norm_epsilon`.
    """

    model_type: str = "deepseek_v3"
    vocab_size: int = 4096
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # MLA/MHA here have no GQA: None or num_attention_heads
    max_position_embeddings: int = 1024
    intermediate_size: int = 384  # dense MLP width (GPT-2: n_inner, default 4 * hidden_size)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = 2
    # Multi-head Latent Attention
    q_lora_rank: int | None = 96  # None: a plain q_proj
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # DeepSeekMoE
    moe_intermediate_size: int = 96
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # Multi-Token Prediction
    num_nextn_predict_layers: int = 1
    # GPT-2 dropout
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    # nanoseek-only
    mtp_loss_weight: float = 0.3  # lambda in L = L_main + lambda/D * sum_k L_mtp_k
    aux_loss_alpha: float = 0.0001  # alpha of the balance loss (sequence-wise, or batch-wise for aux_loss)
    router_balance: str = "aux_free"  # aux_free: bias + sequence-wise loss; aux_loss: classic loss; none
    mup_base_width: int | None = None  # None: standard parametrization
    embedding_multiplier: float = 1.0  # input embeddings are multiplied by this (muP's alpha_emb); folded on export
    readout_multiplier: float = 1.0  # logits multiplied by this (alpha_out; times 1/m under muP); folded on export
    attention_multiplier: float = 1.0  # attention logits multiplied by this (alpha_attn); folded into q on export
    embedding_lr_multiplier: float = 1.0  # Adam lr factor of the embedding tables (a tied head shares it)
    zero_init_query: bool = False  # query projections start at 0 (TP5's recommendation; all heads attend uniformly)
    zero_init_readout: bool = False  # an untied lm_head starts at 0 (TP5's recommendation)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"must be one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "intermediate_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", f"must be one of {ACTIVATIONS}")
        if self.num_key_value_heads not in (None, self.num_attention_heads):
            bad("num_key_value_heads", "grouped-query attention is not supported; use None or num_attention_heads")
        if self.router_balance not in ROUTER_BALANCE:
            bad("router_balance", f"must be one of {ROUTER_BALANCE}")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        for name in ("embedding_multiplier", "readout_multiplier", "attention_multiplier", "embedding_lr_multiplier"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        if self.zero_init_readout and self.tie_word_embeddings:
            bad("zero_init_readout", "needs an untied lm_head (a tied head is the embedding table)")
        if not self.initializer_range > 0:
            bad("initializer_range", "must be > 0")
        if self.mup_base_width is not None and self.mup_base_width < 1:
            bad("mup_base_width", "must be None or a positive integer")
        for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, tok)
            if v is not None and not 0 <= v < self.vocab_size:
                bad(tok, f"must be None or in [0, vocab_size={self.vocab_size})")
        if self.model_type == "gpt2":
            if self.hidden_size % self.num_attention_heads:
                bad("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
            return
        # DeepSeek-V3
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            bad("q_lora_rank", "must be None (plain q_proj) or a positive integer")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        rope_type = self.rope_parameters.get("rope_type", "default")
        if rope_type not in ("default", "yarn"):
            bad("rope_parameters", "rope_type must be 'default' or 'yarn'")
        if "rope_theta" not in self.rope_parameters:
            bad("rope_parameters", "needs 'rope_theta'")
        if rope_type == "yarn":
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_parameters:
                    bad("rope_parameters", f"yarn needs '{key}'")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_nextn_predict_layers < 0:
            bad("num_nextn_predict_layers", "must be >= 0")
        for name in ("mtp_loss_weight", "aux_loss_alpha"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not self.has_moe:
            return
        for name in ("n_routed_experts", "moe_intermediate_size", "n_shared_experts", "num_experts_per_tok",
                     "n_group", "topk_group"):
            if not isinstance(getattr(self, name), int):
                bad(name, "must be an integer")
        if self.routed_scaling_factor <= 0:
            bad("routed_scaling_factor", "must be > 0")
        if self.n_routed_experts < 2:
            bad("n_routed_experts", "a MoE layer needs at least 2 routed experts")
        if self.moe_intermediate_size < 1:
            bad("moe_intermediate_size", "must be a positive integer")
        if self.n_shared_experts < 0:
            bad("n_shared_experts", "must be >= 0")
        if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            bad("num_experts_per_tok", f"must be in [1, n_routed_experts={self.n_routed_experts}]")
        if self.n_group < 1 or self.n_routed_experts % self.n_group:
            bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if self.n_routed_experts // self.n_group < 2:
            bad("n_group", "each group needs >= 2 experts (a group is scored by its top-2 experts)")
        if not 1 <= self.topk_group <= self.n_group:
            bad("topk_group", f"must be in [1, n_group={self.n_group}]")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            bad("num_experts_per_tok", "exceeds the experts left in the topk_group kept groups")

    # ------------------------------------------------------------------ derived sizes
    @property
    def has_moe(self) -> bool:
        """Any MoE layer, MTP included (MTP layers sit after the last main layer, so they are MoE)."""
        return self.model_type == "deepseek_v3" and (
            self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0)

    @property
    def folds_tied_readout(self) -> bool:
        """A tied head whose multipliers (muP, alpha_emb, alpha_out) are folded on export: written untied."""
        return self.tie_word_embeddings and (self.mup_base_width is not None or self.embedding_multiplier != 1.0
                                             or self.readout_multiplier != 1.0)

    @property
    def has_q_lora(self) -> bool:
        """MLA queries through a low-rank latent (q_a_proj, q_a_layernorm, q_b_proj); else one q_proj."""
        return self.q_lora_rank is not None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def head_dim(self) -> int:
        """GPT-2 head size."""
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_cache_values_per_layer(self) -> int:
        """Values a decode cache keeps per token and layer: MLA's [c_kv ; k_pe], or GPT-2's per-head K and V."""
        if self.model_type == "deepseek_v3":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_attention_heads * self.head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MTP layers are numbered after the main ones (layer_idx >= num_hidden_layers), as on disk."""
        return self.model_type == "deepseek_v3" and layer_idx >= self.first_k_dense_replace

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def with_width(self, width: int) -> ModelConfig:
        """The same model at `hidden_size=width`, for width sweeps (muP).

        Scaled by m = width / hidden_size (rounded): hidden_size, intermediate_size, moe_intermediate_size,
        num_attention_heads (head dims stay fixed, so the head count carries the width), q_lora_rank and
        kv_lora_rank (MLA's latents are width-like: they compress the hidden state). Fixed: vocab, depth,
        head dims, expert count, top-k, groups, positions. Raises ValueError if the heads don't fit.
        """
        m = width / self.hidden_size

        def scale(v):
            return None if v is None else max(1, round(v * m))

        heads = scale(self.num_attention_heads)
        changes = dict(hidden_size=width, intermediate_size=scale(self.intermediate_size),
                       num_attention_heads=heads,
                       num_key_value_heads=None if self.num_key_value_heads is None else heads)
        if self.model_type == "deepseek_v3":
            changes.update(moe_intermediate_size=scale(self.moe_intermediate_size),
                           q_lora_rank=scale(self.q_lora_rank), kv_lora_rank=scale(self.kv_lora_rank))
        return self.replace(**changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**copy.deepcopy(PRESETS[name]), **overrides})

    # ------------------------------------------------------------------ HF config.json
    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` contents: HF keys for the architecture plus nanoseek's extra keys."""
        d = dataclasses.asdict(self)
        extras = {k: d[k] for k in NANOSEEK_KEYS}
        common = {k: d[k] for k in ("vocab_size", "initializer_range", "tie_word_embeddings",
                                     "bos_token_id", "eos_token_id", "pad_token_id")}
        if self.model_type == "gpt2":
            out = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                   **{hf: d[ours] for hf, ours in GPT2_KEYS.items()},
                   "embd_pdrop": self.embd_pdrop, "resid_pdrop": self.resid_pdrop,
                   "attn_pdrop": self.attn_pdrop, "scale_attn_weights": True, "use_cache": True}
        else:
            skip = {"embd_pdrop", "resid_pdrop", "attn_pdrop", *NANOSEEK_KEYS}
            out = {"architectures": ["DeepseekV3ForCausalLM"], **{k: v for k, v in d.items() if k not in skip}}
            out["num_key_value_heads"] = self.num_attention_heads
            out["num_mtp_layers"] = self.num_nextn_predict_layers
        if self.folds_tied_readout:
            # the multipliers are folded into the weights on disk, so a tied head is written on its own
            out["tie_word_embeddings"] = False
            extras["tied_readout_folded"] = True
        out["nanoseek"] = extras
        return out

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a HF `config.json` dict (ours or one written by `transformers`). Unknown HF keys are ignored."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json: model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        if model_type == "gpt2":
            for hf, ours in GPT2_KEYS.items():
                if hf in d:
                    kw[ours] = d[hf]
            if kw.get("intermediate_size") is None:
                kw["intermediate_size"] = 4 * kw.get("hidden_size", 768)
            kw.setdefault("hidden_act", "gelu_new")
            kw.setdefault("rms_norm_eps", 1e-5)
            kw.setdefault("initializer_range", 0.02)
            kw.setdefault("tie_word_embeddings", True)
            kw.setdefault("max_position_embeddings", 1024)
            for k in ("vocab_size", "initializer_range", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                      "pad_token_id", "embd_pdrop", "resid_pdrop", "attn_pdrop"):
                if k in d:
                    kw[k] = d[k]
            kw.setdefault("pad_token_id", None)
        else:
            kw = {k: v for k, v in d.items() if k in names}
            if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
                kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
            kw["rope_parameters"] = rope
        kw["model_type"] = model_type
        kw["num_key_value_heads"] = None  # MLA and our MHA have no GQA; transformers may write any value here
        for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):  # transformers' defaults may not fit
            if isinstance(kw.get(tok), list):
                kw[tok] = kw[tok][0] if kw[tok] else None
            if kw.get(tok) is not None and not 0 <= kw[tok] < kw.get("vocab_size", cls.vocab_size):
                kw[tok] = None
        extras = d.get("nanoseek") or {}
        kw.update({k: v for k, v in extras.items() if k in NANOSEEK_KEYS})
        if extras.get("tied_readout_folded"):
            kw["tie_word_embeddings"] = True
        return cls(**kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d)


_V3_671B = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
    max_position_embeddings=163840, intermediate_size=18432, moe_intermediate_size=2048, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
    n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3,
    norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=1, initializer_range=0.006,
    bos_token_id=0, eos_token_id=1, pad_token_id=None,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                     "mscale": 1.0, "mscale_all_dim": 1.0},
)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small, exactly (124M with tied embeddings); dropout off, as for pretraining from scratch.
    "gpt2-124m": dict(model_type="gpt2", vocab_size=50257, hidden_size=768, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=1024, intermediate_size=3072,
                      hidden_act="gelu_new", rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True,
                      bos_token_id=50256, eos_token_id=50256, pad_token_id=None),
    # A small GPT-2 for CPU experiments and tests. Exact GELU (HF "gelu", nanoGPT's) instead of GPT-2's tanh
    # approximation: the CPU kernel of the approximation took 3x as long (BENCHMARKS.md, "Fast by default").
    "gpt2-tiny": dict(model_type="gpt2", vocab_size=4096, hidden_size=128, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=1024, intermediate_size=512,
                      hidden_act="gelu", rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=True),
    # Trains on 2 CPU cores in minutes: every DeepSeek-V3 feature at toy size.
    "dsv3-tiny": dict(model_type="deepseek_v3"),
    # About 0.5B total / 0.15B active: one GPU.
    "dsv3-small": dict(model_type="deepseek_v3", vocab_size=32768, hidden_size=1024, num_hidden_layers=12,
                       num_attention_heads=16, max_position_embeddings=4096, intermediate_size=2816,
                       moe_intermediate_size=352, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
                       qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1,
                       num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                       routed_scaling_factor=2.5, num_nextn_predict_layers=1),
    # The real DeepSeek-V3 shapes: build on the meta device only (for counting).
    "dsv3-671b": _V3_671B,
}
