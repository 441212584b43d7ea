"""Groupers: deterministic, cover every example exactly once, respect the requested sizes; bad requests are named."""

from __future__ import annotations

import pytest
import torch

from lightning_attr.influence.groups import (
    Grouping,
    class_groups,
    column_groups,
    kmeans,
    kmeans_groups,
    make_grouping,
    random_groups,
)


def covers_once(grouping: Grouping, n: int) -> None:
    assert grouping.assignment.shape == (n,) and int(grouping.sizes.sum()) == n
    assert (grouping.sizes > 0).all()  # dense ids, no empty group


@pytest.mark.parametrize("n, kw, groups", [(100, dict(num_groups=7), 7), (100, dict(group_size=32), 4),
                                           (5, dict(num_groups=5), 5)])
def test_random_groups_have_near_equal_sizes(n, kw, groups):
    g = random_groups(n, seed=3, **kw)
    covers_once(g, n)
    assert g.num_groups == groups and int(g.sizes.max() - g.sizes.min()) <= 1
    assert torch.equal(g.assignment, random_groups(n, seed=3, **kw).assignment)
    assert not torch.equal(g.assignment, random_groups(n, seed=4, **kw).assignment) or groups == 1


def test_class_groups_never_mix_classes():
    labels = torch.tensor([0] * 40 + [1] * 25 + [2] * 35)
    plain = class_groups(labels)
    assert plain.num_groups == 3 and torch.equal(plain.sizes, torch.tensor([40, 25, 35]))
    g = class_groups(labels, group_size=10, seed=1)
    covers_once(g, 100)
    assert g.num_groups == 4 + 3 + 4 and int(g.sizes.max()) <= 10  # ceil(n_c / 10) groups per class
    for k in range(g.num_groups):
        assert labels[g.members(k)].unique().numel() == 1
    with pytest.raises(ValueError, match="fewer than the 3 classes"):
        class_groups(labels, num_groups=2)
    sizes = class_groups(labels, num_groups=6).sizes
    assert sizes.numel() == 6 and int(sizes.sum()) == 100


def test_kmeans_recovers_separated_clusters_and_uses_every_cluster():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(20, 2, generator=gen) for c in centres])
    ids = kmeans(x, 3, seed=0)
    for block in ids.view(3, 20):
        assert block.unique().numel() == 1
    assert ids.unique().numel() == 3
    dup = torch.zeros(10, 2)  # identical points: still k non-empty clusters
    assert kmeans(dup, 4).unique().numel() == 4


def test_per_class_kmeans_and_determinism():
    gen = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(90, 5, generator=gen), torch.arange(90) % 3
    g = kmeans_groups(feats, group_size=10, labels=labels, seed=2, method="gradient_kmeans")
    covers_once(g, 90)
    assert g.num_groups == 9 and all(labels[g.members(k)].unique().numel() == 1 for k in range(9))
    assert torch.equal(g.assignment, kmeans_groups(feats, group_size=10, labels=labels, seed=2).assignment)


def test_column_groups_and_bad_requests():
    g = column_groups(["a", "b", "a", "c"], 4)
    assert g.assignment.tolist() == [0, 1, 0, 2]
    with pytest.raises(ValueError, match="group column has 3 entries, the training set 4"):
        column_groups(["a", "b", "a"], 4)
    with pytest.raises(ValueError, match="num_groups.*in \\[1, 10\\]"):
        random_groups(10, num_groups=11)
    with pytest.raises(ValueError, match="exactly one"):
        random_groups(10, num_groups=2, group_size=5)
    with pytest.raises(ValueError, match="group_by.*'spectral'"):
        make_grouping("spectral", 10, num_groups=2)
