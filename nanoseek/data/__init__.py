"""Data: corpora (built-in stdlib or user text), byte-level BPE tokenizer, packed resumable loader."""

from .corpus import Corpus, Document, load_corpus
from .loader import PackedLoader, eval_batches, tokenize_corpus
from .tokenizer import Tokenizer, default_cache_dir, get_or_train_tokenizer, train_tokenizer

__all__ = [
    "Corpus",
    "Document",
    "load_corpus",
    "Tokenizer",
    "train_tokenizer",
    "get_or_train_tokenizer",
    "default_cache_dir",
    "tokenize_corpus",
    "PackedLoader",
    "eval_batches",
]
