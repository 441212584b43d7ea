"""OracleDataModule: image batches plus Monte-Carlo oracle labels computed on the training device."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_attr.data.images import ImageDataModule, dataset_fingerprint
from lightning_attr.data.label_store import LabelStore, content_signature
from lightning_attr.estimators import MAX_EXACT_PLAYERS, exact_values, get_estimator

__all__ = ["OracleDataModule", "LabelMode", "game_fingerprint"]

LabelMode = Literal["fixed", "fresh", "running_mean"]
_SPLIT_SALT = {"train": 1, "val": 2, "test": 3}


def game_fingerprint(game: torch.nn.Module) -> str:
    """A short hash of the game's settings (its ``repr``), weights and buffers, persistent or not (e.g. the
    baseline); keys the on-disk label caches."""
    digest = hashlib.sha1(repr(game).encode())
    tensors = {**dict(game.named_buffers()), **game.state_dict()}
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def enumeration_progress(total: int, num_players: int, target: str, is_global_zero: bool = True):
    """A tqdm bar (shown on rank zero only) over ``total`` images whose exact ``target`` values enumerate
    ``2^num_players`` coalitions each."""
    from tqdm.auto import tqdm

    desc = f"exact {target}: 2^{num_players} = {2**num_players} coalitions per image"
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not is_global_zero)


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
        cache_dir: folder of the label caches (``None``: no disk cache): ``{split}-{target}-{estimator}-{budget}-{key}``
            (exact test values: ``test-{target}-exact-{key}``) ``-rank{r}.safetensors``, one file per rank, merged by
            example index. ``key`` hashes what determines the labels: the split's fingerprint (source data set, rows,
            labels, preprocessing), the game's fingerprint, the target and, for noisy labels, estimator, budget and
            seed. On read every file is checked against its digest and key, and every label against a content
            signature of its image (``StaleLabelsError`` when it belongs to another image); never a wrong label.
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
        self._owners: dict[str, weakref.ref] = {}  # store name -> the game its labels are for
        self._progress = None  # the exact-enumeration bar of a test run
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

    def _split_dataset(self, split: str):
        return self._test_set() if split == "test" else self.datamodule.splits[split]

    def _cache_key(self, split: str, kind: str, game) -> dict[str, str]:
        """What determines the labels of ``split``: the examples and their preprocessing, the game, the target and,
        for Monte-Carlo labels, the estimator, its budget and the seed."""
        data = dataset_fingerprint(self._split_dataset(split))
        if data is None:
            rank_zero_warn(f"The {split!r} split ({type(self._split_dataset(split)).__name__}) has no `fingerprint`: "
                           "its label cache is keyed by its length and checked against image signatures only.")
        key = dict(split=split, target=self.estimator.target, game=game_fingerprint(game), data=str(data),
                   n=str(len(self._split_dataset(split))))
        if kind != "exact":
            budget = self.num_samples if split == "train" else self.val_num_samples
            key.update(estimator=self.estimator.name, budget=str(budget), seed=str(self.seed))
        return key

    def _store(self, split: str, kind: str, game) -> LabelStore:
        """The labels of ``split`` / ``kind`` for ``game`` (a new store, read from the cache, when the game changed;
        a store restored by ``load_state_dict`` is adopted by the first game that asks)."""
        name = f"{split}-{kind}"
        owner = self._owners.get(name)
        if name not in self.stores or (owner is not None and owner() is not game):
            n = len(self._split_dataset(split))
            key = self._cache_key(split, kind, game)
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            what = "exact" if kind == "exact" else f"{self.estimator.name}-{key['budget']}"
            prefix = None
            if self.cache_dir and kind != "running_mean":
                prefix = os.path.join(self.cache_dir, f"{split}-{self.estimator.target}-{what}-{digest}")
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.stores[name] = LabelStore(n, prefix, rank, metadata={"cache_key": json.dumps(key, sort_keys=True)})
        self._owners[name] = weakref.ref(game)
        return self.stores[name]

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

    def _cached(self, store: LabelStore, x: Tensor, index: Tensor, compute) -> Tensor:
        """Stored labels of ``index``, computing (``compute(mask)``) and saving the missing ones; raises when a stored
        label belongs to other images than ``x``."""
        return store.fetch(index, content_signature(x), lambda missing: compute(missing.to(index.device)), x.dtype)

    def _train_labels(self, game, x: Tensor, index: Tensor) -> Tensor:
        draw = self.trainer.current_epoch + 1
        if self.label_mode == "fresh":
            return self._draw(game, x, index, "train", draw, self.num_samples)
        if self.label_mode == "running_mean":
            store = self._store("train", "running_mean", game)
            signatures = content_signature(x)
            store.check(index, signatures, x.dtype)
            return store.update_mean(index, self._draw(game, x, index, "train", draw, self.num_samples), signatures)
        store = self._store("train", "fixed", game)
        return self._cached(store, x, index, lambda m: self._draw(game, x[m], index[m], "train", 0, self.num_samples))

    def _exact(self, game, x: Tensor, index: Tensor) -> Tensor:
        target = self.estimator.target
        return self._cached(self._store("test", "exact", game), x, index,
                            lambda m: exact_values(game, x[m], (target,))[target])

    def _test_progress(self, game):
        """The bar (rank zero) of this test run's exact enumeration; announced when it is created."""
        if self._progress is None:
            n, world = len(self._test_set()), self.trainer.world_size
            cached = int((self._store("test", "exact", game).count > 0).sum())
            rank_zero_info(f"Exact {self.estimator.target} values of {n} test images ({cached} cached): enumerating "
                           f"2^{game.num_players} = {2**game.num_players} coalitions per image.")
            self._progress = enumeration_progress(len(range(0, n, world)), game.num_players, self.estimator.target,
                                                  self.trainer.is_global_zero)
        return self._progress

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is None or not isinstance(batch, dict) or "index" not in batch:
            return batch
        stage = self.trainer.state.stage
        x, index = batch["image"], batch["index"]
        if stage == RunningStage.TRAINING:
            batch["labels"] = self._train_labels(self._game(), x, index).to(x.device)
        elif stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING):
            game = self._game()
            store = self._store("val", "fixed", game)
            labels = self._cached(store, x, index,
                                  lambda m: self._draw(game, x[m], index[m], "val", 0, self.val_num_samples))
            batch["labels"] = labels.to(x.device)
        elif stage == RunningStage.TESTING:
            game = self._game()
            if game.num_players <= MAX_EXACT_PLAYERS:
                bar = self._test_progress(game)
                batch["exact"] = self._exact(game, x, index).to(x.device)
                bar.update(len(index))
        return batch

    def teardown(self, stage: str) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def ground_truth(self, game, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Test images (N, C, H, W) and their exact values (N, d, K) of the estimator's target, on ``device``.

        Uses (and fills) the same on-disk cache as ``trainer.test``; shows a progress bar while enumerating.
        """
        if game.num_players > MAX_EXACT_PLAYERS:
            raise ValueError(f"Exact values need `game.num_players` <= {MAX_EXACT_PLAYERS}, got {game.num_players}.")
        self.datamodule.setup()
        device = torch.device(device) if device is not None else next(game.parameters()).device
        images, exact = [], []
        with enumeration_progress(len(self._test_set()), game.num_players, self.estimator.target) as bar:
            for batch in self.datamodule.loader("test", dataset=self._test_set()):
                x, index = batch["image"].to(device), batch["index"]
                images.append(x)
                exact.append(self._exact(game, x, index).to(device))
                bar.update(len(index))
        return torch.cat(images), torch.cat(exact)

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {key: store.state_dict() for key, store in self.stores.items() if key == "train-running_mean"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, state in state_dict.items():
            store = LabelStore(len(state["count"]))
            store.load_state_dict(state)
            self.stores[key] = store
            self._owners.pop(key, None)  # adopted by the first game that asks (the resumed run's)
