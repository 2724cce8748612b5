import math

import pytest

from nanoseek import Model, ModelConfig
from nanoseek.train.optim import configure_optimizer, lr_at, set_lr


@pytest.mark.parametrize("preset", ["dsv3-tiny", "gpt2-tiny"])
def test_groups_cover_each_parameter_once(preset):
    model = Model(ModelConfig.from_preset(preset, hidden_size=64, num_hidden_layers=2, vocab_size=512))
    opt = configure_optimizer(model, lr=1e-3)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    unique = {id(p) for p in model.parameters()}  # tied weights once (gpt2-tiny ties lm_head to wte)
    assert len(ids) == len(set(ids)) == len(unique)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)
    # the stacked experts and the embedding are decayed; the router bias is a buffer, not a parameter
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    if preset == "dsv3-tiny":
        assert any(n.endswith("experts.gate_up_proj") for n in decayed)
        assert "model.embed_tokens.weight" in decayed
    assert not any("e_score_correction_bias" in n for n in names.values())


def test_lr_scale_multiplies_base_lr():
    model = Model(ModelConfig.from_preset("gpt2-tiny", hidden_size=32, num_hidden_layers=1, vocab_size=300))
    opt = configure_optimizer(model, lr=1e-3)
    opt.param_groups[0]["lr_scale"] = 0.5
    set_lr(opt, 2e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3) and opt.param_groups[1]["lr"] == pytest.approx(2e-3)


def test_cosine_schedule_shape():
    lrs = [lr_at(s, 1.0, 100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then non-increasing
    assert lrs[-1] == pytest.approx(0.1)  # ends at min_lr_ratio
    assert lrs[9 + 45] == pytest.approx(0.55, abs=0.02)  # cosine midpoint


def test_wsd_schedule_shape():
    lrs = [lr_at(s, 2.0, 100, warmup_steps=5, min_lr_ratio=0.0, schedule="wsd", decay_frac=0.2) for s in range(100)]
    assert lrs[4] == pytest.approx(2.0)
    assert all(v == 2.0 for v in lrs[5:80])  # stable
    assert all(a > b for a, b in zip(lrs[79:], lrs[80:]))  # linear decay over the last 20%
    assert lrs[-1] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, 10, schedule="step")


def test_schedule_is_pure_function():
    a = [lr_at(s, 3e-3, 50, 5) for s in range(50)]
    b = [lr_at(s, 3e-3, 50, 5) for s in reversed(range(50))][::-1]
    assert a == b and all(math.isfinite(x) for x in a)


def test_fused_step_on_cpu_equals_the_default_step():
    """configure_optimizer takes torch's fused AdamW on the CPU; 5 steps of it equal the default (foreach)
    implementation's up to rounding, for every group (decay and no-decay)."""
    import torch

    def run(fused: bool):
        torch.manual_seed(0)
        model = Model(ModelConfig.from_preset("dsv3-tiny", hidden_size=64, num_hidden_layers=2, vocab_size=256))
        init = {k: v.clone() for k, v in model.state_dict().items()}
        opt = configure_optimizer(model, lr=1e-2)
        assert all(g["fused"] is True for g in opt.param_groups)  # the CPU's fused kernel is picked
        if not fused:
            for g in opt.param_groups:
                g["fused"], g["foreach"] = None, True
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randint(0, 256, (2, 16), generator=g)
            model(x, targets=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return init, model.state_dict()

    init, fused = run(True)
    _, plain = run(False)
    for k, v in plain.items():
        moved = (v - init[k]).abs().max()  # ~lr * steps
        assert (fused[k] - v).abs().max() <= 1e-3 * moved, k  # rounding, not a different update
    assert not torch.equal(plain["model.embed_tokens.weight"], init["model.embed_tokens.weight"])  # they trained
