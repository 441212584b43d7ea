"""Shared Lightning shell of the TracIn and TRAK callbacks: when passes run, what they read, store and log."""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections import defaultdict
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import move_data_to_device
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate
from tqdm.auto import tqdm

from lightning_attr.callbacks.grouped import group_batches, grouping_inputs, segments
from lightning_attr.callbacks.influence_logging import log_topk
from lightning_attr.callbacks.passes import (
    attribution_loader,
    datamodule_attr,
    gather_by_index,
    isolated,
    split,
    train_dataset,
)
from lightning_attr.data.indexed import unpack_batch
from lightning_attr.evaluation import noisy_label_recall, recall_at
from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.groups import GROUPERS, Grouping, make_grouping
from lightning_attr.influence.scores import Features, inner
from lightning_attr.influence.topk import topk_blockwise
from lightning_attr.io import atomic_write
from lightning_attr.metrics.noisy_label import noisy_label_auc

__all__ = ["InfluenceCallback"]


def _tensors(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in _tensors(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in _tensors(v)]
    return []


def _cpu(feats: Features) -> Features:
    return feats.cpu() if isinstance(feats, Tensor) else tuple(t.cpu() for t in feats)


def _save(tensors: dict[str, Tensor], path: str) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp))


class InfluenceCallback(L.Callback):
    """Base of :class:`TracIn` and :class:`TRAK`; see their docstrings for the arguments.

    Subclasses set ``method``, ``output`` and ``uses_lr`` and implement ``_featurize`` (per-example tensors of a
    batch), ``_finish`` (per-checkpoint tensors to store; update running sums), ``_train_side`` (the stored train
    features a query is scored against), ``_combine`` (checkpoint sums -> scores) and ``self_influence``.
    """

    method = "influence"
    output = "cross_entropy"
    uses_lr = True
    mean_keys: tuple[str, ...] = ()  # per-example rows averaged (not summed) over a group's members

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        at_fit_end: bool = False,
        parameters: Sequence[str] | None = None,
        module_types: Sequence[str] | None = None,
        last_layer: bool = False,
        proj_dim: int | None = 2048,
        projection: str = "auto",
        proj_type: str = "rademacher",
        seed: int = 0,
        max_memory_mb: float = 1024.0,
        cache_inputs_mb: float = 512.0,
        batch_size: int | None = None,
        attribution_data: Dataset | DataLoader | None = None,
        query_data: Dataset | None = None,
        num_queries: int = 8,
        top_k: int = 5,
        noisy_labels: str | Sequence[int] | Tensor | None = None,
        input_key: str = "image",
        label_key: str = "label",
        index_key: str = "index",
        progress_bar: bool = True,
        prefix: str | None = None,
        group_by: str | None = None,
        num_groups: int | None = None,
        group_size: int | None = None,
        group_column: str | None = None,
        group_seed: int = 0,
    ) -> None:
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be None or >= 1, got {value}.")
        if not every_n_epochs and not every_n_steps and not at_fit_end:
            raise ValueError("no attribution pass would run: set `every_n_epochs`, `every_n_steps` or `at_fit_end`.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        if num_queries < 0 or top_k < 1:
            raise ValueError(f"`num_queries` must be >= 0 and `top_k` >= 1, got {num_queries} and {top_k}.")
        self.dirpath, self.every_n_epochs, self.every_n_steps, self.at_fit_end = dirpath, every_n_epochs, every_n_steps, at_fit_end
        self.featurizer_kwargs = dict(parameters=parameters, module_types=module_types, last_layer=last_layer,
                                      proj_dim=proj_dim, projection=projection, proj_type=proj_type, seed=seed,
                                      max_memory_mb=max_memory_mb)
        self.batch_size, self.attribution_data, self.query_data = batch_size, attribution_data, query_data
        self.num_queries, self.top_k, self.noisy_labels = num_queries, top_k, noisy_labels
        self.keys = dict(input_key=input_key, label_key=label_key, index_key=index_key)
        self.progress_bar, self.cache_inputs_mb = progress_bar, cache_inputs_mb
        self._input_cache: dict[str, list] = {}
        if group_by is not None:
            if group_by not in GROUPERS:
                raise ValueError(f"`group_by`={group_by!r} is not one of {GROUPERS} (or None for per-example).")
            if group_by == "column" and not group_column:
                raise ValueError("`group_by='column'` needs `group_column`, the batch key holding each example's group.")
            if group_by not in ("class", "column") and (num_groups is None) == (group_size is None):
                raise ValueError(f"`group_by`={group_by!r} needs exactly one of `num_groups` and `group_size`.")
        self.group_by, self.num_groups, self.group_size = group_by, num_groups, group_size
        self.group_column, self.group_seed = group_column, group_seed
        self.grouping: Grouping | None = None
        self.prefix = prefix or self.method + ("_last_layer" if last_layer else "") + ("_grouped" if group_by else "")
        self.records: list[dict[str, Any]] = []
        self.sums: dict[str, Tensor] = {}
        self.n_train: int | None = None
        self.metrics: dict[str, float] = {}
        self.featurizer: GradientFeaturizer | None = None
        self.module: L.LightningModule | None = None
        self._queries: tuple[Tensor, Tensor, Tensor] | None = None
        self._resolved_dir: str | None = None
        self._lrs: dict[str, float] | None = None

    # ------------------------------------------------------------------------------------------------------ set-up
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, dirpath=self.dirpath, seed=self.featurizer_kwargs["seed"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.module = pl_module
        self.featurizer = GradientFeaturizer(pl_module, output=self.output, **self.featurizer_kwargs)
        if self._resolved_dir is None:
            root = trainer.log_dir or trainer.default_root_dir
            self._resolved_dir = self.dirpath or os.path.join(root, self.prefix)
            if trainer.world_size > 1:  # every rank must use rank zero's folder
                self._resolved_dir = trainer.strategy.broadcast(self._resolved_dir)

    @property
    def directory(self) -> str:
        """Folder of the stored results (per-checkpoint features and weights, summaries, top-k JSON)."""
        if self._resolved_dir is None:
            raise RuntimeError("the callback has not been set up by a Trainer yet.")
        return self._resolved_dir

    def _data(self, trainer: L.Trainer) -> tuple[Any, Any, int]:
        if self.attribution_data is not None:
            return self.attribution_data, None, self.batch_size or getattr(self.attribution_data, "batch_size", 64) or 64
        data, collate, bs = train_dataset(trainer)
        return data, collate, self.batch_size or bs or 64

    def _loader(self, trainer: L.Trainer) -> DataLoader:
        data, collate, bs = self._data(trainer)
        return attribution_loader(data, bs, trainer.world_size, trainer.global_rank, collate)

    def _query_examples(self, trainer: L.Trainer) -> tuple[Tensor, Tensor, Tensor] | None:
        if self._queries is not None or not self.num_queries:
            return self._queries
        data = self.query_data if self.query_data is not None else split(trainer.datamodule, "val")[0]
        if data is None or len(data) == 0:
            return None
        batch = default_collate([data[i] for i in range(min(self.num_queries, len(data)))])
        self._queries = unpack_batch(batch, **self.keys)
        return self._queries

    # ---------------------------------------------------------------------------------------------------- triggers
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.uses_lr:  # the rate of the step about to run; epoch-interval schedulers step before epoch-end hooks
            self._lrs = self.learning_rates(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.run_pass(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.run_pass(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and not (self.records and self.records[-1]["step"] == trainer.global_step):
            self.run_pass(trainer, pl_module)

    # -------------------------------------------------------------------------------------------------------- pass
    def learning_rates(self, trainer: L.Trainer) -> dict[str, float]:
        """Learning rate of each selected parameter, read from the optimizers' param groups (a pass uses the rates
        of the last training step before it)."""
        by_id = {id(p): g["lr"] for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        missing = [n for n, p in self.featurizer.params.items() if id(p) not in by_id]
        if missing:
            raise ValueError(f"parameters {missing[:5]} are in no optimizer param group, so TracIn has no learning "
                             "rate for them; exclude them with `parameters=` / `module_types=`.")
        return {n: float(by_id[id(p)]) for n, p in self.featurizer.params.items()}

    def run_pass(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One attribution pass at the current weights (all ranks), then storage and logging (rank zero)."""
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        c, key = len(self.records), (len(self.records),)
        lrs = (self._lrs or self.learning_rates(trainer)) if self.uses_lr else None
        loader = self._loader(trainer)
        n = len(loader.dataset)
        if self.n_train is not None and n != self.n_train:
            raise ValueError(f"the training set changed size between passes: {self.n_train} -> {n}.")
        self.n_train = n
        with isolated(pl_module):
            self.featurizer.set_scales({k: v**0.5 for k, v in lrs.items()} if lrs else None)
            desc = f"{self.method} pass {c} (step {trainer.global_step})"
            if self.group_by:
                data = self._grouped_pass(trainer, pl_module, loader, key, desc)
            else:
                data = self._example_pass(trainer, pl_module, loader, key, desc)
            stored = self._finish(data)
            queries = self._query_examples(trainer)
            if queries is not None:
                qx, qy, _ = move_data_to_device(queries, pl_module.device)
                block = inner(self._train_side_of(stored), _cpu(self._query_features(qx, qy, key)))
                self.sums["query"] = self.sums["query"] + block if "query" in self.sums else block
        record = dict(epoch=trainer.current_epoch, step=trainer.global_step, lrs=lrs, file=f"{self.method}-{c:03d}")
        if trainer.is_global_zero:
            _save(stored, os.path.join(self.directory, record["file"] + ".safetensors"))
            _save({k: v.clone() for k, v in pl_module.state_dict().items()},
                  os.path.join(self.directory, f"weights-{c:03d}.safetensors"))
            _save(dict(self.sums), os.path.join(self.directory, "summary.safetensors"))
        self.featurizer.set_scales(None)
        self.records.append(record)
        if trainer.is_global_zero:
            records = json.dumps(self.records, indent=1)
            atomic_write(os.path.join(self.directory, "checkpoints.json"), lambda tmp: Path(tmp).write_text(records))
            self._log(trainer, c)
        if trainer.world_size > 1:
            trainer.strategy.barrier()

    def _bar(self, trainer: L.Trainer, iterable: Any, desc: str, total: int) -> Any:
        show = self.progress_bar and trainer.is_global_zero and trainer.progress_bar_callback is not None
        return tqdm(iterable, desc=desc, total=total, disable=not show, leave=False, dynamic_ncols=True)

    def _batches(self, loader: DataLoader, name: str) -> Iterator[Any]:
        """The loader's batches; kept in memory after the first pass while they fit ``cache_inputs_mb`` (the
        attribution data is unaugmented, so every pass reads the same batches)."""
        if name in self._input_cache:
            yield from self._input_cache[name]
            return
        kept: list | None = [] if self.cache_inputs_mb > 0 else None
        size = 0
        for batch in loader:
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in _tensors(batch))
                if size <= self.cache_inputs_mb * 2**20:
                    kept.append(batch)
                else:
                    kept = None
            yield batch
        if kept is not None:
            self._input_cache[name] = kept

    def _example_pass(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader,
                      key: tuple[int, ...], desc: str) -> dict[str, Tensor]:
        """Per-example rows (n_train, ...) in dataset order, sharded by index and gathered."""
        local, idx = defaultdict(list), []
        for batch in self._bar(trainer, self._batches(loader, "examples"), desc, len(loader)):
            x, y, i = unpack_batch(move_data_to_device(batch, pl_module.device), **self.keys)
            for k, v in self._featurize(x, y, key).items():
                local[k].append(v.detach())
            idx.append(i)
        return gather_by_index(trainer, torch.cat(idx), {k: torch.cat(v) for k, v in local.items()}, self.n_train)

    def _make_grouping(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader) -> Grouping:
        """Run the grouper once (first pass), on every rank identically; saved with the results."""
        needs_inputs = self.group_by != "random"
        parts: dict[str, Tensor] = {}
        if needs_inputs:
            idx, local = grouping_inputs(self.group_by, pl_module, loader,
                                         lambda b: unpack_batch(b, **self.keys), self.group_column, pl_module.device)
            parts = gather_by_index(trainer, idx.to(pl_module.device),
                                    {k: v.to(pl_module.device) for k, v in local.items()}, self.n_train)
        grouping = make_grouping(self.group_by, self.n_train, self.num_groups, self.group_size, self.group_seed,
                                 labels=parts.get("labels"), features=parts.get("features"), column=parts.get("column"))
        if trainer.is_global_zero:
            _save({"assignment": grouping.assignment}, os.path.join(self.directory, "groups.safetensors"))
        return grouping

    def _grouped_pass(self, trainer: L.Trainer, pl_module: L.LightningModule, loader: DataLoader,
                      key: tuple[int, ...], desc: str) -> dict[str, Tensor]:
        """Per-group rows (n_groups, ...): batches hold whole groups (ranks own groups ``g % world``); each segment's
        features come from one batched backward of its summed output; partial sums are all-reduced."""
        if self.grouping is None:
            self.grouping = self._make_grouping(trainer, pl_module, loader)
        assignment = self.grouping.assignment
        batches = group_batches(assignment, loader.batch_size or 64, trainer.world_size, trainer.global_rank)
        grouped = DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                             num_workers=loader.num_workers)
        sums: dict[str, Tensor] = {}
        counts = torch.zeros(self.grouping.num_groups, device=pl_module.device)
        for batch in self._bar(trainer, self._batches(grouped, "groups"), desc + " [grouped]", len(batches)):
            x, y, i = unpack_batch(move_data_to_device(batch, pl_module.device), **self.keys)
            bounds, rows = segments(assignment[i.cpu()])
            rows = rows.to(pl_module.device)
            for k, v in self._featurize(x, y, key, bounds).items():
                if k not in sums:
                    sums[k] = v.new_zeros(self.grouping.num_groups, *v.shape[1:])
                sums[k].index_add_(0, rows, v.detach())
            counts.index_add_(0, rows, bounds.diff().to(counts))
        if trainer.world_size > 1:
            sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        if not torch.equal(counts.cpu().long(), self.grouping.sizes):
            raise RuntimeError("the grouped pass did not see every example exactly once; is `index` stable?")
        sizes = self.grouping.sizes.to(counts)
        return {k: (v / sizes.view(-1, *[1] * (v.dim() - 1)) if k in self.mean_keys else v).cpu()
                for k, v in sums.items()}

    # ----------------------------------------------------------------------------------------------------- results
    def _noisy_mask(self, trainer: L.Trainer) -> Tensor | None:
        spec = self.noisy_labels
        if spec is None:
            return None
        if isinstance(spec, str):
            value, _ = datamodule_attr(trainer.datamodule, spec)
            if value is None:
                raise ValueError(f"`noisy_labels`={spec!r} is not an attribute of the datamodule "
                                 f"{type(trainer.datamodule).__name__}; pass a mask / list of indices or the "
                                 "attribute's name.")
            spec = value
        spec = torch.as_tensor(spec)
        if spec.dtype == torch.bool:
            if spec.numel() != self.n_train:
                raise ValueError(f"`noisy_labels` mask has length {spec.numel()}, the training set {self.n_train}.")
            return spec
        mask = torch.zeros(self.n_train, dtype=torch.bool)
        mask[spec.long()] = True
        return mask

    def _log(self, trainer: L.Trainer, c: int) -> None:
        s = self._rows_self_influence()
        p = self.prefix
        m = {f"{p}/self_influence_mean": float(s.mean()), f"{p}/self_influence_max": float(s.max()),
             f"{p}/checkpoints": float(c + 1)}
        noisy = self._noisy_mask(trainer)
        if noisy is not None and 0 < int(noisy.sum()) < noisy.numel():  # grouped: each example gets its group's score
            if self.grouping is not None:  # rank groups by the self-influence of their mean gradient (size-fair)
                s = s / self.grouping.sizes.to(s).pow(2)
            per_example = s[self.grouping.assignment] if self.grouping is not None else s
            m[f"{p}/noisy_label_auc"] = float(noisy_label_auc(per_example, noisy))
            rows = self.grouping.assignment if self.grouping is not None else torch.arange(self.n_train)
            m[f"{p}/noisy_recall_at_10pct"] = recall_at(noisy_label_recall(s, rows, noisy), 0.1)
        self.metrics = m
        for logger in trainer.loggers:
            logger.log_metrics(m, step=trainer.global_step)
        if "query" in self.sums and self._queries is not None:
            scores = self._combine(self.sums["query"], 0, self.n_rows)
            top = topk_blockwise(lambda a, b: scores[a:b], self.n_rows, self.top_k)
            data, _, _ = self._data(trainer)
            dataset = None if self.group_by else data.dataset if isinstance(data, DataLoader) else data
            log_topk(trainer, top, self._queries, dataset, self.keys, f"{p}/top_k",
                     os.path.join(self.directory, f"topk-{c:03d}.json"))

    def _load(self, c: int) -> dict[str, Tensor]:
        path = os.path.join(self.directory, self.records[c]["file"] + ".safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"stored results of checkpoint {c} are missing: {path} (was `dirpath` moved?).")
        return load_file(path)

    def _query_features(self, x: Tensor, y: Tensor, key: tuple[int, ...]) -> Features:
        return self.featurizer(x, y, key)

    def query_features(self, query: DataLoader | Dataset, batch_size: int = 256) -> list[Features]:
        """Features of the query examples at every stored checkpoint (weights reloaded from disk, then restored)."""
        if not self.records:
            raise RuntimeError("no attribution pass has run yet; fit with the callback first.")
        module = self.module
        loader = query if isinstance(query, DataLoader) else DataLoader(query, batch_size=batch_size)
        current = {k: v.detach().clone() for k, v in module.state_dict().items()}
        feats: list[Features] = []
        try:
            with isolated(module):
                for c, record in enumerate(self.records):
                    path = os.path.join(self.directory, f"weights-{c:03d}.safetensors")
                    module.load_state_dict({k: v.to(module.device) for k, v in load_file(path).items()})
                    lrs = record["lrs"]
                    self.featurizer.set_scales({k: v**0.5 for k, v in lrs.items()} if lrs else None)
                    parts = []
                    for batch in loader:
                        x, y = self._inputs_labels(move_data_to_device(batch, module.device))
                        parts.append(_cpu(self._query_features(x, y, (c,))))
                    feats.append(torch.cat(parts) if isinstance(parts[0], Tensor)
                                 else tuple(torch.cat(p) for p in zip(*parts)))
        finally:
            module.load_state_dict(current)
            self.featurizer.set_scales(None)
        return feats

    def _inputs_labels(self, batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, dict):
            return batch[self.keys["input_key"]], torch.as_tensor(batch[self.keys["label_key"]])
        return batch[0], torch.as_tensor(batch[1])

    def _block(self, queries: list[Features], start: int, stop: int) -> Tensor:
        total = 0
        for c, q in enumerate(queries):
            train = self._train_side_of(self._load(c))
            train = train[start:stop] if isinstance(train, Tensor) else tuple(t[start:stop] for t in train)
            total = total + inner(train, q)
        return self._combine(total, start, stop)

    def scores(self, query: DataLoader | Dataset, batch_size: int = 256, block: int = 4096) -> Tensor:
        """Scores (n_train, n_query) of every training example for every query example, in dataset order.

        ``query`` yields batches like the training data (inputs, labels[, index]). Computed over train blocks of
        ``block`` rows; exact when the projection is off.
        """
        if self.group_by:
            raise RuntimeError(f"this callback attributes to groups (`group_by`={self.group_by!r}): use group_scores().")
        return self._scores(query, batch_size, block)

    def _scores(self, query: DataLoader | Dataset, batch_size: int, block: int) -> Tensor:
        queries = self.query_features(query, batch_size)
        return torch.cat([self._block(queries, s, min(self.n_rows, s + block)) for s in range(0, self.n_rows, block)])

    def group_scores(self, query: DataLoader | Dataset, batch_size: int = 256, block: int = 4096) -> Tensor:
        """Scores (n_groups, n_query) of every group of training examples (see ``groups``) for every query example."""
        if not self.group_by:
            raise RuntimeError("this callback attributes to single examples: use scores(), or set `group_by`.")
        return self._scores(query, batch_size, block)

    def topk(self, query: DataLoader | Dataset, k: int = 10, batch_size: int = 256, block: int = 4096
             ) -> dict[str, tuple[Tensor, Tensor]]:
        """Top-k proponents / opponents ``(values, train indices)`` (group ids when grouped), each (n_query, k),
        without the full matrix."""
        queries = self.query_features(query, batch_size)
        return topk_blockwise(lambda a, b: self._block(queries, a, b), self.n_rows, k, block)

    @property
    def n_rows(self) -> int:
        """Rows of the attribution: training examples, or groups with ``group_by``."""
        if self.n_train is None:
            raise RuntimeError("no attribution pass has run yet; fit with the callback first.")
        return self.grouping.num_groups if self.group_by and self.grouping is not None else self.n_train

    @property
    def self_influence(self) -> Tensor:
        """Self-influence (n_train,) of every training example, in dataset index order."""
        if self.group_by:
            raise RuntimeError(f"this callback attributes to groups (`group_by`={self.group_by!r}): use "
                               "group_self_influence.")
        return self._rows_self_influence()

    @property
    def group_self_influence(self) -> Tensor:
        """Self-influence (n_groups,) of every group: the method applied to the group's summed gradient."""
        if not self.group_by:
            raise RuntimeError("this callback attributes to single examples: use self_influence, or set `group_by`.")
        return self._rows_self_influence()

    @property
    def group_mean_self_influence(self) -> Tensor:
        """``group_self_influence / size^2`` (n_groups,): the self-influence of each group's mean gradient. Ranks
        groups fairly across sizes (the summed-gradient version grows with size); used for the logged noisy-label
        metrics of grouped callbacks."""
        return self.group_self_influence / self.groups.sizes.to(torch.float32).pow(2)

    @property
    def groups(self) -> Grouping:
        """The grouping: ``groups.assignment`` (n_train,) maps each training example to its group."""
        if self.grouping is None:
            raise RuntimeError("no grouping yet: set `group_by` and fit with the callback first.")
        return self.grouping

    # ------------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        groups = None if self.grouping is None else self.grouping.assignment
        return dict(records=list(self.records), sums=dict(self.sums), n_train=self.n_train, dirpath=self._resolved_dir,
                    groups=groups, group_method=self.group_by)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.records = list(state_dict["records"])
        self.sums = dict(state_dict["sums"])
        self.n_train = state_dict["n_train"]
        self._resolved_dir = self.dirpath or state_dict["dirpath"]
        if state_dict.get("groups") is not None:
            self.grouping = Grouping(state_dict["groups"], state_dict["group_method"])

    # -------------------------------------------------------------------------------------------- subclass hooks
    def _featurize(self, x: Tensor, y: Tensor, key: tuple[int, ...], bounds: Tensor | None = None
                   ) -> dict[str, Tensor]:
        raise NotImplementedError

    def _finish(self, data: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def _train_side_of(self, stored: dict[str, Tensor]) -> Features:
        raise NotImplementedError

    def _combine(self, total: Tensor, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def _rows_self_influence(self) -> Tensor:
        raise NotImplementedError
