"""DeepSeekMoE: grouped expert GEMMs, the sigmoid router with group-limited routing, balance losses and the
auxiliary-loss-free bias update. Every claim is checked against an independent re-implementation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nanoseek import Model, ModelConfig
from nanoseek.model import linear as linear_mod
from nanoseek.model.layers import activation
from nanoseek.model.linear import _padded_grouped_mm, grouped_mm
from nanoseek.model.moe import Experts, Gate, MoE
from tests import tiny
from tests.tiny import ds  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(cfg: ModelConfig, seed: int = 0, std: float = 0.2) -> Model:
    """tiny.make_model's larger weights, left in training mode (routing statistics accumulate there)."""
    return tiny.make_model(cfg, seed=seed, std=std).train()


def make_gate(cfg: ModelConfig, seed: int = 0) -> Gate:
    torch.manual_seed(seed)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.normal_(0.0, 0.5)
    return gate


def make_experts(cfg: ModelConfig, dtype=torch.float32, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    ex = Experts(cfg)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0.0, 0.3)
        ex.down_proj.normal_(0.0, 0.3)
    return ex.to(dtype)


def random_routing(N, E, K, empty=(), seed=0, dtype=torch.float32):
    """idx (N, K) of distinct experts per token avoiding `empty`, weights (N, K) positive."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    idx = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:K]] for _ in range(N)])
    weights = torch.rand(N, K, generator=g, dtype=torch.float64).to(dtype) + 0.1
    return idx, weights


def experts_reference(x, idx, weights, gate_up, down, act):
    """Loop over experts: sum_k w_k * down_e(act(gate_e x) * up_e x)."""
    out = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if len(tok) == 0:
            continue
        g, u = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(act(g) * u, down[e])
        out = out.index_add(0, tok, y * weights[tok, slot, None].to(y.dtype))
    return out


# ---------------------------------------------------------------------- grouped GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N,E,K,empty", [(1, 4, 1, (0, 2)), (7, 4, 2, (3,)), (16, 8, 3, (0, 5)),
                                         (9, 8, 7, (7,)), (5, 2, 1, ())])
def test_experts_match_per_expert_loop_forward_and_backward(N, E, K, empty, dtype):
    cfg = ds(n_routed_experts=E, num_experts_per_tok=min(K, E), n_group=1, topk_group=1)
    ex = make_experts(cfg, dtype)
    idx, w = random_routing(N, E, K, empty, dtype=dtype)
    for e in empty:
        assert not (idx == e).any()
    x = torch.randn(N, cfg.hidden_size, dtype=dtype, requires_grad=True)
    w.requires_grad_(True)
    y = ex(x, idx, w)
    gu = ex.gate_up_proj.detach().clone().requires_grad_(True)
    dn = ex.down_proj.detach().clone().requires_grad_(True)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = experts_reference(x2, idx, w2, gu, dn, activation(cfg.hidden_act))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    assert y.dtype == dtype and y.shape == (N, cfg.hidden_size)
    torch.testing.assert_close(y, ref, **tol)
    gout = torch.randn_like(y)
    (y * gout).sum().backward()
    (ref * gout).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    torch.testing.assert_close(w.grad, w2.grad, **tol)
    torch.testing.assert_close(ex.gate_up_proj.grad, gu.grad, **tol)
    torch.testing.assert_close(ex.down_proj.grad, dn.grad, **tol)
    for e in empty:  # an expert without tokens gets an exactly zero gradient
        assert ex.gate_up_proj.grad[e].abs().max() == 0 and ex.down_proj.grad[e].abs().max() == 0


def _loop_grouped_mm(x, w, offs):
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[e])
        start = end
    return torch.cat(out) if out else x.new_zeros(0, w.shape[-1])


GROUPS = [[3, 0, 5, 2], [0, 0, 0, 6], [6, 0, 0, 0], [1, 1, 1, 1], [0, 4, 0, 0], [0, 0, 0, 0], [2, 7, 0, 3]]


@pytest.mark.parametrize("counts", GROUPS, ids=["-".join(map(str, c)) for c in GROUPS])
def test_padded_grouped_mm_equals_native_and_loop(counts):
    torch.manual_seed(0)
    E, K, N = len(counts), 8, 12
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), K)
    w = torch.randn(E, K, N)
    ref = _loop_grouped_mm(x.double(), w.double(), offs)
    padded = _padded_grouped_mm(x, w, offs)
    assert padded.shape == (sum(counts), N) and padded.dtype == x.dtype
    torch.testing.assert_close(padded.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_padded_grouped_mm(x.double(), w.double(), offs), ref, atol=1e-12, rtol=1e-12)
    if sum(counts):
        native = torch._grouped_mm(x, w, offs=offs)
        torch.testing.assert_close(padded, native, atol=1e-5, rtol=1e-5)
    # a transposed (non-contiguous) weight, as Experts passes it
    wt = torch.randn(E, N, K).transpose(1, 2)
    ref_t = _loop_grouped_mm(x.double(), wt.double(), offs)
    torch.testing.assert_close(_padded_grouped_mm(x, wt, offs).double(), ref_t, atol=1e-5, rtol=1e-5)


def test_padded_grouped_mm_gradients():
    torch.manual_seed(1)
    counts = [2, 0, 5, 1]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, 8, dtype=torch.float64, requires_grad=True)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    g = torch.randn(8, 8, dtype=torch.float64)
    (_padded_grouped_mm(x, w, offs) * g).sum().backward()
    (_loop_grouped_mm(x2, w2, offs) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    assert w.grad[1].abs().max() == 0


def test_grouped_mm_dispatch(monkeypatch):
    calls = []
    real = linear_mod._padded_grouped_mm
    monkeypatch.setattr(linear_mod, "_padded_grouped_mm", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    grouped_mm(x, w, offs)
    assert calls == []  # fp32 on CPU: the native kernel
    grouped_mm(x.double(), w.double(), offs)
    assert calls == [1]  # float64: the fallback


@pytest.mark.parametrize("counts", [[2, 0, 5, 1], [0, 0, 0, 8]])
def test_compiled_grouped_op_equals_the_native_kernel_and_its_gradients(counts):
    """Under torch.compile an fp32 grouped GEMM is the opaque op `nanoseek::grouped_mm` (Inductor lowers bf16
    only); its output and both gradients (dx per group, dW_e = x_e^T g_e, zero for an empty expert) equal
    `torch._grouped_mm`'s own autograd, and torch.library.opcheck accepts its fake and autograd registrations."""
    torch.manual_seed(2)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(4, 24, 16).transpose(1, 2).requires_grad_(True)  # transposed, as Experts passes it
    g = torch.randn(8, 24)
    grads = []
    for fn in (lambda: torch._grouped_mm(x, w, offs=offs), lambda: torch.ops.nanoseek.grouped_mm(x, w, offs)):
        y = fn()
        y.backward(g)
        grads.append((y.detach(), x.grad, w.grad))
        x.grad = w.grad = None
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert all(grads[1][2][e].abs().max() == 0 for e in empty)
    torch.library.opcheck(torch.ops.nanoseek.grouped_mm.default, (x, w, offs))
    torch.library.opcheck(torch.ops.nanoseek.grouped_mm_wgrad.default, (x.detach(), g, offs))


def test_compiled_moe_training_forward_is_one_graph():
    """Dynamo (no Inductor: cheap) traces a DeepSeek-V3 training forward with its loss as one graph: the padded
    fallback's `int(counts.max())` once broke it at every MoE layer (24 graphs on the 6-layer model, and the
    compiled step ran at 0.99x eager; 1.18x with one graph, BENCHMARKS.md)."""
    model = Model(tiny.ds())
    x = torch.randint(0, 64, (2, 12))
    explained = torch._dynamo.explain(model)(x, targets=x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _moe_forward_and_grads(cfg, x):
    torch.manual_seed(3)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    x = x.clone().requires_grad_(True)
    y, load, loss = moe(x, want_loss=True)
    (y.square().sum() + loss).backward()
    return y, load, x.grad, {n: p.grad for n, p in moe.named_parameters()}


def test_padded_fallback_and_native_paths_agree(monkeypatch):
    cfg = ds()
    x = torch.randn(2, 9, cfg.hidden_size)
    y1, l1, gx1, g1 = _moe_forward_and_grads(cfg, x)
    used = []
    monkeypatch.setattr(linear_mod, "_native_grouped_ok", lambda *a: used.append(1) or False)
    y2, l2, gx2, g2 = _moe_forward_and_grads(cfg, x)
    assert used  # the fallback really ran
    assert torch.equal(l1, l2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-5, rtol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.parametrize("hidden,inter", [(32, 6), (30, 16)])
def test_unaligned_expert_sizes_fall_back(hidden, inter):
    cfg = ds(hidden_size=hidden, moe_intermediate_size=inter, num_attention_heads=2)
    ex = make_experts(cfg)
    idx, w = random_routing(5, 8, 2)
    x = torch.randn(5, hidden)
    ref = experts_reference(x, idx, w, ex.gate_up_proj, ex.down_proj, activation(cfg.hidden_act))
    torch.testing.assert_close(ex(x, idx, w), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- router
def kept_groups_reference(choice: torch.Tensor, n_group: int, topk_group: int) -> list[set[int]]:
    """Per token: the topk_group groups with the largest sum of their two best biased scores."""
    out = []
    for row in choice.tolist():
        size = len(row) // n_group
        scores = [sum(sorted(row[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        out.append(set(sorted(range(n_group), key=lambda g: -scores[g])[:topk_group]))
    return out


def expected_weights(scores, idx, norm, scale):
    w = scores.gather(1, idx)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w * scale


def test_gate_outputs_match_definition():
    cfg = ds(routed_scaling_factor=2.5)
    gate = make_gate(cfg)
    x = torch.randn(40, cfg.hidden_size)
    logits, scores, idx, w = gate(x)
    ref_logits = x.double() @ gate.weight.double().T
    torch.testing.assert_close(logits.double(), ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, logits.sigmoid())
    assert logits.dtype == scores.dtype == w.dtype == torch.float32
    assert idx.shape == w.shape == (40, 2)
    assert all(len(set(r)) == 2 for r in idx.tolist())  # k distinct experts, nothing dropped
    torch.testing.assert_close(w, expected_weights(scores, idx, True, 2.5))
    torch.testing.assert_close(w.sum(-1), torch.full((40,), 2.5))


def test_gate_with_bf16_input_routes_in_fp32():
    cfg = ds()
    gate = make_gate(cfg).to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    x = torch.randn(10, cfg.hidden_size).to(torch.bfloat16)
    logits, scores, idx, w = gate(x)
    assert logits.dtype == torch.float32 and w.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ gate.weight.float().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", [True, False])
def test_bias_changes_selection_not_weights(norm):
    cfg = ds(norm_topk_prob=norm, routed_scaling_factor=2.5, n_group=1, topk_group=1)
    gate = make_gate(cfg)
    x = torch.randn(64, cfg.hidden_size)
    _, _, idx0, _ = gate(x)
    assert (idx0 == 5).any(-1).float().mean() < 0.9  # without bias, expert 5 is not chosen by everyone
    gate.e_score_correction_bias[5] = 10.0
    logits, scores, idx, w = gate(x)
    assert (idx == 5).any(-1).all()
    s = torch.sigmoid(x.double() @ gate.weight.double().T)  # independent, no bias term
    torch.testing.assert_close(scores.double(), s, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w.double(), expected_weights(s, idx, norm, 2.5), atol=1e-6, rtol=1e-6)
    if not norm:  # the weight of the biased expert is its plain sigmoid score, not score + 10
        w5 = w[idx == 5]
        assert (w5 < 2.5).all()
        torch.testing.assert_close(w5.double(), 2.5 * s[:, 5], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("topk_group,K", [(1, 1), (1, 2), (2, 2), (2, 3), (3, 4)])
def test_dropped_groups_are_never_chosen(topk_group, K):
    cfg = ds(n_routed_experts=16, n_group=4, topk_group=topk_group, num_experts_per_tok=K)
    gate = make_gate(cfg, seed=topk_group * 10 + K)
    gate.e_score_correction_bias.copy_(torch.randn(16) * 0.3)
    x = torch.randn(300, cfg.hidden_size)
    _, scores, idx, _ = gate(x)
    choice = scores.double() + gate.e_score_correction_bias.double()
    kept = kept_groups_reference(choice, 4, topk_group)
    for t, row in enumerate(idx.tolist()):
        assert {e // 4 for e in row} <= kept[t], (t, row, kept[t])
        # and they are the top-K biased scores among the kept experts
        allowed = [e for e in range(16) if e // 4 in kept[t]]
        best = sorted(allowed, key=lambda e: -choice[t, e].item())[:K]
        assert set(row) == set(best)
    # group limiting matters for this data: without it, some tokens would pick a dropped expert
    if topk_group < 4:
        free = choice.topk(K, dim=-1).indices.tolist()
        assert any(not {e // 4 for e in r} <= kept[t] for t, r in enumerate(free))


def test_masked_group_with_best_expert_and_negative_scores():
    """Group 0 holds the single best expert but a terrible partner; every kept score is negative, so a mask
    of 0 instead of -inf would make the masked experts win."""
    cfg = ds(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True)
    gate = make_gate(cfg)
    gate.e_score_correction_bias.copy_(torch.tensor([0.5, -10.0, -1.0, -1.0, -5.0, -5.0, -5.0, -5.0]))
    x = torch.randn(50, cfg.hidden_size)
    _, scores, idx, w = gate(x)
    choice = scores + gate.e_score_correction_bias
    assert (choice.argmax(-1) == 0).all()  # expert 0 is everyone's single best
    assert (choice[:, 2:4] < 0).all() and (choice[:, 0] > 0).all()  # kept scores < 0 < best masked one
    assert kept_groups_reference(choice.double(), 4, 1) == [{1}] * 50
    assert torch.equal(idx.sort(-1).values, torch.tensor([[2, 3]] * 50))
    torch.testing.assert_close(w, expected_weights(scores, idx, True, 1.0))


@pytest.mark.parametrize("norm,scale", [(True, 1.0), (True, 2.5), (False, 1.0), (False, 2.5)])
def test_norm_topk_prob_and_scaling(norm, scale):
    cfg = ds(norm_topk_prob=norm, routed_scaling_factor=scale, num_experts_per_tok=3)
    gate = make_gate(cfg)
    x = torch.randn(30, cfg.hidden_size)
    _, scores, idx, w = gate(x)
    s = scores.gather(1, idx)
    if norm:
        torch.testing.assert_close(w.sum(-1), torch.full((30,), scale))
        torch.testing.assert_close(w, s / s.sum(-1, keepdim=True) * scale)
    else:
        torch.testing.assert_close(w, s * scale)
        assert (w.sum(-1) < 3 * scale).all()


# ---------------------------------------------------------------------- balance losses
def seqwise_loss_reference(scores, idx, B, T, E, K, alpha):
    total = 0.0
    for b in range(B):
        s = scores[b * T:(b + 1) * T].double()
        counts = torch.zeros(E, dtype=torch.float64)
        for row in idx[b * T:(b + 1) * T].tolist():
            for e in row:
                counts[e] += 1
        f = E / (K * T) * counts
        P = (s / s.sum(-1, keepdim=True)).mean(0)
        total += alpha * (f * P).sum()
    return total / B


def switch_loss_reference(logits, idx, E, K, alpha):
    N = logits.shape[0]
    counts = torch.bincount(idx.flatten(), minlength=E).double()
    f = E / (K * N) * counts
    P = logits.double().softmax(-1).mean(0)
    return alpha * (f * P).sum()


@pytest.mark.parametrize("mode", ["aux_free", "aux_loss", "none"])
def test_balance_loss_matches_definition(mode):
    B, T = 3, 7
    cfg = ds(router_balance=mode, aux_loss_alpha=0.01, num_experts_per_tok=3)
    torch.manual_seed(0)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(B, T, cfg.hidden_size)
    y, load, loss = moe(x, want_loss=True)
    with torch.no_grad():
        logits, scores, idx, _ = moe.gate(x.reshape(-1, cfg.hidden_size))
    assert torch.equal(load, torch.bincount(idx.flatten(), minlength=8))
    if mode == "none":
        assert loss is None
        return
    if mode == "aux_free":
        ref = seqwise_loss_reference(scores, idx, B, T, 8, 3, 0.01)
    else:
        ref = switch_loss_reference(logits, idx, 8, 3, 0.01)
    torch.testing.assert_close(loss.double(), torch.as_tensor(ref, dtype=torch.float64), atol=1e-8, rtol=1e-5)
    assert loss.requires_grad
    # the loss is per sequence: it is not the batch-wise formula (the batch has different sequences)
    if mode == "aux_free":
        batchwise = seqwise_loss_reference(scores, idx, 1, B * T, 8, 3, 0.01)
        assert abs(loss.item() - float(batchwise)) > 1e-7
    _, _, none = moe(x, want_loss=False)
    assert none is None


def test_balance_loss_gradient_reaches_gate_only_through_scores():
    B, T = 2, 5
    cfg = ds(router_balance="aux_free", aux_loss_alpha=1.0)
    gate = make_gate(cfg)
    moe = MoE(cfg)
    moe.gate = gate
    x = torch.randn(B * T, cfg.hidden_size)
    logits, scores, idx, _ = gate(x)
    moe.balance_loss(logits, scores, idx, B, T).backward()
    g = gate.weight.grad.clone()
    gate.weight.grad = None
    w = gate.weight.detach().double().requires_grad_(True)
    s = torch.sigmoid(x.double() @ w.T)
    seqwise_loss_reference(s, idx, B, T, 8, 2, 1.0).backward()
    torch.testing.assert_close(g.double(), w.grad, atol=1e-6, rtol=1e-4)


def test_balance_loss_zero_alpha_is_none():
    moe = MoE(ds(aux_loss_alpha=0.0))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    assert moe(torch.randn(1, 4, 32), want_loss=True)[2] is None


# ---------------------------------------------------------------------- expert load
def _capture_routing(model):
    seen = []
    hooks = [m.gate.register_forward_hook(lambda mod, inp, out: seen.append(out[2]))
             for m in model.moe_layers()]
    return seen, hooks


def test_expert_load_in_model_output():
    cfg = ds(num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=1)
    model = make_model(cfg)
    assert model.num_moe_layers == 3
    B, T = 2, 9
    x = torch.randint(0, 64, (B, T))
    seen, hooks = _capture_routing(model)
    out = model(x, targets=torch.randint(0, 64, (B, T)))
    for h in hooks:
        h.remove()
    assert out.expert_load.shape == (3, 8)  # 2 main MoE layers + the MTP layer
    assert out.expert_load.dtype == torch.float32
    torch.testing.assert_close(out.expert_load.sum(-1), torch.full((3,), float(B * T * 2)))
    assert len(seen) == 3
    for row, idx in zip(out.expert_load, seen):
        assert torch.equal(row, torch.bincount(idx.flatten(), minlength=8).float())
    # without targets the MTP module does not run; the main layers' loads still come out
    out = model(x, return_output=True)
    assert out.expert_load.shape == (2, 8) and out.loss is None
    dense = Model(ds(first_k_dense_replace=3, num_nextn_predict_layers=0))
    assert dense(x, return_output=True).expert_load is None


# ---------------------------------------------------------------------- bias update
def biases(model):
    return torch.stack([m.gate.e_score_correction_bias.clone() for m in model.moe_layers()])


def test_update_router_bias_after_training_forward():
    model = make_model(ds()).train()
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    out = model(x, targets=y)
    assert torch.equal(model.expert_load_accum, out.expert_load)
    before = biases(model)
    gamma = 0.01
    model.update_router_bias(gamma)
    load = out.expert_load
    expect = gamma * torch.sign(load.mean(-1, keepdim=True) - load)
    assert torch.equal(biases(model) - before, expect)
    assert model.expert_load_accum is None
    # consumed: a second call without a new forward does nothing
    model.update_router_bias(gamma)
    assert torch.equal(biases(model) - before, expect)
    # the loads are not balanced by chance: both directions occur
    assert (expect > 0).any() and (expect < 0).any()


def test_update_router_bias_exact_mean_gets_no_step():
    model = make_model(ds())
    loads = torch.tensor([[2.0, 4, 6, 4, 4, 0, 8, 4], [4.0] * 8, [1.0, 1, 1, 1, 1, 1, 1, 9]])
    model.update_router_bias(0.5, loads=loads)
    expect = torch.tensor([[0.5, 0, -0.5, 0, 0, 0.5, -0.5, 0], [0.0] * 8, [0.5] * 7 + [-0.5]])
    assert torch.equal(biases(model), expect)


def test_update_router_bias_accumulates_micro_batches():
    model = make_model(ds()).train()
    o1 = model(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8)))
    o2 = model(torch.randint(0, 64, (3, 5)), targets=torch.randint(0, 64, (3, 5)))
    total = o1.expert_load + o2.expert_load
    assert torch.equal(model.expert_load_accum, total)
    torch.testing.assert_close(total.sum(-1), torch.full((3,), float((16 + 15) * 2)))
    model.update_router_bias(0.001)
    expect = (0.001 * torch.sign(total.mean(-1, keepdim=True) - total)).float()
    assert torch.equal(biases(model), expect)


def test_update_router_bias_explicit_loads_win():
    model = make_model(ds()).train()
    model(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8)))
    loads = torch.arange(24, dtype=torch.float32).view(3, 8)  # experts 0-3 under, 4-7 over the mean 3.5+8r
    model.update_router_bias(0.25, loads=loads)
    expect = torch.tensor([0.25] * 4 + [-0.25] * 4).expand(3, 8)
    assert torch.equal(biases(model), expect)


def test_no_accumulation_in_eval_or_without_targets():
    model = make_model(ds()).eval()
    model(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8)))
    assert model.expert_load_accum is None
    model.train()
    model(torch.randint(0, 64, (2, 8)))
    assert model.expert_load_accum is None
    model.update_router_bias(0.1)
    assert torch.equal(biases(model), torch.zeros(3, 8))


@pytest.mark.parametrize("mode", ["none", "aux_loss"])
def test_update_router_bias_only_for_aux_free(mode):
    model = make_model(ds(router_balance=mode)).train()
    out = model(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8)))
    model.update_router_bias(0.1)
    model.update_router_bias(0.1, loads=out.expert_load)
    assert torch.equal(biases(model), torch.zeros(3, 8))


def test_update_router_bias_without_mtp_rows():
    """mtp_loss_weight=0 skips the MTP module; its accumulated row stays 0 and gets no step."""
    model = make_model(ds(mtp_loss_weight=0.0)).train()
    out = model(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8)))
    assert out.expert_load.shape == (2, 8)
    assert model.expert_load_accum.shape == (3, 8) and (model.expert_load_accum[2] == 0).all()
    model.update_router_bias(0.1)
    assert (biases(model)[2] == 0).all() and (biases(model)[:2] != 0).any()


@pytest.mark.parametrize("cast", ["bf16", "double", "half"])
def test_router_bias_stays_fp32(cast):
    model = make_model(ds())
    model.update_router_bias(0.001, loads=torch.arange(24.0).view(3, 8))
    before = biases(model)
    model = {"bf16": lambda m: m.to(torch.bfloat16), "double": lambda m: m.double(),
             "half": lambda m: m.half()}[cast](model)
    for m in model.moe_layers():
        assert m.gate.e_score_correction_bias.dtype == torch.float32
        assert m.gate.weight.dtype != torch.float32
    assert torch.equal(biases(model), before)  # not rounded through the low precision
    assert model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    model.update_router_bias(0.001, loads=torch.arange(24.0).view(3, 8))
    assert torch.equal(biases(model), before * 2)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in dict(model.named_parameters())


def test_bf16_model_trains_with_fp32_bias():
    model = make_model(ds()).to(torch.bfloat16).train()
    out = model(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.update_router_bias(0.001)
    b = biases(model)
    assert b.dtype == torch.float32
    assert set(b.unique().tolist()) <= {-0.0010000000474974513, 0.0, 0.0010000000474974513}

