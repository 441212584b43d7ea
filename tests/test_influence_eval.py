"""NoisyLabelAUC and the linear datamodeling score against brute force and linear datamodels."""

from __future__ import annotations

import pytest
import torch

from lightning_attr.evaluation import lds, random_subsets
from lightning_attr.metrics import NoisyLabelAUC, noisy_label_auc


def pairwise_auc(s, noisy):
    pos, neg = s[noisy], s[~noisy]
    return float(((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean())


def test_noisy_label_auc_equals_the_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (200,), generator=g).float()  # many ties
    noisy = torch.rand(200, generator=g) < 0.2
    assert float(noisy_label_auc(s, noisy)) == pytest.approx(pairwise_auc(s, noisy), abs=1e-12)
    metric = NoisyLabelAUC()
    for i in range(0, 200, 64):
        metric.update(s[i : i + 64], noisy[i : i + 64])
    assert float(metric.compute()) == pytest.approx(pairwise_auc(s, noisy), abs=1e-12)
    assert float(noisy_label_auc(noisy.float(), noisy)) == 1.0
    with pytest.raises(ValueError, match="noisy and clean"):
        noisy_label_auc(s, torch.zeros(200, dtype=torch.bool))


def test_random_subsets_have_the_requested_size():
    masks = random_subsets(11, 5, 0.5, seed=1)
    assert masks.shape == (5, 11) and (masks.sum(1) == 6).all()
    assert torch.equal(masks, random_subsets(11, 5, 0.5, seed=1))
    with pytest.raises(ValueError, match="fraction"):
        random_subsets(11, 5, 1.0)


def test_lds_is_one_for_the_true_linear_datamodel_and_minus_one_reversed():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 4, generator=g)

    def train_fn(subset):  # outputs of a model that is exactly linear in the training subset
        return w[subset].sum(0)

    assert lds(train_fn, w, num_subsets=20)["lds"] == pytest.approx(1.0)
    assert lds(train_fn, -w, num_subsets=20)["lds"] == pytest.approx(-1.0)
    noisy = lds(train_fn, w + 3 * torch.randn(30, 4, generator=g), num_subsets=40)
    assert -1 < noisy["lds"] < 1 and noisy["per_target"].shape == (4,) and noisy["actual"].shape == (40, 4)
    with pytest.raises(ValueError, match="one output per target"):
        lds(lambda s: torch.zeros(3), w, num_subsets=4)
