"""The InfluenceFunction callback as a d-TDA estimator (``distributional=``): the written run result against the
callback's own scores and losses, two seeds aggregated, DDP equal to one process, bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_influence_callbacks import Tiny, fit, tensors
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import InfluenceFunction
from lightning_attr.data import IndexedDataset
from lightning_attr.distributional import DistributionalInfluence, QueryLogits, QueryLosses, SplitLosses
from lightning_attr.distributional.results import read_run_result

KW = dict(strategy="ekfac", damping=0.1, proj_dim=None, num_queries=0, module_types=["Linear"])


class Splits(L.LightningDataModule):
    """The 13 training tensors and 5 validation items in a ``splits`` dict, as ``ImageDataModule`` holds them."""

    def __init__(self):
        super().__init__()
        self.splits = {"train": IndexedDataset(TensorDataset(*tensors())), "val": TensorDataset(*tensors(5, seed=9))}

    def train_dataloader(self):
        return DataLoader(self.splits["train"], batch_size=4, shuffle=True)


def test_written_change_is_scores_over_n_and_value_the_query_losses(tmp_path):
    xq, yq = tensors(4, seed=9)
    cb = InfluenceFunction(distributional=QueryLosses(xq, yq), run_seed=7, **KW)
    model = Tiny()
    fit(tmp_path, model, [cb])
    result = read_run_result(cb.directory)
    n = len(tensors()[0])
    torch.testing.assert_close(result.change, cb.scores(TensorDataset(xq, yq)).double() / n)
    with torch.no_grad():
        losses = F.cross_entropy(model.eval()(xq), yq, reduction="none")
    torch.testing.assert_close(result.value, losses.double(), rtol=1e-5, atol=1e-6)
    assert result.method == "influence_function" and result.seed == 7
    assert result.measurements == tuple(f"loss_{i}" for i in range(4))
    assert torch.equal(result.examples, torch.arange(n)) and torch.equal(cb.result.change, result.change)


def test_two_seeds_aggregate(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test (seed_everything sets it)
    folders = []
    for seed in (0, 1):
        model = Tiny()  # seeds its own initialization: the seed below sets the batch order
        L.seed_everything(seed)
        cb = InfluenceFunction(dirpath=str(tmp_path / f"seed{seed}"), distributional=SplitLosses("val", num=3), **KW)
        L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[cb]).fit(model, Splits())
        folders.append(cb.directory)
    dtda = DistributionalInfluence.from_runs(folders)
    assert dtda.seeds == [0, 1] and dtda.method == "influence_function"
    assert dtda.measurements == ("val[0]/loss", "val[1]/loss", "val[2]/loss")
    assert tuple(dtda.g.shape) == (2, 13, 3) and not torch.equal(dtda.g[0], dtda.g[1])  # batch order differs
    assert tuple(dtda.mean_influence().shape) == (13, 3)


def test_two_ddp_processes_equal_one(tmp_path):
    results = []
    for devices in (1, 2):
        folder = tmp_path / f"d{devices}"
        kw = dict(strategy="ddp_fork") if devices == 2 else {}
        cb = InfluenceFunction(dirpath=str(folder), proj_dim=24, num_queries=0, module_types=["Linear", "Conv2d"],
                               distributional=QueryLosses(*tensors(3, seed=9)), run_seed=5)
        fit(tmp_path, Tiny(frozen=True), [cb], devices=devices, **kw)
        results.append(read_run_result(str(folder)))
    one, two = results
    assert torch.equal(one.examples, two.examples) and one.seed == two.seed == 5
    torch.testing.assert_close(two.value, one.value)
    torch.testing.assert_close(two.change, one.change, rtol=1e-4, atol=1e-5 * float(one.change.abs().max()))


def test_bad_requests_are_named(tmp_path, monkeypatch):
    xq, yq = tensors(2, seed=9)
    with pytest.raises(ValueError, match="`distributional` must be QueryLosses or SplitLosses.*QueryLogits"):
        InfluenceFunction(distributional=QueryLogits(xq, 0))
    with pytest.raises(ValueError, match="`distributional` must measure the cross-entropy"):
        InfluenceFunction(distributional=SplitLosses(loss="mse"))
    with pytest.raises(ValueError, match="`distributional` needs one row per training example.*group_by"):
        InfluenceFunction(distributional=QueryLosses(xq, yq), group_by="random", group_size=3)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    cb = InfluenceFunction(distributional=QueryLosses(xq, yq), **KW)
    with pytest.raises(ValueError, match="seed_everything.*run_seed"):
        fit(tmp_path, Tiny(), [cb], epochs=1)
