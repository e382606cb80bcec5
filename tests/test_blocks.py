"""Head building blocks, each run of a stacked block against torch.nn's own module given its weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featcache.heads.blocks import (
    RunRNG,
    StackedAdaIN,
    StackedAdapter,
    StackedCosineClassifier,
    StackedCrossAttention,
    StackedDropout,
    StackedGate,
    StackedLayerNorm,
    StackedLinear,
    dann_lambda,
    grad_reverse,
    run_generators,
)

R = 3


def test_grad_reverse_flips_and_scales():
    torch.manual_seed(0)
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(3, 2)
    (x @ w).pow(2).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)  # identity forward
    (y @ w).pow(2).sum().backward()
    assert torch.allclose(x.grad, -0.3 * plain)


def test_dann_lambda_schedule():
    assert dann_lambda(0.0) == 0.0
    values = [dann_lambda(p / 10, max_lambda=0.5) for p in range(11)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.5 * (2 / (1 + math.exp(-10)) - 1))
    assert dann_lambda(5.0, max_lambda=0.5) == pytest.approx(0.5, abs=1e-9)


def _linear(stacked: StackedLinear, r: int) -> nn.Linear:
    """Run r of a stacked Linear as torch's nn.Linear (weight stored transposed there)."""
    lin = nn.Linear(stacked.in_features, stacked.out_features)
    with torch.no_grad():
        lin.weight.copy_(stacked.weight[r].t())
        lin.bias.copy_(stacked.bias[r])
    return lin


def test_stacked_linear_is_r_nn_linears_initialised_within_nn_linears_bound():
    lin = StackedLinear(R, 20, 7, run_generators([0, 1, 2]))
    x = torch.randn(R, 4, 5, 20)
    out = lin(x)
    for r in range(R):
        torch.testing.assert_close(out[r], _linear(lin, r)(x[r]))
        ref = nn.Linear(20, 7)  # nn.Linear's init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
        bound = 1 / math.sqrt(20)
        assert lin.weight[r].abs().max() <= bound and lin.bias[r].abs().max() <= bound
        assert ref.weight.abs().max() <= bound
    # run r's values depend only on its own seed, not on R or the other runs
    alone = StackedLinear(1, 20, 7, run_generators([1]))
    assert torch.equal(alone.weight[0], lin.weight[1]) and torch.equal(alone.bias[0], lin.bias[1])
    assert torch.count_nonzero(StackedLinear(R, 4, 4, run_generators([0, 1, 2]), init="zeros").weight) == 0


def test_stacked_layer_norm_is_nn_layer_norm_per_run():
    ln = StackedLayerNorm(R, 12)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2.0)
        ln.bias.normal_()
    x = torch.randn(R, 6, 12) * 4 + 1
    out = ln(x)
    for r in range(R):
        ref = nn.LayerNorm(12)
        with torch.no_grad():
            ref.weight.copy_(ln.weight[r])
            ref.bias.copy_(ln.bias[r])
        torch.testing.assert_close(out[r], ref(x[r]))


def test_stacked_adapter_is_identity_at_init_and_trains():
    ad = StackedAdapter(R, 16, 8, run_generators([1, 2, 3]), dropout=0.0)
    x = torch.randn(R, 4, 16) * 7 + 3
    assert torch.equal(ad(x), x)
    ad(x).pow(2).sum().backward()
    last = ad.net.net[-1]
    assert all(last.weight.grad[r].abs().sum() > 0 for r in range(R))  # the zero layer learns, in every run


def test_stacked_adain_is_instance_norm_at_init_and_affine_after():
    ada = StackedAdaIN(R, 12, 5, run_generators([2, 3, 4]), eps=1e-6)
    x = torch.randn(R, 4, 12) * 3 + 1
    cond = torch.randn(R, 4, 5)
    standardised = F.layer_norm(x, (12,), eps=0.0)  # per-sample standardisation over the features
    torch.testing.assert_close(ada(x, cond), standardised, atol=1e-5, rtol=0)
    with torch.no_grad():
        ada.gamma.bias.fill_(2.0)
        ada.beta.bias.fill_(0.5)
    torch.testing.assert_close(ada(x, cond), 2.0 * standardised + 0.5, atol=1e-5, rtol=0)


def test_stacked_cross_attention_is_nn_multihead_attention_per_run():
    dim, cond_dim, views, heads = 16, 10, 4, 4
    ca = StackedCrossAttention(R, dim, cond_dim, views, heads, run_generators([3, 4, 5]))
    x, cond = torch.randn(R, 6, dim), torch.randn(R, 6, cond_dim)
    out, w = ca(x, cond)
    assert out.shape == (R, 6, dim) and w.shape == (R, 6, views)
    for r in range(R):
        mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([ca.q.weight[r].t(), ca.k.weight[r].t(), ca.v.weight[r].t()]))
            mha.in_proj_bias.copy_(torch.cat([ca.q.bias[r], ca.k.bias[r], ca.v.bias[r]]))
            mha.out_proj.weight.copy_(ca.out.weight[r].t())
            mha.out_proj.bias.copy_(ca.out.bias[r])
        kv = _linear(ca.views, r)(cond[r]).reshape(6, views, dim)
        ref, ref_w = mha(x[r][:, None], kv, kv, average_attn_weights=True)
        torch.testing.assert_close(out[r], ref[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w[r], ref_w[:, 0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        StackedCrossAttention(1, 10, 10, 2, 4, run_generators([0]))


def test_stacked_gate_formula_and_half_gate_at_zero():
    fu = StackedGate(R, 8, run_generators([4, 5, 6]))
    a, b = torch.randn(R, 3, 8), torch.randn(R, 3, 8)
    out, gate = fu(a, b)
    for r in range(R):
        expected = torch.sigmoid(_linear(fu.proj, r)(torch.cat([a[r], b[r]], -1)))
        torch.testing.assert_close(gate[r], expected)
        torch.testing.assert_close(out[r], expected * a[r] + (1 - expected) * b[r])
    assert torch.equal(fu.proj.bias, torch.zeros(R, 8))
    assert torch.allclose(fu(torch.zeros(R, 3, 8), torch.zeros(R, 3, 8))[1], torch.full((R, 3, 8), 0.5))


def test_stacked_cosine_classifier_is_cosine_similarity():
    cos = StackedCosineClassifier(R, 20, 8, run_generators([5, 6, 7]))
    x = torch.randn(R, 7, 20) * 10
    z = cos(x)
    assert z.shape == (R, 7, 8) and (z.abs() <= 1 + 1e-6).all()
    for r in range(R):
        expected = F.cosine_similarity(x[r][:, None, :], cos.weight[r][None, :, :], dim=-1)
        torch.testing.assert_close(z[r], expected, atol=1e-6, rtol=1e-5)


def test_stacked_dropout_masks_come_from_each_runs_own_stream():
    x = torch.ones(2, 1000)
    both = StackedDropout(0.25, RunRNG([7, 8])).train()(x)
    alone = StackedDropout(0.25, RunRNG([8])).train()(x[:1])
    assert torch.equal(both[1], alone[0])  # run 1's mask does not depend on run 0 being there
    kept = (both > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.05 and torch.allclose(both[both > 0], torch.tensor(1 / 0.75))
    assert torch.equal(StackedDropout(0.25, RunRNG([7])).eval()(x[:1]), x[:1])
