"""SFT data: records, chat template, completion-only targets, padding/packing, resumable order, built-in tasks."""

import json

import pytest
import torch

from nanoseek import Model, ModelConfig
from nanoseek.data import Corpus, Document, train_tokenizer
from nanoseek.data.sft import (
    CHAT_TEMPLATE_JINJA,
    IGNORE_INDEX,
    SFTLoader,
    add_chat_template,
    builtin_task,
    builtin_tasks,
    encode_record,
    load_sft,
    read_jsonl,
    render_chat,
    sft_eval_batches,
    truncate,
)


@pytest.fixture(scope="module")
def tok():
    text = "def f(x):\n    return x + 1\n" * 50 + "<|user|>\nhello\n<|assistant|>\nhi there\n" * 20
    return train_tokenizer([text], vocab_size=300)


def test_prompt_completion_targets(tok):
    ex = encode_record(tok, {"prompt": "def f(x):\n", "completion": "    return x"})
    n_prompt = len(tok.encode("def f(x):\n"))
    assert ex.ids[-1] == tok.eos_id and ex.loss[-1]
    assert not any(ex.loss[:n_prompt]) and all(ex.loss[n_prompt:])
    loader = SFTLoader([ex], seq_len=32, batch_size=1)
    x, y = loader.next_batch()
    L = len(ex.ids)
    assert x[0, : L - 1].tolist() == list(ex.ids[:-1]) and (x[0, L - 1:] == tok.pad_id).all()
    want = [t if trained else IGNORE_INDEX for t, trained in zip(ex.ids[1:], ex.loss[1:])]
    assert y[0, : L - 1].tolist() == want and (y[0, L - 1:] == IGNORE_INDEX).all()
    assert (y[0] != IGNORE_INDEX).sum() == L - n_prompt  # completion tokens + EOS


def test_chat_template(tok, tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi there"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ok"}]
    text = render_chat(msgs)
    assert text == "<|system|>\nbe brief\n<|user|>\nhello\n<|assistant|>\nhi there<|eos|><|user|>\nbye\n" \
                   "<|assistant|>\nok<|eos|>"
    ex = encode_record(tok, {"messages": msgs})
    trained = [t for t, m in zip(ex.ids, ex.loss) if m]
    assert trained == tok.encode("hi there") + [tok.eos_id] + tok.encode("ok") + [tok.eos_id]
    assert ex.ids.count(tok.eos_id) == 2  # the marker text "<|eos|>" never appears as text: EOS is an id
    tok.save(tmp_path)
    add_chat_template(tmp_path)
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert conf["chat_template"] == CHAT_TEMPLATE_JINJA
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(msgs, tokenize=False) == text
    assert hf.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True) == \
        render_chat(msgs[:2]) + "<|assistant|>\n"


@pytest.mark.parametrize("bad", [{"prompt": "x"}, {"messages": []}, {"messages": [{"role": "user", "content": "x"}]},
                                 {"messages": [{"role": "robot", "content": "x"}]}, {"prompt": 1, "completion": "y"},
                                 [1, 2]])
def test_bad_records(tok, bad, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=":3"):
        read_jsonl(f)
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_jsonl(f)


def test_truncate_keeps_prompt_end_and_completion_start(tok):
    ex = encode_record(tok, {"prompt": "p " * 40, "completion": "c " * 40})
    t = truncate(ex, 30)
    assert len(t.ids) == 30 and not t.loss[0] and t.loss[1]
    first = ex.loss.index(True)
    assert t.ids == ex.ids[first - 1:first + 29]


def test_padding_is_exact_for_real_positions(tok):
    """Right padding cannot change the logits at real positions (causal attention)."""
    torch.manual_seed(0)
    m = Model(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                          moe_intermediate_size=16, n_routed_experts=4, n_group=2, topk_group=1,
                          intermediate_size=48, max_position_embeddings=64)).eval()
    ex = encode_record(tok, {"prompt": "def f(x):\n", "completion": "    return x + 1\n"})
    x, _ = next(iter(sft_eval_batches([ex], seq_len=40, batch_size=1)))
    n = len(ex.ids) - 1
    with torch.no_grad():
        assert torch.allclose(m(x)[:, :n], m(x[:, :n]), atol=1e-5)


def _examples(tok, n=23):
    return [encode_record(tok, {"prompt": f"def f{i}(x):\n", "completion": "    return x\n" * (1 + i % 4)})
            for i in range(n)]


@pytest.mark.parametrize("pack", [False, True])
def test_loader_deterministic_resumable_sharded(tok, pack):
    exs = _examples(tok)
    a = SFTLoader(exs, seq_len=16, batch_size=4, seed=3, pack=pack)
    first = [a.next_batch() for _ in range(3)]
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(2 * len(a))]  # crosses epoch boundaries
    b = SFTLoader(exs, seq_len=16, batch_size=4, seed=3, pack=pack)
    b.load_state_dict(state)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in
               zip(rest, [b.next_batch() for _ in range(len(rest))]))
    c = SFTLoader(exs, seq_len=16, batch_size=4, seed=3, pack=pack)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, [c.next_batch() for _ in range(3)]))
    r0 = SFTLoader(exs, seq_len=16, batch_size=2, seed=3, pack=pack, rank=0, world_size=2)
    r1 = SFTLoader(exs, seq_len=16, batch_size=2, seed=3, pack=pack, rank=1, world_size=2)
    for x, _ in first:
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), x)
    if pack:  # packed rows are full: no padding in x
        assert all((x != tok.pad_id).all() for x, _ in first)
    with pytest.raises(ValueError, match="seq_len"):
        SFTLoader(exs, seq_len=8, batch_size=4, pack=pack).load_state_dict(state)


def test_builtin_tasks():
    docs = [Document(f"{p}/m{i}.py", "".join(f"line {p} {i} {k}\n" for k in range(60)), p,
                     "val" if i == 0 else "train") for p in ("alpha", "beta") for i in range(5)]
    docs.append(Document("x.py", "a\n", "_toplevel", "train"))
    corpus = Corpus.from_documents(docs, "test")
    assert builtin_tasks(corpus) == {"alpha": {"train": 4, "val": 1}, "beta": {"train": 4, "val": 1}}
    train = builtin_task("alpha", "train", corpus, prompt_lines=10, completion_lines=5)
    val = builtin_task("alpha", "val", corpus, prompt_lines=10, completion_lines=5)
    assert len(train) == 4 * 4 and len(val) == 4
    assert train[0] == {"prompt": "".join(f"line alpha 1 {k}\n" for k in range(10)),
                        "completion": "".join(f"line alpha 1 {k}\n" for k in range(10, 15))}
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}
    with pytest.raises(ValueError, match="available: alpha, beta"):
        builtin_task("gamma", corpus=corpus)


def test_load_sft_builtin_and_real_corpus(tok):
    tasks = builtin_tasks()  # the real standard-library corpus
    assert "email" in tasks
    exs = load_sft("builtin:email", tok, split="val", max_examples=5)
    assert len(exs) == 5 and all(any(e.loss) for e in exs)
