"""Corpora: the built-in standard-library corpus and user text, split into train/val documents.

What. A `Corpus` is a sorted tuple of `Document`s (name, text, domain, split) plus a `fingerprint`
that later stages use as a cache key (tokenizer, token files). `load_corpus(spec)` builds one from

    None / "stdlib"   the .py files of the running Python's standard library (the built-in default)
    a directory       every text file below it, one document each
    a .jsonl file     one JSON object per line, the document in `text_field`
    any other file    one text file, cut into ~64 KiB chunks at line boundaries

Why. Model weights and data sets can't be downloaded where nanoseek runs, so the default corpus must
already be on the machine: the standard library is ~31 MB of real text (~1,800 files) that splits
naturally into packages (`email`, `asyncio`, `json`, ...), which become the `domain`s used by
per-domain fine-tuning and expert-specialization plots. Top-level single-file modules (`os.py`,
`typing.py`, ...) would each be a tiny domain, so they share the domain `_toplevel`.

Splits are chosen per document by a hash of its name (sha256, not Python's salted `hash`), so a
document keeps its split when others are added or removed and every run and every rank agree.
`val_fraction` (default 5%) is a probability, not an exact count; if a split comes out empty one
document is moved into it (the one whose hash is nearest the threshold), and a corpus of a single
document is cut in two (head = train, tail = val).

Rejected: splitting by position (the last 5% of files) — val would be one package (`zoneinfo`,
`xmlrpc` ...), not a sample of the corpus; shuffling with a seeded RNG — a one-file change would
move many documents across splits; caching the built-in corpus on disk — reading it takes well
under a second, and a cache would need its own invalidation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val")
TOPLEVEL_DOMAIN = "_toplevel"
CHUNK_CHARS = 64 * 1024  # a single text file is cut into documents of about this many characters
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class Document:
    name: str  # unique within the corpus: relative posix path, "file#chunk" or "file:line"
    text: str
    domain: str  # top-level package / folder, "_toplevel" for loose files, or a JSONL "domain" field
    split: str  # "train" or "val"


@dataclass(frozen=True)
class Corpus:
    """Documents sorted by name, and a sha256 `fingerprint` over (name, split, text) of each."""

    documents: tuple[Document, ...]
    source: str  # what was loaded, for logs: "stdlib:/usr/lib/python3.11", a path
    fingerprint: str

    @classmethod
    def from_documents(cls, documents: Iterable[Document], source: str) -> Corpus:
        docs = tuple(sorted(documents, key=lambda d: d.name))
        h = hashlib.sha256()
        for d in docs:  # the split is hashed too: a different val_fraction must not reuse token caches
            h.update(f"{len(d.name)}:{d.name}\0{d.split}\0".encode())
            text = d.text.encode()
            h.update(f"{len(text)}:".encode())
            h.update(text)
        return cls(docs, source, h.hexdigest())

    def __len__(self) -> int:
        return len(self.documents)

    def docs(self, split: str | None = None) -> list[Document]:
        """Documents of one split (all documents for None), in name order."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
        return [d for d in self.documents if split is None or d.split == split]

    def texts(self, split: str | None = None) -> list[str]:
        return [d.text for d in self.docs(split)]

    def domains(self) -> dict[str, int]:
        """Document count per domain, sorted by domain name."""
        counts: dict[str, int] = {}
        for d in self.documents:
            counts[d.domain] = counts.get(d.domain, 0) + 1
        return dict(sorted(counts.items()))

    def _byte_counts(self, split: str | None) -> np.ndarray:
        counts = np.zeros(256, dtype=np.int64)  # (256,) occurrences of each byte value
        for text in self.texts(split):
            buf = np.frombuffer(text.encode(), dtype=np.uint8)
            counts += np.bincount(buf, minlength=256)
        return counts

    def num_bytes(self, split: str | None = None) -> int:
        """UTF-8 bytes of the split's texts: the denominator of bits per byte."""
        return sum(len(t.encode()) for t in self.texts(split))

    def unigram_byte_entropy(self, split: str | None = None) -> float:
        """Shannon entropy (bits) of the split's byte distribution: the bits-per-byte a model that
        knows only byte frequencies achieves, so a trained model must come in below it."""
        counts = self._byte_counts(split)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())


# ---------------------------------------------------------------------------------------------- splits


def _hash_unit(key: str) -> float:
    """A stable number in [0, 1) from sha256(key); salted `hash()` would differ between runs."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _assign_splits(named: list[tuple[str, str, str, str]], val_fraction: float) -> list[Document]:
    """named: (name, text, domain, hash key) -> Documents; u < val_fraction goes to val.

    If a split is empty and there are >= 2 documents, the document with u nearest the threshold
    moves into it, so the rule stays a pure function of the keys.
    """
    units = [_hash_unit(key) for _, _, _, key in named]
    splits = ["val" if u < val_fraction else "train" for u in units]
    if len(named) >= 2:
        if "val" not in splits:
            splits[min(range(len(units)), key=units.__getitem__)] = "val"
        if "train" not in splits:
            splits[max(range(len(units)), key=units.__getitem__)] = "train"
    return [Document(n, t, dom, s) for (n, t, dom, _), s in zip(named, splits)]


def _split_single(doc: Document, val_fraction: float, what: Path) -> list[Document]:
    """One document only: its last ~val_fraction (at a line boundary when there is one) becomes val."""
    text = doc.text
    if len(text) < 2:
        raise ValueError(
            f"{what}: corpus is a single document of {len(text)} character(s); "
            "need at least 2 to make both a train and a validation split"
        )
    cut = len(text) - max(1, math.ceil(len(text) * val_fraction))
    line_cut = text.rfind("\n", 0, cut + 1) + 1  # start of the line holding the cut
    if 0 < line_cut < len(text):
        cut = line_cut
    return [
        Document(doc.name + "#train", text[:cut], doc.domain, "train"),
        Document(doc.name + "#val", text[cut:], doc.domain, "val"),
    ]


def _finish(named: list[tuple[str, str, str, str]], val_fraction: float, source: str, what: Path) -> Corpus:
    named = [n for n in named if n[1]]  # empty documents carry nothing but an EOS
    if not named:
        raise ValueError(f"{what}: no non-empty text documents found")
    docs = _assign_splits(named, val_fraction)
    if len(docs) == 1:
        docs = _split_single(docs[0], val_fraction, what)
    return Corpus.from_documents(docs, source)


# --------------------------------------------------------------------------------------------- sources


def _read_text(path: Path) -> str | None:
    """File contents as text, or None for unreadable or binary (contains NUL) files."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\0" in raw:
        return None
    return raw.decode("utf-8", errors="replace")


def _walk(root: Path, suffix: str | None, skip_hidden: bool) -> Iterator[Path]:
    """Files below root in sorted order, skipping _SKIP_DIRS (and dot-entries when skip_hidden)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _SKIP_DIRS and not (skip_hidden and d.startswith("."))
        )
        for f in sorted(filenames):
            if (suffix is None or f.endswith(suffix)) and not (skip_hidden and f.startswith(".")):
                yield Path(dirpath, f)


def _load_directory(root: Path, suffix: str | None, skip_hidden: bool) -> list[tuple[str, str, str, str]]:
    named = []
    for path in _walk(root, suffix, skip_hidden):
        text = _read_text(path)
        if text is None:
            continue
        rel = path.relative_to(root).as_posix()
        domain = rel.split("/", 1)[0] if "/" in rel else TOPLEVEL_DOMAIN
        named.append((rel, text, domain, rel))
    return named


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _chunk_lines(text: str, chunk_chars: int) -> list[str]:
    """Cut text into pieces of >= chunk_chars characters (the last may be shorter) at line ends."""
    chunks, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("".join(cur))
    return chunks


def _load_text_file(path: Path) -> list[tuple[str, str, str, str]]:
    text = _read_text(path)
    if text is None:
        raise ValueError(f"{path}: not a text file (unreadable, or contains NUL bytes)")
    chunks = _chunk_lines(text, CHUNK_CHARS)
    width = max(5, len(str(len(chunks))))
    return [(f"{path.name}#{i:0{width}d}", c, path.stem, f"{path.name}#{i}") for i, c in enumerate(chunks)]


def read_jsonl_objects(path: str | os.PathLike, errors: str = "strict") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; errors name the file and line.
    `errors` is the UTF-8 decoding policy ("replace" for corpora: a stray byte should not stop a run)."""
    path = Path(path)
    out = []
    with open(path, encoding="utf-8", errors=errors) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: line is not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            out.append((lineno, obj))
    return out


def _load_jsonl(path: Path, text_field: str) -> list[tuple[str, str, str, str]]:
    named = []
    objects = read_jsonl_objects(path, errors="replace")
    width = max(6, len(str(objects[-1][0] if objects else 0)))
    for lineno, obj in objects:
        if text_field not in obj:
            raise ValueError(
                f"{path}:{lineno}: object has no field {text_field!r} "
                f"(its keys: {sorted(obj)}); pass text_field= to choose another"
            )
        text = obj[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
        text = text.encode("utf-8", errors="surrogatepass").decode("utf-8", errors="replace")  # lone \ud800
        domain = obj.get("domain")
        domain = domain if isinstance(domain, str) and domain else path.stem
        named.append((f"{path.name}:{lineno:0{width}d}", text, domain, f"{lineno}\0{text}"))
    return named


def load_corpus(
    spec: str | os.PathLike | None = None, text_field: str = "text", val_fraction: float = 0.05
) -> Corpus:
    """Load a corpus: None or "stdlib" (built-in), a directory, a .jsonl file or a text file.

    Directories: every file below it that decodes as text (binary = contains NUL bytes), skipping
    dot-files/-folders, __pycache__, site-packages; domain = first path component ("_toplevel" for
    files at the root). JSONL: blank lines skipped, domain = the object's "domain" field if it has
    one, else the file stem. Empty documents are dropped.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if spec is None or (isinstance(spec, str) and spec == "stdlib"):
        root = stdlib_dir()
        named = _load_directory(root, suffix=".py", skip_hidden=False)
        return _finish(named, val_fraction, f"stdlib:{root}", root)
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    if path.is_dir():
        named = _load_directory(path, suffix=None, skip_hidden=True)
        if not named:
            raise ValueError(f"{path}: directory has no text files (empty, or only binary/hidden files)")
    elif path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    elif path.suffix == ".jsonl":
        named = _load_jsonl(path, text_field)
    else:
        named = _load_text_file(path)
    return _finish(named, val_fraction, str(path), path)
