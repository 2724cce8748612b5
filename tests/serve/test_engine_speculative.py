"""Speculative decoding in the engine: greedy output equals the plain engine's token for token (mixed prompt
lengths, mixed adapters incl. one on the MTP module, 64-token block boundaries, chunked prefill, preemption,
prefix caching, stops), the MTP latents in the pool equal a fresh full forward after many rollbacks, sampling is
reproducible with a seed, and rejected drafts' blocks are freed at once.

The model is `draftable`: block weights small next to the embeddings, so both heads act as nearly the same
bigram table and the MTP module's draft is accepted often but not always (both paths get exercised)."""

import itertools

import pytest
import torch

from nanoseek import Model
from nanoseek.model import filtered_probs
from nanoseek.serve.engine import Engine, EngineConfig
from nanoseek.serve.sampling import SamplingParams
from tests.serve.engine_helpers import ByteTok, adapter_dirs, greedy, run
from tests.tiny import ds, gpt2, make_model, tokens

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:adapter .* has LoRA on dense-MLP")]

CTX = 160
SPECS = {"a": dict(r=2, target_modules=["eh_proj", "kv_b_proj", "q_a_proj", "experts"]),  # MTP's eh_proj too
         "b": dict(r=4, target_modules="all-linear")}  # every projection, the MTP block's included


def draftable(cfg) -> Model:
    """Small block weights, unit embeddings and head, eh_proj = [I 0]: the MTP head at i sees emb(t_{i+1})."""
    m = make_model(cfg, std=0.05)
    H = cfg.hidden_size
    with torch.no_grad():
        torch.manual_seed(1)
        m.model.embed_tokens.weight.normal_(0, 1.0)
        m.lm_head.weight.normal_(0, 1.0)
        for mtp in m.mtp:
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :H] = torch.eye(H)
    return m


def engine(cfg, adapters=None, **config) -> Engine:
    config = dict(dict(block_size=64, kv_cache_tokens=1024, max_batch_tokens=64), **config)
    return Engine(draftable(cfg), ByteTok(), EngineConfig(**config), adapters)


def requests(lengths, n_new, adapters, **params):
    return [(f"r{i}", tokens(1, L, seed=L)[0].tolist(), greedy(n, **params), a)
            for i, (L, n, a) in enumerate(zip(lengths, n_new, adapters))]


def assert_same(plain: dict, spec: dict) -> None:
    for rid in plain:
        assert spec[rid]["tokens"] == plain[rid]["tokens"], rid
        assert (spec[rid]["text"], spec[rid]["reason"]) == (plain[rid]["text"], plain[rid]["reason"]), rid


@pytest.mark.parametrize("D,k", [(1, 2), (2, None)], ids=["mtp1-k2-reuse", "mtp2-chained"])
def test_greedy_speculative_equals_plain_mixed_adapters(tmp_path, D, k):
    cfg = ds(max_position_embeddings=CTX, num_nextn_predict_layers=D)
    dirs = adapter_dirs(cfg, tmp_path, SPECS)
    # prompts inside one block, across the 64-token boundary in prefill (70: chunked 64 + 6), and in decode
    reqs = requests((3, 50, 61, 70, 9), (30, 30, 20, 25, 40), (None, "a", "b", "a", "b"))
    arrivals = {0: reqs[:3], 2: reqs[3:]}
    plain = run(engine(cfg, dirs), arrivals)
    spec_engine = engine(cfg, dirs, speculative=True, num_speculative_tokens=k)
    assert_same(plain, run(spec_engine, arrivals))
    s = spec_engine.stats()
    assert s["blocks_free"] == s["blocks_total"] and s["spec_num_tokens"] == 2
    drafted, accepted = s["spec_draft_tokens"], s["spec_accepted_tokens"]
    assert drafted[0] > 0 and 0 < accepted[0] < drafted[0], s  # drafts accepted and rejected both
    assert accepted[1] > 0 and s["spec_mean_accepted_length"] > 1.1, s


def mtp_latent(model: Model, ids: torch.Tensor, n: int, adapter: str | None) -> torch.Tensor:
    """Module 1's latents (n, W) at positions 0..n-1 of ids (1, >n), from one uncached main forward."""
    hidden = model(ids[:, :n], adapter=adapter, return_output=True).hidden  # (1, n, H)
    cache = model.make_mtp_caches(1, n)[0]
    model.mtp_forward(0, ids[:, 1: n + 1], hidden, cache, adapter)
    return cache.latent[0, 0, :n]


def test_mtp_cache_equals_full_forward_after_rollbacks(tmp_path):
    """Mid-generation, module 1's latents in the pool (written in pieces, rolled back after every rejection)
    equal one fresh MTP forward over the verified tokens, with the row's adapter; the adapter matters."""
    cfg = ds(max_position_embeddings=CTX)
    dirs = adapter_dirs(cfg, tmp_path, {"a": SPECS["a"]})
    eng = engine(cfg, dirs, speculative=True, num_speculative_tokens=3)
    for rid, L, adapter in (("x", 60, "a"), ("y", 5, None)):
        eng.add_request(rid, tokens(1, L, seed=L)[0].tolist(), greedy(80), adapter)
    for _ in range(14):
        eng.step()
    ref = draftable(cfg)
    ref.load_adapter(dirs["a"], "a")
    L, bs = cfg.num_hidden_layers, 64
    for rid, adapter in (("x", "a"), ("y", None)):
        seq = eng.seqs[rid]
        n = seq.spec.lens[0]  # kept slots of module 1 (caught up to the main cache at the next step's draft)
        assert seq.num_computed - 4 <= n <= seq.num_computed and len(seq.output) > 8
        got = eng.pool.latent[L][[seq.blocks[p // bs] * bs + p % bs for p in range(n)]]  # (n, W)
        ids = torch.tensor([seq.tokens])
        torch.testing.assert_close(got, mtp_latent(ref, ids, n, adapter), atol=2e-4, rtol=2e-4)
        if adapter is not None:
            assert not torch.allclose(got, mtp_latent(ref, ids, n, None), atol=1e-2)
    assert eng.seqs["x"].num_computed > 64


def test_preemption_and_prefix_cache_stay_exact():
    """Small blocks: a pool too small for all rows preempts and recomputes; a request whose prompt is an earlier
    request's prompt + output reuses blocks published during speculative decoding, and still matches."""
    cfg = ds(max_position_embeddings=CTX)
    reqs = requests((3, 14, 9, 17), (20, 20, 20, 20), (None,) * 4)
    small = dict(block_size=4, kv_cache_tokens=64, max_batch_tokens=64)
    plain = run(engine(cfg, **small), {0: reqs})
    spec_engine = engine(cfg, speculative=True, num_speculative_tokens=2, **small)
    assert_same(plain, run(spec_engine, {0: reqs}))
    assert spec_engine.stats()["preemptions"] > 0

    spec_engine = engine(cfg, speculative=True, num_speculative_tokens=2, block_size=4)
    first = run(spec_engine, {0: reqs[:1]})
    longer = [("p", reqs[0][1] + first["r0"]["tokens"][:-3], greedy(12), None)]
    again = run(spec_engine, {0: longer})
    assert again["p"]["cached"] >= 16  # blocks filled by verify steps were published and found
    assert_same(run(engine(cfg, block_size=4), {0: longer}), again)


def test_stops_cut_the_accepted_tokens():
    cfg = ds(max_position_embeddings=CTX)
    base = run(engine(cfg), {0: requests((9,), (40,), (None,))})["r0"]
    stop_token = base["tokens"][12]
    stop_text = base["text"][20:22]
    for params in (dict(stop_token_ids=[stop_token]), dict(stop=[stop_text])):
        reqs = requests((9, 30), (40, 40), (None, None), **params)
        plain = run(engine(cfg), {0: reqs})
        assert plain["r0"]["reason"] == "stop" and len(plain["r0"]["tokens"]) < 40
        assert_same(plain, run(engine(cfg, speculative=True, num_speculative_tokens=3), {0: reqs}))


def test_sampling_is_reproducible_with_a_seed_and_counts_acceptance():
    cfg = ds(max_position_embeddings=CTX)

    def go(seed):
        eng = engine(cfg, speculative=True, num_speculative_tokens=2)
        reqs = [(f"s{i}", tokens(1, L, seed=L)[0].tolist(),
                 SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, top_k=40, seed=seed + i,
                                ignore_eos=True, presence_penalty=0.5 * (i == 1), logprobs=1 if i == 2 else None),
                 None) for i, L in enumerate((5, 40, 12))]
        return run(eng, {0: reqs}), eng.stats()

    (a, stats), (b, _), (c, _) = go(0), go(0), go(7)
    assert all(len(r["tokens"]) == 30 and all(0 <= t < cfg.vocab_size for t in r["tokens"]) for r in a.values())
    assert {k: r["tokens"] for k, r in a.items()} == {k: r["tokens"] for k, r in b.items()}
    assert {k: r["tokens"] for k, r in a.items()} != {k: r["tokens"] for k, r in c.items()}
    assert len(a["s2"]["logprobs"]) == 30
    assert stats["spec_draft_tokens"][0] > 0 and stats["spec_accepted_tokens"][0] > 0
    assert stats["spec_verify_rows"] > 0 and stats["spec_mean_accepted_length"] > 1


def test_rollback_frees_the_rejected_blocks_every_step():
    cfg = ds(max_position_embeddings=CTX)
    eng = engine(cfg, speculative=True, num_speculative_tokens=3, block_size=4)
    start = eng.stats()["blocks_free"]
    for rid, prompt, params, adapter in requests((6, 13), (40, 40), (None, None)):
        eng.add_request(rid, prompt, params, adapter)
    while eng.has_unfinished_requests():
        eng.step()
        for seq in eng.scheduler.running:  # blocks cover the kept tokens only: drafts' blocks went back
            assert len(seq.blocks) == -(-seq.num_computed // 4)
    s = eng.stats()
    assert s["blocks_free"] == start == s["blocks_total"] and s["spec_verify_rows"] > 0


def test_models_without_mtp_and_bad_values_are_refused():
    with pytest.raises(ValueError, match="MTP"):
        Engine(make_model(gpt2()), ByteTok(), EngineConfig(speculative=True))
    with pytest.raises(ValueError, match="MTP"):
        Engine(make_model(ds(num_nextn_predict_layers=0)), ByteTok(), EngineConfig(speculative=True))
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative=True, num_speculative_tokens=0).validate()
    with pytest.raises(ValueError, match="needs speculative"):
        Engine(make_model(ds()), ByteTok(), EngineConfig(num_speculative_tokens=2))


def test_sampling_matches_the_exact_sequence_distribution():
    """1200 seeded requests for one prompt, 3 new tokens over a 3-token vocabulary (temperature 1.3, top_k 2,
    k = 2 drafts from a random MTP module, so drafts are often rejected): the 27 sequence frequencies match
    ordinary sampling's exact probabilities from full forwards (chi-square, p ~ 1e-3)."""
    cfg = ds(vocab_size=3)
    model = make_model(cfg, std=0.3)
    temp, top_k, R, new = 1.3, 2, 1200, 3
    prompt = tokens(1, 4, vocab=3, seed=7)[0].tolist()
    eng = Engine(model, ByteTok(), EngineConfig(block_size=4, kv_cache_tokens=8 * R, max_num_seqs=400,
                                                max_batch_tokens=2000, speculative=True, num_speculative_tokens=2))
    reqs = [(f"s{i}", prompt, SamplingParams(max_tokens=new, temperature=temp, top_k=top_k, seed=i, ignore_eos=True),
             None) for i in range(R)]
    out = torch.tensor([r["tokens"] for r in run(eng, {0: reqs}).values()])  # (R, 3)
    seqs = torch.tensor(list(itertools.product(range(3), repeat=new)))  # (27, 3)
    full = torch.cat([torch.tensor([prompt]).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        probs = filtered_probs(model(full)[:, 3:-1], temp, top_k)  # (27, new, V)
    exact = probs.gather(2, seqs[..., None])[..., 0].prod(1)  # (27,)
    counts = torch.bincount((out * torch.tensor([9, 3, 1])).sum(1), minlength=27).float()
    keep = exact > 0
    chi2 = float(((counts[keep] - R * exact[keep]) ** 2 / (R * exact[keep])).sum())
    assert counts[~keep].sum() == 0  # nothing outside top-k
    dof = int(keep.sum()) - 1
    assert chi2 < {7: 24.3, 8: 26.1}.get(dof, 3 * dof + 20), (chi2, dof)
    s = eng.stats()
    assert 0.1 < s["spec_accepted_tokens"][0] / s["spec_draft_tokens"][0] < 0.9, s  # both branches exercised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_speculative_equals_plain_on_cuda(tmp_path):
    """The mixed-adapter greedy identity with both engines on a CUDA device. Waits for a GPU."""
    cfg = ds(max_position_embeddings=CTX)
    dirs = adapter_dirs(cfg, tmp_path, SPECS)
    reqs = requests((3, 50, 70), (30, 30, 25), (None, "a", "b"))
    plain = run(engine(cfg, dirs, device="cuda"), {0: reqs})
    assert_same(plain, run(engine(cfg, dirs, device="cuda", speculative=True, num_speculative_tokens=2), {0: reqs}))
