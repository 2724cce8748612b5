"""Per-request sampler: top_k / top_p restrict the draw, the generator alone decides it, penalties follow OpenAI."""

import torch

from nanoseek.serve.sampling import SamplingParams, make_generator, penalize, sample_token, top_logprobs

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])


def _draws(params, n=200, seed=0):
    gen = make_generator(seed)
    return [sample_token(LOGITS, params, None, gen) for _ in range(n)]


def test_top_k_and_top_p_restrict_the_support():
    assert set(_draws(SamplingParams(temperature=1.0, top_k=2))) == {0, 1}
    p = LOGITS.softmax(-1)
    top_p = float(p[0] + p[1]) - 1e-3  # the two most likely tokens reach it, one alone does not
    assert set(_draws(SamplingParams(temperature=1.0, top_p=top_p))) == {0, 1}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.01))) == {0}
    assert len(set(_draws(SamplingParams(temperature=5.0)))) == 6  # unrestricted: every token shows up


def test_same_seed_same_draws_and_greedy_ignores_the_generator():
    p = SamplingParams(temperature=1.0)
    assert _draws(p, seed=3) == _draws(p, seed=3) != _draws(p, seed=4)
    assert set(_draws(SamplingParams(temperature=0.0), n=5)) == {0}


def test_penalties_and_logprobs():
    counts = torch.tensor([3.0, 0, 1, 0, 0, 0])
    out = penalize(LOGITS, SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), counts)
    assert torch.allclose(out, LOGITS - torch.tensor([1.75, 0, 0.75, 0, 0, 0]))
    lp, top = top_logprobs(LOGITS, 2, 2)
    ref = LOGITS.log_softmax(-1)
    assert abs(lp - float(ref[2])) < 1e-6 and list(top) == [0, 1] and abs(top[0] - float(ref[0])) < 1e-6
