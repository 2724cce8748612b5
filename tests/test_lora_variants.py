"""DoRA and VeRA (lora.py, lora_variants.py): forward formulas, merge, per-row mixing, absorbed MLA, refusals.

The PEFT round trips (both ways, equal logits) are in tests/model/test_lora_peft.py.
"""

import pytest
import torch

from nanoseek import LoraConfig, VeraConfig
from nanoseek.lora_variants import dora_as_lora, dora_scale, vera_projections
from tests.test_lora import CONFIGS, cached_decode, make, maxdiff, rand_cfg, tokens

TOL = 1e-4


def randomize(m, name: str, seed: int = 5) -> None:
    """Make DoRA magnitudes / VeRA vectors non-trivial (their inits make the adapter start as the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if f".{name}." in n and ("lora_magnitude_vector" in n or "vera_lambda" in n):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def dora(m, name="d", **kw):
    m.add_adapter(name, rand_cfg(use_dora=True, **kw))
    randomize(m, name)


def vera(m, name="v", **kw):
    m.add_adapter(name, VeraConfig(**{"r": 6, **kw}))
    randomize(m, name)


def test_dora_formula_and_lora_form():
    """g (W + gamma B A) == W + the rank r+out LoRA form; the norm carries no gradient."""
    torch.manual_seed(0)
    W, A, B = torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    m = torch.rand(5, requires_grad=True)
    g = dora_scale(m, W, A, B)
    A2, B2 = dora_as_lora(g, W, A, B)
    assert maxdiff(W + B2 @ A2, g[:, None] * (W + B @ A)) < 1e-5
    g.sum().backward()  # d g / d m = 1 / ||V|| exactly: nothing flows through the norm
    assert maxdiff(m.grad, 1 / torch.linalg.norm(W + B @ A, dim=1)) < 1e-6


def test_dora_starts_as_base():
    m = make("deepseek_v3")
    m.add_adapter("d", LoraConfig(r=4, use_dora=True))  # B = 0, m = ||W||: exactly the base model
    x = tokens(m.config.vocab_size)
    with torch.no_grad():
        assert maxdiff(m(x, adapter="d"), m(x)) < 1e-5


@pytest.mark.parametrize("kind", ["dora", "vera"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_merge_equals_unmerged_and_unmerge_restores(arch, kind):
    m = make(arch)
    (dora if kind == "dora" else vera)(m, "a")
    weights = {n: p.clone() for n, p in m.state_dict().items()}
    x = tokens(m.config.vocab_size)
    with torch.no_grad():
        want, base = m(x, adapter="a"), m(x)
        assert maxdiff(want, base) > 1e-2
        m.merge_adapter("a")
        assert maxdiff(m(x), want) < TOL
        m.unmerge_adapter("a")
        assert maxdiff(m(x), base) < TOL
        assert all(maxdiff(p, weights[n]) < 1e-5 for n, p in m.state_dict().items())
        m.merge_and_unload("a")
        assert m.adapters == [] and maxdiff(m(x), want) < TOL


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_mixed_batch_with_dora_and_vera_rows(arch):
    """Per-row batches mixing LoRA, DoRA, VeRA and base rows == each row run alone; cached (absorbed MLA) too."""
    m = make(arch)
    m.add_adapter("l", rand_cfg(r=2))
    dora(m)
    vera(m)
    x = tokens(m.config.vocab_size, B=5, T=8)
    rows = torch.tensor([0, 1, 2, -1, 1])
    with torch.no_grad():
        alone = torch.cat([m(x[b:b + 1], adapter=None if r < 0 else m.adapters[r]) for b, r in enumerate(rows)])
        assert maxdiff(m(x, adapter=rows), alone) < TOL
        for absorb in (True, False):
            assert maxdiff(cached_decode(m, x, rows, prefill=3, absorb=absorb), alone) < TOL


def test_dora_absorbed_decoding_matches_full_forward():
    m = make("deepseek_v3")
    dora(m, target_modules=["kv_b_proj"])
    x = tokens(96, B=2, T=9)
    with torch.no_grad():
        full = m(x, adapter="d")
        assert maxdiff(full, m(x)) > 1e-3
        cache = m.make_cache(2, 12)
        dec = torch.cat([m(x[:, :3], cache=cache, adapter="d")] +
                        [m(x[:, t:t + 1], cache=cache, adapter="d") for t in range(3, 9)], 1)
        assert maxdiff(dec, full) < TOL


def test_variants_train_their_own_tensors():
    m = make("deepseek_v3")
    dora(m)
    vera(m)
    for name, kinds in (("d", {"lora_A", "lora_B", "lora_magnitude_vector"}),
                        ("v", {"vera_lambda_d", "vera_lambda_b"})):
        params = m.trainable_adapter(name)
        named = [n for n, p in m.named_parameters() if p.requires_grad]
        assert {k for n in named for k in kinds if f".{k}." in n} == kinds and len(params) == len(named)
        x = tokens(96)
        m(x, targets=x, adapter=name).loss.backward()  # main and MTP losses
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params if p.dim() == 1)
        m.zero_grad()


def test_defaults_and_refusals():
    m = make("deepseek_v3")
    m.add_adapter("d", LoraConfig(use_dora=True))
    m.add_adapter("v", VeraConfig(r=4))
    d_paths = {p for p, mod in m.named_modules() if "d" in getattr(mod, "lora_magnitude_vector", {})}
    v_paths = {p for p, mod in m.named_modules() if "v" in getattr(mod, "vera_lambda_d", {})}
    assert d_paths and all(p.split(".")[-2] == "self_attn" or p.endswith("eh_proj") for p in d_paths)
    assert v_paths and not any(p.startswith("mtp.") or p.endswith(".gate") for p in v_paths)
    assert any(p.endswith("mlp.gate_proj") for p in v_paths)  # VeRA covers the dense MLPs (peft loads those)
    with pytest.raises(ValueError, match="DoRA applies to linear layers only"):
        m.add_adapter("x", LoraConfig(use_dora=True, target_modules=["experts"]))
    with pytest.raises(ValueError, match="DoRA applies to linear layers only"):
        m.add_adapter("x", LoraConfig(use_dora=True, target_modules=["gate"]))
    with pytest.raises(ValueError, match="VeRA applies to linear layers only"):
        m.add_adapter("x", VeraConfig(target_modules=["experts"]))
    with pytest.raises(ValueError, match="VeraConfig.projection_prng_key"):
        VeraConfig(projection_prng_key=-1)
    assert m.adapters == ["d", "v"]
    m.add_adapter("mlp", LoraConfig(use_dora=True, target_modules=["gate_proj"]))  # explicit: allowed, see I/O


def test_vera_projection_is_deterministic_and_sized_by_targets():
    A, B = vera_projections(0, 4, 48, 64)
    A2, B2 = vera_projections(0, 4, 48, 64)
    assert A.shape == (4, 48) and B.shape == (64, 4) and torch.equal(A, A2) and torch.equal(B, B2)
    assert not torch.equal(vera_projections(1, 4, 48, 64)[0], A)
    assert A.abs().max() <= (3 ** 0.5) * (2 ** 0.5) / 48 ** 0.5
