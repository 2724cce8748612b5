"""Engine exactness: greedy tokens equal Model.generate on each request alone, whatever the batch, for both
architectures, with mixed adapters (ranks 2-4; routed experts and kv_b_proj targeted), staggered arrivals,
chunked prefill and prompts crossing block boundaries; preemption, prefix caching and adapter swaps too."""

import pytest
import torch

from nanoseek.lora import adapter_parameters
from tests.serve.engine_helpers import adapter_dirs, greedy, greedy_ref, make_engine, reference, run
from tests.tiny import ds, gpt2, tokens

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:adapter .* has LoRA on dense-MLP")]

SPECS = {
    "deepseek_v3": {"a": dict(r=2, target_modules=["experts", "kv_b_proj", "q_b_proj"]),
                    "b": dict(r=4, target_modules="all-linear")},
    "gpt2": {"a": dict(r=2, target_modules=["c_attn"]), "b": dict(r=3, target_modules="all-linear")},
}
LENGTHS = (3, 4, 9, 14, 5, 17)  # block_size 4: inside one block, exactly one, and across several


def _requests(n_new=8):
    adapters = [None, "a", "b", "a", None, "b"]
    return [(f"r{i}", tokens(1, L, seed=L)[0].tolist(), greedy(n_new), adapters[i]) for i, L in enumerate(LENGTHS)]


def _check(cfg, tmp_path, arrivals_of, **config):
    dirs = adapter_dirs(cfg, tmp_path, SPECS[cfg.model_type])
    ref = reference(cfg, dirs)
    engine = make_engine(cfg, dirs, **config)
    reqs = _requests()
    res = run(engine, arrivals_of(reqs))
    for rid, prompt, params, adapter in reqs:
        assert res[rid]["tokens"] == greedy_ref(ref, prompt, params.max_tokens, adapter), (rid, adapter)
        assert res[rid]["reason"] == "length"
    s = engine.stats()
    assert s["blocks_free"] == s["blocks_total"] and s["running"] == s["waiting"] == 0
    return engine


@pytest.mark.parametrize("cfg", [ds(), gpt2()], ids=["deepseek_v3", "gpt2"])
def test_greedy_equals_generate_mixed_adapters_staggered(cfg, tmp_path):
    # requests arrive at steps 0, 0, 1, 3, 4, 7; max_batch_tokens=8 forces chunked prefill beside decodes
    _check(cfg, tmp_path, lambda r: {0: r[:2], 1: [r[2]], 3: [r[3]], 4: [r[4]], 7: [r[5]]}, max_batch_tokens=8)


def test_preemption_recomputes_same_tokens(tmp_path):
    # 12 blocks of 4 tokens cannot hold six growing requests at once: the newest are preempted and recomputed
    engine = _check(ds(), tmp_path, lambda reqs: {0: reqs}, kv_cache_tokens=48, max_batch_tokens=64)
    assert engine.stats()["preemptions"] > 0


def test_max_loras_one_swaps_and_stays_exact(tmp_path):
    engine = _check(ds(), tmp_path, lambda reqs: {0: reqs}, max_loras=1)
    assert engine.stats()["adapters_resident"] == 1


def test_prefix_cache_hits_equal_misses(tmp_path):
    cfg = gpt2()
    engine = make_engine(cfg)
    ref = reference(cfg, {})
    system = tokens(1, 13, seed=5)[0].tolist()  # 3 full blocks of 4 shared
    first = run(engine, {0: [("p0", system + [7, 8], greedy(6), None)]})
    before = engine.stats()
    second = run(engine, {0: [("p1", system + [7, 8], greedy(6), None), ("p2", system + [9], greedy(6), None)]})
    after = engine.stats()
    assert second["p1"]["tokens"] == first["p0"]["tokens"] == greedy_ref(ref, system + [7, 8], 6)
    assert second["p2"]["tokens"] == greedy_ref(ref, system + [9], 6)
    assert after["prefix_hits"] - before["prefix_hits"] >= 2 * 12
    assert after["prefix_queries"] > before["prefix_queries"]
    assert second["p1"]["cached"] >= 12 and first["p0"]["cached"] == 0


def test_prefix_cache_off_gives_no_hits():
    engine = make_engine(gpt2(), enable_prefix_caching=False)
    p = tokens(1, 13, seed=5)[0].tolist()
    run(engine, {0: [("a", p, greedy(3), None)], 5: [("b", p, greedy(3), None)]})
    assert engine.stats()["prefix_hits"] == 0


def test_adapter_reload_same_name_never_reuses_old_blocks(tmp_path):
    cfg = ds()
    old = adapter_dirs(cfg, tmp_path / "old", {"x": dict(r=2, target_modules="all-linear")})
    new = adapter_dirs(cfg, tmp_path / "new", {"y": dict(r=3, target_modules=["kv_b_proj", "experts"])})
    engine = make_engine(cfg, old)
    prompt = tokens(1, 13, seed=3)[0].tolist()
    a = run(engine, {0: [("a", prompt, greedy(5), "x")]})
    hits = engine.stats()["prefix_hits"]
    engine.load_adapter("x", new["y"])  # same name, other weights
    b = run(engine, {0: [("b", prompt, greedy(5), "x")]})
    assert engine.stats()["prefix_hits"] == hits  # the old adapter's cached blocks are not found
    assert b["b"]["tokens"] == greedy_ref(reference(cfg, {"y": new["y"]}), prompt, 5, "y")
    assert a["a"]["tokens"] == greedy_ref(reference(cfg, {"x": old["x"]}), prompt, 5, "x")
    assert engine.adapter_names == ["x"] and len(engine.model.adapters) == 1  # the old version is gone
    c = run(engine, {0: [("c", prompt, greedy(5), "x")]})  # the new version's blocks are reused
    assert engine.stats()["prefix_hits"] > hits and c["c"]["tokens"] == b["b"]["tokens"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_greedy_equals_generate_on_cuda(tmp_path):
    """The same property with the engine on a CUDA device (reference on CPU, fp32). Waits for a GPU."""
    _check(ds(), tmp_path, lambda r: {0: r[:3], 2: r[3:]}, device="cuda", max_batch_tokens=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_non_resident_adapters_wait_in_host_memory_on_cuda(tmp_path):
    """max_loras=1 on CUDA: outputs stay exact and only the resident adapter's weights are on the GPU. Waits
    for a GPU."""
    engine = _check(ds(), tmp_path, lambda reqs: {0: reqs}, device="cuda", max_loras=1)
    resident = set(engine.scheduler.slots.resident)
    for name in engine.model.adapters:
        devices = {p.device.type for _, p in adapter_parameters(engine.model, name)}
        assert devices == ({"cuda"} if name in resident else {"cpu"}), (name, devices)
