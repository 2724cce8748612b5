"""Attention: causality, MLA absorbed vs naive, cached decoding (also with ragged rows), RoPE/YaRN vs HF."""

from __future__ import annotations

import math

import pytest
import torch

from nanoseek import KVCache, ModelConfig
from nanoseek.model import attention as attn_mod
from nanoseek.model.attention import MLA
from nanoseek.model.layers import Rotary, rope_frequencies, softmax_scale, yarn_mscale
from tests import tiny
from tests.tiny import (
    YARN,
    ds,  # noqa: F401
    make_model,
    tokens,
)

V = 64


pytestmark = pytest.mark.usefixtures("single_thread")


def gpt2(**kw) -> ModelConfig:
    return tiny.gpt2(**{"embd_pdrop": 0.1, "resid_pdrop": 0.1, "attn_pdrop": 0.1, **kw})


CONFIGS = {
    "gpt2": gpt2,
    "deepseek_v3": ds,
    "deepseek_v3-yarn-noq": lambda: ds(q_lora_rank=None, rope_parameters=dict(YARN)),
}


# ---------------------------------------------------------------------- causality
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causal(name, dtype):
    """Changing token j leaves logits < j unchanged (exactly in float64; in fp32 the grouped expert GEMM's
    kernel depends on how many rows an expert gets, so allow rounding) and changes every logit row >= j."""
    model = make_model(CONFIGS[name](), dtype=dtype)
    x = tokens(2, 10)
    base = model(x)
    atol = 5e-6 if dtype == torch.float32 else 0.0
    for j in (0, 3, 6, 9):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 17) % V
        out = model(x2)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=atol, rtol=0)
        change = (out - base).abs().amax(-1)  # (B, T)
        assert (change[:, j:] > 1e-2).all(), (j, change)  # every later position sees token j


def test_causal_in_training_mode_without_dropout():
    model = make_model(ds()).train()
    x, y = tokens(2, 8), tokens(2, 8, seed=1)
    base = model(x, targets=y).logits
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % V
    out = model(x2, targets=y).logits
    torch.testing.assert_close(out[:, :5], base[:, :5], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------- MLA absorbed
def _run_cached(model, x, absorb, chunks):
    cache = model.make_cache(x.shape[0], x.shape[1])
    outs, start = [], 0
    for n in chunks:
        outs.append(model(x[:, start:start + n], cache=cache, absorb=absorb))
        start += n
    assert start == x.shape[1] and int(cache.lengths.min()) == x.shape[1]
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3-yarn-noq"])
def test_absorbed_equals_naive_with_cache(name, monkeypatch):
    model = make_model(CONFIGS[name]())
    x = tokens(2, 12)
    calls = {"absorbed": 0, "naive": 0}
    for key, meth in (("absorbed", "_absorbed"), ("naive", "_naive_cached")):
        real = getattr(MLA, meth)

        def spy(self, *a, _real=real, _key=key):
            calls[_key] += 1
            return _real(self, *a)
        monkeypatch.setattr(MLA, meth, spy)
    chunks = [5, 1, 1, 3, 1, 1]
    absorbed, c1 = _run_cached(model, x, True, chunks)
    assert calls == {"absorbed": 3 * len(chunks), "naive": 0}
    naive, c2 = _run_cached(model, x, False, chunks)
    assert calls == {"absorbed": 3 * len(chunks), "naive": 3 * len(chunks)}
    assert (absorbed - naive).abs().max() <= 1e-5
    torch.testing.assert_close(c1.latent[0], c2.latent[0], atol=0, rtol=0)  # layer 0: same input
    torch.testing.assert_close(c1.latent, c2.latent, atol=1e-5, rtol=0)
    assert absorbed.abs().max() > 1  # not a trivially small output


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3-yarn-noq"])
def test_absorbed_equals_naive_float64_single_layer(name):
    """One MLA module in float64 (no fp32 norms in between): the two forms agree to rounding."""
    cfg = CONFIGS[name]()
    torch.manual_seed(0)
    mla = MLA(cfg, layer_idx=0).double()
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    rotary = Rotary(cfg)
    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64)
    outs = {}
    for absorb in (True, False):
        cache = KVCache(cfg, 2, 9, dtype=torch.float64, num_layers=1)
        ys = []
        for s, e in ((0, 4), (4, 5), (5, 8), (8, 9)):
            pos = cache.begin(e - s)
            cos, sin = rotary(pos, torch.float64)
            ys.append(mla(x[:, s:e], rotary, cos, sin, cache, absorb=absorb))
            cache.end()
        outs[absorb] = torch.cat(ys, 1)
    pos = torch.arange(9)[None].expand(2, -1)
    cos, sin = rotary(pos, torch.float64)
    full = mla(x, rotary, cos, sin)  # no cache: the training path
    assert (outs[True] - outs[False]).abs().max() < 1e-12
    assert (outs[True] - full).abs().max() < 1e-12


# ---------------------------------------------------------------------- cached decoding
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("chunks", [[4, 1, 1, 1, 1, 1, 1], [1] * 8, [3, 4, 1], [8]])
def test_incremental_decoding_equals_full_forward(name, chunks):
    model = make_model(CONFIGS[name]())
    x = tokens(3, sum(chunks))
    full = model(x)
    cached, cache = _run_cached(model, x, True, chunks)
    assert (cached - full).abs().max() <= 2e-5
    assert torch.equal(cache.lengths, torch.full((3,), sum(chunks)))


def test_incremental_decoding_float64_tight():
    for name in ("gpt2", "deepseek_v3-yarn-noq"):
        model = make_model(CONFIGS[name](), dtype=torch.float64)
        x = tokens(2, 9)
        cached, cache = _run_cached(model, x, True, [4, 1, 2, 1, 1])
        assert (cache.k if name == "gpt2" else cache.latent).dtype == torch.float64
        assert (cached - model(x)).abs().max() < 1e-6  # RMSNorm computes in fp32


def test_cache_does_not_change_with_later_tokens():
    """Slots past a row's length are masked out: garbage there must not leak into the logits."""
    model = make_model(ds())
    x = tokens(2, 6)
    cache = model.make_cache(2, 10)
    cache.latent.normal_(0, 100.0)  # garbage in all slots
    out = torch.cat([model(x[:, :4], cache=cache), model(x[:, 4:5], cache=cache),
                     model(x[:, 5:], cache=cache)], 1)
    assert (out - model(x)).abs().max() <= 2e-5


# ---------------------------------------------------------------------- ragged rows
def _alone(model, seq):
    return model(seq[None])[0]


@pytest.mark.parametrize("name", ["gpt2", "deepseek_v3"])
def test_ragged_rows_pad_and_rewind(name):
    """Row 0 has a 5-token prompt, row 1 a 3-token one: prefill both padded to 5, then set the row lengths to
    (5, 3); every later step of each row must equal that row run alone."""
    model = make_model(CONFIGS[name]())
    seq0, seq1 = tokens(1, 10, seed=1)[0], tokens(1, 10, seed=2)[0]
    pad = torch.tensor([V - 1, V - 2])
    cache = model.make_cache(2, 12)
    prefill = model(torch.stack([seq0[:5], torch.cat([seq1[:3], pad])]), cache=cache)
    ref0, ref1 = _alone(model, seq0), _alone(model, seq1)
    assert (prefill[0] - ref0[:5]).abs().max() <= 2e-5
    assert (prefill[1, :3] - ref1[:3]).abs().max() <= 2e-5
    cache.lengths = torch.tensor([5, 3])
    n0, n1 = 5, 3
    for step in range(4):  # one token per row per step, rows at different positions
        out = model(torch.stack([seq0[n0:n0 + 1], seq1[n1:n1 + 1]]), cache=cache)
        assert (out[0, 0] - ref0[n0]).abs().max() <= 2e-5, step
        assert (out[1, 0] - ref1[n1]).abs().max() <= 2e-5, step
        n0, n1 = n0 + 1, n1 + 1
    assert cache.lengths.tolist() == [9, 7]
    # a 2-token step at ragged positions (row 0: 9, 10; row 1: 7, 8)
    out = model(torch.stack([torch.cat([seq0[9:], seq0[:1]]), seq1[7:9]]), cache=cache)
    assert (out[0, 0] - ref0[9]).abs().max() <= 2e-5
    assert (out[1] - ref1[7:9]).abs().max() <= 2e-5


@pytest.mark.parametrize("name", ["gpt2", "deepseek_v3"])
def test_ragged_rows_from_separate_caches(name):
    """Prefill each row into its own cache, copy both into one batch cache, then decode the batch together."""
    model = make_model(CONFIGS[name]())
    seqs = [tokens(1, 9, seed=3)[0], tokens(1, 9, seed=4)[0]]
    lens = [6, 2]
    batch = model.make_cache(2, 12)
    for r, (seq, n) in enumerate(zip(seqs, lens)):
        single = model.make_cache(1, 12)
        model(seq[None, :n], cache=single)
        if batch.mla:
            batch.latent[:, r] = single.latent[:, 0]
        else:
            batch.k[:, r], batch.v[:, r] = single.k[:, 0], single.v[:, 0]
        batch.lengths[r] = single.lengths[0]
    refs = [_alone(model, s) for s in seqs]
    pos = list(lens)
    for step in range(3):
        out = model(torch.stack([seqs[0][pos[0]:pos[0] + 1], seqs[1][pos[1]:pos[1] + 1]]), cache=batch)
        for r in range(2):
            assert (out[r, 0] - refs[r][pos[r]]).abs().max() <= 2e-5, (step, r)
            pos[r] += 1
    assert batch.lengths.tolist() == [9, 5]


def test_kvcache_begin_builds_per_row_positions_and_mask():
    cache = KVCache(ds(), batch_size=2, max_len=8)
    cache.lengths = torch.tensor([3, 1])
    pos = cache.begin(2)
    assert pos.tolist() == [[3, 4], [1, 2]]
    assert cache.span == 5 and cache.mask.shape == (2, 1, 2, 5)
    assert cache.mask[0, 0].tolist() == [[True, True, True, True, False], [True] * 5]
    assert cache.mask[1, 0].tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    cache.end()
    assert cache.lengths.tolist() == [5, 3]


# ---------------------------------------------------------------------- overflow
@pytest.mark.parametrize("name", ["gpt2", "deepseek_v3"])
def test_kvcache_overflow_raises_and_leaves_cache_usable(name):
    model = make_model(CONFIGS[name]())
    x = tokens(1, 6)
    cache = model.make_cache(1, 6)
    a = model(x[:, :4], cache=cache)
    with pytest.raises(ValueError, match="overflow"):
        model(x[:, 4:6].repeat(1, 2)[:, :3], cache=cache)  # 4 + 3 > 6
    assert cache.lengths.tolist() == [4]
    b = model(x[:, 4:6], cache=cache)  # exactly full
    assert (torch.cat([a, b], 1) - model(x)).abs().max() <= 2e-5
    with pytest.raises(ValueError, match="overflow"):
        model(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="max_len=6"):
        KVCache(CONFIGS[name](), 1, 6).begin(7)


def test_kvcache_overflow_on_the_longest_row():
    cache = KVCache(gpt2(), batch_size=2, max_len=6)
    cache.lengths = torch.tensor([5, 0])
    cache.begin(1)
    with pytest.raises(ValueError, match="overflow"):
        cache.begin(2)


def test_kvcache_shapes():
    c = ds()
    cache = KVCache(c, 3, 10)
    assert cache.latent.shape == (3, 3, 10, c.kv_lora_rank + c.qk_rope_head_dim)
    g = gpt2()
    cache = KVCache(g, 2, 7, dtype=torch.float64)
    assert cache.k.shape == cache.v.shape == (2, 2, 4, 7, 8) and cache.k.dtype == torch.float64
    assert cache.batch_size == 2 and cache.lengths.tolist() == [0, 0]


# ---------------------------------------------------------------------- RoPE / YaRN
def test_softmax_scale_includes_mscale_squared():
    cfg = ds(rope_parameters=dict(YARN))
    mscale = 0.1 * 1.0 * math.log(4.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim ** -0.5 * mscale ** 2, rel=1e-12)
    assert MLA(cfg, 0).scale == pytest.approx(softmax_scale(cfg), rel=1e-12)
    cfg = ds(rope_parameters=dict(YARN, mscale_all_dim=0.707, factor=40.0))
    mscale = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert softmax_scale(cfg) == pytest.approx(12 ** -0.5 * mscale ** 2, rel=1e-12)
    assert softmax_scale(ds()) == pytest.approx(12 ** -0.5, rel=1e-12)
    assert softmax_scale(ds(rope_parameters=dict(YARN, mscale_all_dim=0.0))) == pytest.approx(12 ** -0.5)
    assert yarn_mscale(1.0, 5.0) == 1.0 and yarn_mscale(0.5) == 1.0


def _hf_config(cfg: ModelConfig):
    from transformers.models.deepseek_v3 import DeepseekV3Config

    return DeepseekV3Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            num_attention_heads=cfg.num_attention_heads,
                            num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
                            kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                            qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                            max_position_embeddings=cfg.max_position_embeddings,
                            rope_parameters=dict(cfg.rope_parameters), rope_interleave=cfg.rope_interleave,
                            num_hidden_layers=1, first_k_dense_replace=1, n_routed_experts=8, n_group=4,
                            topk_group=2, num_experts_per_tok=2, attention_bias=cfg.attention_bias)


ROPES = {
    "v3-like": dict(YARN),
    "v3-671b": dict(YARN, factor=40.0, original_max_position_embeddings=4096),  # ramp inside (0, dim/2)
    "attention-factor": dict(YARN, mscale=1.0, mscale_all_dim=0.707, factor=40.0,
                             original_max_position_embeddings=16),
    "no-truncate": dict(YARN, truncate=False, beta_fast=16.0, beta_slow=2.0, rope_theta=500.0),
    "only-factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                    "original_max_position_embeddings": 8},
    "explicit-attention-factor": dict(YARN, attention_factor=0.8),
}


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("rope_dim", [4, 16, 64])
def test_yarn_frequencies_match_transformers(rope, rope_dim):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ds(qk_rope_head_dim=rope_dim, rope_parameters=dict(ROPES[rope]))
    inv_freq, factor = rope_frequencies(cfg)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](_hf_config(cfg), "cpu")
    assert inv_freq.shape == (rope_dim // 2,) and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(float(hf_factor), rel=1e-12)
    if rope == "attention-factor":
        assert factor != pytest.approx(1.0)


def test_default_rope_frequencies():
    cfg = ds(qk_rope_head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    inv_freq, factor = rope_frequencies(cfg)
    torch.testing.assert_close(inv_freq, 1.0 / 500.0 ** (torch.arange(0, 8, 2).float() / 8))
    assert factor == 1.0


def test_rotary_stays_fp32_after_cast():
    model = make_model(ds(rope_parameters=dict(YARN))).to(torch.bfloat16)
    assert model.model.rotary.inv_freq.dtype == torch.float32
    ref, _ = rope_frequencies(model.config)
    assert torch.equal(model.model.rotary.inv_freq, ref)


ATTN_CASES = {
    "qlora-default": lambda: ds(),
    "noq-yarn": lambda: ds(q_lora_rank=None, rope_parameters=dict(YARN, mscale_all_dim=0.707)),
    "qlora-yarn-nointerleave-bias": lambda: ds(rope_parameters=dict(YARN), rope_interleave=False,
                                               attention_bias=True),
}


@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_mla_matches_transformers_attention(case):
    """Same weights in nanoseek's MLA and HF's DeepseekV3Attention give the same output (RoPE layout, YaRN
    attention factor and mscale^2 softmax scale included)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3RotaryEmbedding,
    )

    cfg = ATTN_CASES[case]()
    hf_cfg = _hf_config(cfg)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    mla = MLA(cfg, layer_idx=0).double()
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0.0, 0.3) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
    hf = DeepseekV3Attention(hf_cfg, layer_idx=0).double().eval()
    hf.load_state_dict(mla.state_dict(), strict=True)  # same parameter names
    T = 40  # beyond original_max_position_embeddings=32: YaRN interpolation matters
    x = torch.randn(2, T, cfg.hidden_size, dtype=torch.float64)
    pos = torch.arange(T)[None].expand(2, -1)
    rotary = Rotary(cfg)
    cos, sin = rotary(pos, torch.float64)
    ours = mla(x, rotary, cos, sin)
    hf_rot = DeepseekV3RotaryEmbedding(hf_cfg)
    theirs = hf(x, position_embeddings=hf_rot(x, pos), attention_mask=None)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    # and the cached absorbed path agrees with HF too
    cache = KVCache(cfg, 2, T, dtype=torch.float64, num_layers=1)
    ys = []
    for s, e in ((0, 30), (30, 31), (31, T)):
        p = cache.begin(e - s)
        c, sn = rotary(p, torch.float64)
        ys.append(mla(x[:, s:e], rotary, c, sn, cache))
        cache.end()
    torch.testing.assert_close(torch.cat(ys, 1), theirs, atol=1e-6, rtol=1e-6)


def test_module_has_expected_attribute_names():
    names = set(dict(make_model(ds()).named_parameters()))
    for n in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
              "o_proj"):
        assert f"model.layers.0.self_attn.{n}.weight" in names, n
    assert "model.layers.0.self_attn.q_proj.weight" in set(dict(make_model(ds(q_lora_rank=None))
                                                                .named_parameters()))
    assert attn_mod.KVCache is KVCache
