"""The serving engine: requests in, RequestOutputs out, one scheduler step at a time (no threads, no server).

What. `Engine(model, tokenizer, config, adapters)`: `add_request` / `abort_request` / `step()` /
`has_unfinished_requests()`, runtime `load_adapter` / `unload_adapter`, and `stats()`. A step is
    scheduler (scheduler.py) -> block tables -> one Model.forward over a padded (B, T) batch with a PagedCache
    (paged_cache.py) and per-row adapter indices -> per-request sampling (sampling.py) -> detokenization and
    stop checks (detokenizer.py) -> RequestOutputs.
The model only ever sees a cache object and an adapter index per row; it never sees the scheduler.
Speculative (`EngineConfig(speculative=True)`): before that forward the MTP modules draft k tokens per decode
row, the forward verifies them, each row accepts its own prefix, and the rejected tail's blocks are freed
(`_speculative_step`; the design is in speculative.py). A request's tokens are what plain decoding gives.
Adapters. Each load gets an internal name `name__v<load number>` (a new version on every load, so a reloaded adapter
never shares prefix-cache blocks with its predecessor); requests already admitted keep the version they
started with, and a replaced or unloaded version is deleted from the model once no request uses it. A forward
stacks only the resident adapters (`AdapterSlots`, at most `max_loras`, LRU). On an accelerator the other
adapters' weights wait in host memory and move in when their slot is taken, between steps (`_place_adapters`);
on CPU host and device memory are one, so a swap only changes what the per-forward stacks hold.
Rejected: merging an adapter into the weights per batch (serialises tenants); running rows of different
adapters as separate forwards (Punica's point: one gathered matmul per layer is near base speed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..data import Tokenizer
from ..lora import adapter_parameters
from ..model.decoding import check_speculative
from ..model.transformer import ModelOutput
from ..modeling import Model
from .block_manager import BlockManager
from .detokenizer import Detokenizer
from .paged_cache import KVPool, PagedCache, block_tables
from .sampling import SamplingParams, make_generator, sample_token, top_logprobs
from .scheduler import Scheduler, Sequence
from .speculative import Drafter, SpecCounters, SpecState, adapter_index, verify

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
CPU_POOL_BYTES = 1 << 30  # default pool cap on CPU when kv_cache_tokens is not given


@dataclass
class EngineConfig:
    block_size: int = 64
    kv_cache_tokens: int | None = None  # pool size in tokens (None: see kv_cache_fraction / the CPU default)
    kv_cache_fraction: float = 0.9  # on an accelerator, without kv_cache_tokens: this share of its free memory
    max_batch_tokens: int = 512
    max_num_seqs: int = 64
    max_loras: int = 8
    enable_prefix_caching: bool = True
    dtype: torch.dtype | str | None = None
    device: torch.device | str | None = None
    speculative: bool = False  # MTP speculative decoding (speculative.py); needs a model with MTP modules
    num_speculative_tokens: int | None = None  # drafts per decode step (None: the model's MTP module count)

    def validate(self) -> None:
        for name in ("block_size", "max_batch_tokens", "max_num_seqs", "max_loras"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.kv_cache_tokens is not None and (not isinstance(self.kv_cache_tokens, int) or
                                                 self.kv_cache_tokens < self.block_size):
            raise ValueError(f"kv_cache_tokens: must be None or >= block_size ({self.block_size}), "
                             f"got {self.kv_cache_tokens!r}")
        f = self.kv_cache_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ValueError(f"kv_cache_fraction: must be in (0, 1], got {f!r}")
        if not isinstance(self.speculative, bool):
            raise ValueError(f"speculative: must be true or false, got {self.speculative!r}")
        k = self.num_speculative_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"num_speculative_tokens: must be None or an integer >= 1, got {k!r}")


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[tuple[float, dict[int, float]]] | None  # per new token: (its logprob, top-n {id: logprob})
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_prompt_tokens: int
    num_generated_tokens: int
    num_cached_tokens: int = 0


def _dtype(d) -> torch.dtype | None:
    """None, a torch.dtype, or its name ("bfloat16", "torch.float16")."""
    if not isinstance(d, str):
        return d
    dt = getattr(torch, d.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype: unknown dtype {d!r} (e.g. float32, bfloat16, float16)")
    return dt


class Engine:
    def __init__(self, model: Model, tokenizer, config: EngineConfig | None = None,
                 adapters: dict[str, str] | None = None):
        self.config = config = config or EngineConfig()
        config.validate()
        self.model = model.to(device=config.device, dtype=_dtype(config.dtype)).eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.max_model_len = model.config.max_position_embeddings
        try:
            self.k = check_speculative(model.config, config.speculative, config.num_speculative_tokens)
        except ValueError as e:
            raise ValueError(f"speculative: {e}") from e
        self.mtp_layers = len(model.mtp) if self.k else 0
        num_blocks = self._pool_tokens() // config.block_size
        self.pool = KVPool(model.config, num_blocks, config.block_size, self.device, self.dtype, self.mtp_layers)
        self.drafter = Drafter(self.model, self.pool, self.k) if self.k else None
        self.spec_counters = SpecCounters(self.k)
        self.block_manager = BlockManager(num_blocks, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.block_size, config.max_batch_tokens,
                                   config.max_num_seqs, config.max_loras, self._lookahead if self.k else None)
        self.seqs: dict[str, Sequence] = {}
        self.aborted: list[Sequence] = []
        self.prompt_tokens = self.generated_tokens = 0
        self._loads = 0
        self._adapters: dict[str, str] = {n: n for n in model.adapters}  # public name -> internal name
        self._retired: set[str] = set()
        self._placed: dict[str, torch.device] = {}  # internal adapter name -> where its weights are
        model.lora_context.stack_cache = {}  # per-row LoRA stacks kept across steps (cleared on any change)
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    @classmethod
    def from_checkpoint(cls, path, adapters: dict[str, str] | None = None, **config_fields) -> Engine:
        config = EngineConfig(**config_fields)
        model = Model.from_pretrained(path, device=config.device, dtype=_dtype(config.dtype))
        return cls(model, Tokenizer.load(path), config, adapters)

    def _pool_tokens(self) -> int:
        c = self.config
        if c.kv_cache_tokens is not None:
            return c.kv_cache_tokens
        per_token = KVPool.bytes_per_token(self.model.config, self.dtype, self.mtp_layers)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(c.block_size, int(free * c.kv_cache_fraction) // per_token)
        want = c.max_num_seqs * self.max_model_len
        return max(c.block_size, min(want, CPU_POOL_BYTES // per_token))

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, path) -> None:
        """Load a PEFT directory as `name` (replacing a loaded one: a new version); ValueError, nothing changed,
        if the directory is not a valid adapter for this model."""
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"adapter name {name!r}: must be letters, digits, '_' or '-'")
        self._loads += 1
        internal = f"{name}__v{self._loads}"
        try:
            self.model.load_adapter(path, internal)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from e
        if name in self._adapters:
            self._retire(self._adapters[name])
        self._adapters[name] = internal
        self.model.lora_context.stack_cache.clear()

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise KeyError(name)
        self._retire(self._adapters.pop(name))

    def _retire(self, internal: str) -> None:
        self._retired.add(internal)
        self._collect_retired()

    def _collect_retired(self) -> None:
        """Delete replaced/unloaded adapter versions that no request uses any more."""
        used = {s.adapter for s in self.seqs.values()}
        for internal in [n for n in self._retired if n not in used]:
            self._retired.discard(internal)
            self.scheduler.slots.drop(internal)
            self.model.delete_adapter(internal)
            self._placed.pop(internal, None)
            self.model.lora_context.stack_cache.clear()

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    adapter: str | None = None) -> None:
        params.validate()
        if adapter is not None and adapter not in self._adapters:
            raise KeyError(adapter)
        if request_id in self.seqs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        V = self.model.config.vocab_size
        if not ids:
            raise ValueError("prompt: must not be empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V for t in ids):
            raise ValueError(f"prompt: token ids must be integers in [0, {V})")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                             f"context of {self.max_model_len} tokens")
        pool_tokens = self.pool.num_blocks * self.config.block_size
        if len(ids) + params.max_tokens > pool_tokens:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the KV pool "
                             f"of {pool_tokens} tokens")
        internal = None if adapter is None else self._adapters[adapter]
        seq = Sequence(request_id, ids, params, internal,
                       Detokenizer(self.tokenizer, params.stop), make_generator(params.seed))
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        self.prompt_tokens += len(ids)

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.remove(seq)
        self.aborted.append(seq)
        self._collect_retired()

    def has_unfinished_requests(self) -> bool:
        return bool(self.seqs or self.aborted)

    def stats(self) -> dict:
        bm = self.block_manager
        return dict(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                    blocks_total=bm.num_blocks, blocks_used=bm.num_blocks - bm.num_free, blocks_free=bm.num_free,
                    prefix_hits=self.scheduler.prefix_hits, prefix_queries=self.scheduler.prefix_queries,
                    prompt_tokens=self.prompt_tokens, generated_tokens=self.generated_tokens,
                    preemptions=self.scheduler.preemptions, adapters_resident=len(self.scheduler.slots.resident),
                    **self.spec_counters.as_dict())

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        outputs = [self._final(seq, "", "abort") for seq in self.aborted]
        self.aborted = []
        batch = self.scheduler.schedule()
        self._place_adapters()
        if batch:
            outputs += self._speculative_step(batch) if self.k else self._plain_step(batch)
        self._collect_retired()
        return outputs

    def _plain_step(self, batch: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        outputs = []
        logits = self._forward(batch, self._adapter_rows(batch)).logits  # (B, T, V)
        rows = torch.arange(len(batch), device=self.device)
        last = logits[rows, torch.tensor([n - 1 for _, n in batch], device=self.device)].float()  # (B, V)
        for (seq, n), row in zip(batch, last):
            self.scheduler.advance(seq, n)
            if seq.num_computed == seq.num_tokens:
                outputs.append(self._emit(seq, row))
        return outputs

    def _lookahead(self, seq: Sequence) -> int:
        """Drafts a decode row verifies this step: k, fewer near max_tokens, 0 until its MTP state is ready."""
        if seq.spec is None or seq.spec.lens[0] >= seq.num_computed:
            return 0
        return min(self.k, seq.params.max_tokens - len(seq.output) - 1)

    def _speculative_step(self, batch: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """MTP drafts, one main forward over [t_n, d_1..d_k_b] per decode row (prefill chunks unchanged),
        per-row acceptance, rollback of the rejected tail (speculative.py)."""
        for seq, _ in batch:
            if seq.spec is None:  # just admitted: positions below num_computed were a prefix-cache hit
                seq.spec = SpecState(self.mtp_layers, seq.num_computed)
        ks = [max(0, s.num_computed + n - s.num_tokens) for s, n in batch]  # drafts per row (0: prefill/plain)
        rows = self._adapter_rows(batch)
        drafts = self.drafter.draft([s for s, _ in batch], ks, rows, self.scheduler.slots.names())
        out = self._forward(batch, rows, [d.tokens for d in drafts])
        outputs = []
        for b, (seq, n) in enumerate(batch):
            nc, k = seq.num_computed, ks[b]
            if nc + n < seq.num_tokens:  # a prefill chunk, the prompt not finished yet
                seq.spec.hidden[0].put(nc, out.hidden[b, :n])
                self.scheduler.advance(seq, n)
                continue
            target = out.logits[b, n - 1 - k: n].float()  # (k + 1, V): after t_{N-1}, d_1, .., d_k
            tokens, accepted = verify(seq, drafts[b], target)
            self.spec_counters.update(k, accepted)
            result, m = self._push(seq, tokens, target)
            kept = n - k + min(m, accepted)  # computed positions whose token is now in seq.tokens
            seq.spec.hidden[0].put(nc, out.hidden[b, :kept])
            self.scheduler.advance(seq, kept)
            if result.finished:
                self._finish(seq)
            else:
                self.scheduler.trim(seq)
            outputs.append(result)
        return outputs

    def _place_adapters(self) -> None:
        """Resident adapters' weights on the device, the others in host memory (nothing moves on CPU)."""
        if self.device.type == "cpu":
            return
        resident = set(self.scheduler.slots.resident)
        for name in self.model.adapters:
            where = self.device if name in resident else torch.device("cpu")
            if self._placed.get(name) != where:
                for _, p in adapter_parameters(self.model, name):
                    p.data = p.data.to(where)
                self._placed[name] = where

    def _adapter_rows(self, batch: list[tuple[Sequence, int]]) -> list[int]:
        """Each row's index into the resident adapters (-1 = the base); drops LoRA stacks of other resident sets."""
        names = self.scheduler.slots.names()
        cache_of = self.model.lora_context.stack_cache
        if len(cache_of) > 1 or (cache_of and tuple(names) not in cache_of):
            cache_of.clear()  # keep the stacks of the current resident set only
        return [-1 if s.adapter is None else names.index(s.adapter) for s, _ in batch]

    def _forward(self, batch: list[tuple[Sequence, int]], rows: list[int],
                 drafts: list[list[int]] | None = None) -> ModelOutput:
        """One forward over each row's next n tokens (its verified tokens, then its drafts if given) -> logits
        (B, T, V) and the pre-norm hidden states (B, T, H) (row b's first n valid)."""
        B, T = len(batch), max(n for _, n in batch)
        dev = self.device
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, (s, n) in enumerate(batch):
            tokens = s.tokens + (drafts[b] if drafts else [])
            ids[b, :n] = torch.tensor(tokens[s.num_computed: s.num_computed + n])
        starts = torch.tensor([s.num_computed for s, _ in batch])
        n_new = torch.tensor([n for _, n in batch])
        tables = block_tables([s.blocks for s, _ in batch])
        cache = PagedCache(self.pool, tables.to(dev), starts.to(dev), n_new.to(dev))
        return self.model(ids.to(dev), cache=cache, adapter=adapter_index(rows, dev),
                          adapter_names=self.scheduler.slots.names(), return_output=True)

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        """Sample seq's next token from logits (V,) and emit it."""
        result, _ = self._push(seq, [sample_token(logits, seq.params, seq.counts, seq.gen)], logits[None])
        if result.finished:
            self._finish(seq)
        return result

    def _push(self, seq: Sequence, tokens: list[int], logits: torch.Tensor) -> tuple[RequestOutput, int]:
        """Append tokens (logits (len, V): the distribution each came from) one by one until one ends the
        request (eos, a stop token or string, max_tokens); -> (the output, number of tokens appended)."""
        p = seq.params
        new, text, reason = [], "", None
        logprobs = None if p.logprobs is None else []
        for token, row in zip(tokens, logits):
            seq.output.append(token)
            new.append(token)
            self.generated_tokens += 1
            if p.presence_penalty or p.frequency_penalty:
                if seq.counts is None:
                    seq.counts = torch.zeros(row.shape[-1], device=row.device)
                seq.counts[token] += 1
            if logprobs is not None:
                logprobs.append(top_logprobs(row, token, p.logprobs))
            if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
                reason = "stop"
            else:
                text += seq.detok.add([token])
                if seq.detok.stopped:
                    reason = "stop"
            if reason is None and len(seq.output) >= p.max_tokens:
                reason = "length"
            if reason is not None:
                return self._output(seq, new, text + seq.detok.finish(), logprobs, reason), len(new)
        return self._output(seq, new, text, logprobs, None), len(new)

    def _finish(self, seq: Sequence) -> None:
        self.seqs.pop(seq.request_id, None)
        self.scheduler.remove(seq)

    def _final(self, seq: Sequence, text: str, reason: str) -> RequestOutput:
        return self._output(seq, [], text, None if seq.params.logprobs is None else [], reason)

    @staticmethod
    def _output(seq, token_ids, text, logprobs, reason) -> RequestOutput:
        return RequestOutput(seq.request_id, token_ids, text, logprobs, reason is not None, reason, len(seq.prompt),
                             len(seq.output), seq.num_cached_tokens)

