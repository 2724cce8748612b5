"""The model: GPT-2 or DeepSeek-V3 blocks, Multi-Token Prediction, losses, init, and generation.

Module tree = Hugging Face's, so state-dict keys are HF keys (checkpoint.py adds the thin on-disk mapping):
    deepseek_v3: model.embed_tokens, model.layers.{i}.{input_layernorm, self_attn.*, post_attention_layernorm,
                 mlp.*}, model.norm, lm_head; MTP modules at mtp.{k} (on disk: model.layers.{L + k}.*)
    gpt2:        transformer.{wte, wpe, h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj},
                 ln_f}, lm_head (tied to wte unless tie_word_embeddings is false)

MTP (V3 report section 2.2): module k (1..D) combines the previous depth's hidden state h^{k-1}_i (depth 0:
the main model's last block output, before the final norm) with the embedding of token i+k:
    h'_i = eh_proj([enorm(emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), h^k = block_k(h'), logits = lm_head(norm_k(h^k))
and predicts t_{i+k+1}. Sequences keep their length T (the last k positions have no target and are ignored),
so shapes stay static. Loss = CE_main + lambda/D * sum_k CE_k + balance loss.

LoRA (linear.py): every projection is a `Linear` and the routed experts carry adapters too; `forward(...,
adapter=)` runs the base, one named adapter, or one adapter per row, through `lora_context` (set for the duration
of the forward). Adapter tensors are excluded from `state_dict()`: save them with `save_adapter` (PEFT format).

Layering: `CausalLM` is the network and imports nothing above model/. The public `nanoseek.Model` (modeling.py)
is a CausalLM plus the methods that need the rooms above it: `from_pretrained` / `save_pretrained`
(checkpoint.py) and adapter management and PEFT I/O (lora.py, lora_io.py).

Statistics come out as data: `ModelOutput.expert_load` (n_moe_layers, E) token counts of this forward. In
training mode the model also sums them into `expert_load_accum` until `update_router_bias` consumes them, so
gradient accumulation and data parallelism (all-reduce the sum first) see the whole step's load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import IGNORE_INDEX, ModelConfig
from . import decoding
from .attention import MLA, GPT2Attention, KVCache
from .layers import GPT2MLP, RMSNorm, Rotary, SwiGLU
from .linear import LoraContext, drop_lora_from_state_dict, ignore_missing_lora, linear, recomputed
from .moe import MoE
from .parametrization import mup_init, output_multiplier
from .precision import set_precision
from .sampling import check_sampling


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # total = main + mtp_weight * mtp + balance
    main_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths (before lambda)
    balance_loss: torch.Tensor | None = None  # summed over MoE layers (alpha included)
    expert_load: torch.Tensor | None = None  # (n_moe_layers, E) tokens routed to each expert
    hidden: torch.Tensor | None = None  # (B, T, H) last block's output before the final norm (MTP's h^0)


class DecoderLayer(nn.Module):
    """A DeepSeek-V3 block: x + attn(norm(x)), then x + mlp(norm(x)) with a dense or MoE mlp."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, rotary, cos, sin, cache=None, want_loss=False, absorb=True):
        x = x + self.self_attn(self.input_layernorm(x), rotary, cos, sin, cache, absorb)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, load, loss = self.mlp(h, want_loss)
            return x + y, load, loss
        return x + self.mlp(h), None, None


class SharedHead(nn.Module):
    """MTP's output norm (`shared_head.norm`); the head matrix itself is the model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One MTP module: its own block plus enorm, hnorm, eh_proj and shared_head.norm (DeepSeek-V3's names)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.shared_head = SharedHead(cfg)

    def forward(self, emb, h, rotary, cos, sin, want_loss=False, cache=None):
        """emb (B, T, H) embeddings of tokens i+k, h (B, T, H) the previous depth's hidden state ->
        (h^k (B, T, H), shared_head.norm(h^k), expert load, balance loss). All of the module's own parameters
        are used inside its forward, so it can be one FSDP unit. `cache`: the module's own KVCache (decoding)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        h, load, loss = super().forward(x, rotary, cos, sin, cache=cache, want_loss=want_loss)
        return h, self.shared_head.norm(h), load, loss


class DeepseekBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """A GPT-2 or DeepSeek-V3 causal LM. Built on the meta device, then materialised and `init_weights()`-ed.

    `device="meta"` keeps it unmaterialised (for counting the 671B model).
    """

    def __init__(self, config: ModelConfig, device: str | torch.device | None = None):
        super().__init__()
        self.config = cfg = config
        with torch.device("meta"):
            if cfg.model_type == "gpt2":
                self.transformer = GPT2Backbone(cfg)
            else:
                self.model = DeepseekBackbone(cfg)
                L = cfg.num_hidden_layers
                self.mtp = nn.ModuleList(MTPLayer(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
            self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self.expert_load_accum: torch.Tensor | None = None  # (n_moe_layers, E) fp32, summed in training
        self.lora_context = LoraContext()  # the adapters and which one this forward runs (linear.py)
        # recompute each block's activations in the backward instead of keeping them (--activation-checkpointing)
        self.activation_checkpointing = False
        self._register_state_dict_hook(drop_lora_from_state_dict)  # adapters: save_adapter only
        self.register_load_state_dict_post_hook(ignore_missing_lora)
        self.tie_weights()
        if str(device) != "meta":
            self.to_empty(device=device or "cpu")
            self.init_weights()

    # ------------------------------------------------------------------ precision recipe (fp8.py) [fp8 branch]
    def set_precision(self, name: str = "plain", quantize: bool = True, pow2: bool = False):
        """Run the projections and routed experts in `name` ("plain" or "fp8"); see model/precision.py."""
        return set_precision(self, name, quantize=quantize, pow2=pow2)

    # ------------------------------------------------------------------ LoRA adapters (modeling.py, lora.py)
    @property
    def adapters(self) -> list[str]:
        """Adapter names in creation order (the default per-row index space)."""
        return list(self.lora_context.configs)

    # ------------------------------------------------------------------ structure
    @property
    def num_moe_layers(self) -> int:
        return sum(1 for m in self.modules() if isinstance(m, MoE))

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (FSDP units): DeepSeek-V3's layers then its MTP modules, or GPT-2's h."""
        if self.config.model_type == "gpt2":
            return list(self.transformer.h)
        return [*self.model.layers, *self.mtp]

    def embedding(self) -> nn.Embedding:
        return self.transformer.wte if self.config.model_type == "gpt2" else self.model.embed_tokens

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embedding().weight

    def init_weights(self) -> None:
        """All initialisation, in one place.

        | parameter                                   | init                                   |
        |---------------------------------------------|----------------------------------------|
        | embeddings (wte, wpe, embed_tokens)          | N(0, std)                              |
        | every Linear weight, routed experts, gate    | N(0, std)                              |
        | GPT-2 residual outputs (attn/mlp c_proj)     | N(0, std / sqrt(2 * n_layer))  (GPT-2) |
        | lm_head (untied)                             | N(0, std)                              |
        | biases                                       | 0                                      |
        | norm weights (RMSNorm, LayerNorm)            | 1 (LayerNorm bias 0)                   |
        | e_score_correction_bias                      | 0 (fp32 buffer, not trained)           |
        std = config.initializer_range (0.006 for DeepSeek-V3, 0.02 for GPT-2). Under muP, mup.rescale_init then
        divides each hidden matrix by sqrt(m_in) and applies the zero-init switches (see mup.py).
        """
        cfg, std = self.config, self.config.initializer_range
        resid_std = std / (2 * cfg.num_hidden_layers) ** 0.5
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                is_resid = cfg.model_type == "gpt2" and name.endswith("c_proj")
                nn.init.normal_(m.weight, 0.0, resid_std if is_resid else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                if isinstance(m, nn.LayerNorm):  # RMSNorm has no bias
                    nn.init.zeros_(m.bias)
            elif isinstance(m, MoE):
                nn.init.normal_(m.gate.weight, 0.0, std)
                nn.init.zeros_(m.gate.e_score_correction_bias)
                nn.init.normal_(m.experts.gate_up_proj, 0.0, std)
                nn.init.normal_(m.experts.down_proj, 0.0, std)
        self.tie_weights()
        mup_init(self)
        self.expert_load_accum = None

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                absorb: bool = True, return_output: bool = False, adapter: str | torch.Tensor | None = None,
                adapter_names: list[str] | None = None):
        """input_ids (B, T) -> logits (B, T, V); with targets (B, T) (IGNORE_INDEX: skipped) -> ModelOutput with
        losses.

        With a KVCache, the T tokens are appended to each row of the cache at that row's own position.
        adapter: None (the base), an adapter name, or a (B,) long tensor of per-row indices into adapter_names
        (default: self.adapters), -1 = the base for that row (see linear.py).
        """
        with self.lora_context.use(adapter, adapter_names, input_ids.shape[0]):
            return self._forward(input_ids, targets, cache, absorb, return_output)

    def _forward(self, input_ids, targets, cache, absorb, return_output):
        if cache is not None:
            positions = cache.begin(input_ids.shape[1])
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        want_loss = targets is not None
        if self.config.model_type == "gpt2":
            hidden, loads, bal, rope = self._gpt2_trunk(input_ids, positions, cache), [], [], None
        else:
            hidden, loads, bal, rope = self._deepseek_trunk(input_ids, positions, cache, want_loss, absorb)
        if cache is not None:
            cache.end()
        final = self.transformer.ln_f(hidden) if self.config.model_type == "gpt2" else self.model.norm(hidden)
        logits = self.readout(final)
        if not want_loss:
            return ModelOutput(logits=logits, expert_load=self._stack_loads(loads), hidden=hidden) \
                if return_output else logits

        main_loss = cross_entropy(logits, targets)
        loss, mtp_loss = main_loss, None
        if self.config.model_type == "deepseek_v3" and len(self.mtp) and self.config.mtp_loss_weight > 0:
            mtp_loss = self._mtp_loss(input_ids, targets, hidden, rope, loads, bal)
            loss = loss + self.config.mtp_loss_weight * mtp_loss
        balance = torch.stack(bal).sum() if bal else None
        if balance is not None:
            loss = loss + balance
        load = self._stack_loads(loads)
        if self.training and load is not None:
            if self.expert_load_accum is None:
                self.expert_load_accum = torch.zeros(self.num_moe_layers, load.shape[1], device=load.device)
            self.expert_load_accum[: load.shape[0]] += load  # MTP rows stay 0 when MTP is off
        return ModelOutput(logits=logits, loss=loss, main_loss=main_loss, mtp_loss=mtp_loss,
                           balance_loss=balance, expert_load=load, hidden=hidden)

    def _gpt2_trunk(self, input_ids, positions, cache):
        t = self.transformer
        x = t.wte(input_ids) + t.wpe(positions)
        x = t.drop(x if self.config.embedding_multiplier == 1.0 else x * self.config.embedding_multiplier)
        for block in t.h:
            x = self._block(block, x, cache)
        return x

    def _deepseek_trunk(self, input_ids, positions, cache, want_loss, absorb):
        m = self.model
        x = self.embed(input_ids)
        cos, sin = m.rotary(positions.expand(input_ids.shape[0], -1), x.dtype)
        loads, bal = [], []
        for layer in m.layers:
            x, load, loss = self._block(layer, x, m.rotary, cos, sin, cache, want_loss, absorb)
            self._collect(load, loss, loads, bal)
        return x, loads, bal, (cos, sin)

    def _block(self, block: nn.Module, *args):
        """block(*args), under activation checkpointing while training: only the block's input is kept, its
        activations are recomputed in the backward (same dropout masks: the RNG state is replayed)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return recomputed(block, self.lora_context, *args)  # the active adapters are replayed too
        return block(*args)

    @staticmethod
    def _collect(load, loss, loads, bal):
        if load is not None:
            loads.append(load)
        if loss is not None:
            bal.append(loss)

    def _stack_loads(self, loads):
        return torch.stack(loads).float() if loads else None

    def _mtp_loss(self, input_ids, targets, hidden, rope, loads, bal):
        """Mean over depths k of CE(predict t_{i+k+1} from h^{k-1}_i and emb(t_{i+k}))."""
        m, T = self.model, input_ids.shape[1]
        cos, sin = rope  # the main trunk's tables: same positions, same dtype
        h, losses = hidden, []
        for k, layer in enumerate(self.mtp, start=1):
            shifted = torch.roll(input_ids, -k, dims=1)  # token i+k at position i (last k wrap: ignored)
            tgt = torch.roll(targets, -k, dims=1)
            tgt[:, T - k:] = IGNORE_INDEX
            h, normed, load, loss = layer(self.embed(shifted), h, m.rotary, cos, sin, want_loss=True)
            self._collect(load, loss, loads, bal)
            logits = self.readout(normed)
            losses.append(cross_entropy(logits, tgt))
        return torch.stack(losses).mean()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 token embeddings (B, T, H), times config.embedding_multiplier."""
        x = self.model.embed_tokens(input_ids)
        return x if self.config.embedding_multiplier == 1.0 else x * self.config.embedding_multiplier

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> logits (..., V); muP's 1/m output multiplier acts here (1 under SP)."""
        mult = output_multiplier(self.config)
        return self.lm_head(h if mult == 1.0 else h * mult)

    # ------------------------------------------------------------------ balancing
    @torch.no_grad()
    def update_router_bias(self, gamma: float, loads: torch.Tensor | None = None) -> None:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean_load - load_i), per MoE layer.

        loads (n_moe_layers, E): defaults to the loads accumulated since the last call (then reset). Under
        data parallelism, all-reduce `expert_load_accum` (sum) before calling.
        """
        loads = self.expert_load_accum if loads is None else loads
        self.expert_load_accum = None
        if self.config.router_balance != "aux_free" or loads is None:
            return
        for moe, load in zip(self.moe_layers(), loads):
            load = load.float().to(moe.gate.e_score_correction_bias.device)
            moe.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)

    # ------------------------------------------------------------------ generation
    def make_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.config, batch_size, max_len, device=p.device, dtype=dtype or p.dtype)

    def make_mtp_caches(self, batch_size: int, max_len: int, dtype=None) -> list[KVCache]:
        """One KVCache per MTP module (its own latent layer L + k, its own per-row lengths)."""
        p, L = next(self.parameters()), self.config.num_hidden_layers
        return [KVCache(self.config, batch_size, max_len, device=p.device, dtype=dtype or p.dtype, num_layers=1,
                        first_layer=L + k) for k in range(len(self.mtp))]

    def mtp_forward(self, k: int, input_ids: torch.Tensor, hidden: torch.Tensor, cache: KVCache,
                    adapter: str | torch.Tensor | None = None, adapter_names: list[str] | None = None):
        """MTP module k (0-based) with its own cache: input_ids (B, T) the tokens it embeds (t_{i+k+1} at position
        i), hidden (B, T, H) the previous depth's h -> (h^{k+1} (B, T, H), logits (B, T, V) for t_{i+k+2}).
        The row's adapter applies here too (LoRA targets include the MTP modules)."""
        with self.lora_context.use(adapter, adapter_names, input_ids.shape[0]):
            positions = cache.begin(input_ids.shape[1])  # (B, T) each row from its own length
            emb = self.embed(input_ids)
            cos, sin = self.model.rotary(positions, emb.dtype)
            h, normed, _, _ = self.mtp[k](emb, hidden, self.model.rotary, cos, sin, cache=cache)
            cache.end()
            return h, self.readout(normed)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | None = None, adapter: str | torch.Tensor | None = None,
                 adapter_names: list[str] | None = None, prompt_lengths: torch.Tensor | None = None,
                 speculative: bool = False, num_speculative_tokens: int | None = None,
                 return_stats: bool = False, compile: bool = False):
        """Continue each row of input_ids (B, T) by up to max_new_tokens tokens using the KV cache.

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature) restricted to the top_k
        tokens and/or the smallest set with probability >= top_p. Rows that emit eos_token_id keep emitting it;
        generation stops early when every row has. `adapter`/`adapter_names` as in forward. Returns (B, T + n)
        with n <= max_new_tokens.
        prompt_lengths (B,): rows are left-aligned prompts of these lengths (the rest of a row is ignored); row b
        of the result is its prompt, its new tokens, then padding (eos_token_id, else 0).
        speculative: the MTP modules draft num_speculative_tokens tokens (default num_nextn_predict_layers; more
        than that reuses the last module) and the model verifies them in one forward (decoding.py); the output
        is the same as without it (token for token when greedy, in distribution when sampling).
        return_stats: also return a dict (forwards; for speculative decoding also the acceptance by draft
        position and the mean accepted length), as (tokens, stats).
        compile: torch.compile the one-token decode step (plain decoding without adapters; fastdecode.py). The
        first call per shape compiles (seconds on a GPU, minutes on a busy CPU); the output is the same.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        B, T = input_ids.shape
        limit = self.config.max_position_embeddings
        if T + max_new_tokens > limit:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_position_embeddings={limit}")
        check_sampling(temperature, top_k, top_p)
        k = decoding.check_speculative(self.config, speculative, num_speculative_tokens)
        lengths = decoding.check_prompt_lengths(prompt_lengths, B, T, input_ids.device)
        was_training = self.training
        self.eval()
        try:
            gen = None if seed is None else torch.Generator(device=input_ids.device).manual_seed(seed)
            run = decoding.Decode(self, input_ids, lengths, max_new_tokens, temperature, top_k, top_p, gen,
                                  eos_token_id, adapter, adapter_names, compile)
            out, stats = decoding.speculative_decode(run, k) if speculative else decoding.plain_decode(run)
        finally:
            self.train(was_training)
        return (out, stats) if return_stats else out


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over targets != IGNORE_INDEX (fp32); 0, not NaN, when a batch has no target at all."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
