"""Decoding loops for `Model.generate`: plain (one token per forward) and MTP speculative (draft k, verify k+1).

What. Speculative decoding with the model's own Multi-Token Prediction modules (V3 report section 5.4.3):
  draft    MTP module j (1..D, chained) at position n-1 reads h^{j-1}_{n-1} and emb(t_{n-1+j}) and proposes
           d_j = t_{n+j}; for k > D the last module is reused one position further on, with its own output as
           the hidden state (as EAGLE does). Drafts are sampled from q, the MTP distribution after the same
           temperature / top-k / top-p as the main model (greedy: argmax).
  verify   the main model runs [t_n, d_1 .. d_k] (k+1 tokens per row) in ONE forward with its cache.
  accept   `accept_drafts` (a pure function): greedy accepts while d_j == argmax; sampling accepts d_j with
           probability min(1, p(d_j) / q(d_j)), at the first rejection draws from norm(max(0, p - q)), and after
           k acceptances draws a bonus token from p. Each row accepts its own prefix of a_b drafts and emits
           a_b + 1 tokens; the output equals plain decoding (token for token greedy, in distribution sampling).
  rollback every cache (main and one per MTP module) keeps exact per-row lengths: KVCache.rollback(n_per_row)
           drops the rejected tokens; slots past a row's length are masked and overwritten later.
MTP caches follow training exactly: module j's cache slot i holds its block's latent for (h^{j-1}_i, t_{i+j}).
A slot is kept only once all its inputs are verified (i <= n - j), so module j's valid length is n - j + 1;
each round module j catches up on the positions from its length to n - 1 in one ragged forward (rows padded to
the longest, the padding rolled back). `hidden[j]` (B, S, H) keeps h^j per position for module j + 1.

Why here. One file holds both loops and the output assembly (`Emitter`: per-row counts, eos, max_new_tokens),
so plain and speculative decoding share the exact same eos and padding rules; the acceptance rule and the
cache rollback are separate pieces a serving engine can call (see `accept_drafts`, `KVCache.rollback`).
Rejected: one shared length for the batch (rows accept different counts); re-running the MTP module over the
whole prefix each round (quadratic); drafting greedily at temperature > 0 (the acceptance rule needs the q the
draft was drawn from; vLLM measured 10 % vs 49 % acceptance at temperature 1).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from . import fastdecode
from .sampling import filtered_probs, sample


def check_speculative(cfg: ModelConfig, speculative: bool, num_speculative_tokens: int | None) -> int:
    """-> k, the number of drafts per round (0 when not speculative); clear errors for models without MTP."""
    if not speculative:
        if num_speculative_tokens is not None:
            raise ValueError("num_speculative_tokens needs speculative=True")
        return 0
    D = cfg.num_nextn_predict_layers if cfg.model_type == "deepseek_v3" else 0
    if D < 1:
        raise ValueError(f"speculative decoding drafts with the model's MTP modules, and this model has none "
                         f"(model_type={cfg.model_type!r}, num_nextn_predict_layers={D})")
    k = D if num_speculative_tokens is None else num_speculative_tokens
    if k < 1:
        raise ValueError(f"num_speculative_tokens={num_speculative_tokens} must be >= 1")
    return k


def check_prompt_lengths(prompt_lengths: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """-> (B,) long prompt lengths (all T when None), each in 1..T."""
    if prompt_lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=device)
    if lengths.shape != (B,) or bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"prompt_lengths {lengths.tolist()} must be ({B},) values in 1..{T}")
    return lengths


def accept_drafts(draft: torch.Tensor, target: torch.Tensor, draft_probs: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The acceptance rule. draft (B, k) tokens; target (B, k+1, V) the main model on [t_n, d_1..d_k]:
    its logits when greedy (draft_probs None), else its filtered probabilities p; draft_probs (B, k, V) the
    distributions q the drafts were sampled from.
    -> n (B,) accepted drafts per row, tokens (B, k+1): d_1..d_n, then the correction or bonus token at index n
    (entries after n are meaningless)."""
    B, k = draft.shape
    if draft_probs is None:
        best = target.argmax(-1)  # (B, k+1)
        n = (draft == best[:, :k]).long().cumprod(1).sum(1)  # (B,)
        nxt = best.gather(1, n[:, None])[:, 0]
    else:
        p_x = target[:, :k].gather(2, draft[..., None])[..., 0]  # (B, k) p(d_j)
        q_x = draft_probs.gather(2, draft[..., None])[..., 0]  # (B, k) q(d_j) > 0: d_j was drawn from q
        u = torch.rand(B, k, generator=generator, device=draft.device)
        n = (u * q_x < p_x).long().cumprod(1).sum(1)  # accept d_j with probability min(1, p/q)
        q_pad = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)  # (B, k+1, V): q = 0 bonus
        at_n = n[:, None, None].expand(B, 1, target.shape[-1])
        p_n = target.gather(1, at_n)[:, 0]  # (B, V)
        resid = (p_n - q_pad.gather(1, at_n)[:, 0]).clamp(min=0)  # max(0, p - q); = p after k acceptances
        resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p_n)  # p == q: a rejection has probability 0
        nxt = torch.multinomial(resid, 1, generator=generator)[:, 0]  # multinomial normalises
    tokens = torch.cat([draft, draft[:, :1]], dim=1).scatter(1, n[:, None], nxt[:, None])
    return n, tokens


@dataclass
class SpeculativeStats:
    """Counts over (row, round) pairs of rows still generating; `as_dict` gives the rates."""

    k: int
    rounds: int = 0  # verify forwards (one per round, all rows together)
    row_rounds: int = 0
    accepted: list[int] = field(default_factory=list)  # accepted[j]: row-rounds whose draft j+1 was accepted
    main_forwards: int = 0  # prefill + verify forwards
    mtp_forwards: int = 0

    def update(self, n: torch.Tensor, active: torch.Tensor) -> None:
        n = n[active]
        self.rounds += 1
        self.row_rounds += int(n.numel())
        counts = [int((n > j).sum()) for j in range(self.k)]
        self.accepted = [a + c for a, c in zip(self.accepted or [0] * self.k, counts)]

    def as_dict(self) -> dict:
        rr = max(self.row_rounds, 1)
        acc = self.accepted or [0] * self.k
        cond = [acc[j] / max(acc[j - 1] if j else self.row_rounds, 1) for j in range(self.k)]
        return {"speculative": True, "num_speculative_tokens": self.k, "rounds": self.rounds,
                "acceptance_by_position": [a / rr for a in acc],  # P(draft j accepted) = P(a >= j)
                "conditional_acceptance": cond,  # P(draft j accepted | drafts < j accepted)
                "mean_accepted_length": 1 + sum(acc) / rr,  # tokens per row per verify forward
                "main_forwards": self.main_forwards, "mtp_forwards": self.mtp_forwards}


class Emitter:
    """The output: each row's prompt then its new tokens; eos and max_new_tokens end a row."""

    def __init__(self, prompt: torch.Tensor, lengths: torch.Tensor, max_new: int, eos: int | None):
        B, T = prompt.shape
        self.pad = 0 if eos is None else eos
        self.buf = torch.cat([prompt, prompt.new_full((B, max_new), self.pad)], dim=1)  # (B, T + max_new)
        self.count, self.max_new, self.eos = lengths.clone(), max_new, eos
        self.new = torch.zeros_like(lengths)
        self.finished = torch.full((B,), max_new == 0, dtype=torch.bool, device=prompt.device)

    def push(self, tokens: torch.Tensor, n: torch.Tensor) -> None:
        """Append tokens[b, :n[b]] (B, m) to every unfinished row, up to eos and max_new_tokens."""
        m = tokens.shape[1]
        j = torch.arange(m, device=tokens.device)
        take = torch.minimum(n, self.max_new - self.new).masked_fill(self.finished, 0)  # (B,)
        if self.eos is not None:
            is_eos = (tokens == self.eos) & (j < take[:, None])
            first = torch.where(is_eos.any(1), is_eos.float().argmax(1), m)  # (B,) index of the first eos
            take = torch.minimum(take, first + 1)
            self.finished |= is_eos.any(1)
        b, jj = (j < take[:, None]).nonzero(as_tuple=True)
        self.buf[b, self.count[b] + jj] = tokens[b, jj]
        self.count += take
        self.new += take
        self.finished |= self.new >= self.max_new

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def result(self) -> torch.Tensor:
        width = int(self.count.max())
        out = self.buf[:, :width]
        return out.masked_fill(torch.arange(width, device=out.device) >= self.count[:, None], self.pad)


@dataclass
class Decode:
    """One generate call's inputs."""

    model: torch.nn.Module
    input_ids: torch.Tensor  # (B, T) left-aligned prompts
    lengths: torch.Tensor  # (B,) prompt lengths
    max_new: int
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None
    eos: int | None
    adapter: str | torch.Tensor | None
    adapter_names: list[str] | None
    compile: bool = False  # torch.compile the one-token step of plain decoding (fastdecode.py)

    def forward(self, ids, cache):
        return self.model(ids, cache=cache, adapter=self.adapter, adapter_names=self.adapter_names,
                          return_output=True)

    def sample(self, logits):
        return sample(logits, self.temperature, self.top_k, self.top_p, self.generator)

    def prefill(self, cache):
        """Run the prompts; -> (output, last logits (B, V)). The cache keeps each row's own prompt length."""
        out = self.forward(self.input_ids, cache)
        cache.rollback(self.input_ids.shape[1] - self.lengths)
        rows = torch.arange(self.input_ids.shape[0], device=self.lengths.device)
        return out, out.logits[rows, self.lengths - 1]


def plain_decode(run: Decode) -> tuple[torch.Tensor, dict]:
    B, T = run.input_ids.shape
    device = run.input_ids.device
    # adapters run eager; so does a step that would not compile to one graph (fastdecode.worth_compiling)
    compile = run.compile and run.adapter is None and fastdecode.worth_compiling(run.model, B, device)
    static = fastdecode.wants_static(compile, device)
    cache = fastdecode.make_cache(run.model, B, T + run.max_new, static)  # static: no host sync per step
    _, logits = run.prefill(cache)
    step = fastdecode.step_function(compile, device)
    em, forwards = Emitter(run.input_ids, run.lengths, run.max_new, run.eos), 1
    stance = contextlib.nullcontext()
    while not em.done:
        nxt = run.sample(logits)  # (B,)
        em.push(nxt[:, None], torch.ones_like(nxt))
        if em.done:
            break
        with stance:
            logits = step(run.model, nxt[:, None], cache, run.adapter, run.adapter_names)
        if compile and forwards == 1:  # the first step checked the guards (and compiled if it had to)
            stance = fastdecode.same_step_again()
        forwards += 1
    return em.result(), {"speculative": False, "main_forwards": forwards}


class Speculator:
    """State of one speculative generate: caches, verified tokens, hidden states per MTP depth."""

    def __init__(self, run: Decode, k: int):
        model, (B, T) = run.model, run.input_ids.shape
        self.run, self.k, self.D = run, k, len(model.mtp)
        S = T + run.max_new + 2 * (k + self.D) + 2  # verify and catch-up forwards run past the last kept token
        self.cache = model.make_cache(B, S)
        self.mtp_caches = model.make_mtp_caches(B, S)
        self.rows = torch.arange(B, device=run.lengths.device)
        self.seq = torch.zeros(B, S + k + self.D, dtype=torch.long, device=run.lengths.device)  # t_i, then drafts
        self.seq[:, :T] = run.input_ids
        p = next(model.parameters())
        self.hidden = torch.zeros(self.D, B, S, model.config.hidden_size, device=p.device, dtype=p.dtype)
        self.stats = SpeculativeStats(k)

    def start(self, em: Emitter) -> torch.Tensor:
        """Prefill; -> n (B,) the main cache lengths. seq[n] is the newest token (sampled, not yet run)."""
        out, logits = self.run.prefill(self.cache)
        T = self.run.input_ids.shape[1]
        self.hidden[0, :, :T] = out.hidden
        n = self.run.lengths.clone()
        t = self.run.sample(logits)
        self.seq[self.rows, n] = t
        em.push(t[:, None], torch.ones_like(t))
        self.stats.main_forwards += 1
        return n

    def draft(self, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> drafts (B, k) (also written to seq[n+1 ..]) and their distributions q (B, k, V) (None greedy)."""
        run, model, rows = self.run, self.run.model, self.rows
        drafts, qs, h = [], [], None
        for j in range(1, self.k + 1):
            if j <= self.D:
                h, logits = self._catch_up(j, n)
            else:  # reuse the last module one position further on, its own output as the hidden state
                h, logits = model.mtp_forward(self.D - 1, drafts[-1][:, None], h[:, None], self.mtp_caches[-1],
                                              run.adapter, run.adapter_names)
                h, logits = h[:, 0], logits[:, 0]
            self.stats.mtp_forwards += 1
            if run.temperature > 0:
                q = filtered_probs(logits, run.temperature, run.top_k, run.top_p)  # (B, V)
                d = torch.multinomial(q, 1, generator=run.generator)[:, 0]
                qs.append(q)
            else:
                d = logits.argmax(-1)
            self.seq[rows, n + j] = d
            drafts.append(d)
        for j, c in enumerate(self.mtp_caches[: self.k], start=1):  # keep slots whose inputs are all verified
            c.rollback(c.lengths - (n - j + 1).clamp(min=0))
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if qs else None)

    def _catch_up(self, j: int, n: torch.Tensor):
        """Module j over positions [its length, n-1] of each row -> h^j, logits (B, ...) at position n-1."""
        cache, rows = self.mtp_caches[j - 1], self.rows
        start = cache.lengths.clone()
        cnt = n - start  # (B,) >= 1
        C = int(cnt.max())
        pos = torch.minimum(start[:, None] + torch.arange(C, device=n.device), (n - 1)[:, None])  # (B, C) clamped
        h, logits = self.run.model.mtp_forward(j - 1, self.seq[rows[:, None], pos + j],
                                               self.hidden[j - 1][rows[:, None], pos], cache,
                                               self.run.adapter, self.run.adapter_names)
        cache.rollback(C - cnt)  # drop the padding
        if j < self.D:
            valid = torch.arange(C, device=n.device) < cnt[:, None]
            b, i = valid.nonzero(as_tuple=True)
            self.hidden[j][b, pos[b, i]] = h[b, i]
        last = cnt - 1
        return h[rows, last], logits[rows, last]

    def verify(self, n: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, em: Emitter) -> torch.Tensor:
        """Main forward on [t_n, d_1..d_k]; accept; roll back. -> the new n."""
        run, rows, k = self.run, self.rows, self.k
        span = n[:, None] + torch.arange(k + 1, device=n.device)  # (B, k+1) positions n..n+k
        out = run.forward(self.seq[rows[:, None], span], self.cache)
        self.stats.main_forwards += 1
        target = out.logits if q is None else filtered_probs(out.logits, run.temperature, run.top_k, run.top_p)
        acc, tokens = accept_drafts(drafts, target, q, run.generator)
        active = ~em.finished
        self.stats.update(acc, active)
        em.push(tokens, acc + 1)
        new_n = torch.where(active, n + acc + 1, n)  # finished rows stay where they are
        self.cache.rollback(n + k + 1 - new_n)
        self.hidden[0][rows[:, None], span] = out.hidden  # kept up to new_n - 1, the rest is overwritten later
        self.seq[rows[:, None], span + 1] = torch.where(active[:, None], tokens, self.seq[rows[:, None], span + 1])
        return new_n


def speculative_decode(run: Decode, k: int) -> tuple[torch.Tensor, dict]:
    em = Emitter(run.input_ids, run.lengths, run.max_new, run.eos)
    if em.done:
        return em.result(), SpeculativeStats(k).as_dict()
    spec = Speculator(run, k)
    n = spec.start(em)
    while not em.done:
        drafts, q = spec.draft(n)
        n = spec.verify(n, drafts, q, em)
    return em.result(), spec.stats.as_dict()
