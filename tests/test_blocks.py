"""Head building blocks: initial states and the properties the heads rely on."""

import math

import pytest
import torch
import torch.nn.functional as F

from featcache.heads.blocks import (
    AdaIN,
    BinaryClassifier,
    CosineClassifier,
    GatedFusion,
    GradReverse,
    MLPHead,
    MultiViewCrossAttention,
    ResidualAdapter,
    dann_lambda,
    grad_reverse,
)


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
    x.grad = None
    (GradReverse(2.0)(x) @ w).pow(2).sum().backward()
    assert torch.allclose(x.grad, -2.0 * plain)


def test_dann_lambda_schedule():
    assert dann_lambda(0.0) == 0.0
    values = [dann_lambda(p / 10, max_lambda=0.5) for p in range(11)]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.5 * (2 / (1 + math.exp(-10)) - 1))
    assert dann_lambda(5.0, max_lambda=0.5) == pytest.approx(0.5, abs=1e-9)


def test_residual_adapter_is_identity_at_init_and_trains():
    torch.manual_seed(1)
    ad = ResidualAdapter(16, 8, dropout=0.0)
    x = torch.randn(4, 16) * 7 + 3
    assert torch.equal(ad(x), x)
    ad(x).pow(2).sum().backward()
    assert ad.net[-1].weight.grad.abs().sum() > 0  # the zero layer learns


def test_adain_identity_init_is_instance_norm():
    torch.manual_seed(2)
    ada = AdaIN(12, 5, eps=1e-6)
    x = torch.randn(4, 12) * 3 + 1
    cond = torch.randn(4, 5)
    expected = F.layer_norm(x, (12,), eps=0.0)  # per-sample standardisation over the features
    assert torch.allclose(ada(x, cond), expected, atol=1e-5)
    mean, std = x.mean(-1, keepdim=True), x.std(-1, unbiased=False, keepdim=True)
    assert torch.allclose(ada(x, cond), (x - mean) / (std + 1e-6), atol=1e-6)
    with torch.no_grad():
        ada.gamma.bias.fill_(2.0)
        ada.beta.bias.fill_(0.5)
    assert torch.allclose(ada(x, cond), 2.0 * expected + 0.5, atol=1e-5)


def test_cross_attention_shapes_and_weights():
    torch.manual_seed(3)
    ca = MultiViewCrossAttention(dim=16, cond_dim=10, n_views=4, heads=4)
    assert ca.enabled
    out, w = ca(torch.randn(6, 16), torch.randn(6, 10))
    assert out.shape == (6, 16) and w.shape == (6, 4)
    assert torch.allclose(w.sum(-1), torch.ones(6), atol=1e-6)
    assert (w >= 0).all()
    off = MultiViewCrossAttention(dim=16, cond_dim=10, n_views=0)
    assert not off.enabled and sum(p.numel() for p in off.parameters()) == 0
    assert off(torch.randn(6, 16), torch.randn(6, 10)) == (None, None)
    with pytest.raises(ValueError):
        MultiViewCrossAttention(dim=10, cond_dim=10, heads=4)


def test_gated_fusion_gate():
    torch.manual_seed(4)
    fu = GatedFusion(8)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    out, gate = fu(a, b)
    assert torch.equal(fu.proj.bias, torch.zeros(8))
    expected_gate = torch.sigmoid(torch.cat([a, b], -1) @ fu.proj.weight.t())
    assert torch.allclose(gate, expected_gate, atol=1e-6)
    assert torch.allclose(out, gate * a + (1 - gate) * b)
    zero_gate = fu(torch.zeros(3, 8), torch.zeros(3, 8))[1]
    assert torch.allclose(zero_gate, torch.full((3, 8), 0.5))


def test_classifiers():
    torch.manual_seed(5)
    x = torch.randn(7, 20) * 10
    cos = CosineClassifier(20, 8)
    z = cos(x)
    assert z.shape == (7, 8)
    assert (z.abs() <= 1 + 1e-6).all()
    expected = F.cosine_similarity(x[:, None, :], cos.weight[None, :, :], dim=-1)
    assert torch.allclose(z, expected, atol=1e-6)
    bc = BinaryClassifier(20).eval()
    assert bc(x).shape == (7, 2)
    assert [m.out_features for m in bc.modules() if isinstance(m, torch.nn.Linear)] == [384, 192, 2]
    assert MLPHead(20, 32, 4)(x).shape == (7, 4) and MLPHead(20, 32, 2)(x).shape == (7, 2)
