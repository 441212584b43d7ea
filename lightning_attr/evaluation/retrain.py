"""Retraining a user's LightningModule on subsets of its training data, for the linear datamodeling score (LDS) and
leave-one-out checks: every retrain's measurements are cached on disk, keyed by the subset and the seed, so all methods
are compared on one set of retrains and an interrupted evaluation resumes where it stopped."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from lightning_attr.influence.attribution import inputs_labels
from lightning_attr.io import load_tensors, save_tensors

__all__ = ["SubsetRetrainer", "target_losses"]


def target_losses(module: L.LightningModule, targets: Dataset, keys: dict[str, str] | None = None,
                  batch_size: int = 256) -> Tensor:
    """Per-example cross-entropy (n_target,) of ``module`` (eval mode, no grad) on ``targets`` (items like training)."""
    module.eval()
    out = []
    with torch.no_grad():
        for batch in DataLoader(targets, batch_size=batch_size):
            x, y = inputs_labels(batch, keys or {})
            out.append(F.cross_entropy(module(x.to(module.device)).float(), y.to(module.device), reduction="none").cpu())
    return torch.cat(out).double()


class SubsetRetrainer:
    """``retrainer(indices) -> (n_target,)``: the mean over ``seeds`` of ``measure(module, targets)`` after training a
    fresh ``make_module()`` on ``train[indices]`` (a shuffled loader of ``batch_size``, ``trainer_kwargs`` for the
    Trainer, seed ``s`` for initialization and batch order). Results go to ``{cache_dir}/{key}-{hash}.safetensors``
    (``key`` names the model and recipe: change it when they change); a cached subset is never retrained.
    """

    def __init__(self, make_module: Callable[[], L.LightningModule], train: Dataset, targets: Dataset, cache_dir: str,
                 key: str, measure: Callable[[L.LightningModule, Dataset], Tensor] = target_losses,
                 seeds: int = 1, batch_size: int = 64, trainer_kwargs: dict[str, Any] | None = None,
                 progress: bool = True) -> None:
        if seeds < 1:
            raise ValueError(f"`seeds` must be >= 1, got {seeds}.")
        self.make_module, self.train, self.targets, self.measure = make_module, train, targets, measure
        self.cache_dir, self.key, self.seeds, self.batch_size = cache_dir, key, seeds, batch_size
        self.trainer_kwargs = {**dict(max_epochs=10, accelerator="cpu", devices=1, logger=False,
                                      enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False), **(trainer_kwargs or {})}
        self.progress, self.trained = progress, 0

    def path(self, indices: Tensor, seed: int) -> str:
        digest = hashlib.sha1(indices.long().sort().values.numpy().tobytes() + f"|{seed}".encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{self.key}-{digest}.safetensors")

    def fit(self, indices: Tensor, seed: int) -> L.LightningModule:
        """A fresh ``make_module()`` trained on ``train[indices]`` with seed ``seed`` (initialization, batch order):
        the recipe of every retrain (``indices`` = all examples gives the full model of an LDS)."""
        L.seed_everything(seed, verbose=False)
        module = self.make_module()
        loader = DataLoader(Subset(self.train, indices.tolist()), batch_size=self.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        L.Trainer(**self.trainer_kwargs).fit(module, loader)
        return module

    def run(self, indices: Tensor, seed: int) -> Tensor:
        """Measurements (n_target,) of one retrain (from the cache when it exists)."""
        path = self.path(indices, seed)
        if os.path.isfile(path):
            return load_tensors(path, expect={"key": self.key})[0]["outputs"]
        outputs = self.measure(self.fit(indices, seed), self.targets).double().flatten()
        save_tensors(path, {"outputs": outputs, "indices": indices.long()}, {"key": self.key})
        self.trained += 1
        return outputs

    def __call__(self, indices: Tensor) -> Tensor:
        return torch.stack([self.run(indices, s) for s in range(self.seeds)]).mean(0)

    def all(self, masks: Tensor) -> Tensor:
        """Measurements (num_subsets, n_target) for every subset mask (num_subsets, n_train), with a progress bar."""
        rows = [self(m.nonzero().flatten()) for m in tqdm(masks, desc=f"retrains ({self.key})", disable=not self.progress,
                                                            leave=False)]
        return torch.stack(rows)
