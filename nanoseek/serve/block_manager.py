"""Block manager: which pool blocks are free, who holds each block, and the prefix cache over full blocks.

What. The KV pool is `num_blocks` blocks of `block_size` tokens. A request owns a block table (list of block
ids). `allocate()` hands out a block (a free one, else the least recently used cached block nobody holds);
`free(block)` drops one reference. Prefix caching: once a block is full its content is fixed, so it is keyed by
`block_hash(parent_key, adapter_key, tokens)` - a chain hash over all tokens up to the block's end and the
adapter's name and load version - and later requests with the same key reuse it (`lookup`). Cached blocks with
no holder stay cached until evicted (LRU), so a shared system prompt is computed once.
Why a chain hash of (parent, tokens) rather than the tokens of the block alone: a block's K/V depends on every
earlier token. Why the adapter key: LoRA changes every layer's K/V; the key carries a version bumped on each
load, so an adapter reloaded under the same name never reuses the old adapter's blocks.
Rejected: copy-on-write of partial blocks (only full blocks are shared; a request's last, partial block is
always its own), a radix tree (SGLang) - a flat hash map is enough for block-granular prefixes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import torch


def block_hash(parent: bytes, adapter_key: str, tokens: list[int]) -> bytes:
    """Key of a full block: sha256 over the previous block's key, the adapter key and this block's tokens."""
    h = hashlib.sha256(parent)
    h.update(adapter_key.encode())
    h.update(torch.tensor(tokens, dtype=torch.int64).numpy().tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the KV pool needs at least one block")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.free_list: deque[int] = deque(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # key -> block
        self.key_of: dict[int, bytes] = {}  # block -> key (cached blocks only)
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced blocks, LRU first

    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out now (free or evictable)."""
        return len(self.free_list) + len(self.evictable)

    def allocate(self) -> int | None:
        if self.free_list:
            block = self.free_list.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.key_of.pop(block)]
        else:
            return None
        self.ref[block] = 1
        return block

    def free(self, block: int) -> None:
        self.ref[block] -= 1
        assert self.ref[block] >= 0, f"block {block} freed twice"
        if self.ref[block] == 0:
            if block in self.key_of:
                self.evictable[block] = None
            else:
                self.free_list.append(block)

    def free_all(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # tail blocks first: they are the least likely to be shared again
            self.free(b)

    def lookup(self, key: bytes) -> int | None:
        """The cached block with this key, now held once more by the caller; None on a miss."""
        block = self.cached.get(key) if self.enable_prefix_caching else None
        if block is None:
            return None
        if self.ref[block] == 0:
            del self.evictable[block]
        self.ref[block] += 1
        return block

    def register(self, block: int, key: bytes) -> None:
        """`block` is full with the content `key` names: make it findable (first writer wins)."""
        if self.enable_prefix_caching and key not in self.cached and block not in self.key_of:
            self.cached[key] = block
            self.key_of[block] = key
