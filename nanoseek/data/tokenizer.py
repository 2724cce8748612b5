"""Byte-level BPE tokenizer: trained with Hugging Face `tokenizers`, saved as an HF tokenizer directory.

What. `train_tokenizer(texts, vocab_size)` trains a GPT-2-style byte-level BPE (GPT-2 pre-tokenizer
regex, the 256-byte alphabet always in the vocabulary, so every string round-trips) with special
tokens `<|bos|>`=0, `<|eos|>`=1, `<|pad|>`=2. `Tokenizer` is a thin wrapper over
`tokenizers.Tokenizer`; `save(dir)` writes `tokenizer.json` + `tokenizer_config.json` +
`special_tokens_map.json`, which `transformers.AutoTokenizer.from_pretrained(dir)` loads as a
`PreTrainedTokenizerFast` with the same ids. `get_or_train_tokenizer` trains once per (corpus
fingerprint, vocab size) and caches the result under `default_cache_dir()/tokenizers/`.

Why. The Rust library trains on the whole 31 MB built-in corpus in seconds on 2 cores and its file
format is what every HF tool reads, so checkpoints carry a tokenizer anybody can load.

Text that happens to contain "<|eos|>" is encoded as ordinary bytes by `encode` (the library's
`encode_special_tokens`), so data can never inject control ids; the ids 0/1/2 come only from code
that asks for them (the loader appends `eos_id` after each document). HF's own tokenizer object,
loaded from the saved files, does match those strings as special tokens — a difference that only
shows for text containing them.

Rejected: a hand-written BPE (slow, and one more format); sentencepiece (not byte-level by
default, extra dependency); adding BOS/EOS in a post-processor (the loader decides where documents
end; `encode` returns exactly the text's tokens).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .corpus import Corpus

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in this order
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def default_cache_dir() -> Path:
    """$NANOSEEK_CACHE, or ~/.cache/nanoseek."""
    env = os.environ.get("NANOSEEK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanoseek"


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; ids are plain Python ints, no special tokens are added."""

    def __init__(self, tok: HFTokenizer):
        self._tok = tok
        self._tok.encode_special_tokens = True  # "<|eos|>" inside text is text, not id 1
        for name, want in zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS))):
            if tok.token_to_id(name) != want:
                raise ValueError(f"tokenizer must map {name} to id {want}, got {tok.token_to_id(name)}")
        self.json = tok.to_str()  # the tokenizer.json text
        self.sha256 = hashlib.sha256(self.json.encode()).hexdigest()  # cache key for token files

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    @property
    def pad_id(self) -> int:
        return 2

    @property
    def backend(self) -> HFTokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes in parallel on the library's thread pool (TOKENIZERS_PARALLELISM)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike, model_max_length: int | None = None) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (HF layout)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)
        # tokenizer.json last: it is the file whose presence means "done" to get_or_train_tokenizer
        _atomic_write(d / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        _atomic_write(d / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")
        _atomic_write(d / "tokenizer.json", self.json)
        return d

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """From a directory holding tokenizer.json, or the tokenizer.json file itself."""
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {f}")
        return cls(HFTokenizer.from_str(f.read_text(encoding="utf-8")))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:16]})"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE on texts. The result may have fewer than vocab_size tokens when the
    text runs out of pairs to merge (tiny corpora); `Tokenizer.vocab_size` says how many."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
            f"tokens), got {vocab_size}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def get_or_train_tokenizer(
    corpus: Corpus, vocab_size: int, cache_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """Load the tokenizer cached for (corpus.fingerprint, vocab_size), or train it on the corpus's
    train split and cache it in cache_dir/tokenizers/<fingerprint[:16]>-<vocab_size>/."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    d = cache / "tokenizers" / f"{corpus.fingerprint[:16]}-{vocab_size}"
    if (d / "tokenizer.json").is_file():
        return Tokenizer.load(d)
    tok = train_tokenizer(corpus.texts("train"), vocab_size)
    tok.save(d)
    return tok
