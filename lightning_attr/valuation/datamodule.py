"""ValuationDataModule: the valued points as batches, with noisy value labels made on the fly by a batched utility."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_attr.data.label_store import LabelStore, content_signature
from lightning_attr.valuation.data import DigitsSource, ValuationData, ValuationSource
from lightning_attr.valuation.estimators import MAX_EXACT_POINTS, get_valuation_estimator
from lightning_attr.valuation.labels import ValueOracle
from lightning_attr.valuation.utility import LogisticUtility, Metric

__all__ = ["ValuationDataModule", "PointDataset"]


class PointDataset(Dataset):
    """Rows ``points`` of a :class:`ValuationData`: ``{"input", "label", "index", "flipped"}`` per point."""

    def __init__(self, data: ValuationData, points: Tensor) -> None:
        self.data, self.points = data, points

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        p = int(self.points[i])
        return {"input": self.data.inputs[p], "label": self.data.y_train[p], "index": torch.tensor(p),
                "flipped": self.data.flipped[p]}


class ValuationDataModule(L.LightningDataModule):
    """Points of ``source`` (default: digits with 20% flipped labels) with value labels added in
    ``on_after_batch_transfer``, made by ``estimator`` on a :class:`~lightning_attr.valuation.LogisticUtility`:

    * train (every point): ``labels`` (B,) noisy unbiased values, ``label_mode`` ``fixed`` (one draw, cached on disk),
      ``fresh`` (a new draw every epoch) or ``running_mean`` (mean of all draws so far);
    * val (``val_size`` random points): an independent fixed draw with ``val_num_samples`` (model selection);
    * test (``test_size`` random points): ``values``, ground truth from ``test_num_samples`` samples per point
      (exact enumeration when ``N <= 12``), cached on disk.

    Labels are drawn in fixed chunks of points with one seeded generator each (``ValueOracle``), so they are equal
    whatever the batch size, device or number of processes. Cache files: ``{cache_dir}/{split}-{estimator}-{budget}-
    {key}-rank{r}.safetensors``, keyed by the data, utility settings, estimator, options, budget and seed, checked on
    read (a truncated file raises naming it).

    Args:
        source: builds the :class:`ValuationData` (``DigitsSource``, ``SyntheticSource``, ``DatasetSource``).
        estimator / estimator_options: a name in ``lightning_attr.valuation.estimators`` and its options (e.g.
            ``{"cardinality": [0, 30]}``). num_samples: samples per point per draw.
        metric / C: the utility (validation log-likelihood or accuracy of an L2 logistic regression with ``C``).
    """

    def __init__(self, source: ValuationSource | None = None, estimator: str = "distributional_shapley",
                 estimator_options: dict[str, Any] | None = None, num_samples: int = 5,
                 label_mode: Literal["fixed", "fresh", "running_mean"] = "fixed", val_num_samples: int | None = None,
                 val_size: int = 256, test_size: int = 250, test_num_samples: int = 1000,
                 metric: Metric = "log_likelihood", C: float = 1.0, cache_dir: str | None = "artifacts/valuation_cache",
                 seed: int = 0, batch_size: int = 64, chunk_size: int = 128) -> None:
        super().__init__()
        if label_mode not in ("fixed", "fresh", "running_mean"):
            raise ValueError(f"`label_mode` must be 'fixed', 'fresh' or 'running_mean', got {label_mode!r}.")
        for name, value in (("num_samples", num_samples), ("val_size", val_size), ("test_size", test_size),
                            ("test_num_samples", test_num_samples), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        get_valuation_estimator(estimator)  # a clear error now, not at the first batch
        self.source = source if source is not None else DigitsSource()
        self.estimator_name, self.estimator_options = estimator, dict(estimator_options or {})
        self.num_samples, self.label_mode = num_samples, label_mode
        self.val_num_samples = val_num_samples or num_samples
        self.val_size, self.test_size, self.test_num_samples = val_size, test_size, test_num_samples
        self.metric, self.C, self.cache_dir, self.seed = metric, C, cache_dir, seed
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.data: ValuationData | None = None
        self.oracle: ValueOracle | None = None
        self.stores: dict[str, LabelStore] = {}
        self.splits: dict[str, Tensor] = {}

    # ----------------------------------------------------------------- data
    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self.source.load()
            n = len(self.data.x_train)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
            self.splits = {"train": torch.arange(n), "val": order[: min(self.val_size, n)].sort().values,
                           "test": order.flip(0)[: min(self.test_size, n)].sort().values}
        if self.oracle is None:
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            d = self.data
            utility = LogisticUtility(d.x_train.to(device), d.y_train.to(device), d.x_val.to(device),
                                      d.y_val.to(device), d.num_classes, C=self.C, metric=self.metric)
            self.oracle = ValueOracle(utility, self.estimator_name, self.estimator_options, self.seed, self.chunk_size)

    @property
    def num_features(self) -> int:
        self.setup()
        return int(self.data.inputs[0].numel()) if self.data.inputs.dim() == 2 else 0

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.data.num_classes

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(PointDataset(self.data, self.splits[split]), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("train")

    # ----------------------------------------------------------------- labels
    def _budget(self, split: str) -> int | str:
        if split == "test":
            return "exact" if self.oracle.num_points <= MAX_EXACT_POINTS else self.test_num_samples
        return self.num_samples if split == "train" else self.val_num_samples

    def _store(self, name: str, split: str) -> LabelStore:
        if name not in self.stores:
            key = self.oracle.key(split, self._budget(split))
            digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
            prefix = None
            if self.cache_dir and name != "train-running_mean":
                prefix = os.path.join(self.cache_dir, f"{split}-{self.estimator_name}-{key['budget']}-{digest}")
            rank = self.trainer.global_rank if self.trainer is not None else 0
            self.stores[name] = LabelStore(self.oracle.num_points, prefix, rank,
                                           metadata={"cache_key": json.dumps(key, sort_keys=True)})
        return self.stores[name]

    def _signatures(self, index: Tensor) -> Tensor:
        """Content signature of each point: its utility features and label."""
        d = self.data
        return content_signature(torch.cat([d.x_train[index], d.y_train[index].unsqueeze(1).float()], 1))

    def _cached(self, split: str, index: Tensor, compute) -> Tensor:
        store = self._store(f"{split}-fixed", split)
        return store.fetch(index, self._signatures(index), lambda missing: compute(index[missing]).float())

    def labels(self, split: str, index: Tensor, epoch: int = 0) -> Tensor:
        """Labels (B,) of points ``index`` (B,) for ``split`` (train labels of ``epoch`` per ``label_mode``)."""
        self.setup()
        index = index.cpu()
        if split == "test":
            compute = self.oracle.exact if self._budget("test") == "exact" else (
                lambda p: self.oracle.draw(p, "test", 0, self.test_num_samples, self.splits["test"]))
            return self._cached("test", index, compute)
        if split == "val":
            return self._cached("val", index, lambda p: self.oracle.draw(p, "val", 0, self.val_num_samples, self.splits["val"]))
        if self.label_mode == "fixed":
            return self._cached("train", index, lambda p: self.oracle.draw(p, "train", 0, self.num_samples))
        fresh = self.oracle.draw(index, "train", epoch + 1, self.num_samples).float()
        if self.label_mode == "fresh":
            return fresh
        return self._store("train-running_mean", "train").update_mean(index, fresh, self._signatures(index))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is None or not isinstance(batch, dict) or "index" not in batch:
            return batch
        stage, device = self.trainer.state.stage, batch["index"].device
        if stage == RunningStage.TRAINING:
            batch["labels"] = self.labels("train", batch["index"], self.trainer.current_epoch).to(device)
        elif stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING):
            batch["labels"] = self.labels("val", batch["index"]).to(device)
        elif stage == RunningStage.TESTING:
            batch["values"] = self.labels("test", batch["index"]).to(device)
        return batch

    @property
    def evaluations(self) -> int:
        """Utility evaluations spent by this process so far."""
        return self.oracle.utility.num_evaluations if self.oracle is not None else 0

    def state_dict(self) -> dict[str, Any]:
        store = self.stores.get("train-running_mean")
        return {"train-running_mean": store.state_dict()} if store is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, state in state_dict.items():
            store = LabelStore(len(state["count"]))
            store.load_state_dict(state)
            self.stores[key] = store
