"""Losses: each checked against an independent computation."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from geomloss import SamplesLoss
from scipy.optimize import minimize_scalar

from featcache.config import resolve_config
from featcache.losses import (
    LDAMLoss,
    StackedSinkhorn,
    bilevel_cvar,
    bilevel_cvar_parts,
    bounding_diameter,
    cosine_disentanglement,
    cvar,
    feature_scale,
    ldam_margins,
)

# -- CVaR ---------------------------------------------------------------------------------------


def cvar_by_sort(values, alpha):
    """Mean of the worst alpha*n values, the boundary one weighted fractionally."""
    v = sorted(values, reverse=True)
    k = alpha * len(v)
    whole = int(math.floor(k + 1e-12))
    total = sum(v[:whole])
    if whole < len(v):
        total += (k - whole) * v[whole]
    return total / k


def cvar_by_minimisation(values, alpha):
    v = np.asarray(values, dtype=np.float64)
    res = minimize_scalar(lambda lam: lam + np.maximum(v - lam, 0).mean() / alpha,
                          bounds=(v.min() - 1, v.max() + 1), method="bounded", options={"xatol": 1e-10})
    return res.fun


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0, 0.1, 0.33, 0.07, 0.9])
def test_cvar_matches_sort_and_rockafellar_uryasev(alpha):
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(3, 20, generator=g, dtype=torch.float64) * 5
    got = cvar(losses, alpha)
    for r in range(3):
        row = losses[r].tolist()
        assert got[r].item() == pytest.approx(cvar_by_sort(row, alpha), abs=1e-12)
        assert got[r].item() == pytest.approx(cvar_by_minimisation(row, alpha), abs=1e-6)


def test_cvar_extremes():
    x = torch.tensor([3.0, -1.0, 7.0, 2.0])
    assert cvar(x, 1.0).item() == pytest.approx(x.mean().item())
    assert cvar(x, 0.01).item() == pytest.approx(7.0)  # alpha*n < 1: the worst sample
    assert cvar(x, 0.5).item() == pytest.approx(5.0)  # integer alpha*n = 2: mean of 7 and 3
    with pytest.raises(ValueError):
        cvar(x, 0.0)
    with pytest.raises(ValueError):
        cvar(x, 1.5)


def test_cvar_masked_rows():
    losses = torch.tensor([[1.0, 9.0, 4.0, float("nan"), 2.0],
                           [5.0, float("inf"), 3.0, 8.0, 0.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False, True],
                         [True, False, True, True, False],
                         [False, False, False, False, False]])
    got = cvar(losses, 0.5, mask)
    assert got[0].item() == pytest.approx(cvar_by_sort([1, 9, 4, 2], 0.5))  # 6.5
    assert got[1].item() == pytest.approx(cvar_by_sort([5, 3, 8], 0.5))
    assert got[2].item() == 0.0  # an empty row gives 0
    assert torch.isfinite(got).all()
    got.sum().backward()
    assert torch.isfinite(losses.grad).all()
    assert (losses.grad[~mask] == 0).all()  # non-members (nan and inf included) get no gradient
    # members: dCVaR/dl_i is the sort weight; here k = 2 on row 0, so 9 and 4 get 1/2 each
    assert losses.grad[0].tolist() == pytest.approx([0, 0.5, 0.5, 0, 0])
    # row 1: k = 1.5: 8 gets 1/1.5, 5 gets 0.5/1.5
    assert losses.grad[1].tolist() == pytest.approx([1 / 3, 0, 0, 2 / 3, 0])


def test_cvar_tensor_alpha_and_broadcast_mask():
    losses = torch.tensor([4.0, 1.0, 3.0, 2.0])
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    alpha = torch.tensor([0.5, 1.0])
    got = cvar(losses, alpha, mask)
    assert got.tolist() == pytest.approx([3.5, 3.5])


# -- bilevel CVaR --------------------------------------------------------------------------------


def bilevel_reference(losses, groups, labels, a_in, a_out, n_groups=8):
    """Plain-Python loops."""
    outers = []
    for c in (0, 1):
        inners = []
        for g in range(n_groups):
            vals = [ell for ell, gg, y in zip(losses, groups, labels) if gg == g and y == c]
            if vals:
                inners.append(cvar_by_sort(vals, a_in))
        if inners:
            outers.append(cvar_by_sort(inners, a_out))
    return sum(outers) / len(outers) if outers else 0.0


def test_bilevel_cvar_matches_loops():
    g = torch.Generator().manual_seed(1)
    n = 40
    losses = torch.rand(n, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 2, (n,), generator=g)
    groups = torch.randint(0, 6, (n,), generator=g)
    groups[::7] = -1  # unknown subgroups are excluded
    groups[(groups == 3) & (labels == 1)] = 2  # subgroup 3 absent from the fakes only
    assert ((groups == 3) & (labels == 0)).any()
    for a_in, a_out in [(0.1, 0.5), (0.9, 0.9), (0.5, 0.3), (1.0, 1.0)]:
        ref = bilevel_reference(losses.tolist(), groups.tolist(), labels.tolist(), a_in, a_out)
        got = bilevel_cvar(losses, groups, labels, a_in, a_out)
        assert got.item() == pytest.approx(ref, abs=1e-12)
    parts = bilevel_cvar_parts(losses, groups, labels)
    assert not parts.group_present[1, 3] and parts.group_present[0, 3]
    assert not parts.group_present[:, 6:].any()
    assert parts.class_present.all()


def test_bilevel_cvar_one_class_and_empty():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    labels = torch.tensor([1, 1, 1, 1])
    groups = torch.tensor([0, 0, 5, -1])
    ref = bilevel_reference(losses.tolist(), groups.tolist(), labels.tolist(), 0.5, 0.5)
    got = bilevel_cvar(losses, groups, labels, 0.5, 0.5)
    assert got.item() == pytest.approx(ref)  # the mean over the one class present, not over two
    got.backward()
    assert losses.grad[3] == 0 and losses.grad[2] > 0
    none_known = bilevel_cvar(losses, torch.full((4,), -1), labels)
    assert none_known.item() == 0.0
    none_known.backward()  # still in the graph


def test_bilevel_cvar_no_host_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to check for host-device synchronisation")
    dev = torch.device("cuda")
    losses = torch.rand(64, device=dev, requires_grad=True)
    groups = torch.randint(-1, 8, (64,), device=dev)
    labels = torch.randint(0, 2, (64,), device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = bilevel_cvar(losses, groups, labels, 0.9, 0.5)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = bilevel_reference(losses.tolist(), groups.tolist(), labels.tolist(), 0.9, 0.5)
    assert out.item() == pytest.approx(ref, rel=1e-5)


# -- LDAM ----------------------------------------------------------------------------------------


def test_ldam_margins_formula():
    """Issue 26.1: by default the design's m_k = C / n_k^(1/4), C = ldam_max_margin = 0.5, on FF++'s counts."""
    counts = [2475, 25443, 1468, 4163, 8013, 31281, 1111, 2185]
    # by hand: 0.5 / 2475^(1/4) = 0.5 / 7.0534 = 0.07089 ..., written out to 5 decimals
    by_hand = [0.07089, 0.03959, 0.08078, 0.06225, 0.05285, 0.03760, 0.08660, 0.07313]
    assert ldam_margins(counts).tolist() == pytest.approx(by_hand, abs=5e-6)
    assert resolve_config("stage2")["loss"]["ldam_margin_rule"] == "literal"
    assert resolve_config("stage2")["loss"]["ldam_max_margin"] == 0.5
    # the option `normalized` (the LDAM paper's code): the rarest subgroup gets C itself, 5.8x the design's
    m = ldam_margins(counts, max_margin=0.5, rule="normalized")
    raw = [n ** -0.25 for n in counts]
    assert m.tolist() == pytest.approx([0.5 * r / max(raw) for r in raw], rel=1e-6)
    assert m.max().item() == pytest.approx(0.5) and m.argmax().item() == 6  # the rarest class
    assert (m / ldam_margins(counts)).tolist() == pytest.approx([1111 ** 0.25] * 8, rel=1e-6)  # 5.773
    assert ldam_margins([0, 1, 16], rule="normalized").tolist() == pytest.approx([0.5, 0.5, 0.25])  # 0 counted as 1


def test_ldam_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(2)
    counts = [100, 10, 1000]
    logits = torch.rand(6, 3, generator=g) * 2 - 1
    target = torch.tensor([0, 1, 2, 1, 0, 2])
    loss = LDAMLoss(counts, max_margin=0.4, s=30.0)
    m = torch.tensor([0.4 * n ** -0.25 for n in counts])
    onehot = F.one_hot(target, 3).float()
    expected = F.cross_entropy(30.0 * (logits - m[target][:, None] * onehot), target)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    per_sample = LDAMLoss(counts, max_margin=0.4, reduction="none")(logits, target)
    assert per_sample.shape == (6,) and per_sample.mean().item() == pytest.approx(expected.item(), rel=1e-6)
    assert "margins" in dict(loss.named_buffers())
    assert loss.to(torch.float64).margins.dtype == torch.float64  # a buffer: follows .to()


# -- Sinkhorn ------------------------------------------------------------------------------------


def test_feature_scale_known_cloud():
    # 4 points at distance 2 from their mean (the square of side 2*sqrt(2)), shifted
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]) + 5.0
    assert feature_scale(x) == pytest.approx(2.0)
    y = torch.tensor([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])  # each 2.5 from the mean
    assert feature_scale(y) == pytest.approx(2.5)


def _one_run(x: torch.Tensor, groups: torch.Tensor, labels: torch.Tensor | None = None):
    """A single run of :class:`StackedSinkhorn`: (B, D) -> (1, B, D), and its codes (1, B)."""
    return x.unsqueeze(0), groups.unsqueeze(0), None if labels is None else labels.unsqueeze(0)


def test_sinkhorn_identical_clouds_is_zero_and_grows_with_shift():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 4, generator=g, dtype=torch.float64)
    groups = torch.tensor([0] * 10 + [1] * 10)
    for mode in ("compact", "masked"):
        values = []
        for shift in (0.0, 0.25, 0.5, 1.0, 2.0):
            x = torch.cat([base, base + shift])
            sk = StackedSinkhorn(0.1, 0.9, bounding_diameter(x), mode=mode)
            values.append(float(sk.terms(*_one_run(x, groups)[:2], pairwise=True)["sinkhorn_pairwise"][0]))
        assert abs(values[0]) < 1e-4
        assert all(b > a for a, b in zip(values, values[1:]))
        # a pure translation by t: S ~ |t|^2 / 2 for a small blur (half the squared W2 distance)
        assert values[-1] == pytest.approx(0.5 * 4 * 2.0 ** 2, rel=0.05)


def _cloud_setup():
    g = torch.Generator().manual_seed(4)
    sizes = {0: 5, 1: 9, 2: 3, 3: 1, 4: 7}  # subgroup 3 has one sample: skipped with min_group=2
    groups = torch.cat([torch.full((n,), k) for k, n in sizes.items()] + [torch.full((4,), -1)])
    groups = groups[torch.randperm(len(groups), generator=g)]
    x = torch.randn(len(groups), 3, generator=g, dtype=torch.float64) + groups[:, None].clamp(min=0) * 0.3
    labels = torch.randint(0, 2, (len(groups),), generator=g)
    return x, groups, labels


def test_sinkhorn_terms_equal_geomloss_pair_by_pair():
    x, groups, labels = _cloud_setup()
    diameter = 20.0
    ref_loss = SamplesLoss("sinkhorn", p=2, blur=0.3, scaling=0.8, debias=True, backend="tensorized",
                           diameter=diameter)
    present = [0, 1, 2, 4]  # 3 has one sample
    clouds = {k: x[groups == k] for k in present}
    pairs = [ref_loss(clouds[a], clouds[b]) for a, b in itertools.combinations(present, 2)]
    known = x[groups >= 0]
    glob = [ref_loss(clouds[k], known) for k in present]
    for mode in ("compact", "masked"):
        sk = StackedSinkhorn(0.3, 0.8, diameter, mode=mode)
        t = sk.terms(*_one_run(x, groups)[:2], global_=True, pairwise=True)
        assert float(t["sinkhorn_pairwise"][0]) == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-6, abs=1e-9)
        assert float(t["sinkhorn_global"][0]) == pytest.approx(torch.stack(glob).mean().item(), rel=1e-6, abs=1e-9)


def test_sinkhorn_padding_is_exact_at_small_blur_and_far_clouds():
    # float64 points far from the origin, small blur: a 2-point cloud padded to 10 must give the
    # unpadded value. (Padding with zeros fails this: it puts ~1e4 costs into the cost matrices.)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 2, generator=g, dtype=torch.float64) * 3 + 100.0
    groups = torch.tensor([0] * 2 + [1] * 3 + [2] * 7)  # pairs (0,1), (0,2), (1,2): clouds of 2 and 3 padded
    diameter = bounding_diameter(x)
    ref = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.9, debias=True, backend="tensorized", diameter=diameter)
    want = np.mean([ref(x[groups == a], x[groups == b]).item() for a, b in ((0, 1), (0, 2), (1, 2))])
    for mode in ("compact", "masked"):
        got = StackedSinkhorn(0.05, 0.9, diameter, mode=mode).terms(*_one_run(x, groups)[:2], pairwise=True)
        assert float(got["sinkhorn_pairwise"][0]) == pytest.approx(want, rel=1e-6)


def test_sinkhorn_skips_small_groups_and_backward():
    x, groups, labels = _cloud_setup()
    for mode in ("compact", "masked"):
        xx = x.clone().requires_grad_(True)
        out = StackedSinkhorn(0.3, 0.9, 20.0, mode=mode).terms(*_one_run(xx, groups)[:2], pairwise=True)
        out["sinkhorn_pairwise"].sum().backward()
        assert torch.isfinite(xx.grad).all()
        assert (xx.grad[groups == 3] == 0).all() and (xx.grad[groups == -1] == 0).all()
        assert xx.grad[groups == 0].abs().sum() > 0
    with pytest.raises(ValueError, match="blur must be positive"):
        StackedSinkhorn(0.0, 0.9, 20.0)


# -- disentanglement -----------------------------------------------------------------------------


def test_cosine_disentanglement():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0], [-2.0, -2.0], [1.0, 1.0]])
    assert cosine_disentanglement(a, b).item() == pytest.approx((0.0 + 1.0 + 0.5) / 3)
    assert cosine_disentanglement(a[:1], b[:1]).item() == pytest.approx(0.0)


# -- stacked runs --------------------------------------------------------------------------------
def _runs_clouds(runs=2, b=40, dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(runs, b, dim, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 8, (runs, b), generator=g)
    groups[0, :3] = -1  # unknown subgroups are ignored
    groups[1][groups[1] == 5] = 6  # run 1 lacks subgroup 5
    labels = torch.randint(0, 2, (runs, b), generator=g)
    return z + 0.3 * groups.clamp(min=0).unsqueeze(-1), groups, labels


def test_stacked_per_class_sinkhorn_is_the_mean_of_the_two_class_means_brute_force():
    """Stage 2's per-class term = (L_real + L_fake) / 2, L_c = mean over the within-class subgroup
    pairs (both with >= min_group members) of geomloss's Sinkhorn divergence, for every run."""
    from geomloss import SamplesLoss

    z, groups, labels = _runs_clouds()
    blur, scaling, diameter = 0.5, 0.7, 20.0
    ref = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True, diameter=diameter)
    for mode in ("compact", "masked"):
        sk = StackedSinkhorn(blur, scaling, diameter, min_group=2, mode=mode)
        got = sk.terms(z, groups, labels=labels)["sinkhorn"]
        for r in range(z.shape[0]):
            per_class = []
            for c in (0, 1):
                clouds = [z[r][(groups[r] == k) & (labels[r] == c)] for k in range(8)]
                clouds = [x for x in clouds if len(x) >= 2]
                pairs = [ref(clouds[i], clouds[j]) for i in range(len(clouds)) for j in range(i + 1, len(clouds))]
                if pairs:
                    per_class.append(torch.stack(pairs).mean())
            assert len(per_class) == 2
            assert float(got[r]) == pytest.approx(float(sum(per_class) / 2), rel=1e-6, abs=1e-9), (mode, r)


def test_stacked_sinkhorn_masked_equals_compact_with_gradients():
    z, groups, labels = _runs_clouds(runs=3, seed=1)
    outs = {}
    for mode in ("compact", "masked"):
        zz = z.clone().requires_grad_(True)
        sk = StackedSinkhorn(0.4, 0.6, 15.0, mode=mode)
        terms = sk.terms(zz, groups, global_=True, pairwise=True, labels=labels)
        sum(t.sum() for t in terms.values()).backward()
        outs[mode] = ({k: v.detach() for k, v in terms.items()}, zz.grad)
    for k in outs["compact"][0]:
        torch.testing.assert_close(outs["masked"][0][k], outs["compact"][0][k], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(outs["masked"][1], outs["compact"][1], rtol=1e-5, atol=1e-8)
    # a run is independent of the others in the call (the diameter is fixed)
    alone = StackedSinkhorn(0.4, 0.6, 15.0).terms(z[1:2], groups[1:2], pairwise=True)["sinkhorn_pairwise"]
    assert float(alone[0]) == pytest.approx(float(outs["compact"][0]["sinkhorn_pairwise"][1]), rel=1e-9)


def test_stacked_sinkhorn_run_without_groups_is_zero():
    z, groups, labels = _runs_clouds(runs=2)
    groups[1] = -1
    for mode in ("compact", "masked"):
        zz = z.clone().requires_grad_(True)
        t = StackedSinkhorn(0.5, 0.5, 20.0, mode=mode).terms(zz, groups, global_=True, labels=labels)
        v = {k: x.detach() for k, x in t.items()}
        assert float(v["sinkhorn_global"][1]) == 0 and float(v["sinkhorn"][1]) == 0 and float(v["sinkhorn"][0]) > 0
        (t["sinkhorn"][1] + t["sinkhorn_global"][1]).backward()
        assert torch.isfinite(zz.grad).all() and float(zz.grad.abs().sum()) == 0


def test_ldam_margin_rules_against_hand_computation():
    counts = [16, 81, 256, 0]
    n = torch.tensor([16.0, 81.0, 256.0, 1.0])  # a count of 0 counts as 1
    literal = ldam_margins(counts, 0.5, rule="literal")
    torch.testing.assert_close(literal, 0.5 / n ** 0.25)  # the design's m_k = max_margin / n_k^(1/4)
    assert literal.tolist() == pytest.approx([0.25, 0.5 / 3, 0.125, 0.5])
    normalized = ldam_margins(counts, 0.5, rule="normalized")  # reference code: the rarest class gets max_margin
    assert normalized.tolist() == pytest.approx([0.25, 0.5 / 3, 0.125, 0.5])  # rarest count is 1 here
    assert ldam_margins([16, 81, 256], 0.5, rule="normalized").tolist() == pytest.approx([0.5, 0.5 * 2 / 3, 0.25])
    assert ldam_margins([16, 81, 256], 0.5).tolist() == pytest.approx([0.25, 0.5 / 3, 0.125])  # literal by default
    with pytest.raises(ValueError, match="literal or normalized"):
        ldam_margins(counts, rule="paper")
    # the per-run masked loss: mean over known targets, by hand
    loss = LDAMLoss([16, 81, 256], max_margin=0.5, s=10.0, rule="literal")
    logits = torch.tensor([[[0.2, 0.1, -0.3], [0.0, 0.5, 0.1]]])
    target = torch.tensor([[2, -1]])
    z = logits[0, 0].clone()
    z[2] -= 0.125
    assert float(loss.masked(logits, target)[0]) == pytest.approx(float(-torch.log_softmax(10 * z, 0)[2]), rel=1e-6)


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1:]]


@pytest.mark.parametrize("seed", range(12))
def test_size_buckets_is_the_cheapest_split_a_brute_force_search_finds(seed):
    """Sinkhorn problems padded per bucket: at most `most` buckets, every problem in one, and the
    dense work sum(count x largest^2) as low as over every partition of the problems."""
    from featcache.losses.sinkhorn import size_buckets

    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 40, int(rng.integers(1, 8))).tolist()
    most = int(rng.integers(1, 5))
    got = size_buckets(sizes, most)
    assert sorted(p for b in got for p in b) == list(range(len(sizes))) and 1 <= len(got) <= most

    def work(buckets):
        return sum(len(b) * max(sizes[p] for p in b) ** 2 for b in buckets)

    best = min(work(part) for part in _partitions(list(range(len(sizes)))) if len(part) <= most)
    assert work(got) == best
    assert size_buckets([], 4) == [] and size_buckets([5, 5, 5], 4) == [[0, 1, 2]]
