"""AmortizedExplainer: frozen timm backbone + trainable head -> attributions (B, d, K), fit to noisy oracle labels."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_attr.data.oracle import game_fingerprint
from lightning_attr.games import PatchGame
from lightning_attr.metrics import EfficiencyGap, attribution_metrics
from lightning_attr.modules.feature_cache import FeatureCache
from lightning_attr.modules.heads import build_head
from lightning_attr.modules.optim import adamw_cosine
from lightning_attr.modules.timm_models import PatchFeatures, create_timm_model

__all__ = ["AmortizedExplainer", "check_feature_cache"]

_NOT_FOLDERS = {"", "none", "null", "off", "false", "true", "no", "yes", "on", "0", "1", "disk", "memory"}


def check_feature_cache(value: Any) -> None:
    """Raise a ValueError naming ``feature_cache`` unless ``value`` is ``"memory"``, ``None`` or a folder path."""
    allowed = "'memory' (in-memory cache, the default), None (no cache) or the path of a folder"
    if value is None or value == "memory":
        return
    if not isinstance(value, str) or value.strip().lower() in _NOT_FOLDERS:
        raise ValueError(f"`feature_cache`={value!r} is not allowed; use {allowed}.")
    if os.path.exists(value) and not os.path.isdir(value):
        raise ValueError(f"`feature_cache`={value!r} is an existing file, not a folder; use {allowed}.")


class AmortizedExplainer(L.LightningModule):
    """Learns ``x -> phi(x)`` (B, d, K) for a patch game of a classifier by regression on noisy unbiased labels.

    The explained classifier (``classifier``, a timm name, with ``classifier_weights``) defines the game
    ``self.game`` (a :class:`~lightning_attr.games.PatchGame`) that an :class:`~lightning_attr.data.OracleDataModule`
    queries for labels. The explainer is a frozen timm ``backbone`` (default: the classifier's architecture and
    weights) giving one feature per patch, plus a trainable ``head``.

    Args:
        classifier / classifier_weights / classifier_kwargs: the model to explain (timm name, local weights file,
            ``timm.create_model`` kwargs). ``pretrained=True`` without a file loads hub weights.
        backbone / backbone_weights / backbone_kwargs: the frozen feature extractor (defaults: the classifier's).
        num_classes: K. image_size / patch_size / baseline / output / removal: the game (players = patches;
            ``removal="drop"`` drops the absent patches' tokens of a patch-aligned ViT instead of masking them).
        head: ``"transformer"`` (default; attends over patches and the prediction) or ``"mlp"`` (per patch).
        pixel_features: also give the head each patch's raw pixels (concatenated to its backbone feature); the
            final-layer tokens of a classifier are mixed across patches and tuned to the label, the pixels are not.
        head_dim / head_depth / head_heads / dropout: head size.
        target_scale: labels and outputs are divided by it inside the loss; ``None`` sets it once from the first
            training batch (RMS of the labels) and stores it in the checkpoint.
        efficiency: add ``(v(all) - v(empty) - sum_i phi_i) / d`` to every player (exact efficiency, Shapley only).
        lr / weight_decay / warmup_fraction: AdamW on the head with warm-up and cosine decay.
        feature_cache: the frozen outputs of each training / validation example (backbone features (d, D), v(empty)
            and v(all) (2, K)) are computed once and reused while its image stays the same (checked by a content
            signature; augmented images are computed every time): ``"memory"`` (default) keeps them in CPU memory,
            ``None`` recomputes every step, a folder also loads them at fit start from / saves them after every
            training epoch to ``{folder}/features-{key}-{split}-rank{r}.safetensors`` (``key``:
            :meth:`feature_cache_key`). Never part of the checkpoint; test / predict / forward are not cached.
    """

    def __init__(
        self,
        classifier: str = "vit_tiny_patch16_224",
        classifier_weights: str | None = None,
        classifier_kwargs: dict[str, Any] | None = None,
        backbone: str | None = None,
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = True,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 8,
        baseline: float = 0.0,
        output: Literal["probs", "logits", "log_probs"] = "probs",
        removal: Literal["mask", "drop"] = "mask",
        head: Literal["transformer", "mlp"] = "transformer",
        pixel_features: bool = True,
        head_dim: int = 128,
        head_depth: int = 2,
        head_heads: int = 4,
        dropout: float = 0.0,
        target_scale: float | None = None,
        efficiency: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_fraction: float = 0.05,
        feature_cache: str | None = "memory",
    ) -> None:
        super().__init__()
        check_feature_cache(feature_cache)
        self.save_hyperparameters()
        classifier_kwargs = dict(classifier_kwargs or {})
        model = create_timm_model(classifier, pretrained, classifier_weights, num_classes, argument="classifier",
                                  **classifier_kwargs)
        for p in model.parameters():
            p.requires_grad_(False)
        self.game = PatchGame(model, patch_size, (image_size, image_size), baseline, output, removal=removal)
        if backbone is None:
            backbone, backbone_weights = classifier, backbone_weights or classifier_weights
            backbone_kwargs = classifier_kwargs if backbone_kwargs is None else backbone_kwargs
        self.features = PatchFeatures(backbone, self.game.grid, image_size, pretrained, backbone_weights,
                                      **dict(backbone_kwargs or {}))
        d = self.game.num_players
        pixels = int(classifier_kwargs.get("in_chans", 3)) * self.game.patch_size[0] * self.game.patch_size[1]
        in_dim = self.features.dim + (pixels if pixel_features else 0)
        self.head = build_head(head, in_dim=in_dim, num_players=d, num_classes=num_classes, dim=head_dim,
                               depth=head_depth, heads=head_heads, dropout=dropout)
        self.register_buffer("scale", torch.tensor(float(target_scale or 0.0)))
        self.test_metrics = attribution_metrics("test/")
        self.test_efficiency = EfficiencyGap()
        # split -> cache of frozen outputs, keyed by the batches' "index" (plain attributes: not in the state dict)
        self.feature_caches = {split: FeatureCache() for split in ("train", "val")} if feature_cache else {}

    @property
    def num_players(self) -> int:
        return self.game.num_players

    def forward(self, x: Tensor) -> Tensor:
        """Attributions (B, d, K) for images (B, C, H, W), in the units of the game's output."""
        phi, _ = self._explain(x)
        return phi

    def patch_features(self, x: Tensor) -> Tensor:
        """Head input (B, d, D'): backbone features per patch, plus the patch pixels with ``pixel_features``."""
        return self._head_input(self.features(x), x)

    def _head_input(self, feats: Tensor, x: Tensor) -> Tensor:
        """Backbone features (B, d, D) of ``x`` (B, C, H, W), with the patch pixels appended (always taken from x)."""
        if not self.hparams.pixel_features:
            return feats
        return torch.cat([feats, self.game.patches(x)], -1)

    def frozen_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What the frozen models give for images ``x`` (B, C, H, W): backbone features (B, d, D) and the game's
        ends (B, 2, K), v(empty) and v(all)."""
        ends = torch.zeros(x.shape[0], 2, self.num_players, dtype=torch.bool, device=x.device)
        ends[:, 1] = True
        return self.features(x), self.game(x, ends)

    def _frozen(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor] | None:
        """:meth:`frozen_outputs` of a train / val batch through ``split``'s feature cache (None: not cached)."""
        cache = self.feature_caches.get(split)
        if cache is None or "index" not in batch:
            return None
        return cache.fetch(batch["index"], batch["image"], self.frozen_outputs)

    def _explain(self, x: Tensor, frozen: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Attributions (B, d, K) and totals v(all) - v(empty) (B, K) of ``x``, from its :meth:`frozen_outputs`
        (computed here unless given, e.g. from the feature cache)."""
        feats, v = self.frozen_outputs(x) if frozen is None else frozen  # v: (B, 2, K) v(empty), v(all)
        d = self.num_players
        total = v[:, 1] - v[:, 0]
        scale = self.scale if self.scale > 0 else torch.ones_like(self.scale)
        phi = self.head(self._head_input(feats, x), v[:, 1]) * scale
        if self.hparams.efficiency:
            phi = phi + (total - phi.sum(1)).unsqueeze(1) / d
        return phi, total

    def _loss(self, phi: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(phi / self.scale, labels / self.scale)

    def _labels(self, batch: dict[str, Tensor], key: str = "labels") -> Tensor:
        if key not in batch:
            raise KeyError(
                f"Batch has no {key!r} (keys: {sorted(batch)}). Use an OracleDataModule: it adds noisy 'labels' to "
                "train / val batches and 'exact' values to test batches when the game has at most 20 players."
            )
        labels = batch[key]
        if labels.shape[1] != self.num_players:
            raise ValueError(f"Labels have {labels.shape[1]} players, the game has {self.num_players}.")
        return labels

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        labels = self._labels(batch)
        if self.scale <= 0:  # set once from the first batch, then saved with the checkpoint
            self.scale.fill_(float(labels.pow(2).mean().sqrt().clamp(min=1e-8)))
        phi, _ = self._explain(batch["image"], self._frozen(batch, "train"))
        loss = self._loss(phi, labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        labels = self._labels(batch)
        phi, _ = self._explain(batch["image"], self._frozen(batch, "val"))
        if self.scale > 0:  # MSE to independent noisy labels: unbiased for the MSE to exact values, up to a constant
            self.log("val/loss", self._loss(phi, labels), prog_bar=True, sync_dist=True, batch_size=len(labels))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        exact = self._labels(batch, "exact")
        phi, total = self._explain(batch["image"])
        self.test_metrics.update(phi, exact)
        self.test_efficiency.update(phi, total)
        self.log_dict(self.test_metrics, batch_size=len(exact))
        self.log("test/efficiency_gap", self.test_efficiency, batch_size=len(exact))

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"attributions": (B, d, K), "index": (B,)}`` for a dict batch with ``image`` (and ``index``, the examples'
        stable positions; left out when the batch has none) or a bare image tensor (B, C, H, W).
        :class:`~lightning_attr.callbacks.AttributionWriter` saves them."""
        x = batch["image"] if isinstance(batch, dict) else batch
        out = {"attributions": self(x)}
        if isinstance(batch, dict) and "index" in batch:
            out["index"] = batch["index"]
        return out

    # ----------------------------------------------------------------- feature cache
    def feature_cache_key(self) -> str:
        """A short hash of the frozen backbone's and the game's fingerprints (settings, weights, buffers)."""
        both = f"{game_fingerprint(self.features)}|{game_fingerprint(self.game)}"
        return hashlib.sha1(both.encode()).hexdigest()[:12]

    def feature_cache_file(self, split: str, key: str | None = None) -> str | None:
        """``{folder}/features-{key}-{split}-rank{r}.safetensors`` of this process (None without a folder)."""
        folder = self.hparams.feature_cache
        if folder in (None, "memory"):
            return None
        key = key or self.feature_cache_key()
        return os.path.join(folder, f"features-{key}-{split}-rank{self.global_rank}.safetensors")

    def on_fit_start(self) -> None:
        """Key the feature caches to the frozen weights (emptied when they changed) and, with a folder, load this
        process's files."""
        if not self.feature_caches:
            return
        key = self.feature_cache_key()
        for split, cache in self.feature_caches.items():
            if cache.key == key:
                continue
            cache.key = key
            cache.clear()
            path = self.feature_cache_file(split, key)
            if path is not None and os.path.isfile(path):
                cache.load(path)

    def _save_feature_caches(self) -> None:
        for split, cache in self.feature_caches.items():
            path = self.feature_cache_file(split, cache.key) if cache.key else None
            if path is not None and cache.dirty:
                cache.save(path)

    def on_train_epoch_end(self) -> None:
        self._save_feature_caches()  # after this epoch's validation: both splits

    def on_fit_end(self) -> None:
        self._save_feature_caches()

    def configure_optimizers(self):
        return adamw_cosine(self, self.head.parameters(), self.hparams.lr, self.hparams.weight_decay,
                            self.hparams.warmup_fraction)
