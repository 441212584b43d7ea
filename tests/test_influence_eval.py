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


def test_noisy_label_recall_counts_groups_in_score_order():
    from lightning_attr.evaluation import noisy_label_recall, recall_at

    assignment = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    noisy = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0]).bool()
    curve = noisy_label_recall(torch.tensor([0.5, 0.1, 2.0, 0.0]), assignment, noisy)
    # group 2 (3 examples, 2 noisy), then group 0 (2, 1 noisy), then group 1, then group 3
    torch.testing.assert_close(curve["inspected"], torch.tensor([0, 3 / 8, 5 / 8, 7 / 8, 1], dtype=torch.float64))
    torch.testing.assert_close(curve["recall"], torch.tensor([0, 2 / 3, 1, 1, 1], dtype=torch.float64))
    assert recall_at(curve, 3 / 8) == pytest.approx(2 / 3)
    per_example = noisy_label_recall(noisy.float(), torch.arange(8), noisy)
    assert recall_at(per_example, 3 / 8) == pytest.approx(1.0)


def test_prune_groups_removes_whole_groups_in_order():
    from lightning_attr.evaluation import prune_groups, pruning_curve

    assignment = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    scores = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert prune_groups(scores, assignment, 0.3).tolist() == [2, 3, 6, 7, 8, 9]  # groups 0 and 2 go (3 of 10 -> 4)
    assert prune_groups(scores, assignment, 0.2, order="lowest").tolist() == [0, 1, 4, 5, 6, 7, 8, 9]
    kept = prune_groups(scores, assignment, 0.2, seed=0)
    assert kept.numel() == 8 and torch.equal(kept, prune_groups(scores, assignment, 0.2, seed=0))
    curve = pruning_curve(lambda idx: float(idx.numel()), scores, assignment, fractions=(0.0, 0.2))
    assert curve["scored"] == [10.0, 8.0] and curve["random"] == [10.0, 8.0]


def test_subset_retrainer_caches_each_retrain_and_feeds_lds(tmp_path):
    import lightning as L
    from test_in_step_tracin import MLP, data
    from torch.utils.data import DataLoader, Subset, TensorDataset

    from lightning_attr.data import IndexedDataset
    from lightning_attr.evaluation import SubsetRetrainer, target_losses
    from lightning_attr.io import CorruptArtifactError

    train, targets = IndexedDataset(TensorDataset(*data(13))), TensorDataset(*data(4, seed=3))
    kw = dict(train=train, targets=targets, cache_dir=str(tmp_path), key="mlp", seeds=2, batch_size=4,
              trainer_kwargs=dict(max_epochs=2), progress=False)
    retrainer = SubsetRetrainer(MLP, **kw)
    masks = random_subsets(13, 3, seed=0)
    out = retrainer.all(masks)
    assert out.shape == (3, 4) and retrainer.trained == 6
    again = SubsetRetrainer(MLP, **kw)
    torch.testing.assert_close(again.all(masks), out, rtol=0, atol=0)
    assert again.trained == 0  # every retrain came from the cache
    idx = masks[0].nonzero().flatten()
    L.seed_everything(1, verbose=False)  # the second seed of the first subset, by hand
    module = MLP()
    loader = DataLoader(Subset(train, idx.tolist()), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, loader)
    torch.testing.assert_close(retrainer.run(idx, 1), target_losses(module, targets))
    assert lds(retrainer, torch.randn(13, 4), masks=masks)["actual"].shape == (3, 4)
    path = retrainer.path(idx, 0)
    with open(path, "r+b") as f:
        f.truncate(64)
    with pytest.raises(CorruptArtifactError, match=path):
        retrainer.run(idx, 0)
