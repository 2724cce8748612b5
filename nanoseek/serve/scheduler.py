"""Scheduler: continuous batching with chunked prefill, preemption by recompute, prefix-cache admission, adapter slots.

What. Every step `schedule()` picks rows and how many new tokens each computes, under `max_batch_tokens` and
`max_num_seqs`:
  1. running requests first, in arrival order: a decode row computes 1 token (speculative engines: 1 + the
     `lookahead(seq)` drafts it verifies), a partly prefilled one its next chunk. A row that needs a block the
     pool cannot give preempts the most recently admitted running request (its blocks freed, itself requeued
     at the front of the waiting queue keeping its generated tokens; it will re-prefill prompt + generated
     tokens later, which recomputes the same cache).
  2. then waiting requests in FIFO order, while budget, seats, pool blocks and adapter slots allow: the longest
     prefix of full blocks found in the prefix cache is reused, the rest is prefilled in chunks.
A long prompt therefore never stalls running decodes: it only takes what budget the decodes leave.
`AdapterSlots` keeps at most `max_loras` adapters resident (the set a forward stacks); a request whose adapter
is not resident takes a free slot or the least recently used slot that no running request uses, else waits.
Rejected: swapping a request's blocks to host memory on preemption (vLLM's swap mode) - recompute is simpler
and, with short contexts and prefix caching, cheap; reserving a request's blocks for max_tokens up front - it
caps concurrency far below what the pool holds.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager, block_hash
from .detokenizer import Detokenizer
from .sampling import SamplingParams
from .speculative import SpecState


@dataclass(eq=False)  # identity: a request is itself, not its field values
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    adapter: str | None  # internal adapter name (name__v<n>: unique per load), None = the base
    detok: Detokenizer
    gen: torch.Generator
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the pool
    keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of blocks[:len(keys)]
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted: bool = False
    counts: torch.Tensor | None = None  # (V,) generated-token counts, for penalties
    spec: SpecState | None = None  # speculative engines: MTP state, from admission until release

    @property
    def adapter_key(self) -> str:
        """Prefix-cache key part: the internal name, new on every load, so a reload never meets old blocks."""
        return self.adapter or ""

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


class AdapterSlots:
    """At most `capacity` adapters resident, least recently used first."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.resident: OrderedDict[str, None] = OrderedDict()

    def acquire(self, name: str | None, in_use: set[str]) -> bool:
        if name is None:
            return True
        if name in self.resident:
            self.resident.move_to_end(name)
            return True
        if len(self.resident) >= self.capacity:
            victim = next((n for n in self.resident if n not in in_use), None)
            if victim is None:
                return False
            del self.resident[victim]
        self.resident[name] = None
        return True

    def drop(self, name: str) -> None:
        self.resident.pop(name, None)

    def names(self) -> list[str]:
        return list(self.resident)


class Scheduler:
    def __init__(self, blocks: BlockManager, block_size: int, max_batch_tokens: int, max_num_seqs: int,
                 max_loras: int, lookahead: Callable[[Sequence], int] | None = None):
        self.blocks, self.block_size = blocks, block_size
        self.lookahead = lookahead  # speculative engines: drafts a decode row verifies this step
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.slots = AdapterSlots(max_loras)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_hits = 0  # tokens
        self.prefix_queries = 0  # tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted request and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free_all(seq.blocks)
        seq.blocks, seq.keys, seq.num_computed, seq.spec = [], [], 0, None

    def trim(self, seq: Sequence) -> None:
        """Free the blocks past seq's computed tokens (rejected drafts' slots); they hold no published token."""
        keep = -(-seq.num_computed // self.block_size)
        self.blocks.free_all(seq.blocks[keep:])
        del seq.blocks[keep:]

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make seq's block table cover num_tokens tokens; False (nothing allocated) if the pool can't."""
        need = -(-num_tokens // self.block_size) - len(seq.blocks)
        if need > self.blocks.num_free:
            return False
        seq.blocks.extend(self.blocks.allocate() for _ in range(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _match_prefix(self, seq: Sequence) -> int:
        """Reuse cached full blocks of seq's tokens (at least one token is left to compute); returns tokens hit."""
        bs, tokens, parent = self.block_size, seq.tokens, b""
        for i in range((seq.num_tokens - 1) // bs):
            key = block_hash(parent, seq.adapter_key, tokens[i * bs: (i + 1) * bs])
            block = self.blocks.lookup(key)
            if block is None:
                break
            seq.blocks.append(block)
            seq.keys.append(key)
            parent = key
        seq.num_computed = len(seq.blocks) * bs
        return seq.num_computed

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's rows: (sequence, number of new tokens to compute)."""
        budget, batch, preempted = self.max_batch_tokens, [], False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n == 1 and self.lookahead is not None:  # a decode row: its last token plus k_b drafts
                n += min(self.lookahead(seq), budget - 1)
            if self._grow(seq, seq.num_computed + n):
                batch.append((seq, n))
                budget -= n
                i += 1
            else:
                self._preempt(self.running[-1])  # the newest; may be seq itself
                preempted = True
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not self.slots.acquire(seq.adapter, {s.adapter for s in self.running if s.adapter}):
                break
            hit = self._match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._release(seq)
                break
            self.waiting.popleft()
            self.prefix_hits += hit
            self.prefix_queries += seq.num_tokens
            if not seq.admitted:
                seq.num_cached_tokens, seq.admitted = hit, True
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def advance(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq are in the pool: make its newly full blocks findable in the prefix cache."""
        seq.num_computed += n
        bs, tokens = self.block_size, None
        while (len(seq.keys) + 1) * bs <= seq.num_computed:
            tokens = tokens or seq.tokens
            k = len(seq.keys)
            key = block_hash(seq.keys[-1] if seq.keys else b"", seq.adapter_key, tokens[k * bs: (k + 1) * bs])
            self.blocks.register(seq.blocks[k], key)
            seq.keys.append(key)
