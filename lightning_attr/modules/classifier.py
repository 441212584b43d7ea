"""Classifier: the image model to explain (any timm model), trained with random patch removal."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor

from lightning_attr.estimators.sampling import random_subsets_of_size
from lightning_attr.games import PatchGame, get_removal
from lightning_attr.modules.optim import check_optimizer, optimizer_cosine
from lightning_attr.modules.timm_models import create_timm_model, save_timm_weights

__all__ = ["Classifier"]


class Classifier(L.LightningModule):
    """A timm classifier trained on image batches ``{"image", "label"}``.

    With ``mask_prob > 0`` a fraction of each training batch has a uniformly random number of its patches removed (a
    uniformly random subset of that size), so the model behaves sensibly on the inputs an explanation game feeds it;
    such a model is also the surrogate of the original classifier. ``removal`` says how, as in
    :class:`~lightning_attr.games.PatchGame`: ``"mask"`` replaces them by ``baseline``, ``"drop"`` (patch-aligned ViTs)
    leaves their tokens out of the sequence; train with the removal the explanation game will use.

    Args:
        model_name: any timm model name; ``model_kwargs`` go to ``timm.create_model`` (e.g. ``img_size``, ``depth``).
        num_classes: number of classes K.
        pretrained / weights_file: start from hub weights or from a local weights file.
        image_size / patch_size / baseline: the removal game (patch grid ``image_size / patch_size``).
        mask_prob: fraction of training images that get patches removed.
        removal: ``"mask"`` (default) or ``"drop"``.
        optimizer: ``"adamw"`` (default: ``torch.optim.AdamW``, decoupled weight decay) or ``"sgd"``
            (``torch.optim.SGD`` with ``momentum``, weight decay added to the gradient; what
            :class:`~lightning_attr.callbacks.UnrolledDifferentiation` differentiates). Either way ``lr`` /
            ``weight_decay`` with linear warm-up over ``warmup_fraction`` of the run and cosine decay to 0, stepped
            every optimizer step (:mod:`lightning_attr.modules.optim`).
        momentum: SGD's momentum (unused with ``"adamw"``).
        export_path: when set, the trained timm weights are written there (safetensors) at the end of ``fit``,
            loadable with ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))``.
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        weights_file: str | None = None,
        image_size: int = 32,
        patch_size: int = 8,
        baseline: float = 0.0,
        mask_prob: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        label_smoothing: float = 0.0,
        export_path: str | None = None,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        removal: Literal["mask", "drop"] = "mask",
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"`mask_prob` must be in [0, 1], got {mask_prob}.")
        check_optimizer(optimizer, momentum)
        self.save_hyperparameters()
        self.model = create_timm_model(model_name, pretrained, weights_file, num_classes, **(model_kwargs or {}))
        self.masker = PatchGame(torch.nn.Identity(), patch_size, (image_size, image_size), baseline)
        self.removal = get_removal(removal)
        self.removal.check(self.model, self.masker)
        metric = dict(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(**metric)
        self.test_acc = torchmetrics.Accuracy(**metric)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, K) of images (B, C, H, W)."""
        return self.model(x)

    def random_keep(self, x: Tensor) -> Tensor:
        """Kept patches (B, d) for images ``x`` (B, C, H, W): a ``mask_prob`` fraction of them keep a random subset of
        uniformly random size, the others keep all."""
        d, b = self.masker.num_players, x.shape[0]
        which = torch.rand(b, device=x.device) < self.hparams.mask_prob
        sizes = torch.randint(0, d + 1, (b,), device=x.device)
        sizes = torch.where(which, sizes, torch.full_like(sizes, d))
        return random_subsets_of_size(sizes, d, None).to(x.device)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x = batch["image"]
        logits = self.removal.remove(self.model, x, self.random_keep(x), self.masker) if self.hparams.mask_prob > 0 \
            else self(x)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: dict[str, Tensor], prefix: str, acc: torchmetrics.Metric) -> None:
        logits = self(batch["image"])
        acc(logits, batch["label"])
        self.log(f"{prefix}/loss", F.cross_entropy(logits, batch["label"]), sync_dist=True)
        self.log(f"{prefix}/acc", acc, prog_bar=True)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["image"]).softmax(-1)

    def configure_optimizers(self):
        hp = self.hparams
        return optimizer_cosine(hp.optimizer, self, self.model.parameters(), hp.lr, hp.weight_decay, hp.warmup_fraction,
                                hp.momentum)

    def on_fit_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            save_timm_weights(self.model, self.hparams.export_path)

    def export(self, path: str) -> None:
        """Write the timm weights to ``path`` (safetensors / torch), atomically."""
        save_timm_weights(self.model, path)
