import json
from pathlib import Path

import pytest

from nanoseek.data import (
    Corpus,
    Document,
    Tokenizer,
    default_cache_dir,
    get_or_train_tokenizer,
    train_tokenizer,
)
from nanoseek.data import tokenizer as tokenizer_mod

TRAIN_TEXT = [
    f"def function_{i}(x, y):\n    return x * {i} + y  # comment {i}\n\nclass Thing{i}:\n    pass\n"
    for i in range(200)
]
SAMPLES = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "emoji 🎉🚀 and ZWJ 👩‍💻",
    "中文字符 日本語 한국어",
    "nul \x00 bell \x07 del \x7f",
    "mixed: é ß ∑ ∫ \u200b zero-width",
    "def f(x):\n\treturn x ** 2\n",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(TRAIN_TEXT, 300)


def test_round_trip_any_string(tok):
    for s in SAMPLES:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]


def test_special_tokens_and_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert [tok.backend.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")] == [0, 1, 2]
    assert tok.vocab_size == 300
    assert 1 not in tok.encode("text") and tok.encode("text")[0] != 0  # nothing added
    ids = tok.encode("a <|eos|> b")  # literal special-token text stays text
    assert not {0, 1, 2} & set(ids) and tok.decode(ids) == "a <|eos|> b"
    assert tok.decode([5, 1, 5]).count("<|eos|>") == 1
    assert "<|eos|>" not in tok.decode([5, 1, 5], skip_special_tokens=True)
    assert len(tok.encode("return x")) < len("return x")  # merges learnt


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_tokenizer(["abc"], 258)


def test_training_is_deterministic(tok):
    assert train_tokenizer(TRAIN_TEXT, 300).sha256 == tok.sha256


def test_save_load_and_transformers(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save(tmp_path, model_max_length=512)
    assert {p.name for p in tmp_path.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 512
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    for loaded in (Tokenizer.load(tmp_path), Tokenizer.load(tmp_path / "tokenizer.json")):
        assert loaded.sha256 == tok.sha256
        assert [loaded.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
    assert auto.model_max_length == 512
    for hf in (fast, auto):
        for s in SAMPLES:
            ids = hf(s, add_special_tokens=True)["input_ids"]
            assert ids == tok.encode(s)
            assert hf.decode(ids) == s
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "elsewhere")


def _small_corpus() -> Corpus:
    docs = [Document(f"d{i}", t, "code", "val" if i % 10 == 0 else "train") for i, t in enumerate(TRAIN_TEXT)]
    return Corpus.from_documents(docs, "mem")


def test_get_or_train_caches(tmp_path, monkeypatch):
    corpus = _small_corpus()
    calls = []
    real_train = tokenizer_mod.train_tokenizer

    def counting_train(texts, vocab_size):
        texts = list(texts)
        calls.append(len(texts))
        return real_train(texts, vocab_size)

    monkeypatch.setattr(tokenizer_mod, "train_tokenizer", counting_train)
    first = get_or_train_tokenizer(corpus, 300, tmp_path)
    path = tmp_path / "tokenizers" / f"{corpus.fingerprint[:16]}-300" / "tokenizer.json"
    assert path.is_file() and calls == [len(corpus.docs("train"))]  # trained on the train split only
    mtime = path.stat().st_mtime_ns
    second = get_or_train_tokenizer(corpus, 300, tmp_path)
    assert calls == [180] and path.stat().st_mtime_ns == mtime  # loaded, not retrained
    assert second.sha256 == first.sha256
    get_or_train_tokenizer(corpus, 320, tmp_path)  # another vocab size is another entry
    assert len(calls) == 2 and (tmp_path / "tokenizers" / f"{corpus.fingerprint[:16]}-320").is_dir()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NANOSEEK_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "nanoseek"
