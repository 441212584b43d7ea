"""AttributionHeatmaps: every few epochs, draw the explainer's attributions for a few validation images."""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lightning_attr.plots import attribution_heatmaps

__all__ = ["AttributionHeatmaps"]


class AttributionHeatmaps(L.Callback):
    """Save (and log) heatmaps of ``pl_module(x)`` (B, d, K) for the first ``num_images`` validation images.

    Each row shows an image, the explainer's attribution for the predicted class and, when the batch source is an
    :class:`~lightning_attr.data.OracleDataModule`, the noisy validation label it is selected against. PNGs go to
    ``dirpath`` (default: ``{trainer.log_dir}/heatmaps``) as ``epoch=NNN.png``; with a ``WandbLogger`` they are also
    logged as images under ``key``. Runs on rank zero only, never during the sanity check.
    """

    def __init__(self, num_images: int = 6, every_n_epochs: int = 5, dirpath: str | None = None,
                 key: str = "val/heatmaps") -> None:
        if num_images < 1:
            raise ValueError(f"`num_images` must be >= 1, got {num_images}.")
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        self.num_images, self.every_n_epochs, self.dirpath, self.key = num_images, every_n_epochs, dirpath, key
        self.paths: list[str] = []

    def _images(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor | None]:
        dm = trainer.datamodule
        images = getattr(dm, "datamodule", dm)
        val = images.splits["val"]
        n = min(self.num_images, len(val))
        x = torch.stack([val[i]["image"] for i in range(n)])
        labels = None
        store = getattr(dm, "stores", {}).get("val-fixed")
        if store is not None and bool(store.has(torch.arange(n)).all()):
            labels = store.get(torch.arange(n))
        return x, labels

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        x, labels = self._images(trainer)
        x = x.to(pl_module.device)
        with torch.no_grad():
            phi = pl_module(x)
            probs = pl_module.game(x, torch.ones(len(x), 1, pl_module.game.num_players, dtype=torch.bool, device=x.device))
        maps = {"amortized": phi}
        if labels is not None:
            maps["noisy label"] = labels
        folder = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "heatmaps")
        path = attribution_heatmaps(x, maps, probs[:, 0].argmax(-1), pl_module.game.grid,
                                    os.path.join(folder, f"epoch={trainer.current_epoch:03d}.png"))
        self.paths.append(path)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=self.key, images=[path], step=trainer.global_step)
