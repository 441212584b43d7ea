"""Data-valuation evaluation: train a ValuationModel with model selection, per-point Monte Carlo at a budget, and
the scores both get against ground truth (error metrics, mislabeled-point AUROC, equal-error samples)."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_attr.metrics import noisy_label_auc
from lightning_attr.modules.valuation import TEST_METRICS, ValuationModel

__all__ = ["fit_valuation_model", "predict_values", "monte_carlo_values", "value_scores"]


def fit_valuation_model(datamodule, root: str, max_epochs: int = 60, seed: int = 0, logger: Any = False,
                        **model_kwargs: Any) -> ValuationModel:
    """Train a :class:`ValuationModel` on ``datamodule``'s labels, keep the epoch with the lowest ``val/loss``
    (independent noisy labels: an unbiased model-selection signal) and return that model (eval mode, CPU)."""
    L.seed_everything(seed, workers=True, verbose=False)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), monitor="val/loss",
                                                      save_top_k=1, filename="best")
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(ValuationModel(**model_kwargs), datamodule)
    return ValuationModel.load_from_checkpoint(checkpoint.best_model_path, map_location="cpu").eval()


@torch.no_grad()
def predict_values(model: ValuationModel, datamodule, points: Tensor | None = None) -> Tensor:
    """Amortized values (P,) of ``points`` (default: all valued points) of ``datamodule``."""
    datamodule.setup()
    data = datamodule.data
    points = torch.arange(len(data.y_train)) if points is None else points
    return model.value(data.inputs[points], data.y_train[points]).double()


def monte_carlo_values(datamodule, points: Tensor, num_samples: int, draw: int = 1000) -> Tensor:
    """Per-point Monte Carlo values (P,) with ``num_samples`` samples each (the datamodule's estimator, an
    independent ``draw`` of the test split's stream: never the training labels or the ground truth)."""
    datamodule.setup()
    return datamodule.oracle.draw(points, "test", draw + num_samples, num_samples, points)


def value_scores(preds: Tensor, truth: Tensor | None = None, flipped: Tensor | None = None) -> dict[str, float]:
    """``mse``, ``explained_variance``, ``pearson``, ``spearman``, ``sign_agreement`` of ``preds`` (P,) against
    ``truth`` (P,), and ``mislabeled_auroc`` (AUROC of ``-preds`` for flagging ``flipped`` (P,) points)."""
    out: dict[str, float] = {}
    if truth is not None:
        p, t = preds.double().view(1, -1, 1), truth.double().view(1, -1, 1)
        out.update({name: float(fn(p, t)) for name, fn in TEST_METRICS.items()})
    if flipped is not None and flipped.any() and not flipped.all():
        out["mislabeled_auroc"] = float(noisy_label_auc(-preds, flipped))
    return out
