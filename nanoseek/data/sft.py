"""Supervised fine-tuning data: JSONL prompt/completion or chat records, loss on completions only, batches.

What.
  * Records. A JSONL line is {"prompt": str, "completion": str} or {"messages": [{"role", "content"}, ...]}
    (roles: system, user, assistant). `encode_record` turns one into token ids and a per-token loss flag:
      prompt/completion   ids(prompt) + ids(completion) + [EOS]          loss on completion + EOS
      chat                every message rendered with CHAT_TEMPLATE        loss on assistant contents + their EOS
    CHAT_TEMPLATE (the marker strings are plain text that the tokenizer encodes like any other text; the EOS is
    the tokenizer's id 1, appended by code, never parsed from text):
        <|system|>\\n{content}\\n        (optional)
        <|user|>\\n{content}\\n
        <|assistant|>\\n{content}<EOS>   (the header is prompt; content and EOS are trained)
    `CHAT_TEMPLATE_JINJA` is the same template for `transformers` (`add_chat_template(dir)` writes it into a
    saved tokenizer's tokenizer_config.json, so `apply_chat_template` renders the same text).
  * Batches. `SFTLoader` gives (x, y) of shape (batch_size, seq_len): x the inputs, y the next-token targets
    with -100 wherever the next token is prompt or padding, so the model's cross entropy is the completion-only
    loss. `pack=False` (default): one example per row, right-padded with PAD (causal attention never looks
    right, so padding cannot change the real positions' logits: exact). `pack=True`: examples are concatenated
    (each ends with its EOS) and cut into rows like pretraining's packing; an example may then attend to the
    previous ones in its row (no block-diagonal mask: the model takes none), which wastes no compute on padding.
    Too-long examples keep the end of their prompt and the start of their completion (`truncate`).
    Order: examples are permuted per epoch with PCG64(seed + epoch); state = (epoch, position), so resuming
    gives exactly the batches an uninterrupted run would, and rank r takes rows [r*B, (r+1)*B) of each global
    batch, as `PackedLoader` does.
  * Built-in tasks (`builtin_tasks()`, `builtin_task(name, split)`): one task per package of the built-in
    corpus ("email", "asyncio", "json", ...) so several tenants can be tuned and compared: "continue this
    file" — prompt = `prompt_lines` lines of a file, completion = the next `completion_lines` lines, for
    consecutive windows of each file; the train/val split is the corpus's own (by file).

Rejected: masking attention between packed examples (needs a mask argument through every attention path, and
padding already gives the exact loss); loss on the prompt (the standard SFT loss is completion-only, and
"LoRA Without Regret" measures that); dynamic per-batch lengths (fixed shapes keep step times and memory
constant, and the loader simple to resume).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import IGNORE_INDEX
from .corpus import Corpus, load_corpus, read_jsonl_objects
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = "<|{role}|>\n{content}"  # + "\n" after system/user, + EOS after assistant
CHAT_TEMPLATE_JINJA = (  # newlines as {{ '\n' }}: transformers renders with trim_blocks, which eats "\n" after a tag
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # (L,) the whole sequence, EOS included
    loss: tuple[bool, ...]  # (L,) True where the token is a training target (completion / assistant / EOS)


# ---------------------------------------------------------------------------------------------- records
def segments(record: dict, where: str = "record", need_target: bool = True) -> list[tuple[str | None, bool]]:
    """A record as (text, trained) pieces; text None stands for the EOS id. Raises ValueError if malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        out: list[tuple[str | None, bool]] = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}")
            if m["role"] == "assistant":
                out += [("<|assistant|>\n", False), (m["content"], True), (None, True)]
            else:
                out.append((CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) + "\n", False))
        if need_target and not any(t for _, t in out):
            raise ValueError(f"{where}: a chat record needs at least one assistant message (nothing to train on)")
        return out
    if "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if not isinstance(p, str) or not isinstance(c, str):
            raise ValueError(f"{where}: 'prompt' and 'completion' must be strings")
        return [(p, False), (c, True), (None, True)]
    raise ValueError(f"{where}: expected {{'prompt', 'completion'}} or {{'messages'}}, got keys {sorted(record)}")


def render_chat(messages: list[dict], eos: str = "<|eos|>") -> str:
    """The chat template as text (EOS written as `eos`): what CHAT_TEMPLATE_JINJA renders."""
    return "".join(eos if t is None else t for t, _ in segments({"messages": messages}, need_target=False))


def encode_record(tokenizer: Tokenizer, record: dict, where: str = "record") -> Example:
    ids: list[int] = []
    loss: list[bool] = []
    for text, trained in segments(record, where):
        piece = [tokenizer.eos_id] if text is None else tokenizer.encode(text)
        ids += piece
        loss += [trained] * len(piece)
    return Example(tuple(ids), tuple(loss))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file (blank lines skipped), each validated; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {path} does not exist")
    records = []
    for lineno, rec in read_jsonl_objects(path):
        segments(rec, f"{path}:{lineno}")
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def truncate(ex: Example, max_len: int) -> Example:
    """Keep at most max_len tokens: drop the start of the prompt first, then the end of the completion."""
    if len(ex.ids) <= max_len:
        return ex
    first = ex.loss.index(True) if True in ex.loss else len(ex.ids)
    start = max(0, min(first - 1, len(ex.ids) - max_len))  # keep >= 1 prompt token to predict the first target
    return Example(ex.ids[start:start + max_len], ex.loss[start:start + max_len])


def add_chat_template(tokenizer_dir: str | os.PathLike) -> None:
    """Write CHAT_TEMPLATE_JINJA into a saved tokenizer's tokenizer_config.json (for `apply_chat_template`)."""
    f = Path(tokenizer_dir) / "tokenizer_config.json"
    conf = json.loads(f.read_text()) if f.is_file() else {}
    conf["chat_template"] = CHAT_TEMPLATE_JINJA
    tmp = f.with_name(f"{f.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps(conf, indent=2) + "\n")
    os.replace(tmp, f)


# ---------------------------------------------------------------------------------------------- batches
def _row(ids, loss, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One sequence of <= seq_len + 1 tokens -> x (seq_len,), y (seq_len,) with -100 on untrained targets."""
    ids = np.asarray(ids, dtype=np.int64)
    tgt = np.where(np.asarray(loss, dtype=bool), ids, IGNORE_INDEX)
    x = np.full(seq_len, pad_id, dtype=np.int64)
    y = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    n = min(len(ids) - 1, seq_len)
    x[:n], y[:n] = ids[:n], tgt[1:n + 1]
    return x, y


class SFTLoader:
    """Shuffled, sharded, resumable (x, y) batches (batch_size, seq_len) of SFT examples (see module docstring)."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", pack: bool = False, pad_id: int = 2):
        if seq_len < 1 or batch_size < 1 or world_size < 1:
            raise ValueError(f"seq_len, batch_size, world_size must be >= 1, got {seq_len}, {batch_size}, {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.examples = [truncate(e, seq_len + 1) for e in examples if any(e.loss[1:])]
        self.seq_len, self.batch_size, self.seed, self.pack, self.pad_id = seq_len, batch_size, seed, pack, pad_id
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.global_batch_size = batch_size * world_size
        self.tokens_per_batch = batch_size * seq_len
        self.epoch, self.position = 0, 0
        self._rows_epoch, self._rows = -1, []
        if self.batches_per_epoch == 0:
            raise ValueError(f"too little data: {len(self.examples)} usable example(s) make fewer rows than one global "
                             f"batch of {self.global_batch_size}")

    def _epoch_rows(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The epoch's rows: examples in PCG64(seed + epoch) order, one per row or packed."""
        if epoch != self._rows_epoch:
            order = np.random.Generator(np.random.PCG64(self.seed + epoch)).permutation(len(self.examples))
            if not self.pack:
                rows = [(self.examples[i].ids, self.examples[i].loss) for i in order]
            else:
                ids = [t for i in order for t in self.examples[i].ids]
                loss = [t for i in order for t in self.examples[i].loss]
                L = self.seq_len
                rows = [(ids[s:s + L + 1], loss[s:s + L + 1]) for s in range(0, len(ids) - L, L)]
            self._rows_epoch, self._rows = epoch, rows
        return self._rows

    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_rows(self.epoch)) // self.global_batch_size  # packing: the same count every epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        rows = self._epoch_rows(self.epoch)
        start = self.position * self.global_batch_size + self.rank * self.batch_size
        self.position += 1
        return _to_batch(rows[start:start + self.batch_size], self.seq_len, self.pad_id, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < self.batches_per_epoch:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed),
                "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size,
                "pack": self.pack, "num_examples": len(self.examples)}

    def load_state_dict(self, sd: dict) -> None:
        for key, mine in (("seq_len", self.seq_len), ("pack", self.pack), ("num_examples", len(self.examples))):
            if sd.get(key) != mine:
                raise ValueError(f"loader state has {key}={sd.get(key)!r}, this loader has {mine!r}: same data?")
        if int(sd["batch_size"]) * int(sd["world_size"]) != self.global_batch_size:
            raise ValueError(f"loader state has global batch {sd['batch_size']} x {sd['world_size']}, this loader "
                             f"{self.batch_size} x {self.world_size}")
        self.epoch, self.position, self.seed = int(sd["epoch"]), int(sd["position"]), int(sd["seed"])
        self._rows_epoch = -1


def _to_batch(rows, seq_len: int, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    xy = [_row(ids, loss, seq_len, pad_id) for ids, loss in rows]
    x = torch.from_numpy(np.stack([a for a, _ in xy]))
    y = torch.from_numpy(np.stack([b for _, b in xy]))
    return x.to(device), y.to(device)


def sft_eval_batches(examples: list[Example], seq_len: int, batch_size: int, max_batches: int | None = None,
                     device: str | torch.device = "cpu", pad_id: int = 2) -> Iterator[tuple[torch.Tensor, ...]]:
    """Validation batches in order, one padded example per row (the last batch may be smaller)."""
    rows = [(e.ids, e.loss) for e in (truncate(e, seq_len + 1) for e in examples) if any(e.loss[1:])]
    for b, s in enumerate(range(0, len(rows), batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield _to_batch(rows[s:s + batch_size], seq_len, pad_id, torch.device(device))


# ---------------------------------------------------------------------------------------------- built-in tasks
def builtin_tasks(corpus: Corpus | None = None, min_docs: int = 4) -> dict[str, dict[str, int]]:
    """Task name -> {"train": files, "val": files} for every package of the built-in corpus with at least
    min_docs files and at least one file in each split."""
    corpus = corpus or load_corpus()
    counts: dict[str, dict[str, int]] = {}
    for d in corpus.documents:
        counts.setdefault(d.domain, {"train": 0, "val": 0})[d.split] += 1
    return {k: v for k, v in sorted(counts.items())
            if not k.startswith("_") and v["train"] + v["val"] >= min_docs and v["train"] and v["val"]}


def builtin_task(name: str, split: str = "train", corpus: Corpus | None = None, prompt_lines: int = 16,
                 completion_lines: int = 8, max_examples: int | None = None) -> list[dict]:
    """"Continue this file" records of package `name`: consecutive windows of each file of the split,
    prompt = prompt_lines lines, completion = the next completion_lines lines (windows whose completion is
    blank are skipped). Files in name order, windows in file order: deterministic."""
    corpus = corpus or load_corpus()
    tasks = builtin_tasks(corpus)
    if name not in tasks:
        raise ValueError(f"unknown built-in task {name!r}; available: {', '.join(tasks)}")
    if prompt_lines < 1 or completion_lines < 1:
        raise ValueError("prompt_lines and completion_lines must be >= 1")
    out = []
    for d in corpus.docs(split):
        if d.domain != name:
            continue
        lines = d.text.splitlines(keepends=True)
        step = prompt_lines + completion_lines
        for s in range(0, len(lines) - prompt_lines, step):
            prompt = "".join(lines[s:s + prompt_lines])
            completion = "".join(lines[s + prompt_lines:s + step])
            if completion.strip():
                out.append({"prompt": prompt, "completion": completion})
            if max_examples is not None and len(out) >= max_examples:
                return out
    return out


def load_sft(spec: str, tokenizer: Tokenizer, split: str = "train", corpus: Corpus | None = None,
             **task_kw) -> list[Example]:
    """Examples from "builtin:<task>" (that split) or a JSONL file (all records; split ignored)."""
    if spec.startswith("builtin:"):
        records = builtin_task(spec.removeprefix("builtin:"), split, corpus, **task_kw)
    else:
        records = read_jsonl(spec)
    return [encode_record(tokenizer, r, f"{spec}[{i}]") for i, r in enumerate(records)]
