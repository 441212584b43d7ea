"""ValuationModel: a network of a data point's input with one output per class; the value of ``(x, y)`` is the
output at ``y``. Fit by regression on noisy unbiased value labels (a :class:`~lightning_attr.valuation.ValuationDataModule`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_attr.metrics import functional as M
from lightning_attr.metrics import noisy_label_auc
from lightning_attr.modules.optim import adamw_cosine
from lightning_attr.modules.timm_models import create_timm_model

__all__ = ["ValuationModel", "TEST_METRICS"]

TEST_METRICS = {"mse": M.attribution_mse, "explained_variance": M.attribution_explained_variance,
                "pearson": M.attribution_pearson, "spearman": M.attribution_spearman,
                "sign_agreement": M.sign_agreement}


def _mlp(in_dim: int, out_dim: int, hidden: int, depth: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.GELU(), nn.Dropout(dropout)]
    layers.append(nn.Linear(hidden if depth else in_dim, out_dim))
    nn.init.zeros_(layers[-1].weight)  # zero-initialized output: starts at value 0
    nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


class ValuationModel(L.LightningModule):
    """``x -> values (B, K)``; ``value(x, y) = values[y]`` (so the class with the highest value suggests a label fix).

    Inputs are tabular features (an MLP reads them; ``num_features`` is taken from the datamodule when ``None``) or
    images (``backbone``: a frozen timm model, with ``backbone_weights`` a local file, gives pooled features).

    Args:
        num_features / num_classes: input width and K (``None``: read from the datamodule at setup).
        hidden / depth / dropout: the MLP head. target_scale: labels and outputs are divided by it in the loss
            (``None``: RMS of the first training batch's labels, stored in the checkpoint).
        lr / weight_decay / warmup_fraction: AdamW with warm-up and cosine decay.
    """

    def __init__(self, num_features: int | None = None, num_classes: int | None = None, backbone: str | None = None,
                 backbone_weights: str | None = None, backbone_kwargs: dict[str, Any] | None = None,
                 hidden: int = 256, depth: int = 2, dropout: float = 0.0, target_scale: float | None = None,
                 lr: float = 1e-3, weight_decay: float = 0.01, warmup_fraction: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone: nn.Module | None = None
        if backbone is not None:
            self.backbone = create_timm_model(backbone, backbone_weights is None, backbone_weights,
                                              argument="backbone", drop_classifier=True, **dict(backbone_kwargs or {}))
            self.backbone.requires_grad_(False).eval()
        self.head: nn.Module | None = None
        if num_classes is not None and (num_features is not None or backbone is not None):
            self._build(num_features, num_classes)
        self.register_buffer("scale", torch.tensor(float(target_scale or 0.0)))
        self.test_metrics = {f"test/{name}": fn for name, fn in TEST_METRICS.items()}
        self._test: dict[str, list[Tensor]] = {"preds": [], "values": [], "index": [], "flipped": []}

    def _build(self, num_features: int | None, num_classes: int) -> None:
        in_dim = self.backbone.num_features if self.backbone is not None else num_features
        self.head = _mlp(int(in_dim), num_classes, self.hparams.hidden, self.hparams.depth, self.hparams.dropout)
        self.hparams.num_features, self.hparams.num_classes = num_features, num_classes

    def setup(self, stage: str) -> None:
        if self.head is None:
            dm = self.trainer.datamodule
            if dm is None or not hasattr(dm, "num_classes"):
                raise ValueError("ValuationModel needs `num_features` and `num_classes`, or a ValuationDataModule to "
                                 "read them from.")
            self._build(dm.num_features or None, dm.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Values (B, K) of ``x`` (B, D) (or images (B, C, H, W) with a backbone) under every label."""
        if self.backbone is not None:
            with torch.no_grad():
                x = self.backbone.eval()(x)
        scale = self.scale if self.scale > 0 else torch.ones_like(self.scale)
        return self.head(x.flatten(1)) * scale

    def value(self, x: Tensor, y: Tensor) -> Tensor:
        """Values (B,) of the points ``(x, y)``."""
        return self(x).gather(1, y.long().unsqueeze(1)).squeeze(1)

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            raise KeyError(f"Batch has no 'labels' (keys: {sorted(batch)}); use a ValuationDataModule.")
        value = self.value(batch["input"], batch["label"])
        return F.mse_loss(value / self.scale, batch["labels"].to(value) / self.scale)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        if self.scale <= 0:
            self.scale.fill_(float(batch["labels"].float().pow(2).mean().sqrt().clamp(min=1e-8)))
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if self.scale > 0:  # MSE to independent unbiased labels: the MSE to true values plus a constant
            self.log("val/loss", self._loss(batch), prog_bar=True, sync_dist=True, batch_size=len(batch["label"]))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        if "values" not in batch:
            raise KeyError(f"Test batch has no 'values' (keys: {sorted(batch)}); use a ValuationDataModule.")
        self._test["preds"].append(self.value(batch["input"], batch["label"]).detach().double())
        self._test["values"].append(batch["values"].double())
        self._test["index"].append(batch["index"])
        self._test["flipped"].append(batch["flipped"])

    def on_test_epoch_end(self) -> None:
        """Metrics over all test points (gathered across processes, DistributedSampler's padding duplicates
        dropped): MSE, explained variance, Pearson, Spearman and sign agreement against the ground truth, and the
        AUROC of ``-value`` for flagging flipped labels."""
        got = {k: self.all_gather(torch.cat(v)).reshape(-1) for k, v in self._test.items()}
        self._test = {k: [] for k in self._test}
        index, first = got["index"].unique(return_inverse=True)
        rows = torch.arange(len(first), device=first.device)
        keep = torch.zeros_like(index).scatter_(0, first, rows)  # one row per point
        preds, values, flipped = got["preds"][keep], got["values"][keep], got["flipped"][keep].bool()
        metrics = {k: float(f(preds.view(1, -1, 1), values.view(1, -1, 1)))
                   for k, f in self.test_metrics.items()}
        if flipped.any() and not flipped.all():
            metrics["test/mislabeled_auroc"] = float(noisy_label_auc(-preds, flipped))
        self.log_dict(metrics, rank_zero_only=True)
        self._log_table(got["index"][keep], preds, values, flipped)

    def _log_table(self, index: Tensor, preds: Tensor, values: Tensor, flipped: Tensor) -> None:
        """A W&B table ``test/values`` (index, value, ground truth, flipped) under every ``WandbLogger``, rank zero."""
        if self.trainer.is_global_zero:
            rows = [[int(i), float(p), float(v), bool(f)] for i, p, v, f in zip(index, preds, values, flipped)]
            for logger in self.trainer.loggers:
                if type(logger).__name__ == "WandbLogger":
                    logger.log_table(key="test/values", columns=["index", "value", "ground_truth", "flipped"],
                                     data=rows)

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"values": (B,), "all_values": (B, K), "index": (B,)}``."""
        out = self(batch["input"])
        return {"values": out.gather(1, batch["label"].long().unsqueeze(1)).squeeze(1), "all_values": out,
                "index": batch["index"]}

    def configure_optimizers(self):
        return adamw_cosine(self, self.head.parameters(), self.hparams.lr, self.hparams.weight_decay,
                            self.hparams.warmup_fraction)
