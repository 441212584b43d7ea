"""Data-valuation estimators against exact enumeration on a tiny utility (known answers), and the batched utility
against scikit-learn fitted per subset."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from lightning_attr.valuation import LogisticUtility
from lightning_attr.valuation.estimators import (
    data_banzhaf,
    distributional_shapley,
    exact_data_values,
    get_valuation_estimator,
    permutation_shapley,
)
from lightning_attr.valuation.estimators.sampling import subsets_without
from lightning_attr.valuation.logistic import ConvergenceError


def _digits(n_train: int, n_val: int = 120, flip: int = 0, seed: int = 0):
    data = load_digits()
    x = (data.data - data.data.mean(0)) / (data.data.std(0) + 1e-8)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(x))
    tr, va = rows[:n_train], rows[n_train:n_train + n_val]
    y = data.target.copy()
    y[tr[:flip]] = (y[tr[:flip]] + 1) % 10
    t = lambda a: torch.as_tensor(a)  # noqa: E731
    return t(x[tr]).float(), t(y[tr]), t(x[va]).float(), t(data.target[va])


@pytest.fixture(scope="module")
def tiny():
    """8 points (one of them mislabeled), smooth utility: validation log-likelihood."""
    return LogisticUtility(*_digits(8, flip=1), C=0.5, metric="log_likelihood", dtype=torch.float64)


def test_batched_utility_equals_sklearn_per_subset():
    xt, yt, xv, yv = _digits(300)
    utility = LogisticUtility(xt, yt, xv, yv, C=1.0)
    gen = torch.Generator().manual_seed(0)
    subsets = torch.full((12, 300), -1)
    for row, k in enumerate([40, 80, 150, 300] * 3):
        subsets[row, :k] = torch.randperm(300, generator=gen)[:k]
    theta = utility.fit(subsets)
    ones = np.ones((len(xv), 1))
    for s, th in zip(subsets.numpy(), theta):
        s = s[s >= 0]
        ref = LogisticRegression(C=1.0, fit_intercept=False, tol=1e-10, max_iter=10_000)
        ref.fit(np.c_[xt.numpy()[s], np.ones(len(s))].astype(np.float64), yt.numpy()[s])
        probs = np.zeros((len(xv), 10))
        probs[:, ref.classes_] = ref.predict_proba(np.c_[xv.numpy(), ones])
        ours = (utility.x_val @ th).softmax(-1).numpy()
        if len(ref.classes_) == 10:
            assert np.abs(ours - probs).max() < 1e-4
    assert utility.num_evaluations == len(subsets)


def test_utility_masks_and_index_lists_agree_and_empty_set_is_uniform(tiny):
    masks = torch.tensor([[True, False, True, True, False, False, True, False], [False] * 8])
    lists = torch.tensor([[0, 2, 3, 6], [-1, -1, -1, -1]])
    assert torch.allclose(tiny(masks), tiny(lists))
    assert tiny(masks[1:]).item() == pytest.approx(-np.log(10))


def test_utility_refuses_bad_input_and_reports_non_convergence():
    xt, yt, xv, yv = _digits(50)
    with pytest.raises(ValueError, match="metric"):
        LogisticUtility(xt, yt, xv, yv, metric="f1")
    with pytest.raises(ValueError, match="y_train"):
        LogisticUtility(xt, yt[:10], xv, yv)
    utility = LogisticUtility(xt, yt, xv, yv, max_iter=2)
    with pytest.raises(ConvergenceError, match="max_iter"):
        utility(torch.ones(2, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        utility(torch.tensor([[0, 50]]))


def test_subsets_without_is_uniform_and_excludes_the_point():
    gen = torch.Generator().manual_seed(1)
    rows = 20_000
    draw = subsets_without(torch.full((rows,), 3), torch.full((rows,), 2), 6, gen)
    assert not (draw == 3).any() and (draw[:, 0] != draw[:, 1]).all()
    pairs = torch.sort(draw, 1).values
    counts = torch.unique(pairs[:, 0] * 10 + pairs[:, 1], return_counts=True)[1].double()
    assert len(counts) == 10  # C(5, 2) pairs of the 5 other points, each about equally often
    assert (counts - rows / 10).abs().max() < 5 * (rows / 10) ** 0.5


def _samples(estimator, utility, repeats, **options):
    """(repeats, N) independent single-sample estimates (as a per-point oracle draws them)."""
    n, out = utility.num_points, []
    if estimator.shares_samples:
        for r in range(repeats):
            out.append(estimator(utility, torch.arange(n), 2, torch.Generator().manual_seed(r), **options))
        return torch.stack(out)
    points = torch.arange(n).repeat(repeats)
    return estimator(utility, points, 1, torch.Generator().manual_seed(0), **options).view(repeats, n)


@pytest.mark.parametrize("name,target,options", [
    ("distributional_shapley", "distributional_shapley", {"cardinality": (1, 5)}),
    ("permutation_shapley", "shapley", {}),
    ("data_banzhaf", "banzhaf", {}),
])
def test_estimators_are_unbiased_within_four_standard_errors(tiny, name, target, options):
    estimator = get_valuation_estimator(name)
    exact = exact_data_values(tiny, cardinality=(1, 5))[target]
    draws = _samples(estimator, tiny, 400, **options)
    mean, se = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    assert ((mean - exact).abs() <= 4 * se + 1e-9).all(), (mean - exact) / se


def test_exact_values_known_identities(tiny):
    values = exact_data_values(tiny, cardinality=(0, tiny.num_points - 1))
    everyone = torch.ones(1, tiny.num_points, dtype=torch.bool)
    total = (tiny(everyone) - tiny(~everyone)).item()
    assert values["shapley"].sum().item() == pytest.approx(total, abs=1e-9)  # efficiency
    # distributional Shapley over all sizes 0..N-1 is Data Shapley itself
    assert torch.allclose(values["distributional_shapley"], values["shapley"], atol=1e-12)
    assert values["shapley"].argmin() == 0  # the flipped point is worth least


def test_estimators_refuse_bad_input(tiny):
    with pytest.raises(ValueError, match="cardinality"):
        distributional_shapley(tiny, torch.arange(3), 2, cardinality=(0, 8))
    with pytest.raises(ValueError, match="points"):
        permutation_shapley(tiny, torch.tensor([8]), 1)
    with pytest.raises(ValueError, match="num_samples"):
        data_banzhaf(tiny, torch.arange(3), 1)
    with pytest.raises(ValueError, match="allowed"):
        get_valuation_estimator("loo")
