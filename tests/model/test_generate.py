"""Generation (greedy, sampling, eos, limits) and the Multi-Token Prediction loss."""

from __future__ import annotations

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.model import sample
from nanoseek.model.transformer import IGNORE_INDEX, DecoderLayer
from tests import tiny
from tests.tiny import make_model, tokens

V = 64


pytestmark = pytest.mark.usefixtures("single_thread")


def ds(**kw) -> ModelConfig:
    return tiny.ds(**{"max_position_embeddings": 32, "aux_loss_alpha": 0.01, **kw})


def gpt2(**kw) -> ModelConfig:
    return tiny.gpt2(**{"max_position_embeddings": 32, **kw})


CONFIGS = {"gpt2": gpt2, "deepseek_v3": ds}


def greedy_reference(model, x, n):
    for _ in range(n):
        x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x


# ---------------------------------------------------------------------- greedy
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_equals_loop_of_full_forwards(name):
    model = make_model(CONFIGS[name]())
    x = tokens(3, 4)
    out = model.generate(x, max_new_tokens=10)
    assert out.shape == (3, 14)
    assert torch.equal(out[:, :4], x)
    assert torch.equal(out, greedy_reference(model, x, 10))
    assert len(out[:, 4:].unique()) > 3  # a non-degenerate continuation
    assert torch.equal(model.generate(x[0], max_new_tokens=10), out[:1])  # 1-D prompt


def test_greedy_float64_model():
    model = make_model(ds(), dtype=torch.float64)
    x = tokens(2, 3)
    assert torch.equal(model.generate(x, 6), greedy_reference(model, x, 6))


def test_zero_new_tokens_returns_prompt():
    model = make_model(gpt2())
    x = tokens(2, 5)
    assert torch.equal(model.generate(x, 0), x)


# ---------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_seeded_sampling_is_reproducible(name):
    model = make_model(CONFIGS[name](), std=0.05)  # flatter distributions
    x = tokens(2, 3)
    a = model.generate(x, 12, temperature=1.0, seed=1)
    b = model.generate(x, 12, temperature=1.0, seed=1)
    assert torch.equal(a, b)
    others = [model.generate(x, 12, temperature=1.0, seed=s) for s in (2, 3, 4)]
    assert all(not torch.equal(a, o) for o in others)
    assert not torch.equal(a, model.generate(x, 12))  # sampling is not greedy here
    # the seed's generator is private: the global RNG is untouched
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    model.generate(x, 4, temperature=1.0, seed=9)
    assert torch.equal(torch.rand(1), before)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_top_k_1_and_tiny_top_p_are_greedy(name):
    model = make_model(CONFIGS[name](), std=0.05)
    x = tokens(2, 3)
    greedy = model.generate(x, 8)
    for seed in (0, 1):
        assert torch.equal(model.generate(x, 8, temperature=1.0, top_k=1, seed=seed), greedy)
        assert torch.equal(model.generate(x, 8, temperature=1.0, top_p=1e-6, seed=seed), greedy)
        assert torch.equal(model.generate(x, 8, temperature=5.0, top_k=1, top_p=0.5, seed=seed), greedy)


def _support(logits, n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    temperature = kw.pop("temperature", 1.0)
    return set(sample(logits.expand(n, -1), temperature=temperature, generator=g, **kw).tolist())


def test_sample_top_k_top_p_supports():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    assert sample(logits).tolist() == [1]  # temperature 0: argmax
    assert _support(logits) == {0, 1, 2, 3}
    assert _support(logits, top_k=2) == {1, 3}
    assert _support(logits, top_k=3) == {1, 2, 3}
    assert _support(logits, top_p=0.4) == {1}
    assert _support(logits, top_p=0.75) == {1, 3}  # 0.5 + 0.3 reach 0.75
    assert _support(logits, top_p=0.85) == {1, 2, 3}
    assert _support(logits, top_p=1.0) == {0, 1, 2, 3}
    assert _support(logits, top_k=3, top_p=0.75) == {1, 3}


def test_sample_frequencies_follow_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    for temp in (1.0, 2.0):
        draws = sample(logits.expand(n, -1), temperature=temp, generator=g)
        freq = torch.bincount(draws, minlength=3).float() / n
        torch.testing.assert_close(freq, (logits[0] / temp).softmax(-1), atol=0.015, rtol=0)
    # top_k renormalises over the kept tokens
    draws = sample(logits.expand(n, -1), temperature=1.0, top_k=2, generator=g)
    freq = torch.bincount(draws, minlength=3).float() / n
    expect = torch.tensor([float("-inf"), 1.0, 2.0]).softmax(-1)
    torch.testing.assert_close(freq, expect, atol=0.015, rtol=0)


# ---------------------------------------------------------------------- eos
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_eos_rows_keep_eos_and_others_continue(name):
    model = make_model(CONFIGS[name]())
    x = tokens(2, 3, seed=5)
    greedy = model.generate(x, 10)
    row0, row1 = greedy[0, 3:].tolist(), greedy[1, 3:].tolist()
    # a token that row 0 first emits at step 1..5 and row 1 never emits
    eos = next(t for i, t in enumerate(row0) if 1 <= i <= 5 and row0.index(t) == i and t not in row1)
    first0 = row0.index(eos)
    assert 1 <= first0 <= 5 and row0[first0 + 1:] != [eos] * (9 - first0)
    out = model.generate(x, 10, eos_token_id=eos)
    assert out.shape == greedy.shape  # row 1 never finishes: no early stop
    assert out[0, 3:3 + first0 + 1].tolist() == row0[:first0 + 1]
    assert (out[0, 3 + first0:] == eos).all()
    assert torch.equal(out[1], greedy[1])


def test_stops_early_when_every_row_is_done():
    model = make_model(ds())
    x = tokens(1, 3, seed=5)
    greedy = model.generate(x, 10)[0, 3:].tolist()
    eos = greedy[3]
    stop = greedy.index(eos)
    out = model.generate(x, 10, eos_token_id=eos)
    assert out.shape == (1, 3 + stop + 1)
    assert out[0, 3:].tolist() == greedy[:stop + 1]
    # two rows: stops once the later of the two finishes
    x2 = torch.cat([x, tokens(1, 3, seed=6)])
    g2 = model.generate(x2, 10)[:, 3:].tolist()
    eos = next(t for t in g2[0] if t in g2[1])
    n = max(g2[0].index(eos), g2[1].index(eos)) + 1
    assert n < 10
    out = model.generate(x2, 10, eos_token_id=eos)
    assert out.shape == (2, 3 + n)
    assert out[:, -1].tolist() == [eos, eos]


# ---------------------------------------------------------------------- limits, modes
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prompt_plus_new_tokens_over_limit_raises(name):
    model = make_model(CONFIGS[name]())  # max_position_embeddings = 32
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(tokens(1, 30), max_new_tokens=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(tokens(1, 33), max_new_tokens=0)
    assert model.generate(tokens(1, 30), max_new_tokens=2).shape == (1, 32)


def test_training_mode_restored_and_dropout_off():
    model = make_model(gpt2(embd_pdrop=0.5, resid_pdrop=0.5, attn_pdrop=0.5))
    x = tokens(2, 3)
    ref = greedy_reference(model, x, 6)  # eval mode: no dropout
    model.train()
    out = model.generate(x, 6)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(out, ref)
    model.eval()
    model.generate(x, 2)
    assert not model.training


def test_training_mode_restored_when_generate_raises():
    model = make_model(gpt2()).train()
    with pytest.raises(IndexError):  # a token id outside the vocabulary fails inside the forward
        model.generate(torch.full((1, 3), 10**6), 2)
    assert model.training


@pytest.mark.parametrize("kw", [dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0)])
def test_bad_sampling_arguments(kw):
    model = make_model(gpt2())
    with pytest.raises(ValueError, match=next(iter(kw))):
        model.generate(tokens(1, 3), 2, **kw)


def test_generate_does_not_touch_router_statistics():
    model = make_model(ds()).train()
    model.generate(tokens(2, 3), 4)
    assert model.expert_load_accum is None


# ---------------------------------------------------------------------- MTP loss
def ce_manual(logits, tgt):
    """Mean cross entropy over positions whose target is not -100, without ignore_index."""
    valid = tgt != IGNORE_INDEX
    lp = logits.double().log_softmax(-1)[valid]
    return -lp.gather(1, tgt[valid][:, None]).mean()


def mtp_reference(model, x, targets, h):
    """Depth k on the first T-k positions only: h'_i = eh_proj([enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)]), one
    block, lm_head(shared_head.norm(.)), CE against targets[i+k]. h = last main block's output (pre-norm)."""
    m, T = model.model, x.shape[1]
    losses = []
    for k, layer in enumerate(model.mtp, start=1):
        n = T - k
        hk = layer.eh_proj(torch.cat([layer.enorm(m.embed_tokens(x[:, k:])), layer.hnorm(h[:, :n])], dim=-1))
        cos, sin = m.rotary(torch.arange(n)[None].expand(x.shape[0], -1), hk.dtype)
        h = DecoderLayer.forward(layer, hk, m.rotary, cos, sin)[0]  # the MTP module's own block
        logits = model.lm_head(layer.shared_head.norm(h))
        losses.append(ce_manual(logits.flatten(0, 1), targets[:, k:].flatten()))
    return torch.stack(losses).mean()


def _forward_capturing_h(model, x, targets):
    store = {}

    def grab(mod, inp, out):  # returns None: the output is not replaced
        store["h"] = out[0]
    hook = model.model.layers[-1].register_forward_hook(grab)
    out = model(x, targets=targets)
    hook.remove()
    return out, store["h"]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("mode", ["aux_free", "aux_loss", "none"])
def test_mtp_loss_matches_independent_computation(depth, mode):
    model = make_model(ds(num_nextn_predict_layers=depth, router_balance=mode, mtp_loss_weight=0.3)).train()
    x = tokens(2, 9)
    targets = torch.roll(x, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, 2] = IGNORE_INDEX
    targets[1, 5:7] = IGNORE_INDEX
    out, h = _forward_capturing_h(model, x, targets)
    with torch.no_grad():
        ref_mtp = mtp_reference(model, x, targets, h)
        ref_main = ce_manual(out.logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(out.main_loss.double(), ref_main, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mtp_loss.double(), ref_mtp, atol=1e-5, rtol=1e-5)
    if mode == "none":
        assert out.balance_loss is None
        torch.testing.assert_close(out.loss, out.main_loss + 0.3 * out.mtp_loss)
    else:
        assert out.balance_loss > 0
        torch.testing.assert_close(out.loss, out.main_loss + 0.3 * out.mtp_loss + out.balance_loss)
    assert out.expert_load.shape == (2 + depth, 8)


def test_mtp_ignores_minus_100_targets():
    """Changing the tokens *at* ignored target positions changes nothing; changing a counted target does."""
    model = make_model(ds())
    x = tokens(2, 8)
    targets = tokens(2, 8, seed=1)
    targets[:, 3] = IGNORE_INDEX
    base = model(x, targets=targets)
    # the MTP target of position 2 is targets[:, 3] (ignored); position 6's is targets[:, 7] (counted)
    t2 = targets.clone()
    t2[:, 0] = (t2[:, 0] + 1) % V  # targets[0] is never an MTP target (depth 1 predicts targets[1:])
    o2 = model(x, targets=t2)
    torch.testing.assert_close(o2.mtp_loss, base.mtp_loss, atol=0, rtol=0)
    assert o2.main_loss != base.main_loss
    t3 = targets.clone()
    t3[:, 7] = (t3[:, 7] + 1) % V
    assert model(x, targets=t3).mtp_loss != base.mtp_loss
    # all main targets ignored but one: the MTP loss still counts only valid targets
    t4 = torch.full_like(targets, IGNORE_INDEX)
    t4[:, 4] = 7
    out, h = _forward_capturing_h(model, x, t4)
    torch.testing.assert_close(out.mtp_loss.double(), mtp_reference(model, x, t4, h).detach(), atol=1e-5,
                               rtol=1e-5)


def test_mtp_loss_finite_without_mtp_targets():
    model = make_model(ds())
    x = tokens(2, 6)
    targets = torch.full_like(x, IGNORE_INDEX)
    targets[:, 0] = 5  # a main target, but no MTP target (depth 1 predicts targets[1:])
    out = model(x, targets=targets)
    assert torch.isfinite(out.main_loss)
    assert torch.isfinite(out.loss)


def test_mtp_loss_weight_zero_skips_mtp():
    model = make_model(ds(mtp_loss_weight=0.0, router_balance="none"))
    x = tokens(2, 6)
    out = model(x, targets=torch.roll(x, -1, 1))
    assert out.mtp_loss is None
    torch.testing.assert_close(out.loss, out.main_loss)
    model = make_model(ds(num_nextn_predict_layers=0, router_balance="none"))
    out = model(x, targets=torch.roll(x, -1, 1))
    assert out.mtp_loss is None and out.expert_load.shape == (2, 8)


def test_mtp_does_not_change_main_logits():
    with_mtp = make_model(ds(num_nextn_predict_layers=1))
    without = make_model(ds(num_nextn_predict_layers=0))
    without.load_state_dict({k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")})
    x = tokens(2, 7)
    out = with_mtp(x, targets=torch.roll(x, -1, 1))
    torch.testing.assert_close(out.logits, without(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, with_mtp(x), atol=0, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_gradients_reach_every_parameter(tied):
    model = make_model(ds(num_nextn_predict_layers=2, tie_word_embeddings=tied)).train()
    x = tokens(4, 12)
    out = model(x, targets=torch.roll(x, -1, 1))
    out.loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("mtp.1.") for n in names) and any("eh_proj" in n for n in names)
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert p.grad.abs().max() > 0, n
        assert torch.isfinite(p.grad).all(), n
    buffers = dict(model.named_buffers())
    assert "mtp.0.mlp.gate.e_score_correction_bias" in buffers
    assert "mtp.0.mlp.gate.e_score_correction_bias" not in dict(model.named_parameters())


def test_mtp_gradient_flows_into_main_trunk():
    """The MTP loss alone back-propagates through h into the main model (it is not detached)."""
    model = make_model(ds(router_balance="none")).train()
    x = tokens(2, 8)
    out = model(x, targets=torch.roll(x, -1, 1))
    out.mtp_loss.backward()
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().max() > 0
    assert model.model.norm.weight.grad is None or model.model.norm.weight.grad.abs().max() == 0
