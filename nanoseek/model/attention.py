"""Attention: GPT-2 multi-head attention and DeepSeek's Multi-head Latent Attention (MLA), with a decode cache.

MLA (DeepSeek-V3 report section 2.1.1), symbols as in the paper:
    c_q  = q_a_layernorm(q_a_proj(h))                     (B, T, q_lora_rank)   [or q = q_proj(h)]
    q    = q_b_proj(c_q) -> per head [q_nope ; q_pe]       (B, H, T, nope + rope)
    [c_kv ; k_pe] = kv_a_proj_with_mqa(h); c_kv = kv_a_layernorm(c_kv)
    [k_nope ; v] = kv_b_proj(c_kv) per head                (B, H, T, nope + v)
    RoPE on q_pe and on k_pe (one rope key shared by all heads).
The cache keeps only [c_kv ; k_pe] per token: kv_lora_rank + qk_rope_head_dim numbers per layer.

Two ways to attend over the cache:
  naive     expand the cached latent with kv_b_proj into per-head keys/values (what training does).
  absorbed  fold kv_b_proj's key half W_UK into the query (q_lat = q_nope W_UK, (B, H, T, kv_lora_rank)) and
            apply the value half W_UV after attention. The attention is then multi-query attention whose
            key is the cached [c_kv ; k_pe] itself and whose value is c_kv: the cache is never expanded. The
            H heads are run as H*T queries of one head (B, 1, H*T, r + dr), so the key is read once, not H
            times (an expanded (B, H, S, r + dr) key made batch-32 decoding several times slower on CPU).
Decoding with a cache uses the absorbed form; `absorb=False` forces the naive one (the tests compare them).

KVCache holds one length per row, so rows of different lengths share a batch (continuous batching); the
mask is built from per-row positions, never from a shared offset. `rollback(n)` forgets each row's last n[b]
tokens (speculative decoding's rejected drafts): slots past a row's length are masked out (slot <= position)
and the next tokens overwrite them, so no stale latent is ever attended to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, Rotary, softmax_scale
from .linear import linear


class KVCache:
    """Preallocated decode cache for all layers of one model, with a length per row.

    MLA: `latent` (L, B, S_max, kv_lora_rank + qk_rope_head_dim) = [c_kv ; k_pe] per token.
    MHA: `k`, `v` (L, B, H, S_max, head_dim).
    Call `begin(T)` before a forward of T new tokens per row (the model does it), `end()` after.
    `static`: every step attends over all max_len slots (unwritten ones masked), so a step's shapes never change
    and `begin` reads nothing back from the device (decoding's fast path, fastdecode.py); the caller guarantees
    that lengths stay <= max_len (a write past it raises an index error instead of the overflow message).
    `first_layer`: the layer index of the first cached layer (an MTP module's own cache holds layer L + k only).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32,
                 num_layers: int | None = None, first_layer: int = 0, static: bool = False):
        self.mla = cfg.model_type == "deepseek_v3"
        self.max_len = max_len
        self.static = static
        self.first_layer = first_layer
        L = cfg.num_hidden_layers if num_layers is None else num_layers
        if self.mla:
            width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
            self.latent = torch.zeros(L, batch_size, max_len, width, device=device, dtype=dtype)
            self._latent = self._views(self.latent)
        else:
            shape = (L, batch_size, cfg.num_attention_heads, max_len, cfg.head_dim)
            self.k = torch.zeros(shape, device=device, dtype=dtype)
            self.v = torch.zeros(shape, device=device, dtype=dtype)
            self._k, self._v = self._views(self.k), self._views(self.v)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rows = torch.arange(batch_size, device=device)[:, None]  # (B, 1) for per-row slot writes
        self.positions: torch.Tensor | None = None  # (B, T) positions of this step's tokens
        self.mask: torch.Tensor | None = None  # (B, 1, T, S) True = may attend
        self.span = 0  # S: cache slots this step attends over

    def _views(self, buf: torch.Tensor) -> list[torch.Tensor] | None:
        """A static cache's per-layer views, made once: a compiled step writes its new slots through them in
        place, where indexing the stacked buffer per step (`buf[layer]`) made Inductor rewrite all of it every
        step (55 ms of a GPT-2 batch-32 step; BENCHMARKS.md, "Fast by default, third session"). Only static
        caches keep them (decoding, under no_grad): a view made before a write that records autograd history
        could not be written again in grad mode."""
        return [buf[i] for i in range(buf.shape[0])] if self.static else None

    def _layer(self, buf: torch.Tensor, views: list[torch.Tensor] | None, layer: int) -> torch.Tensor:
        """Cached layer `layer` of `buf`: a static cache's view made once (_views), else indexed now."""
        return views[layer] if views is not None else buf[layer]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    def begin(self, T: int) -> torch.Tensor:
        """Positions (B, T) of T new tokens per row; builds this step's causal mask."""
        self.positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)
        if self.static:  # fixed shapes and no host sync: attend over every slot (the caller sizes max_len)
            self.span = self.max_len
        else:
            self.span = int(self.lengths.max()) + T
            if self.span > self.max_len:
                raise ValueError(f"KVCache overflow: {self.span} tokens > max_len={self.max_len}")
        slots = torch.arange(self.span, device=self.lengths.device)
        self.mask = slots[None, None, None, :] <= self.positions[:, None, :, None]
        return self.positions

    def end(self) -> None:
        self.lengths += self.positions.shape[1]

    def rollback(self, n: torch.Tensor | int) -> None:
        """Forget the last n[b] tokens of each row b (n (B,) long or one int for every row)."""
        n = torch.as_tensor(n, device=self.lengths.device)
        if bool((n < 0).any()) or bool((n > self.lengths).any()):
            raise ValueError(f"rollback {n.tolist()} outside 0..lengths {self.lengths.tolist()}")
        self.lengths -= n

    def update_latent(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        """new (B, T, W) -> all cached latents (B, S, W) of this layer, including the new ones."""
        layer -= self.first_layer
        cache = self._layer(self.latent, self._latent, layer)
        cache[self.rows, self.positions] = new.to(cache.dtype)
        return cache[:, : self.span]

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, T, D) -> cached (B, H, S, D) each."""
        layer -= self.first_layer
        kc, vc = self._layer(self.k, self._k, layer), self._layer(self.v, self._v, layer)
        kc[self.rows, :, self.positions] = k.transpose(1, 2).to(kc.dtype)  # (B, T, H, D) into slots (rows, positions)
        vc[self.rows, :, self.positions] = v.transpose(1, 2).to(vc.dtype)
        return kc[:, :, : self.span], vc[:, :, : self.span]


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.c_attn = linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.c_proj = linear(cfg.hidden_size, cfg.hidden_size, bias=True)
        self.attn_pdrop = cfg.attn_pdrop
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)
        self.scale = self.head_dim ** -0.5 * cfg.attention_multiplier  # alpha_attn (mup.py)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        p = self.attn_pdrop if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=self.scale)
        else:
            k, v = cache.update_kv(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, dropout_p=p, scale=self.scale)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLA(nn.Module):
    """Multi-head Latent Attention; parameter names are HF DeepseekV3Attention's."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        qk = cfg.qk_head_dim
        self.has_q_lora = cfg.has_q_lora
        if not self.has_q_lora:
            self.q_proj = linear(cfg.hidden_size, self.n_head * qk)
        else:
            self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = linear(cfg.q_lora_rank, self.n_head * qk)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, self.kv_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank)
        self.kv_b_proj = linear(self.kv_rank, self.n_head * (self.nope + self.v_dim))
        self.o_proj = linear(self.n_head * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = softmax_scale(cfg) * cfg.attention_multiplier  # alpha_attn (mup.py)
        self.dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, rotary: Rotary, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, absorb: bool = True) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_head
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.has_q_lora else self.q_proj(x)
        q = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)  # (B, H, T, nope + rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope], dim=-1)  # (B, T, r), (B, T, dr)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = rotary.rotate(q_pe, cos, sin)  # (B, H, T, dr)
        k_pe = rotary.rotate(k_pe[:, None], cos, sin)  # (B, 1, T, dr)
        p = self.dropout if self.training else 0.0
        if cache is None:
            k_nope, v = self._expand(c_kv)
            k = torch.cat([k_nope, k_pe.expand(B, H, T, self.rope)], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=self.scale)
        else:
            latent = cache.update_latent(self.layer_idx, torch.cat([c_kv, k_pe[:, 0]], dim=-1))  # (B, S, r + dr)
            y = self._absorbed(q_nope, q_pe, latent, cache.mask, p) if absorb else \
                self._naive_cached(q_nope, q_pe, latent, cache.mask, p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _expand(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """c_kv (B, S, r) -> k_nope (B, H, S, nope), v (B, H, S, v)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_head, self.nope + self.v_dim).transpose(1, 2)
        return kv.split([self.nope, self.v_dim], dim=-1)

    def _naive_cached(self, q_nope, q_pe, latent, mask, p):
        B, H, T, _ = q_nope.shape
        S = latent.shape[1]
        c_kv, k_pe = latent.split([self.kv_rank, self.rope], dim=-1)
        k_nope, v = self._expand(c_kv)
        k = torch.cat([k_nope, k_pe[:, None].expand(B, H, S, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)

    def _absorbed(self, q_nope, q_pe, latent, mask, p):
        B, H, T, _ = q_nope.shape
        S = latent.shape[1]
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # (H, nope, r), (H, v, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        lora = self._absorbed_lora(B)
        if lora is not None:  # kv_b_proj's LoRA delta gamma*B_l A_l, absorbed the same way as its weight
            a, b_uk, b_uv = lora  # (B, 1, rl, r), (B, H, nope, rl), (B, H, v, rl)
            q_lat = q_lat + torch.einsum("bhtd,bhdl->bhtl", q_nope, b_uk) @ a  # (B, H, T, r)
        q = torch.cat([q_lat, q_pe], dim=-1).view(B, 1, H * T, -1)  # (B, 1, H*T, r + dr): heads as queries
        k = latent[:, None]  # (B, 1, S, r + dr): the cache is the one key of every head
        v = k[..., : self.kv_rank]  # and c_kv the value
        if mask is not None:  # (B, 1, T, S) -> (B, 1, H*T, S), the same rows for every head
            mask = mask[:, :, None].expand(B, 1, H, T, S).reshape(B, 1, H * T, S)
        o_lat = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=self.scale)
        o_lat = o_lat.view(B, H, T, self.kv_rank)  # (B, H, T, r)
        o = torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)  # (B, H, T, v)
        if lora is not None:
            o = o + torch.einsum("bhtl,bhvl->bhtv", o_lat @ a.transpose(-1, -2), b_uv)
        return o

    def _absorbed_lora(self, B: int):
        """kv_b_proj's active LoRA factors split per head for the absorbed path, or None.

        A (rl, kv_rank), gamma*B (H*(nope+v), rl), one adapter or one per row -> a (B, 1, rl, kv_rank),
        b_uk (B, H, nope, rl), b_uv (B, H, v, rl).
        """
        f = self.kv_b_proj.lora_factors()
        if f is None:
            return None
        a, b = f
        if a.dim() == 2:
            a, b = a.expand(B, *a.shape), b.expand(B, *b.shape)
        b = b.view(B, self.n_head, self.nope + self.v_dim, -1)
        return a[:, None], b[:, :, : self.nope], b[:, :, self.nope:]
