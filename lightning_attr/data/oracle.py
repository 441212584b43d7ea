"""OracleDataModule: image batches plus Monte-Carlo oracle labels computed on the training device."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_attr.data.images import ImageDataModule
from lightning_attr.data.label_store import LabelStore
from lightning_attr.estimators import MAX_EXACT_PLAYERS, exact_values, get_estimator

__all__ = ["OracleDataModule", "LabelMode", "game_fingerprint"]

LabelMode = Literal["fixed", "fresh", "running_mean"]
_SPLIT_SALT = {"train": 1, "val": 2, "test": 3}


def game_fingerprint(game: torch.nn.Module) -> str:
    """A short hash of the game's model weights and settings (keys the on-disk label caches)."""
    digest = hashlib.sha1(repr(game).encode())
    for name, tensor in sorted(game.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


class OracleDataModule(L.LightningDataModule):
    """Wraps an :class:`ImageDataModule` and adds attribution labels to each batch in ``on_after_batch_transfer``.

    The labels are computed on the training device by ``estimator`` through the LightningModule's ``game``
    attribute (a :class:`~lightning_attr.games.PatchGame` or anything with the same contract). Batches gain:

    * train: ``labels`` (B, d, K), noisy and unbiased when the estimator is; drawn per ``label_mode``:
      ``fixed`` (one draw per example, cached on disk and reused), ``fresh`` (a new draw every epoch) or
      ``running_mean`` (the mean of all draws so far, one more each epoch).
    * val: ``labels`` (B, d, K), an *independent* fixed draw with ``val_num_samples`` (model selection).
    * test: ``exact`` (B, d, K) exact values of the estimator's target by enumeration (when ``d <= 20``;
      cached on disk). Predict batches get nothing: the explainer alone answers them.

    Args:
        datamodule: the image data.
        estimator: name of an estimator in :mod:`lightning_attr.estimators`.
        num_samples: game evaluations per example per label draw.
        label_mode: ``fixed``, ``fresh`` or ``running_mean``.
        val_num_samples: budget of the validation labels (default: ``num_samples``).
        test_size: explain only the first ``test_size`` test examples (exact values cost ``2^d`` evaluations each).
        cache_dir: folder of the label caches (``None``: no disk cache).
        seed: seed of all label draws.
        oracle_batch_size: examples per estimator call (bounds the masked batch held at once).
    """

    def __init__(
        self,
        datamodule: ImageDataModule,
        estimator: str = "unbiased_kernel_shap",
        num_samples: int = 32,
        label_mode: LabelMode = "fixed",
        val_num_samples: int | None = None,
        test_size: int | None = 64,
        cache_dir: str | None = "artifacts/oracle_cache",
        seed: int = 0,
        oracle_batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.estimator = get_estimator(estimator)
        if label_mode not in ("fixed", "fresh", "running_mean"):
            raise ValueError(f"`label_mode` must be 'fixed', 'fresh' or 'running_mean', got {label_mode!r}.")
        if num_samples < 1:
            raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
        if test_size is not None and test_size < 1:
            raise ValueError(f"`test_size` must be >= 1 or None, got {test_size}.")
        self.datamodule = datamodule
        self.num_samples, self.label_mode = num_samples, label_mode
        self.val_num_samples = val_num_samples or num_samples
        self.test_size, self.cache_dir, self.seed = test_size, cache_dir, seed
        self.oracle_batch_size = oracle_batch_size
        self.stores: dict[str, LabelStore] = {}
        self.evaluations = {"train": 0, "val": 0, "test": 0}

    # ----------------------------------------------------------------- loaders
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)

    def _test_set(self):
        test = self.datamodule.splits["test"]
        if self.test_size is not None and self.test_size < len(test):
            return Subset(test, range(self.test_size))
        return test

    def train_dataloader(self) -> DataLoader:
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.loader("test", dataset=self._test_set())

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # ----------------------------------------------------------------- labels
    def _game(self):
        module = self.trainer.lightning_module if self.trainer is not None else None
        game = getattr(module, "game", None)
        if game is None:
            raise AttributeError(
                "OracleDataModule needs the LightningModule to expose a `game` attribute (e.g. a PatchGame) "
                f"to compute labels; {type(module).__name__} has none."
            )
        return game

    def _store(self, split: str, kind: str, game) -> LabelStore:
        key = f"{split}-{kind}"
        if key not in self.stores:
            n = len(self._test_set()) if split == "test" else len(self.datamodule.splits[split])
            prefix = None
            if self.cache_dir and kind != "running_mean":
                budget = self.num_samples if split == "train" else self.val_num_samples
                what = "exact" if kind == "exact" else f"{self.estimator.name}-{budget}-s{self.seed}"
                name = f"{split}-{self.estimator.target}-{what}-{game_fingerprint(game)}-n{n}"
                prefix = os.path.join(self.cache_dir, name)
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.stores[key] = LabelStore(n, prefix, rank)
        return self.stores[key]

    def _generator(self, split: str, draw: int, index: Tensor) -> torch.Generator:
        seed = hash((self.seed, _SPLIT_SALT[split], draw, int(index.min()), int(index.max()), len(index))) % (2**62)
        return torch.Generator().manual_seed(seed)

    def _draw(self, game, x: Tensor, index: Tensor, split: str, draw: int, budget: int) -> Tensor:
        gen = self._generator(split, draw, index)
        before = getattr(game, "num_evaluations", None)
        outs = []
        for start in range(0, x.shape[0], self.oracle_batch_size):
            sl = slice(start, start + self.oracle_batch_size)
            outs.append(self.estimator(game, x[sl], budget, generator=gen))
        # the evaluations the game actually ran (estimators round budgets to whole units)
        self.evaluations[split] += game.num_evaluations - before if before is not None else budget * x.shape[0]
        return torch.cat(outs)

    def _cached(self, store: LabelStore, index: Tensor, compute) -> Tensor:
        missing = ~store.has(index)
        if missing.any():
            store.put(index[missing.cpu()], compute(missing.to(index.device)))
            store.save()
        return store.get(index)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is None or not isinstance(batch, dict) or "index" not in batch:
            return batch
        stage = self.trainer.state.stage
        x, index = batch["image"], batch["index"]
        if stage == RunningStage.TRAINING:
            game = self._game()
            epoch = self.trainer.current_epoch
            if self.label_mode == "fresh":
                labels = self._draw(game, x, index, "train", epoch + 1, self.num_samples)
            elif self.label_mode == "running_mean":
                store = self._store("train", "running_mean", game)
                labels = store.update_mean(index, self._draw(game, x, index, "train", epoch + 1, self.num_samples))
            else:
                store = self._store("train", "fixed", game)
                labels = self._cached(store, index, lambda m: self._draw(game, x[m], index[m], "train", 0, self.num_samples))
            batch["labels"] = labels.to(x.device)
        elif stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING):
            game = self._game()
            store = self._store("val", "fixed", game)
            labels = self._cached(store, index, lambda m: self._draw(game, x[m], index[m], "val", 0, self.val_num_samples))
            batch["labels"] = labels.to(x.device)
        elif stage == RunningStage.TESTING:
            game = self._game()
            if game.num_players <= MAX_EXACT_PLAYERS:
                store = self._store("test", "exact", game)
                target = self.estimator.target
                batch["exact"] = self._cached(store, index, lambda m: exact_values(game, x[m], (target,))[target]).to(x.device)
        return batch

    def ground_truth(self, game, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Test images (N, C, H, W) and their exact values (N, d, K) of the estimator's target, on ``device``.

        Uses (and fills) the same on-disk cache as ``trainer.test``; shows a progress bar while enumerating.
        """
        from tqdm.auto import tqdm

        if game.num_players > MAX_EXACT_PLAYERS:
            raise ValueError(f"Exact values need `game.num_players` <= {MAX_EXACT_PLAYERS}, got {game.num_players}.")
        self.datamodule.setup()
        device = torch.device(device) if device is not None else next(game.parameters()).device
        store, target = self._store("test", "exact", game), self.estimator.target
        images, exact = [], []
        for batch in tqdm(self.datamodule.loader("test", dataset=self._test_set()), desc=f"exact {target}", leave=False):
            x, index = batch["image"].to(device), batch["index"]
            images.append(x)
            exact.append(self._cached(store, index, lambda m: exact_values(game, x[m], (target,))[target]).to(device))
        return torch.cat(images), torch.cat(exact)

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {key: store.state_dict() for key, store in self.stores.items() if key == "train-running_mean"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, state in state_dict.items():
            store = LabelStore(len(state["count"]))
            store.load_state_dict(state)
            self.stores[key] = store
