"""Paged KV cache: one preallocated block pool, and the per-step view the model attends through.

What. `KVPool` holds every block of every layer: MLA `latent` (L, num_blocks * block_size, kv_lora_rank +
qk_rope_head_dim) = [c_kv ; k_pe] per token (nothing per head), GPT-2 `k`, `v` (L, num_blocks * block_size, H, D).
With `mtp_layers=D` (speculative serving) the latent has L + D layers: MTP module k's attention is layer L + k.
`PagedCache` is what one engine step hands to `Model.forward(cache=...)`: it has the interface of
`nanoseek.model.attention.KVCache` (`begin(T)` -> positions (B, T), `mask` (B, 1, T, S), `update_latent`,
`update_kv`, `end()`), built from per-row block tables, start positions and numbers of new tokens. Rows are
padded to a rectangle (decode rows 1 token, prefill chunks many): only valid tokens are written to the pool;
a padded query repeats its row's last valid position, so it attends only valid slots (finite values, never
read); slots past a row's length are masked out.
Why a gather on CPU: `update_latent` returns the row's blocks gathered into (B, S, W) and the model's absorbed
MLA path attends over it unchanged (the latent is never expanded per head). A paged attention kernel that
reads the blocks in place (FlashMLA / a Triton kernel) would avoid the copy on a GPU; that waits for one.
Rejected: one contiguous cache per request (vLLM's motivation: fragmentation and no sharing between requests).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def block_tables(tables: list[list[int]]) -> torch.Tensor:
    """Per-row block id lists -> (B, max_blocks) long, padded with block 0 (never read: masked)."""
    out = torch.zeros(len(tables), max(len(t) for t in tables), dtype=torch.long)
    for b, t in enumerate(tables):
        out[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    return out


class KVPool:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, device=None, dtype=torch.float32,
                 mtp_layers: int = 0):
        self.mla = cfg.model_type == "deepseek_v3"
        self.num_blocks, self.block_size = num_blocks, block_size
        L, slots = cfg.num_hidden_layers + mtp_layers, num_blocks * block_size
        if self.mla:
            self.latent = torch.zeros(L, slots, cfg.kv_lora_rank + cfg.qk_rope_head_dim, device=device, dtype=dtype)
        else:
            self.k = torch.zeros(L, slots, cfg.num_attention_heads, cfg.head_dim, device=device, dtype=dtype)
            self.v = torch.zeros_like(self.k)

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype=torch.float32, mtp_layers: int = 0) -> int:
        return ((cfg.num_hidden_layers + mtp_layers) * cfg.kv_cache_values_per_layer
                * torch.empty((), dtype=dtype).element_size())


class PagedCache:
    """One step's view of the pool for B rows: row b holds `starts[b]` cached tokens and gets `n_new[b]` new ones."""

    def __init__(self, pool: KVPool, block_tables: torch.Tensor, starts: torch.Tensor, n_new: torch.Tensor):
        self.pool = pool
        self.block_tables = block_tables  # (B, max_blocks) long, padded with block 0
        self.starts = starts  # (B,) long
        self.n_new = n_new  # (B,) long, >= 1
        self.positions: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.starts.shape[0]

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        """Positions (B, N) -> pool slot indices (B, N) through each row's block table."""
        bs = self.pool.block_size
        return self.block_tables.gather(1, pos // bs) * bs + pos % bs

    def begin(self, T: int) -> torch.Tensor:
        dev = self.starts.device
        t = torch.arange(T, device=dev)
        self.valid = t[None, :] < self.n_new[:, None]  # (B, T)
        last = self.starts + self.n_new - 1  # (B,) last valid position
        self.positions = torch.minimum(self.starts[:, None] + t, last[:, None])  # (B, T), padding repeats `last`
        S = int(last.max()) + 1
        s = torch.arange(S, device=dev)
        self.read_slots = self._slots(s[None, :].expand(self.batch_size, S).minimum(last[:, None]))  # (B, S)
        self.write_slots = self._slots(self.positions)[self.valid]  # (N,) valid tokens only
        self.mask = s[None, None, None, :] <= self.positions[:, None, :, None]  # (B, 1, T, S)
        return self.positions

    def end(self) -> None:
        pass  # lengths live in the scheduler

    def update_latent(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        """new (B, T, W) -> this layer's cached latents (B, S, W), the new ones included."""
        pool = self.pool.latent[layer]
        pool.index_copy_(0, self.write_slots, new[self.valid].to(pool.dtype))
        return pool[self.read_slots]

    def update_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, H, T, D) -> cached (B, H, S, D) each."""
        out = []
        for pool, new in ((self.pool.k[layer], k), (self.pool.v[layer], v)):
            pool.index_copy_(0, self.write_slots, new.transpose(1, 2)[self.valid].to(pool.dtype))  # (N, H, D)
            out.append(pool[self.read_slots].transpose(1, 2))  # (B, H, S, D)
        return out[0], out[1]
