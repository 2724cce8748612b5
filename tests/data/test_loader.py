import json

import numpy as np
import pytest
import torch

from nanoseek.data import Corpus, Document, PackedLoader, eval_batches, tokenize_corpus, train_tokenizer
from nanoseek.data import loader as loader_mod
from nanoseek.data.loader import token_dtype

T, B = 8, 3


def _stream(n: int = 1000) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # token value == position: windows are easy to identify


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _same(batches_a, batches_b) -> bool:
    return all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(batches_a, batches_b)
    )


def test_batches_are_shifted_windows():
    loader = PackedLoader(_stream(), T, B)
    assert loader.num_windows == 999 // T and len(loader) == (999 // T) // B
    assert loader.tokens_per_batch == B * T
    x, y = loader.next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
    assert torch.equal(y, x + 1)  # next-token targets
    assert torch.all(x[:, 0] % T == 0)  # windows start on the stride


def test_determinism_and_seed():
    a, b, c = (PackedLoader(_stream(), T, B, seed=s) for s in (7, 7, 8))
    ba, bb, bc = _take(a, 5), _take(b, 5), _take(c, 5)
    assert _same(ba, bb) and not _same(ba, bc)


def test_epochs_cover_windows_once_and_reshuffle():
    loader = PackedLoader(_stream(), T, B)
    starts = []
    for epoch in range(2):
        batches = list(loader)  # iterating = the rest of the current epoch
        assert len(batches) == len(loader) and loader.epoch == epoch
        starts.append(torch.cat([x[:, 0] for x, _ in batches]).tolist())
    assert len(set(starts[0])) == len(starts[0]) == len(loader) * B  # no window twice in an epoch
    assert starts[0] != starts[1]
    assert loader.next_batch()[0][:, 0].tolist() != starts[1][:B]  # next_batch rolls into epoch 2
    assert loader.epoch == 2


def test_two_ranks_union_equals_one_rank_with_double_batch():
    single = PackedLoader(_stream(), T, 2 * B, seed=3)
    ranks = [PackedLoader(_stream(), T, B, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == len(ranks[0])
    for _ in range(2 * len(single) + 1):  # across two epoch boundaries
        x, y = single.next_batch()
        (x0, y0), (x1, y1) = (r.next_batch() for r in ranks)
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
        assert not set(x0[:, 0].tolist()) & set(x1[:, 0].tolist())


@pytest.mark.parametrize("k", [0, 1, 5, 41, 42, 43, 90])
def test_resume_matches_uninterrupted(k):
    ref = PackedLoader(_stream(), T, B, seed=11)
    assert len(ref) == 41  # k covers the epoch boundary: 41 (end), 42, 43, 90 (third epoch)
    expected = _take(ref, k + 50)[k:]
    run = PackedLoader(_stream(), T, B, seed=11)
    _take(run, k)
    state = json.loads(json.dumps(run.state_dict()))
    assert set(state) == {"epoch", "position", "seed", "seq_len", "batch_size", "world_size"}
    resumed = PackedLoader(_stream(), T, B, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 50), expected)


def test_resume_across_world_sizes():
    ranks = [PackedLoader(_stream(), T, B, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        _take(r, 30)
    single = PackedLoader(_stream(), T, 2 * B)
    single.load_state_dict(ranks[0].state_dict())
    for _ in range(10):
        x, _ = single.next_batch()
        assert torch.equal(x, torch.cat([r.next_batch()[0] for r in ranks]))


def test_load_state_dict_mismatch():
    sd = PackedLoader(_stream(), T, B).state_dict()
    with pytest.raises(ValueError, match="seq_len 8, this loader has 16"):
        PackedLoader(_stream(), 16, B).load_state_dict(sd)
    with pytest.raises(ValueError, match="global batch 3 x 1 ranks = 3 windows, this loader has 2 x 2 = 4"):
        PackedLoader(_stream(), T, 2, world_size=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="position 99 is outside"):
        PackedLoader(_stream(), T, B).load_state_dict({**sd, "position": 99})


def test_too_little_data_and_bad_args():
    with pytest.raises(ValueError, match="needs 49 tokens, the stream has 40"):
        PackedLoader(_stream(40), T, 3, world_size=2)
    PackedLoader(_stream(49), T, 3, world_size=2)  # exactly enough
    with pytest.raises(ValueError, match="rank must be in"):
        PackedLoader(_stream(), T, B, rank=2, world_size=2)
    with pytest.raises(ValueError, match="needs 9 tokens, the stream has 5"):
        eval_batches(_stream(5), T, B)


def test_eval_batches_in_order():
    tokens = _stream(100)  # 99 // 8 = 12 windows -> batches of 5, 5, 2
    batches = list(eval_batches(tokens, T, 5))
    assert [x.shape[0] for x, _ in batches] == [5, 5, 2]
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == list(range(0, 12 * T, T))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(eval_batches(tokens, T, 5, max_batches=2))) == 2
    assert _same(list(eval_batches(tokens, T, 5)), batches)


# ------------------------------------------------------------------------------------- tokenize_corpus


def _corpus() -> Corpus:
    docs = [
        Document(
            f"doc{i:03d}",
            f"def f{i}(x):\n    return x + {i}  # é 🎉\n",
            "code",
            "val" if i % 8 == 0 else "train",
        )
        for i in range(100)
    ]
    return Corpus.from_documents(docs, "mem")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus().texts("train"), 300)


def test_tokenize_corpus_content_and_cache(tok, tmp_path, monkeypatch):
    corpus = _corpus()
    tokens = tokenize_corpus(corpus, tok, "train", tmp_path)
    expected = [t for text in corpus.texts("train") for t in tok.encode(text) + [tok.eos_id]]
    assert tokens.dtype == np.uint16 and tokens.tolist() == expected
    path = tmp_path / "tokens" / f"{corpus.fingerprint[:16]}-{tok.sha256[:16]}-train.bin"
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left
    with pytest.raises(ValueError):
        tokens[0] = 5  # read-only
    monkeypatch.setattr(loader_mod, "_write_tokens", lambda *a, **k: pytest.fail("re-tokenized"))
    assert tokenize_corpus(corpus, tok, "train", tmp_path).tolist() == expected


def test_tokenize_corpus_val_split_and_loader(tok, tmp_path):
    corpus = _corpus()
    val = tokenize_corpus(corpus, tok, "val", tmp_path)
    assert int((val == tok.eos_id).sum()) == len(corpus.docs("val"))
    x, y = next(iter(eval_batches(val, 16, 2)))
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="split must be"):
        tokenize_corpus(corpus, tok, "test", tmp_path)


def test_tokenize_corpus_is_atomic(tok, tmp_path, monkeypatch):
    corpus = _corpus()
    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir()
    name = f"{corpus.fingerprint[:16]}-{tok.sha256[:16]}-train.bin"
    stray = tokens_dir / f"{name}.tmp.999.deadbeef"  # left by a crashed run: never trusted
    stray.write_bytes(b"\xff" * 10)
    monkeypatch.setattr(loader_mod, "ENCODE_BATCH_DOCS", 4)
    calls = []
    real = tok.encode_batch

    def crash_after_two(texts):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt("simulated crash mid-write")
        return real(texts)

    monkeypatch.setattr(tok, "encode_batch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus(corpus, tok, "train", tmp_path)
    assert sorted(p.name for p in tokens_dir.iterdir()) == [stray.name]  # no final file, own temp removed
    monkeypatch.setattr(tok, "encode_batch", real)
    tokens = tokenize_corpus(corpus, tok, "train", tmp_path)
    assert tokens.tolist() == [t for text in corpus.texts("train") for t in tok.encode(text) + [tok.eos_id]]


def test_token_dtype():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
