"""Decoding's fast path (fastdecode.py) equals the plain one: static cache, gathered experts, compiled step."""

from __future__ import annotations

import pytest
import torch

from nanoseek.model.attention import KVCache
from nanoseek.model.fastdecode import (
    BUCKET,
    COMPILE_MAX_BATCH_CPU,
    make_cache,
    static_length,
    step,
    wants_static,
    worth_compiling,
)
from tests import tiny
from tests.tiny import make_model

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {"gpt2": tiny.gpt2, "deepseek_v3": tiny.ds}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_static_cache_gives_the_dynamic_caches_logits(name):
    model = make_model(CONFIGS[name]())
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (3, 9), generator=g)
    lengths = torch.tensor([9, 4, 6])  # ragged rows: each static step masks a different number of slots
    dyn = KVCache(model.config, 3, 20)
    fast = make_cache(model, 3, 20)
    assert fast.static and fast.max_len == min(static_length(20), 64) and not dyn.static
    with torch.no_grad():
        for cache in (dyn, fast):
            model(x, cache=cache)
            cache.rollback(9 - lengths)
        for _ in range(4):
            ids = torch.randint(0, 64, (3, 1), generator=g)
            a, b = model(ids, cache=dyn), model(ids, cache=fast)
            assert fast.mask.shape[-1] == fast.max_len
            assert (a - b).abs().max() <= 1e-5
    assert torch.equal(dyn.lengths, fast.lengths)


def test_static_length_rounds_up_to_the_bucket():
    assert static_length(1) == BUCKET and static_length(BUCKET) == BUCKET and static_length(BUCKET + 1) == 2 * BUCKET


def test_gathered_experts_equal_grouped_ones():
    model = make_model(tiny.ds())
    experts = model.moe_layers()[0].experts
    E = experts.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 32, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(3)])  # (3, 2): 6 copies <= E = 8
    w = torch.rand(3, 2, generator=g)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    with torch.no_grad():
        ref = experts.grouped(x, flat, order, order // 2, w.flatten(), 3)
        out = experts.gathered(x, idx, w)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert torch.equal(experts(x, idx, w), ref)  # eager forward keeps the grouped GEMM


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_generate_with_the_fast_path_equals_full_forwards(name):
    model = make_model(CONFIGS[name]())
    x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    ref = x
    with torch.no_grad():
        for _ in range(6):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(x, 6), ref)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_decode_step_gives_the_same_tokens(name):
    model = make_model(CONFIGS[name](max_position_embeddings=2 * BUCKET))
    x = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(3))  # 3 rows: per-row slot writes
    plain = model.generate(x, 8)
    assert torch.equal(model.generate(x, 8, compile=True), plain)
    assert torch.equal(model.generate(x, 8, compile=True), plain)  # the compiled code is reused
    # another batch and a longer cache (another static length) compile a second graph; the steps after a loop's
    # first skip the guards (fastdecode.same_step_again), so each loop must still pick its own graph
    y = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.generate(y, BUCKET, compile=True), model.generate(y, BUCKET))
    assert torch.equal(model.generate(x, 8, compile=True), plain)


def test_static_cache_when_compiling_or_on_cuda():
    assert wants_static(True, torch.device("cpu")) and wants_static(False, torch.device("cuda"))
    assert not wants_static(False, torch.device("cpu"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_step_traces_as_one_graph(name):
    """Dynamo (no Inductor: cheap) sees the one-token step as one graph: no data-dependent break (a `bincount`
    of the expert load once broke it inside a context manager and sent whole frames back to eager)."""
    model = make_model(CONFIGS[name]()).eval()
    cache = make_cache(model, 1, 12)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 4)), cache=cache)
        explained = torch._dynamo.explain(step)(model, torch.randint(0, 64, (1, 1)), cache)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_cpu_compiles_a_decode_step_only_up_to_a_batch_where_it_pays():
    """On a CPU the compiled step stopped paying above batch 8 (GPT-2 0.9x eager at batch 32): larger batches
    stay eager. Other devices compile as asked."""
    ds_model, gpt2_model = make_model(tiny.ds()), make_model(tiny.gpt2())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for model in (ds_model, gpt2_model):
        assert worth_compiling(model, 1, cpu) and worth_compiling(model, COMPILE_MAX_BATCH_CPU, cpu)
        assert not worth_compiling(model, COMPILE_MAX_BATCH_CPU + 1, cpu)
        assert worth_compiling(model, 64, cuda)
