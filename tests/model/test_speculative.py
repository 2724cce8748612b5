"""MTP speculative decoding: greedy output identical to plain decoding, the acceptance rule preserves the
sampling distribution (and wrong rules provably fail the same test), cache rollback leaves no stale latent."""

from __future__ import annotations

import itertools

import pytest
import torch

from nanoseek import LoraConfig
from nanoseek.model import accept_drafts, decoding, filtered_probs
from tests import tiny
from tests.tiny import make_model, tokens

pytestmark = pytest.mark.usefixtures("single_thread")

LENGTHS = torch.tensor([6, 3, 5, 1])  # left-aligned prompts of mixed lengths


def ds(V: int, D: int = 1, **kw):
    # a 3-token vocabulary makes random MTP drafts right often enough to see runs of acceptances and rejections
    return tiny.ds(vocab_size=V, num_nextn_predict_layers=D, max_position_embeddings=128, **kw)


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# ---------------------------------------------------------------------- greedy: identical to plain decoding
@pytest.mark.parametrize("V,D,k", [(3, 1, 1), (3, 1, 3), (4, 2, 2), (4, 2, 3)])
def test_greedy_speculative_equals_plain_mixed_lengths(V, D, k):
    model = make_model(ds(V, D))
    x = tokens(4, 6, vocab=V)
    plain = model.generate(x, 20, prompt_lengths=LENGTHS)
    spec, stats = model.generate(x, 20, prompt_lengths=LENGTHS, speculative=True, num_speculative_tokens=k,
                                 return_stats=True)
    assert torch.equal(spec, plain)
    acc = stats["acceptance_by_position"]
    assert 0 < acc[0] < 1  # both acceptances and rejections happened
    assert stats["rounds"] < 20  # some rounds emitted more than one token


def test_plain_with_prompt_lengths_equals_each_row_alone():
    model = make_model(ds(8))
    x = tokens(4, 6, vocab=8)
    out = model.generate(x, 10, prompt_lengths=LENGTHS)
    assert out.shape == (4, 16)
    for b, n in enumerate(LENGTHS.tolist()):
        alone = model.generate(x[b:b + 1, :n], 10)[0]
        assert torch.equal(out[b, : n + 10], alone)
        assert (out[b, n + 10:] == 0).all()  # padding after a short row


def test_greedy_speculative_with_mixed_per_row_adapters():
    model = make_model(ds(3))
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(10 + i)
        model.add_adapter(name, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear"))
    x = tokens(4, 6, vocab=3)
    rows = torch.tensor([0, -1, 1, 0])
    plain = model.generate(x, 16, prompt_lengths=LENGTHS, adapter=rows)
    spec, stats = model.generate(x, 16, prompt_lengths=LENGTHS, adapter=rows, speculative=True,
                                 num_speculative_tokens=2, return_stats=True)
    assert torch.equal(spec, plain)
    assert 0 < stats["acceptance_by_position"][0] < 1
    assert not torch.equal(plain, model.generate(x, 16, prompt_lengths=LENGTHS))  # the adapters matter
    # the MTP draft runs each row's adapter: per-row forward == that adapter alone
    caches = [model.make_mtp_caches(1, 8)[0] for _ in range(4)]
    batch_cache = model.make_mtp_caches(4, 8)[0]
    h = torch.randn(4, 5, model.config.hidden_size)
    _, per_row = model.mtp_forward(0, x[:, :5], h, batch_cache, adapter=rows)
    for b, a in enumerate(rows.tolist()):
        _, alone = model.mtp_forward(0, x[b:b + 1, :5], h[b:b + 1], caches[b], adapter=[None, "a", "b"][a + 1]
                                     if a >= 0 else None)
        torch.testing.assert_close(per_row[b], alone[0], atol=1e-5, rtol=1e-5)
    _, base = model.mtp_forward(0, x[:1, :5], h[:1], model.make_mtp_caches(1, 8)[0])
    assert (base[0] - per_row[0]).abs().max() > 1e-3


def test_greedy_speculative_eos_matches_plain():
    model = make_model(ds(4))
    x = tokens(4, 6, vocab=4, seed=3)
    plain = model.generate(x, 12, prompt_lengths=LENGTHS, eos_token_id=2)
    spec = model.generate(x, 12, prompt_lengths=LENGTHS, eos_token_id=2, speculative=True,
                          num_speculative_tokens=3)
    assert torch.equal(spec, plain)
    assert (plain == 2).any()


# ---------------------------------------------------------------------- drafts = the trained MTP's predictions
def test_drafts_equal_cache_free_mtp_on_the_final_sequence(monkeypatch):
    """With its own cache, rolled back each round, MTP module 1 drafts exactly what the training-time (cache-free)
    MTP computes at that position of the final sequence; chained module 2 too where draft 1 was accepted."""
    model = make_model(ds(4, D=2))
    x = tokens(4, 6, vocab=4)
    rounds = []
    draft = decoding.Speculator.draft

    def recording_draft(self, n):
        d, q = draft(self, n)
        rounds.append((n.clone(), d.clone()))
        return d, q

    monkeypatch.setattr(decoding.Speculator, "draft", recording_draft)
    out = model.generate(x, 20, prompt_lengths=LENGTHS, speculative=True, num_speculative_tokens=2)
    with torch.no_grad():
        main = model(out, return_output=True)
        h1, l1 = model.mtp_forward(0, out[:, 1:], main.hidden[:, :-1], model.make_mtp_caches(4, 32)[0])
        _, l2 = model.mtp_forward(1, out[:, 2:], h1[:, :-1], model.make_mtp_caches(4, 32)[1])
    checked = [0, 0]
    for n, d in rounds:
        for b in range(4):
            i = int(n[b]) - 1  # the drafting position
            if i + 2 < int(LENGTHS[b]) + 20:
                assert d[b, 0] == l1[b, i].argmax()
                checked[0] += 1
                if out[b, i + 2] == d[b, 0]:  # draft 1 accepted: the final sequence holds it
                    assert d[b, 1] == l2[b, i].argmax()
                    checked[1] += 1
    assert checked[0] > 40 and checked[1] > 3


# ---------------------------------------------------------------------- rollback
def test_rollback_leaves_no_stale_latent():
    """Write k+1 tokens, roll each row back by a different count, write new tokens: the logits equal those of a
    cache that never saw the rejected tokens, for the main model and for an MTP module's own cache."""
    model = make_model(ds(8))
    B, H = 3, model.config.hidden_size
    prefix, junk, fresh = tokens(B, 5, vocab=8, seed=1), tokens(B, 4, vocab=8, seed=2), tokens(B, 3, vocab=8, seed=3)
    keep = torch.tensor([0, 2, 4])  # tokens of `junk` kept per row
    c = model.make_cache(B, 32)
    model(prefix, cache=c)
    model(junk, cache=c)
    c.rollback(4 - keep)
    assert c.lengths.tolist() == (5 + keep).tolist()
    got = model(fresh, cache=c)
    for b in range(B):
        ref = torch.cat([prefix[b], junk[b, : keep[b]], fresh[b]])[None]
        torch.testing.assert_close(got[b], model(ref)[0, -3:], atol=1e-5, rtol=1e-5)  # from scratch, no cache
    # the MTP module's cache
    hid = torch.randn(B, 12, H, generator=torch.Generator().manual_seed(0))
    m = model.make_mtp_caches(B, 32)[0]
    model.mtp_forward(0, prefix, hid[:, :5], m)
    model.mtp_forward(0, junk, hid[:, 5:9], m)
    m.rollback(4 - keep)
    _, got = model.mtp_forward(0, fresh, hid[:, 9:], m)
    for b in range(B):
        n = int(keep[b])
        ids = torch.cat([prefix[b], junk[b, :n], fresh[b]])[None]
        h = torch.cat([hid[b, : 5 + n], hid[b, 9:]])[None]
        _, ref = model.mtp_forward(0, ids, h, model.make_mtp_caches(1, 32)[0])
        torch.testing.assert_close(got[b], ref[0, -3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rollback"):
        c.rollback(100)


# ---------------------------------------------------------------------- the acceptance rule's distribution
V8, K, N = 8, 2, 200_000
CHI2_CRIT = 29.9  # chi-square, 7 degrees of freedom, p = 1e-4


def _rule_case():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(K + 1, V8, generator=g) ** 3
    p[0, 0] = 0.0  # a token the target never emits
    p = p / p.sum(-1, keepdim=True)  # (K+1, V) target per position (independent of the prefix)
    q = torch.rand(K, V8, generator=g) ** 3
    q = q / q.sum(-1, keepdim=True)  # (K, V) draft distributions
    return p, q, g


def _emitted_counts(n, out):
    first = torch.bincount(out[:, 0], minlength=V8).float()
    second = torch.bincount(out[n >= 1, 1], minlength=V8).float()  # the second token, when one was emitted
    return first, second


def _run_rule(greedy_draft=False, resample_from_p=False):
    p, q, g = _rule_case()
    P, Q = p.expand(N, -1, -1), q.expand(N, -1, -1)
    draft = q.argmax(-1).expand(N, -1) if greedy_draft else torch.multinomial(q, N, True, generator=g).T
    n, out = accept_drafts(draft.contiguous(), P, Q, g)
    if resample_from_p:  # WRONG: at a rejection draw from p instead of norm(max(0, p - q))
        rejected = n < K
        redo = torch.multinomial(p[n[rejected]], 1, generator=g)[:, 0]
        out[rejected, n[rejected]] = redo
    return p, n, out


def test_speculative_sampling_rule_preserves_the_distribution():
    p, n, out = _run_rule()
    first, second = _emitted_counts(n, out)
    assert chi2(first, p[0]) < CHI2_CRIT and chi2(second, p[1]) < CHI2_CRIT
    assert 0.1 < (n >= 1).float().mean() < 0.9  # both branches are exercised
    # every draft accepted -> the bonus token follows p[K]
    bonus = torch.bincount(out[n == K, K], minlength=V8).float()
    assert chi2(bonus, p[K]) < CHI2_CRIT


@pytest.mark.parametrize("wrong", ["greedy_draft", "resample_from_p"])
def test_wrong_acceptance_rules_fail_the_same_test(wrong):
    p, n, out = _run_rule(**{wrong: True})
    first, second = _emitted_counts(n, out)
    assert chi2(first, p[0]) > 10 * CHI2_CRIT


def test_speculative_sampling_generate_matches_exact_sequence_distribution():
    """One prompt, 2000 rows, 3 new tokens over a 3-token vocabulary with top_k=2: the 27 sequence frequencies
    match the exact probabilities of ordinary sampling, computed from full forwards."""
    model = make_model(ds(3), std=0.3)
    temp, top_k, R, new = 1.3, 2, 2000, 3
    prompt = tokens(1, 4, vocab=3, seed=7)
    out = model.generate(prompt.expand(R, -1), new, temperature=temp, top_k=top_k, seed=0, speculative=True,
                         num_speculative_tokens=2)[:, 4:]
    seqs = torch.tensor(list(itertools.product(range(3), repeat=new)))  # (27, 3)
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        probs = filtered_probs(model(full)[:, 3:-1], temp, top_k)  # (27, new, V)
    exact = probs.gather(2, seqs[..., None])[..., 0].prod(1)  # (27,)
    counts = torch.bincount((out * torch.tensor([9, 3, 1])).sum(1), minlength=27).float()
    dof = int((exact > 0).sum()) - 1
    assert chi2(counts, exact) < {7: 24.3, 8: 26.1}.get(dof, 3 * dof + 20)  # p ~ 1e-3


def test_seeded_speculative_sampling_is_reproducible():
    model = make_model(ds(8), std=0.05)
    x = tokens(2, 4, vocab=8)
    a = model.generate(x, 10, temperature=1.0, seed=1, speculative=True)
    assert torch.equal(a, model.generate(x, 10, temperature=1.0, seed=1, speculative=True))
    assert not torch.equal(a, model.generate(x, 10, temperature=1.0, seed=2, speculative=True))


# ---------------------------------------------------------------------- stats and errors
def test_stats_are_consistent():
    model = make_model(ds(3))
    x = tokens(4, 6, vocab=3)
    out, s = model.generate(x, 20, speculative=True, num_speculative_tokens=3, return_stats=True)
    acc = s["acceptance_by_position"]
    assert all(0 <= a <= 1 for a in acc) and acc == sorted(acc, reverse=True)
    assert s["mean_accepted_length"] == pytest.approx(1 + sum(acc))
    assert s["main_forwards"] == s["rounds"] + 1  # prefill + one verify forward per round
    assert s["mtp_forwards"] == 3 * s["rounds"]
    assert s["rounds"] * s["mean_accepted_length"] >= 19  # the tokens came from the rounds
    _, plain = model.generate(x, 20, return_stats=True)
    assert plain == {"speculative": False, "main_forwards": 20}
    assert s["rounds"] < 20


def test_errors():
    gpt2 = make_model(tiny.gpt2())
    with pytest.raises(ValueError, match="MTP"):
        gpt2.generate(tokens(1, 3), 4, speculative=True)
    model = make_model(ds(8))
    with pytest.raises(ValueError, match="num_speculative_tokens=0"):
        model.generate(tokens(1, 3, vocab=8), 4, speculative=True, num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        model.generate(tokens(2, 3, vocab=8), 4, prompt_lengths=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="MTP"):
        make_model(ds(8, D=0)).generate(tokens(1, 3, vocab=8), 4, speculative=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_greedy_speculative_equals_plain():
    model = make_model(ds(3)).to("cuda")
    x, lengths = tokens(4, 6, vocab=3).cuda(), LENGTHS.cuda()
    plain = model.generate(x, 20, prompt_lengths=lengths)
    spec = model.generate(x, 20, prompt_lengths=lengths, speculative=True, num_speculative_tokens=2)
    assert torch.equal(spec, plain)
