import json
import math

import pytest

from nanoseek.data import Corpus, Document, load_corpus
from nanoseek.data.corpus import CHUNK_CHARS, TOPLEVEL_DOMAIN


def test_builtin_corpus_loads_with_splits_and_domains():
    c = load_corpus()
    assert c.source.startswith("stdlib:")
    names = [d.name for d in c.documents]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len(c) > 500
    assert not any(("site-packages/" in n) or ("__pycache__" in n) or not n.endswith(".py") for n in names)
    n_val = len(c.docs("val"))
    assert 0.02 < n_val / len(c) < 0.10  # ~5% by hash
    assert len(c.docs("train")) + n_val == len(c)
    domains = c.domains()
    assert {"email", "asyncio", "json", TOPLEVEL_DOMAIN} <= set(domains)
    by_name = {d.name: d for d in c.documents}
    assert by_name["os.py"].domain == TOPLEVEL_DOMAIN
    assert by_name["json/decoder.py"].domain == "json"
    assert c.num_bytes() == c.num_bytes("train") + c.num_bytes("val") > 10_000_000
    assert 3.0 < c.unigram_byte_entropy("val") < 6.0
    again = load_corpus("stdlib")  # deterministic: same documents, splits and fingerprint
    assert again.fingerprint == c.fingerprint
    assert [d.split for d in again.documents] == [d.split for d in c.documents]


def _write_tree(root, files):
    for rel, content in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())


def test_directory_corpus(tmp_path):
    files = {f"pkg/mod{i}.py": f"def f{i}():\n    return {i}\n" for i in range(40)}
    files.update(
        {
            "top.txt": "top level é\n",
            "other/deep/x.md": "# title\n",
            "blob.bin": b"\x00\x01\x02",
            ".hidden/secret.txt": "nope\n",
            ".dotfile": "nope\n",
            "empty.txt": "",
            "bad.txt": b"ok \xff\n",
        }
    )
    _write_tree(tmp_path, files)
    c = load_corpus(tmp_path)
    names = {d.name for d in c.documents}
    assert "blob.bin" not in names and "empty.txt" not in names  # binary / empty skipped
    assert not any(n.startswith(".") for n in names)  # hidden skipped
    by_name = {d.name: d for d in c.documents}
    assert by_name["top.txt"].domain == TOPLEVEL_DOMAIN and by_name["top.txt"].text == "top level é\n"
    assert by_name["other/deep/x.md"].domain == "other"
    assert by_name["bad.txt"].text == "ok \ufffd\n"  # undecodable bytes replaced
    assert c.domains() == {TOPLEVEL_DOMAIN: 2, "other": 1, "pkg": 40}
    assert c.docs("val") and c.docs("train")


def test_split_depends_only_on_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_tree(a, {f"f{i}.txt": f"text {i}\n" for i in range(60)})
    _write_tree(b, {f"f{i}.txt": f"other text {i}\n" for i in range(0, 120, 2)})
    ca, cb = load_corpus(a), load_corpus(b)
    split_b = {d.name: d.split for d in cb.documents}
    common = [d for d in ca.documents if d.name in split_b]
    assert len(common) == 30 and all(split_b[d.name] == d.split for d in common)


def test_text_file_is_chunked_at_lines(tmp_path):
    lines = [f"line {i} " + "x" * (i % 50) + "\n" for i in range(12_000)]
    p = tmp_path / "book.txt"
    p.write_text("".join(lines))
    c = load_corpus(p)
    assert len(c) > 3
    assert "".join(c.texts()) == p.read_text()  # name order == chunk order
    assert all(t.endswith("\n") for t in c.texts())
    assert all(len(t) < CHUNK_CHARS + 100 for t in c.texts())
    assert c.docs("train") and c.docs("val")
    assert {d.domain for d in c.documents} == {"book"}


def test_single_document_is_cut_into_both_splits(tmp_path):
    p = tmp_path / "small.txt"
    text = "".join(f"row {i}\n" for i in range(100))
    p.write_text(text)
    c = load_corpus(p)
    train, val = c.texts("train"), c.texts("val")
    assert len(train) == 1 and len(val) == 1
    assert train[0] + val[0] == text and val[0].startswith("row ")  # cut at a line boundary
    one_line = tmp_path / "one.txt"
    one_line.write_text("abcdefghij")
    c1 = load_corpus(one_line)
    assert c1.texts("train") == ["abcdefghi"] and c1.texts("val") == ["j"]


def test_empty_split_gets_one_document(tmp_path):
    _write_tree(tmp_path, {f"f{i}.txt": f"doc {i}\n" for i in range(5)})
    c = load_corpus(tmp_path, val_fraction=1e-9)
    assert len(c.docs("val")) == 1 and len(c.docs("train")) == 4
    c = load_corpus(tmp_path, val_fraction=1 - 1e-9)
    assert len(c.docs("train")) == 1 and len(c.docs("val")) == 4


def test_jsonl_corpus(tmp_path):
    p = tmp_path / "data.jsonl"
    rows = [{"text": f"sample {i} ✓", "domain": "math" if i % 2 else "code", "id": i} for i in range(50)]
    rows.append({"text": "no domain"})
    p.write_text(
        "\n".join(json.dumps(r) for r in rows[:10]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[10:])
    )
    c = load_corpus(p)
    assert sorted(c.texts()) == sorted(r["text"] for r in rows)
    assert c.domains() == {"code": 25, "data": 1, "math": 25}
    assert c.docs("train") and c.docs("val")
    assert [d.name for d in c.documents][:2] == ["data.jsonl:000001", "data.jsonl:000002"]
    q = tmp_path / "content.jsonl"
    q.write_text("\n".join(json.dumps({"content": f"c{i}"}) for i in range(5)))
    assert sorted(load_corpus(q, text_field="content").texts()) == [f"c{i}" for i in range(5)]


def test_fingerprint_tracks_text_and_split(tmp_path):
    _write_tree(tmp_path, {f"f{i}.txt": f"doc {i}\n" for i in range(20)})
    fp = load_corpus(tmp_path).fingerprint
    assert load_corpus(tmp_path).fingerprint == fp
    assert load_corpus(tmp_path, val_fraction=0.5).fingerprint != fp
    (tmp_path / "f3.txt").write_text("changed\n")
    assert load_corpus(tmp_path).fingerprint != fp


def test_bytes_and_entropy():
    docs = [
        Document("a", "aabb", "d", "train"),
        Document("b", "é", "d", "val"),
        Document("c", "xyz", "d", "val"),
    ]
    c = Corpus.from_documents(docs, "mem")
    assert c.num_bytes("train") == 4 and c.num_bytes("val") == 5  # "é" is 2 bytes in utf-8
    assert c.unigram_byte_entropy("train") == pytest.approx(1.0)
    assert c.unigram_byte_entropy("val") == pytest.approx(math.log2(5))
    with pytest.raises(ValueError, match="split must be"):
        c.texts("test")


def test_errors_name_the_path_and_problem(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="does not exist.*nope.txt"):
        load_corpus(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        load_corpus(empty)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(ValueError, match="emptydir: directory has no text files"):
        load_corpus(tmp_path / "emptydir")
    _write_tree(tmp_path / "bindir", {"a.bin": b"\x00\x00", "b.bin": b"x\x00y"})
    with pytest.raises(ValueError, match="bindir: directory has no text files"):
        load_corpus(tmp_path / "bindir")
    binfile = tmp_path / "file.dat"
    binfile.write_bytes(b"abc\x00def")
    with pytest.raises(ValueError, match="file.dat: not a text file"):
        load_corpus(binfile)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x")
    with pytest.raises(ValueError, match="tiny.txt: corpus is a single document of 1 character"):
        load_corpus(tiny)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        load_corpus(tiny, val_fraction=0.0)


def test_jsonl_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: line is not valid JSON"):
        load_corpus(p)
    p.write_text('{"text": "ok"}\n{"body": "x", "id": 1}\n')
    with pytest.raises(
        ValueError, match=r"bad.jsonl:2: object has no field 'text' \(its keys: \['body', 'id'\]\)"
    ):
        load_corpus(p)
    p.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'text' is int, not a string"):
        load_corpus(p)
    p.write_text('["text"]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object, got list"):
        load_corpus(p)
    p.write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: no non-empty text documents"):
        load_corpus(p)
