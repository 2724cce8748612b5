"""Engine request handling: per-request sampling (seeds independent of batch mates, penalties, logprobs), stop
strings across token boundaries, UTF-8-safe streaming, aborts, no block leak over 1,000 requests, bad input,
runtime adapters, and the offline LLM API on a saved checkpoint."""

import pytest
import torch

from nanoseek import Model
from nanoseek.data import Tokenizer
from nanoseek.serve import LLM, SamplingParams
from nanoseek.serve.detokenizer import Detokenizer
from tests.serve.engine_helpers import ByteTok, adapter_dirs, greedy, greedy_ref, make_engine, reference, run
from tests.tiny import ds, gpt2, tokens

pytestmark = pytest.mark.usefixtures("single_thread")


def _prompt(L, seed=None):
    return tokens(1, L, seed=L if seed is None else seed)[0].tolist()


def test_seeded_sampling_independent_of_batch_mates():
    cfg = ds()
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
    alone = run(make_engine(cfg), {0: [("s", _prompt(6), p, None)]})["s"]["tokens"]
    mates = [(f"m{i}", _prompt(3 + i), SamplingParams(max_tokens=5 + i, temperature=1.0, ignore_eos=True), None)
             for i in range(4)]
    crowd = run(make_engine(cfg), {0: mates[:2], 1: [("s", _prompt(6), p, None)], 2: mates[2:]})["s"]["tokens"]
    other = SamplingParams(max_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=8, ignore_eos=True)
    reseeded = run(make_engine(cfg), {0: [("s", _prompt(6), other, None)]})["s"]["tokens"]
    assert alone == crowd and len(alone) == 10
    assert reseeded != alone


def test_top_k_one_is_greedy_and_logprobs():
    cfg = gpt2()
    engine = make_engine(cfg)
    p = SamplingParams(max_tokens=6, temperature=0.8, top_k=1, logprobs=3, ignore_eos=True, seed=1)
    res = run(engine, {0: [("k", _prompt(5), p, None)]})["k"]
    assert res["tokens"] == greedy_ref(reference(cfg, {}), _prompt(5), 6)
    assert len(res["logprobs"]) == 6
    for tok, (lp, top) in zip(res["tokens"], res["logprobs"]):
        assert len(top) == 3 and lp == pytest.approx(max(top.values())) and top[tok] == lp and lp <= 0


def test_penalties_match_a_plain_reference_loop():
    cfg = gpt2()
    model = reference(cfg, {})
    prompt, fp, pp = _prompt(4, seed=2), 0.7, 0.5
    ids, counts = list(prompt), torch.zeros(cfg.vocab_size)
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids]))[0, -1] - fp * counts - pp * (counts > 0).float()
            ids.append(int(logits.argmax()))
            counts[ids[-1]] += 1
    got = run(make_engine(cfg), {0: [("p", prompt, greedy(8, frequency_penalty=fp, presence_penalty=pp), None)]})
    assert got["p"]["tokens"] == ids[len(prompt):]
    assert got["p"]["tokens"] != greedy_ref(model, prompt, 8)  # the penalties did change something


def test_stop_string_split_across_tokens_and_stop_token_ids():
    cfg = ds()
    prompt = _prompt(5)
    ref = greedy_ref(reference(cfg, {}), prompt, 12)
    tok = ByteTok()
    text = tok.decode(ref)
    stop = text[5:7]  # bytes of tokens 5 and 6: one stop string split over two tokens
    cut = text.find(stop)
    res = run(make_engine(cfg), {0: [("s", prompt, greedy(12, stop=[stop]), None)]})["s"]
    assert res["text"] == text[:cut] and res["reason"] == "stop"
    assert res["tokens"] == ref[: cut + 2]
    stop_id = ref[3]
    res = run(make_engine(cfg), {0: [("t", prompt, greedy(12, stop_token_ids=[stop_id]), None)]})["t"]
    assert res["tokens"] == ref[: ref.index(stop_id) + 1] and res["reason"] == "stop"


def test_detokenizer_holds_half_utf8_and_stop_prefixes():
    d = Detokenizer(ByteTok(), stop=[])
    assert d.add([2]) == "" and d.add([3]) == "é"  # "é" is two byte tokens: nothing half-made is emitted
    d = Detokenizer(ByteTok(), stop=["o wo"])
    assert d.add([4]) == "l"  # "lo w": the last 3 characters could start the stop string
    assert d.add([5]) == "" and d.stopped and d.text == "l"  # "lo wor" contains "o wo": cut before it
    d = Detokenizer(ByteTok(), stop=["zz"])
    assert d.add([4]) == "lo " and d.finish() == "w"


def test_abort_frees_blocks_and_reports():
    engine = make_engine(ds())
    for i in range(3):
        engine.add_request(f"a{i}", _prompt(9 + i), greedy(20), None)
    engine.step()
    engine.step()
    used = engine.stats()["blocks_used"]
    engine.abort_request("a1")
    engine.abort_request("nope")  # unknown ids are ignored
    assert engine.stats()["blocks_used"] < used
    outs = {o.request_id: o for o in engine.step()}
    assert outs["a1"].finished and outs["a1"].finish_reason == "abort" and outs["a1"].new_token_ids == []
    engine.abort_request("a0")
    engine.abort_request("a2")
    engine.step()
    assert not engine.has_unfinished_requests()
    s = engine.stats()
    assert s["blocks_free"] == s["blocks_total"] and s["running"] == s["waiting"] == 0


def test_pool_returns_to_full_after_1000_requests():
    engine = make_engine(gpt2(), kv_cache_tokens=256, max_batch_tokens=128, max_num_seqs=64)
    g = torch.Generator().manual_seed(0)
    finished, n = 0, 1000
    for i in range(n):
        L, m = int(torch.randint(1, 13, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        engine.add_request(str(i), _prompt(L, seed=i % 50), greedy(m), None)
    step = 0
    while engine.has_unfinished_requests():
        if step % 5 == 0 and engine.scheduler.running:  # abort a running request now and then
            engine.abort_request(engine.scheduler.running[-1].request_id)
        finished += sum(o.finished for o in engine.step())
        step += 1
    s = engine.stats()
    assert finished == n
    assert s["blocks_free"] == s["blocks_total"] == 64 and s["blocks_used"] == 0
    assert s["prefix_hits"] > 0  # prompts repeat: the cache was used and still nothing leaked


def test_bad_input_raises():
    engine = make_engine(gpt2())
    bad = dict(max_tokens=0, temperature=-1.0, top_p=0.0, top_k=0, logprobs=21, presence_penalty=3.0,
               frequency_penalty=float("nan"), stop=[""], stop_token_ids=[-1], seed=1.5)
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"^{name}:"):
            engine.add_request("x", [1, 2], SamplingParams(**{name: value}))
    with pytest.raises(KeyError):
        engine.add_request("x", [1, 2], SamplingParams(), adapter="missing")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.add_request("x", [1] * 60, SamplingParams(max_tokens=5))
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("x", [64], SamplingParams())
    engine.add_request("x", [1, 2], SamplingParams())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [1, 2], SamplingParams())


def test_runtime_adapters_load_unload(tmp_path):
    cfg = ds()
    dirs = adapter_dirs(cfg, tmp_path, {"a": dict(r=2, target_modules=["kv_b_proj"])})
    engine = make_engine(cfg)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError):
        engine.load_adapter("a", str(bad))
    with pytest.raises(ValueError):
        engine.load_adapter("a", str(tmp_path / "missing"))
    assert engine.adapter_names == [] and engine.model.adapters == []  # nothing changed
    engine.load_adapter("a", dirs["a"])
    res = run(engine, {0: [("r", _prompt(6), greedy(5), "a")]})
    assert res["r"]["tokens"] == greedy_ref(reference(cfg, dirs), _prompt(6), 5, "a")
    engine.unload_adapter("a")
    assert engine.adapter_names == [] and engine.model.adapters == []
    with pytest.raises(KeyError):
        engine.unload_adapter("a")
    with pytest.raises(KeyError):
        engine.add_request("r2", _prompt(6), greedy(5), adapter="a")


def test_llm_offline_api_on_a_checkpoint(sft_base):
    base = sft_base / "base"
    tok, model = Tokenizer.load(base), Model.from_pretrained(base).eval()
    prompts = ["def f1(x):\n", "def f22(x):\n    return"]
    llm = LLM(base, block_size=4, kv_cache_tokens=256)
    outs = llm.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = tok.encode(prompt)
        ref = model.generate(torch.tensor([ids]), 6)[0, len(ids):].tolist()
        assert out.token_ids == ref and out.finish_reason == "length"
        assert out.text == tok.decode(ref, skip_special_tokens=True)


def test_long_prompt_never_stalls_running_decodes():
    # max_batch_tokens=8: a 40-token prompt arriving mid-decode is prefilled in chunks beside the running decodes,
    # which each get their token on every step
    engine = make_engine(ds(), max_batch_tokens=8)
    for rid in ("d0", "d1"):
        engine.add_request(rid, _prompt(3, seed=len(rid)), greedy(12), None)
    engine.step()  # both prompts prefilled, first tokens out
    engine.add_request("long", _prompt(40), greedy(2), None)
    for step in range(1, 7):
        outs = {o.request_id: o for o in engine.step()}
        assert len(outs["d0"].new_token_ids) == len(outs["d1"].new_token_ids) == 1
        assert "long" not in outs and engine.seqs["long"].num_computed == 6 * step  # the rest of the budget
    outs = {o.request_id: o for o in engine.step()}  # the last 4 prompt tokens: the long request's first token
    assert len(outs["long"].new_token_ids) == 1 and len(outs["d0"].new_token_ids) == 1


def test_engine_config_checks_and_cpu_pool_default():
    cfg = gpt2()
    for bad in (dict(block_size=0), dict(max_loras=1.5), dict(kv_cache_tokens=2), dict(kv_cache_fraction=0.0),
                dict(dtype="float33")):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))}:"):
            make_engine(cfg, **bad)
    engine = make_engine(cfg, kv_cache_tokens=None, max_num_seqs=3)  # CPU default: max_num_seqs full contexts
    assert engine.pool.num_blocks * 4 == 3 * engine.max_model_len
