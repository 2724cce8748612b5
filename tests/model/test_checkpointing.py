"""Activation checkpointing (CausalLM.activation_checkpointing, --activation-checkpointing): the same loss and
gradients as the plain backward, dropout included, with fewer saved activations."""

from __future__ import annotations

import pytest
import torch

from tests import tiny
from tests.tiny import make_model

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {"gpt2": lambda: tiny.gpt2(resid_pdrop=0.1, attn_pdrop=0.1), "deepseek_v3": tiny.ds}


def _step(model, x, checkpointing: bool):
    """(loss, {name: grad}, bytes autograd saved) of one forward + backward in training mode."""
    model.train()
    model.activation_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(5)  # the same dropout masks for both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x, targets=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpointed_backward_equals_the_plain_one(name):
    model = make_model(CONFIGS[name]())
    x = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    loss, grads, saved = _step(model, x, False)
    loss_c, grads_c, saved_c = _step(model, x, True)
    assert torch.equal(loss, loss_c)
    assert grads.keys() == grads_c.keys() and len(grads) > 10
    for n, g in grads.items():
        assert torch.allclose(grads_c[n], g, rtol=1e-5, atol=1e-7), n
    assert saved_c < 0.6 * saved  # only the blocks' inputs (and the head's activations) are kept
    model.eval()
    with torch.no_grad():  # inference ignores the flag
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_checkpointed_backward_replays_the_active_adapter(name):
    """The recomputation runs in backward, after the forward left its adapter context: the adapter must be
    replayed there, or the LoRA factors (experts' included) get the gradients of the base alone."""
    from nanoseek import LoraConfig

    model = make_model(CONFIGS[name]())
    model.add_adapter("a", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    params = model.trainable_adapter("a")
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = {}
    for on in (False, True):
        model.train()
        model.activation_checkpointing = on
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        model(x, targets=x, adapter="a").loss.backward()
        grads[on] = [p.grad.clone() for p in params]
    assert len(params) > 4 and all(g.abs().sum() > 0 for g in grads[False])
    for a, b in zip(grads[False], grads[True]):
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-7)
