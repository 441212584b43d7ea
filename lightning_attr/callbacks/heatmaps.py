"""AttributionHeatmaps: every few epochs, draw the explainer's attributions for a few validation images."""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lightning_attr.frozen import eval_mode
from lightning_attr.plots import attribution_heatmaps
from lightning_attr.runs import run_directory

__all__ = ["AttributionHeatmaps"]


class AttributionHeatmaps(L.Callback):
    """Save (and log) heatmaps of ``pl_module(x)`` (B, d, K) for the first ``num_images`` validation images.

    Each row shows an image titled with the model's predicted class (``pred N``), the explainer's attribution for that
    class and, when the batch source is an :class:`~lightning_attr.data.OracleDataModule`, the noisy validation label
    it is selected against. PNGs go to ``dirpath`` (default: ``{run folder}/heatmaps``, the run's own folder from
    :func:`~lightning_attr.runs.run_directory`) as ``epoch=NNN.png``: every ``every_n_epochs`` epochs after
    validation, and once more at the end of fit when the last epoch was not drawn (so a short run always leaves
    one). With a ``WandbLogger`` they are also logged as images under ``key``. Rank zero only, never during the
    sanity check.
    """

    def __init__(self, num_images: int = 6, every_n_epochs: int = 5, dirpath: str | None = None,
                 key: str = "val/heatmaps") -> None:
        if num_images < 1:
            raise ValueError(f"`num_images` must be >= 1, got {num_images}.")
        if every_n_epochs < 1:
            raise ValueError(f"`every_n_epochs` must be >= 1, got {every_n_epochs}.")
        self.num_images, self.every_n_epochs, self.dirpath, self.key = num_images, every_n_epochs, dirpath, key
        self.paths: list[str] = []
        self._folder: str | None = None
        self._drawn: int | None = None  # the last epoch drawn

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # on every rank: run_directory broadcasts rank zero's folder
        self._folder = self.dirpath or os.path.join(run_directory(trainer), "heatmaps")
        self._drawn = None

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

    def _draw(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        x, labels = self._images(trainer)
        x = x.to(pl_module.device)
        with torch.no_grad(), eval_mode(pl_module):
            phi = pl_module(x)
            everyone = torch.ones(len(x), 1, pl_module.game.num_players, dtype=torch.bool, device=x.device)
            probs = pl_module.game(x, everyone)
        maps = {"amortized": phi}
        if labels is not None:
            maps["noisy label"] = labels
        pred = probs[:, 0].argmax(-1)
        assert self._folder is not None, "setup() sets the folder"
        path = os.path.join(self._folder, f"epoch={epoch:03d}.png")
        path = attribution_heatmaps(x, maps, pred, pl_module.game.grid, path, titles=[f"pred {int(c)}" for c in pred])
        self.paths.append(path)
        self._drawn = epoch
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=self.key, images=[path], step=trainer.global_step)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._draw(trainer, pl_module, trainer.current_epoch)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = trainer.current_epoch - 1  # the epoch counter has moved past the last finished epoch
        if last >= 0 and self._drawn != last:
            self._draw(trainer, pl_module, last)
