"""Functional influence core against brute-force loops of torch.autograd.grad and dense references."""

from __future__ import annotations

import pytest
import torch
from influence_models import brute_force_grads, tiny_cnn, tiny_mlp
from torch import nn

from lightning_attr.influence import (
    CountSketch,
    GradientFeaturizer,
    KroneckerProjector,
    RandomProjector,
    cross_entropy,
    damped_inverse,
    margin,
    out_to_loss,
    select_parameters,
    topk_blockwise,
    tracin_scores,
    tracin_self_influence,
    trak_kernel,
    trak_scores,
    xtx,
)


def data(n=6, seed=1, shape=(1, 6, 6), k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, k, (n,), generator=g)


@pytest.mark.parametrize("output", [cross_entropy, margin])
@pytest.mark.parametrize("route", ["layers", "func"])
def test_per_example_gradients_equal_a_brute_force_loop(route, output):
    model = tiny_cnn()
    x, y = data()
    feat = GradientFeaturizer(model, output=output, route=route)
    assert (feat.layers is not None) == (route == "layers")
    ref = brute_force_grads(model, list(feat.params), x, y, output)
    torch.testing.assert_close(feat.flat_grads(x, y), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feat.sq_norms(x, y), ref.pow(2).sum(1), rtol=1e-4, atol=1e-5)


class SequenceModel(nn.Module):
    """Linear layers on (B, S, I) tokens (the Gram route of the norms) plus a free parameter (func route)."""

    def __init__(self, free: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(4, 3), nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.5)) if free else None

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.scale is not None:
            h = h * self.scale
        return self.out(h).mean(1)


def test_sequence_layers_and_free_parameters():
    x, y = torch.randn(5, 7, 4), torch.randint(0, 2, (5,))
    for free in (False, True):
        model = SequenceModel(free)
        feat = GradientFeaturizer(model)
        assert (feat.layers is None) == free  # a free parameter forces the torch.func route
        ref = brute_force_grads(model, list(feat.params), x, y, cross_entropy)
        torch.testing.assert_close(feat.flat_grads(x, y), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(feat.sq_norms(x, y), ref.pow(2).sum(1), rtol=1e-4, atol=1e-6)


def test_last_layer_factors_equal_last_layer_gradients():
    model = tiny_cnn()
    x, y = data()
    feat = GradientFeaturizer(model, last_layer=True)
    assert list(feat.params) == ["7.weight", "7.bias"]
    a, g = feat.factors(x, y)
    ref = brute_force_grads(model, ["7.weight", "7.bias"], x, y, cross_entropy)
    outer = torch.einsum("bo,bi->boi", g, a)  # (B, O, I + 1): weight columns then the bias column
    torch.testing.assert_close(torch.cat([outer[..., :-1].flatten(1), outer[..., -1]], 1), ref, rtol=1e-4, atol=1e-6)
    probs = model(x).softmax(-1)  # the closed form: g = softmax - onehot
    torch.testing.assert_close(g, probs - nn.functional.one_hot(y, 3), rtol=1e-5, atol=1e-6)


def test_tracin_equals_the_brute_force_sum_over_checkpoints():
    x, y = data(8)
    xq, yq = data(3, seed=2)
    lrs = [0.3, 0.05]
    total_ref, self_ref, train, query = 0, 0, [], []
    for c, lr in enumerate(lrs):
        model = tiny_cnn(seed=c)  # two checkpoints
        feat = GradientFeaturizer(model)
        gt = brute_force_grads(model, list(feat.params), x, y, cross_entropy)
        gq = brute_force_grads(model, list(feat.params), xq, yq, cross_entropy)
        total_ref = total_ref + lr * gt @ gq.T
        self_ref = self_ref + lr * gt.pow(2).sum(1)
        train.append(feat(x, y, (c,)))
        query.append(feat(xq, yq, (c,)))
    torch.testing.assert_close(tracin_scores(train, query, lrs), total_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(tracin_self_influence(train, lrs), self_ref, rtol=1e-4, atol=1e-6)


def test_learning_rate_scales_fold_into_the_features():
    model = tiny_cnn()
    x, y = data()
    feat = GradientFeaturizer(model)
    plain = feat.per_example_grads(x, y)
    scales = {n: 0.1 * (i + 1) for i, n in enumerate(feat.params)}
    feat.set_scales(scales)
    scaled = feat.per_example_grads(x, y)
    for n in feat.params:
        torch.testing.assert_close(scaled[n], plain[n] * scales[n], rtol=1e-5, atol=1e-7)
    last = GradientFeaturizer(model, last_layer=True)
    a0, g0 = last.factors(x, y)
    last.set_scales({"7.weight": 0.5, "7.bias": 2.0})
    a1, g1 = last.factors(x, y)
    torch.testing.assert_close(a1, torch.cat([a0[:, :-1] * 0.5, a0[:, -1:] * 2.0], 1))


def test_projector_is_chunk_invariant_and_scaled():
    big = RandomProjector(600, 8, seed=3, kind="rademacher")
    small = RandomProjector(600, 8, seed=3, kind="rademacher", block_mb=1e-4, cache_mb=0)
    assert small.num_blocks == 3 and not small.cacheable
    x = torch.randn(4, 600)
    torch.testing.assert_close(small(x), big(x))
    torch.testing.assert_close(big.matrix().abs(), torch.full((600, 8), 8 ** -0.5))
    assert not torch.equal(RandomProjector(600, 8, seed=4).matrix(), big.matrix())
    gauss = RandomProjector(4000, 16, seed=0, kind="gaussian").matrix()
    assert abs(float(gauss.var()) * 16 - 1) < 0.05
    with pytest.raises(ValueError, match="proj_type"):
        RandomProjector(5, 2, kind="sparse")


def _unbiased(estimates: torch.Tensor, truth: torch.Tensor) -> None:
    mean, se = estimates.mean(0), estimates.std(0) / estimates.shape[0] ** 0.5
    assert ((mean - truth).abs() <= 4 * se + 1e-6).all(), (mean, truth, se)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projected_inner_products_are_unbiased(kind):
    """Mean over 3000 seeds within 4 standard errors of the exact inner products (dense and Kronecker)."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 12, generator=g)
    dense = torch.stack([(lambda p: p @ p.T)(RandomProjector(12, 4, s, kind)(u)) for s in range(3000)])
    _unbiased(dense.flatten(1), (u @ u.T).flatten())
    a, gr = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 4, generator=g)
    full = torch.einsum("bso,bsi->boi", gr, a).flatten(1)
    kron = torch.stack([(lambda p: p @ p.T)(KroneckerProjector(5, 4, 2, 2, s, kind)(a, gr)) for s in range(3000)])
    _unbiased(kron.flatten(1), (full @ full.T).flatten())
    if kind == "rademacher":  # the count sketch has no entry distribution to choose
        sk = torch.stack([(lambda p: p @ p.T)(CountSketch(12, 4, s)(u)) for s in range(3000)])
        _unbiased(sk.flatten(1), (u @ u.T).flatten())


def test_kronecker_projection_equals_its_dense_matrix_and_never_forms_gradients():
    proj = KroneckerProjector(5, 4, 3, 2, seed=1)
    a, g = torch.randn(3, 7, 5), torch.randn(3, 7, 4)
    full = torch.einsum("bso,bsi->boi", g, a).flatten(1)
    torch.testing.assert_close(proj(a, g), full @ proj.matrix(), rtol=1e-4, atol=1e-5)


def test_featurizer_projections_are_seeded_by_key_and_match_exact_in_expectation():
    model = tiny_cnn()
    x, y = data()
    exact = GradientFeaturizer(model).flat_grads(x, y)
    dense = GradientFeaturizer(model, proj_dim=32, projection="dense", seed=5)
    ref = exact @ RandomProjector(exact.shape[1], 32, 5, "rademacher", (7, 0)).matrix()
    torch.testing.assert_close(dense(x, y, (7,)), ref, rtol=1e-4, atol=1e-5)
    assert GradientFeaturizer(model, proj_dim=40).projection == "sketch"  # auto: small model
    assert GradientFeaturizer(model, proj_dim=10_000).proj_dim is None  # k >= #params: exact, not a noisier sketch
    assert GradientFeaturizer(model, proj_dim=40, max_memory_mb=0.01).projection == "kronecker"  # auto: "big" one
    sketch = GradientFeaturizer(model, proj_dim=32, projection="sketch", seed=5)
    ref = exact @ CountSketch(exact.shape[1], 32, 5, (7, 3)).matrix()
    torch.testing.assert_close(sketch(x, y, (7,)), ref, rtol=1e-4, atol=1e-5)
    kron = GradientFeaturizer(model, proj_dim=40, projection="kronecker")
    assert kron(x, y, (0,)).shape == (6, kron.feature_dim)
    torch.testing.assert_close(kron(x, y, (0,)), kron(x, y, (0,)))
    assert not torch.allclose(kron(x, y, (0,)), kron(x, y, (1,)))
    for projection in ("kronecker", "sketch"):
        gram = torch.stack([(lambda f: f @ f.T)(GradientFeaturizer(model, proj_dim=40, projection=projection,
                                                                   seed=s)(x, y)) for s in range(400)])
        _unbiased(gram.flatten(1), (exact @ exact.T).flatten())


def test_trak_without_projection_equals_a_dense_reference():
    x, y = data(40, shape=(5,))
    xq, yq = data(4, seed=3, shape=(5,))
    kernels, queries, qs, ref = [], [], [], 0
    for c in range(2):
        model = tiny_mlp(seed=c)
        feat = GradientFeaturizer(model, output="margin")
        X, Phi = feat(x, y, (c,)), feat(xq, yq, (c,))
        Xr = brute_force_grads(model, list(feat.params), x, y, margin).double()
        Pr = brute_force_grads(model, list(feat.params), xq, yq, margin).double()
        lam = 1e-3 * float((Xr.T @ Xr).diagonal().mean())
        ref = ref + Xr @ torch.linalg.inv(Xr.T @ Xr + lam * torch.eye(Xr.shape[1], dtype=torch.float64)) @ Pr.T
        kernels.append(trak_kernel(X, damped_inverse(xtx(X), 1e-3)))
        queries.append(Phi)
        with torch.no_grad():
            qs.append(out_to_loss(model(x), y))
    ref = ref / 2 * (sum(qs) / 2).double().unsqueeze(1)
    torch.testing.assert_close(trak_scores(kernels, queries, qs).double(), ref, rtol=2e-3, atol=1e-4)


def test_singular_gram_needs_damping():
    X = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))  # rank 3 < 6
    with pytest.raises(ValueError, match="damping"):
        damped_inverse(xtx(X), 0.0)


def test_topk_blockwise_equals_full_topk():
    s = torch.randn(103, 4)
    top = topk_blockwise(lambda a, b: s[a:b], 103, 5, block=10)
    full = s.T.topk(5, dim=1)
    torch.testing.assert_close(top["proponents"][0], full.values)
    torch.testing.assert_close(top["proponents"][1], full.indices)
    low = s.T.topk(5, dim=1, largest=False)
    torch.testing.assert_close(top["opponents"][1], low.indices)


def test_bad_parameter_selections_are_named():
    model = tiny_cnn()
    with pytest.raises(ValueError, match=r"nothing\*|matches no parameter.*0.weight"):
        select_parameters(model, ["nothing*"])
    with pytest.raises(ValueError, match="module_types.*Lstm"):
        select_parameters(model, module_types=["Lstm"])
    assert list(select_parameters(model, module_types=["Linear"])) == ["7.weight", "7.bias"]
    with pytest.raises(ValueError, match="projection"):
        GradientFeaturizer(model, projection="sparse")
    with pytest.raises(ValueError, match="kronecker"):
        GradientFeaturizer(SequenceModel(free=True), proj_dim=8, projection="kronecker")


class ItemModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w * float(x.sum())  # .item() inside vmap


def test_module_torch_func_cannot_handle_gets_a_clear_error():
    with pytest.raises(ValueError, match="torch.func could not compute per-example gradients of ItemModel"):
        GradientFeaturizer(ItemModel()).flat_grads(torch.randn(2, 3), torch.tensor([0, 1]))


def test_nan_gradients_raise_naming_the_examples():
    model = tiny_mlp()
    x, y = data(4, shape=(5,))
    x[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"batch positions \[2\]"):
        GradientFeaturizer(model)(x, y)


@pytest.mark.parametrize("kw", [dict(), dict(route="func"), dict(proj_dim=40, projection="kronecker"),
                                dict(proj_dim=32, projection="dense"), dict(proj_dim=32), dict(last_layer=True)])
def test_group_features_equal_the_sum_of_member_features(kw):
    """GGDA: a segment's gradient (one backward, no per-example gradients) is the sum of its members' gradients."""
    model = tiny_cnn()
    x, y = data(9)
    feat = GradientFeaturizer(model, **kw)
    bounds = torch.tensor([0, 4, 5, 9])
    per_example = feat(x, y, (3,))
    expected = torch.stack([per_example[s:e].sum(0) for s, e in ((0, 4), (4, 5), (5, 9))])
    torch.testing.assert_close(feat(x, y, (3,), bounds=bounds), expected, rtol=1e-4, atol=1e-5)
    if not kw:
        ref = brute_force_grads(model, list(feat.params), x, y, cross_entropy)
        torch.testing.assert_close(feat.flat_grads(x, y, bounds)[0], ref[:4].sum(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="segment bounds"):
        feat(x, y, bounds=torch.tensor([0, 5, 4, 9]))
