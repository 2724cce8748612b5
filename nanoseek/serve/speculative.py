"""MTP speculative decoding inside the serving engine: draft with the MTP modules, verify in the main forward.

What. With `EngineConfig(speculative=True)` a decode row of an engine step computes 1 + k_b tokens instead of 1:
  draft    before the main forward, `Drafter.draft` runs MTP module j = 1..D (chained) for every row of the
           batch over the positions whose inputs became known since the row's last step (the previous prefill
           chunk, or the last verify's accepted tokens), and for decode rows one position further: module j
           at position n-1 (n = tokens in the main cache) reads h^{j-1}_{n-1} and t_{n-1+j} (a draft for j > 1)
           and proposes d_j; k_b > D reuses module D one position further on, its own output as h (as
           `Model.generate` does). At temperature 0 d_j is the argmax, else it is sampled from q = the MTP
           distribution after the row's temperature / top-k / top-p, with the row's own generator.
  verify   the main forward runs [t_n, d_1 .. d_k_b] for the row (ragged: prefill chunks and decode rows of
           other lengths share the padded batch); `verify` applies the row's penalties (counting the drafts
           before each position) and calls `nanoseek.model.accept_drafts` on that row alone, with its own
           generator: greedy accepts while d_j == argmax, sampling accepts with probability min(1, p/q).
  rollback the engine appends the accepted tokens one by one (eos / stop strings / max_tokens cut them), counts
           only the kept positions as computed (`Scheduler.advance`), and frees the blocks past them
           (`Scheduler.trim`); rejected slots in the last partial block are masked and overwritten later.
k_b = min(k, max_tokens - generated - 1), so a verify never runs past a request's last position; a row
whose MTP state is not ready (just admitted) decodes one plain token first.
MTP caches: module j's latent is layer L + j - 1 of the same paged pool (`KVPool(mtp_layers=D)`), addressed
through the row's own block table. Module j's slot i holds its latent for (h^{j-1}_i, t_{i+j}) and counts as
kept once t_{i+j} is verified, so `SpecState.lens[j-1]` = N - j (N = verified tokens), never below `floor`
(the prefix-cache hit at admission: the main model skipped those positions, so no h^0 exists there; their MTP
slots hold what the block's first writer left). `SpecState.hidden[j]` keeps h^j of the positions module j+1
has not consumed yet (a few per row; h^0 comes from the main forward's `ModelOutput.hidden`).
Correctness (the tokens and their distribution) depends only on the main model's cache, the verify forward
and the acceptance rule; the MTP caches only decide how good the drafts are.

Why this design. The MTP latent in the main pool needs no second allocator, preemption frees it with the
row's blocks, and a decode row's blocks already cover every position a draft writes. One MTP forward per
module per step serves every row (catch-up and drafting together), so a batch of 16 pays D small forwards.
Rejected: per-sequence contiguous MTP caches (one forward per row, or a gather of B caches per step); a
separate MTP block pool (a second allocator and the same no-h^0-under-a-prefix-hit problem); recomputing the
MTP latents under a prefix hit (needs the main model's hidden states the prefix cache exists to skip);
drafting greedily at temperature > 0 (acceptance needs the q the draft was drawn from).
Known cost: the shared blocks' last j MTP slots were written by the first request with that prefix; a later
request that continues differently gets a slightly worse draft there, never a different output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import accept_drafts, filtered_probs
from .paged_cache import KVPool, PagedCache, block_tables
from .sampling import penalize, sample_token


def adapter_index(rows: list[int], device) -> torch.Tensor | None:
    """Per-row adapter indices (-1 = the base) -> the model's `adapter` argument (None when all rows are base)."""
    return None if all(r == -1 for r in rows) else torch.tensor(rows, device=device)


class Window:
    """Hidden states (m, H) of the consecutive positions [start, start + m)."""

    def __init__(self, start: int):
        self.start, self.h = start, None

    @property
    def end(self) -> int:
        return self.start + (0 if self.h is None else self.h.shape[0])

    def put(self, pos: int, h: torch.Tensor) -> None:
        """h (c, H) of positions [pos, pos + c) (overwriting any from pos on); pos within [start, end]. A copy
        is kept, not a view of the batch's hidden states (that would keep the whole batch tensor alive)."""
        assert self.start <= pos <= self.end, (self.start, pos, self.end)
        self.h = h.clone() if self.h is None or pos == self.start else torch.cat([self.h[: pos - self.start], h])

    def get(self, a: int, b: int) -> torch.Tensor:
        assert self.start <= a <= b <= self.end, (self.start, a, b, self.end)
        return self.h[a - self.start: b - self.start]

    def keep(self, a: int, b: int | None = None) -> None:
        """Restrict to positions [a, b) (a >= start)."""
        lo, hi = a - self.start, self.end - self.start if b is None else min(b, self.end) - self.start
        self.h = self.h[lo:hi] if self.h is not None and hi > lo else None
        self.start = a


class SpecState:
    """One sequence's MTP state: kept length of each module's cache and the hidden states still to consume."""

    def __init__(self, num_modules: int, floor: int):
        self.floor = floor  # positions below it were a prefix-cache hit: no h^0, MTP slots as found
        self.lens = [floor] * num_modules  # lens[j-1]: module j's kept slots
        self.hidden = [Window(floor) for _ in range(num_modules)]  # hidden[j]: h^j at [lens[j], ...)


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)  # d_1 .. d_k_b
    q: list[torch.Tensor] = field(default_factory=list)  # (V,) each, the distributions they were drawn from


@dataclass
class SpecCounters:
    """Acceptance over the engine's life: per draft position, over verify rows that drafted that position."""

    k: int
    verify_rows: int = 0  # (row, step) pairs that verified at least one draft
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.drafted, self.accepted = [0] * self.k, [0] * self.k

    def update(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            return
        self.verify_rows += 1
        for j in range(num_drafts):
            self.drafted[j] += 1
            self.accepted[j] += j < num_accepted

    def as_dict(self) -> dict:
        return {"spec_num_tokens": self.k, "spec_verify_rows": self.verify_rows,
                "spec_draft_tokens": list(self.drafted), "spec_accepted_tokens": list(self.accepted),
                "spec_acceptance_by_position": [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)],
                "spec_mean_accepted_length": 1 + sum(self.accepted) / self.verify_rows if self.verify_rows else 0.0}


class Drafter:
    """The MTP phase of a speculative engine step (see the module docstring)."""

    def __init__(self, model, pool: KVPool, k: int):
        self.model, self.pool, self.k = model, pool, k
        self.D = len(model.mtp)
        self.device = pool.latent.device

    def draft(self, seqs: list, ks: list[int], adapters: list[int], names: list[str]) -> list[Draft]:
        """seqs of this step's rows (their `spec` set), ks their draft counts (0: catch up only), adapters their
        adapter indices into names -> one Draft per row."""
        n = [s.num_computed for s in seqs]
        N = [s.num_tokens for s in seqs]
        ext = [s.tokens for s in seqs]  # verified tokens, then this step's drafts
        drafts = [Draft() for _ in seqs]
        last_h: list[torch.Tensor | None] = [None] * len(seqs)  # h^j at the draft position, for reuse
        for j in range(1, self.D + 1):
            spans = [(s.spec.lens[j - 1], n[b] if j <= ks[b] else min(n[b], N[b] - j)) for b, s in enumerate(seqs)]
            items = [(b, a, [ext[b][i + j] for i in range(a, e)], seqs[b].spec.hidden[j - 1].get(a, e))
                     for b, (a, e) in enumerate(spans) if e > a]
            if items:
                h, logits = self._run(j - 1, items, seqs, adapters, names)
                for i, (b, a, ids, _) in enumerate(items):
                    c = len(ids)
                    if j < self.D:
                        seqs[b].spec.hidden[j].put(a, h[i, :c])
                    if j <= ks[b]:
                        self._sample(logits[i, c - 1], seqs[b], drafts[b], ext[b])
                        last_h[b] = h[i, c - 1]
            for b, s in enumerate(seqs):
                st = s.spec
                st.lens[j - 1] = max(st.floor, min(spans[b][1], N[b] - j))  # drop slots of unverified tokens
                st.hidden[j - 1].keep(st.lens[j - 1], None if j == 1 else st.lens[j - 2])
        for j in range(self.D + 1, max(ks, default=0) + 1):  # module D again, one position further each time
            items = [(b, n[b] - 1 + j - self.D, [ext[b][n[b] - 1 + j]], last_h[b][None])
                     for b in range(len(seqs)) if ks[b] >= j]
            h, logits = self._run(self.D - 1, items, seqs, adapters, names)
            for i, (b, _, _, _) in enumerate(items):
                self._sample(logits[i, 0], seqs[b], drafts[b], ext[b])
                last_h[b] = h[i, 0]
        return drafts

    def _run(self, module: int, items: list, seqs: list, adapters: list[int], names: list[str]):
        """items [(row, first position, token ids (c,), hidden (c, H))] -> h (R, C, H), logits (R, C, V)."""
        R, C, dev = len(items), max(len(ids) for _, _, ids, _ in items), self.device
        ids = torch.zeros(R, C, dtype=torch.long)
        hidden = torch.zeros(R, C, self.model.config.hidden_size, device=dev, dtype=self.pool.latent.dtype)
        for i, (_, _, toks, h) in enumerate(items):
            ids[i, : len(toks)] = torch.tensor(toks)
            hidden[i, : len(toks)] = h
        tables = block_tables([seqs[b].blocks for b, _, _, _ in items]).to(dev)
        starts = torch.tensor([a for _, a, _, _ in items], device=dev)
        counts = torch.tensor([len(t) for _, _, t, _ in items], device=dev)
        cache = PagedCache(self.pool, tables, starts, counts)
        adapter = adapter_index([adapters[b] for b, _, _, _ in items], dev)
        return self.model.mtp_forward(module, ids.to(dev), hidden, cache, adapter, names)

    @staticmethod
    def _sample(logits: torch.Tensor, seq, draft: Draft, ext: list[int]) -> None:
        """Draw the next draft from logits (V,): argmax at temperature 0, else from q with the row's generator."""
        p = seq.params
        if p.temperature == 0:
            token = int(logits.argmax())
        else:
            q = filtered_probs(logits.to(seq.gen.device), p.temperature, p.top_k, p.top_p)  # (V,)
            token = int(torch.multinomial(q, 1, generator=seq.gen))
            draft.q.append(q)
        draft.tokens.append(token)
        ext.append(token)


def verify(seq, draft: Draft, logits: torch.Tensor) -> tuple[list[int], int]:
    """The main model's logits (k_b + 1, V) on [t_n, d_1 .. d_k_b] -> (tokens to emit: the accepted drafts and
    the correction or bonus token, number of drafts accepted). Penalties count the drafts before each position."""
    p, k = seq.params, len(draft.tokens)
    if k == 0:
        return [sample_token(logits[0], p, seq.counts, seq.gen)], 0
    d = torch.tensor(draft.tokens, device=logits.device)
    counts = None
    if seq.counts is not None:  # counts after t_n, d_1, ..., d_j at position j
        seen = torch.nn.functional.one_hot(d, logits.shape[-1]).to(seq.counts.dtype).cumsum(0)  # (k, V)
        counts = seq.counts + torch.cat([torch.zeros_like(seen[:1]), seen])  # (k + 1, V)
    target = penalize(logits.float(), p, counts).to(seq.gen.device)  # (k + 1, V)
    d = d.to(seq.gen.device)
    if p.temperature == 0:
        a, tokens = accept_drafts(d[None], target[None])
    else:
        probs = filtered_probs(target, p.temperature, p.top_k, p.top_p)
        a, tokens = accept_drafts(d[None], probs[None], torch.stack(draft.q)[None], seq.gen)
    a = int(a[0])
    return tokens[0, : a + 1].tolist(), a
