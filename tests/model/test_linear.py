"""The one Linear (model/linear.py): base_forward from the precision recipe, adapter state owned by the modules,
and the serving stack cache emptied whenever the adapter set changes."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek import LoraConfig
from nanoseek.fp8 import Precision
from nanoseek.model import CausalLM
from nanoseek.model.linear import ExpertAdapters, Linear, LinearAdapters, LoraContext
from nanoseek.model.moe import Experts, Gate

from ..tiny import ds, make_model


def test_plain_linear_is_nn_linear_and_fp8_is_a_recipe():
    torch.manual_seed(0)
    lin = Linear(256, 128, bias=True)
    x = torch.randn(3, 256)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # no adapter, plain recipe
    names = [n for n, _ in lin.named_parameters()]
    lin.precision = Precision("fp8")  # the same module and parameter names, another base_forward
    assert [n for n, _ in lin.named_parameters()] == names
    y = lin(x)
    assert not torch.equal(y, F.linear(x, lin.weight, lin.bias))  # quantized tiles/blocks...
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), atol=0.05, rtol=0.05)  # ...close to it


def test_every_adapter_capable_module_owns_its_state():
    """Linear, the router and the experts carry the adapter mixins; the network itself imports no lora.py."""
    model = CausalLM(ds())
    kinds = {type(m) for m in model.modules() if isinstance(m, (LinearAdapters, ExpertAdapters))}
    assert kinds == {Linear, Gate, Experts}
    assert isinstance(model.lora_context, LoraContext)


def test_add_delete_merge_empty_the_serving_stack_cache():
    model = make_model(ds())
    model.add_adapter("a", LoraConfig(r=2, init_lora_weights=False))
    model.add_adapter("b", LoraConfig(r=4, init_lora_weights=False))
    ctx = model.lora_context
    ctx.stack_cache = {}  # what the serving engine sets
    x = torch.randint(0, 64, (2, 5))
    rows = torch.tensor([0, 1])
    before = model(x, adapter=rows)
    assert ctx.stack_cache  # stacks kept across forwards
    model.add_adapter("c", LoraConfig(r=2, init_lora_weights=False))
    assert ctx.stack_cache == {}
    assert torch.equal(model(x, adapter=rows), before)  # rebuilt, same result
    model.delete_adapter("c")
    assert ctx.stack_cache == {}
    model(x, adapter=rows)
    model.merge_adapter("a")
    assert ctx.stack_cache == {}
    model.unmerge_adapter("a")
    torch.testing.assert_close(model(x, adapter=rows), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "experts"])
def test_remove_adapter_leaves_no_trace(kind):
    model = make_model(ds())
    target = ["q_b_proj"] if kind == "linear" else ["experts"]
    state = {n for n, _ in model.named_parameters()}
    model.add_adapter("a", LoraConfig(r=2, target_modules=target))
    assert {n for n, _ in model.named_parameters()} > state
    model.delete_adapter("a")
    assert {n for n, _ in model.named_parameters()} == state
    assert all(not m.lora_scale for m in model.modules() if isinstance(m, (LinearAdapters, ExpertAdapters)))
