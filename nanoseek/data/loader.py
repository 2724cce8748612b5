"""Tokenize once, pack into fixed windows, shuffle per epoch, shard across ranks, resume exactly.

What. `tokenize_corpus` encodes one split of a corpus into a flat token file (each document
followed by EOS), cached under cache_dir/tokens/ and returned as a read-only `np.memmap`.
`PackedLoader` cuts that stream into non-overlapping windows of seq_len+1 tokens (stride seq_len:
x = w[:-1], y = w[1:]), permutes the windows each epoch with `Generator(PCG64(seed + epoch))`, and
gives rank r the slice [r*B:(r+1)*B] of every global batch of B*world_size windows. Its state is
two integers (epoch, position), so a resumed run continues with exactly the batch an
uninterrupted run would have produced. `eval_batches` walks the validation windows in order.

Why this shape. Packing documents back to back with EOS separators wastes no tokens on padding
and needs no attention masks for a pretraining loss; the permutation of windows (not of tokens or
documents) is cheap — one index array per epoch — and is a pure function of (seed, epoch), which
makes resumption, multi-rank sharding and "2 ranks with batch B == 1 rank with batch 2B" follow by
construction. Token files are written to a temp file and renamed, so a crash never leaves a half
file under the name that later runs trust; stray temp files are never read.

Rejected: torch `DataLoader` with workers — the batch is a memmap slice and a gather, so worker
processes would only add fork/pickle cost and make the state harder to save; random-offset windows
(nanoGPT's `torch.randint`) — they overlap, repeat, and can't be resumed without the RNG state;
padding each document to seq_len — most stdlib files are far shorter or longer than a window.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .corpus import SPLITS, Corpus
from .tokenizer import Tokenizer, default_cache_dir

ENCODE_BATCH_DOCS = 64  # documents per encode_batch call: parallel within, bounded memory across


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, split: str, cache_dir: str | os.PathLike | None = None
) -> np.memmap:
    """The split's tokens, each document followed by EOS, as a read-only memmap (N,) uint16/uint32.

    Cached at cache_dir/tokens/<corpus fp[:16]>-<tokenizer sha[:16]>-<split>.bin; a second call
    only maps the file.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / "tokens" / f"{corpus.fingerprint[:16]}-{tokenizer.sha256[:16]}-{split}.bin"
    dtype = token_dtype(tokenizer.vocab_size)
    if not path.is_file():
        docs = corpus.texts(split)
        if not docs:
            raise ValueError(f"corpus {corpus.source} has no {split!r} documents to tokenize")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            _write_tokens(tmp, docs, tokenizer, dtype, desc=f"tokenize {split}")
            os.replace(tmp, path)  # atomic: the final name only ever holds a complete file
        finally:
            tmp.unlink(missing_ok=True)
    return np.memmap(path, dtype=dtype, mode="r")


def _write_tokens(path: Path, docs: list[str], tokenizer: Tokenizer, dtype: np.dtype, desc: str) -> None:
    eos = tokenizer.eos_id
    with open(path, "wb") as f, tqdm(total=len(docs), desc=desc, unit="doc", disable=None, delay=2.0) as bar:
        for i in range(0, len(docs), ENCODE_BATCH_DOCS):
            batch = tokenizer.encode_batch(docs[i : i + ENCODE_BATCH_DOCS])
            f.write(np.concatenate([np.asarray(ids + [eos], dtype=dtype) for ids in batch]).tobytes())
            bar.update(len(batch))
        f.flush()
        os.fsync(f.fileno())


class PackedLoader:
    """Shuffled, sharded, resumable (x, y) batches of shape (batch_size, seq_len), int64, on device.

    `next_batch()` runs forever, rolling into the next epoch after the last full global batch (a
    partial last global batch is dropped). Iterating the loader yields the rest of the current
    epoch (a whole epoch when it starts at a boundary), so `for x, y in loader` is one epoch.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ):
        if seq_len < 1 or batch_size < 1 or world_size < 1:
            raise ValueError(
                f"seq_len, batch_size, world_size must be >= 1, got {seq_len}, {batch_size}, {world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.tokens = tokens  # (N,) any integer dtype; a memmap stays on disk
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.global_batch_size = batch_size * world_size  # windows per optimizer step, all ranks
        self.tokens_per_batch = batch_size * seq_len  # this rank's input tokens per batch
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)  # windows of seq_len+1, stride seq_len
        self.batches_per_epoch = self.num_windows // self.global_batch_size
        if self.batches_per_epoch == 0:
            need = self.global_batch_size * seq_len + 1
            raise ValueError(
                f"too little data: one global batch ({world_size} rank(s) x {batch_size} x "
                f"seq_len {seq_len}) needs {need} tokens, the stream has {len(tokens)}"
            )
        self.epoch, self.position = 0, 0  # next batch: global batch `position` of epoch `epoch`
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:  # (num_windows,) window order of this epoch
            self._perm = np.random.Generator(np.random.PCG64(self.seed + epoch)).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch_size + self.rank * self.batch_size
        windows = self._permutation(self.epoch)[start : start + self.batch_size]  # (B,)
        self.position += 1
        return _gather(self.tokens, windows * self.seq_len, self.seq_len, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": int(self.epoch),
            "position": int(self.position),
            "seed": int(self.seed),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue where the saved loader stopped. The global batch (batch_size * world_size) and
        seq_len must match; the split of it across ranks may differ."""
        if int(sd["seq_len"]) != self.seq_len:
            raise ValueError(f"loader state has seq_len {sd['seq_len']}, this loader has {self.seq_len}")
        saved_global = int(sd["batch_size"]) * int(sd["world_size"])
        if saved_global != self.global_batch_size:
            raise ValueError(
                f"loader state has global batch {sd['batch_size']} x {sd['world_size']} ranks "
                f"= {saved_global} windows, this loader has {self.batch_size} x "
                f"{self.world_size} = {self.global_batch_size}"
            )
        if not 0 <= int(sd["position"]) <= self.batches_per_epoch:
            raise ValueError(
                f"loader state position {sd['position']} is outside this data's epoch of "
                f"{self.batches_per_epoch} batches: is it the same token stream?"
            )
        self.epoch, self.position, self.seed = int(sd["epoch"]), int(sd["position"]), int(sd["seed"])
        self._perm_epoch = -1


def _gather(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows tokens[s : s+seq_len+1] for s in starts -> x, y (B, seq_len) int64 on device."""
    buf = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    w = torch.from_numpy(buf)
    if device.type == "cuda":
        w = w.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        w = w.to(device)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # x, y: (B, T)


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation (x, y) in stream order: windows of seq_len+1 at stride seq_len, unshuffled. The
    last batch may hold fewer than batch_size windows; tokens after the last whole window are
    not used. Stops after max_batches batches when given."""
    num_windows = max(0, (len(tokens) - 1) // seq_len)
    if num_windows == 0:
        raise ValueError(
            f"too little data: one window of seq_len {seq_len} needs {seq_len + 1} tokens, "
            f"the stream has {len(tokens)}"
        )
    return _eval_iter(tokens, seq_len, batch_size, max_batches, num_windows, torch.device(device))


def _eval_iter(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    num_windows: int,
    dev: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for b, first in enumerate(range(0, num_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        windows = np.arange(first, min(first + batch_size, num_windows))
        yield _gather(tokens, windows * seq_len, seq_len, dev)
