"""One attribution pass: a row function over the attribution data, one row per group (per example for the identity
grouping), sharded over ranks, summed per row and all-reduced; the unaugmented input batches are kept between passes.

No Lightning here: the collectives come in as a :class:`Comm` (the callbacks adapt the Trainer's strategy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from lightning_attr.data.indexed import unpack_batch
from lightning_attr.influence.batching import group_batches, segments
from lightning_attr.influence.groups import Grouping

__all__ = ["Comm", "LocalComm", "AttributionData", "PassRunner", "RowFn", "check_ordered", "to_module", "data_total"]

RowFn = Callable[[Tensor, Tensor, "Tensor | None", Any], dict[str, Tensor]]  # (x, y, bounds, batch) -> rows


class Comm(Protocol):
    """The collectives a pass needs; every rank calls them in the same order."""

    world_size: int
    rank: int

    def all_reduce_sum(self, t: Tensor) -> Tensor: ...

    def all_gather(self, t: Tensor) -> Tensor: ...  # (world_size, *t.shape)

    def broadcast(self, obj: Any) -> Any: ...


class LocalComm:
    """A single process."""

    world_size, rank = 1, 0

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def all_gather(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0)

    def broadcast(self, obj: Any) -> Any:
        return obj


def check_ordered(loader: DataLoader, argument: str) -> None:
    """Refuse a DataLoader whose batches are not in dataset order (results are returned in that order)."""
    sampler = loader.batch_sampler.sampler if isinstance(loader.batch_sampler, BatchSampler) else loader.batch_sampler
    if not isinstance(sampler, SequentialSampler):
        raise ValueError(f"`{argument}` is a DataLoader over a {type(sampler).__name__} (shuffled or reordered); results "
                         "come back in dataset order only from an unshuffled loader: pass the Dataset, or a DataLoader "
                         "with shuffle=False and no custom sampler.")


@dataclass
class AttributionData:
    """The data a pass reads: a map-style ``dataset`` whose items carry their own position as ``index``."""

    dataset: Dataset
    batch_size: int = 64
    collate_fn: Callable | None = None
    num_workers: int = 0

    @classmethod
    def of(cls, data: Dataset | DataLoader, batch_size: int | None, argument: str) -> "AttributionData":
        """From a Dataset, or from an unshuffled DataLoader (its collate_fn, workers and batch size are kept)."""
        if isinstance(data, DataLoader):
            check_ordered(data, argument)
            return cls(data.dataset, batch_size or data.batch_size or 64, data.collate_fn, data.num_workers)
        return cls(data, batch_size or 64)

    def example(self, module: nn.Module, keys: dict[str, str]) -> Tensor:
        """The inputs (1, ...) of the first item, ready for ``module``."""
        return unpack_batch(to_module(next(iter(self.loader([[0]]))), module), **keys)[0]

    def loader(self, batches: list[list[int]]) -> DataLoader:
        kw = {} if self.collate_fn is None else {"collate_fn": self.collate_fn}
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers, **kw)


def to_module(batch: Any, module: nn.Module) -> Any:
    """``batch`` on the module's device, floating tensors in its parameters' dtype (e.g. ``bf16-true`` weights)."""
    p = next(module.parameters())

    def move(t: Any) -> Any:
        if isinstance(t, Tensor):
            return t.to(p.device, p.dtype) if t.is_floating_point() else t.to(p.device)
        if isinstance(t, dict):
            return {k: move(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(move(v) for v in t) if not hasattr(t, "_fields") else type(t)(*(move(v) for v in t))
        return t

    return move(batch)


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, dict):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            yield from _tensors(v)


class PassRunner:
    """Runs row functions over the attribution data, one row per group of a :class:`Grouping`.

    Args:
        keys: ``input_key`` / ``label_key`` / ``index_key`` of dict batches (tuple batches: ``(x, y, ..., index)``).
        cache_inputs_mb: keep the batches of a pass in memory after it while they fit (0: never); the next pass with
            the same batches reads them from memory (the attribution data is unaugmented, so they are the same).
    """

    def __init__(self, keys: dict[str, str] | None = None, cache_inputs_mb: float = 512.0) -> None:
        self.keys = dict(keys or {})
        self.cache_inputs_mb = cache_inputs_mb
        self.cache: dict[str, tuple[list[list[int]], list]] = {}

    def batches(self, data: AttributionData, plan: list[list[int]], name: str) -> Iterator[tuple[list[int], Any]]:
        """``(positions, batch)`` of ``plan`` (lists of positions), from the cache when an earlier pass kept the same
        plan."""
        if name in self.cache and self.cache[name][0] == plan:
            yield from zip(plan, self.cache[name][1])
            return
        kept: list | None = [] if self.cache_inputs_mb > 0 else None
        size = 0
        for positions, batch in zip(plan, data.loader(plan) if plan else ()):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in _tensors(batch))
                if size <= self.cache_inputs_mb * 2**20:
                    kept.append(batch)
                else:
                    kept = None
            yield positions, batch
        if kept is not None:
            self.cache[name] = (plan, kept)

    def run(self, data: AttributionData, grouping: Grouping, row_fn: RowFn, module: nn.Module, comm: Comm,
            mean_keys: tuple[str, ...] = (), progress: Callable[[Iterable, int], Iterable] | None = None,
            name: str = "pass") -> dict[str, Tensor]:
        """Rows (num_groups, ...) on the CPU: ``row_fn`` summed over each group's members (``mean_keys`` averaged)."""
        plan = group_batches(grouping.assignment, data.batch_size, comm.world_size, comm.rank)
        stream: Iterable = self.batches(data, plan, name)
        if progress is not None:
            stream = progress(stream, len(plan))
        sums: dict[str, Tensor] = {}
        counts = torch.zeros(grouping.num_groups, dtype=torch.float64)
        for positions, batch in stream:
            self._add(sums, counts, grouping, row_fn, module, positions, batch)
        if not plan:  # this rank owns no group: rows of one example, zeroed, give the collectives their shapes
            self._add(sums, counts, grouping, row_fn, module, [0], next(iter(data.loader([[0]]))), weight=0.0)
        sums = {k: comm.all_reduce_sum(v) for k, v in sums.items()}
        counts = comm.all_reduce_sum(counts.to(next(iter(sums.values())).device)).cpu()
        if not torch.equal(counts.long(), grouping.sizes):
            raise RuntimeError("the attribution pass did not see every example exactly once; is `index` stable?")
        sizes = grouping.sizes.double()
        return {k: (v.cpu() / sizes.view(-1, *[1] * (v.dim() - 1)).to(v.dtype) if k in mean_keys else v.cpu())
                for k, v in sums.items()}

    def total(self, data: AttributionData, fn: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]],
              module: nn.Module, comm: Comm, positions: list[int] | None = None,
              progress: Callable[[Iterable, int], Iterable] | None = None, name: str = "total") -> dict[str, Tensor]:
        """Sums over the examples at ``positions`` (default: all) of ``fn(x, y, index)`` (each a dict of sums over
        its batch), sharded over ranks and all-reduced (float64), with ``count``: the number of examples read."""
        positions = list(range(len(data.dataset))) if positions is None else sorted(positions)
        mine = positions[comm.rank :: comm.world_size]
        plan = [mine[i : i + data.batch_size] for i in range(0, len(mine), data.batch_size)]
        stream: Iterable = self.batches(data, plan, name)
        sums: dict[str, Tensor] = {}
        for where, batch in progress(stream, len(plan)) if progress else stream:
            self._sum_batch(sums, fn, module, where, batch)
        if not plan:  # this rank reads nothing: one example, zeroed, gives the collectives their shapes
            self._sum_batch(sums, fn, module, positions[:1], next(iter(data.loader([positions[:1]]))), weight=0.0)
        sums["count"] = torch.tensor(float(len(mine)), dtype=torch.float64, device=next(iter(sums.values())).device)
        return {k: comm.all_reduce_sum(sums[k]).cpu() for k in sorted(sums)}

    def _sum_batch(self, sums: dict[str, Tensor], fn: Callable, module: nn.Module, positions: list[int], batch: Any,
                   weight: float = 1.0) -> None:
        _, x, y, idx = self._unpack(batch, module, positions)
        for k, v in fn(x, y, idx).items():
            v = v.detach().double() * weight
            sums[k] = sums[k] + v if k in sums else v

    def _unpack(self, batch: Any, module: nn.Module, positions: list[int]) -> tuple[Any, Tensor, Tensor, Tensor]:
        """``(batch, x, y, index)`` on the module's device; raises when an item's ``index`` is not its position."""
        batch = to_module(batch, module)
        x, y, idx = unpack_batch(batch, **self.keys)
        if idx.tolist() != positions:
            bad = next(i for i, (a, b) in enumerate(zip(idx.tolist(), positions)) if a != b)
            raise ValueError(f"the item at position {positions[bad]} of the attribution data carries index "
                             f"{idx.tolist()[bad]}: every item's `index` must be its position in the dataset (wrap the "
                             "dataset in `lightning_attr.data.IndexedDataset`).")
        return batch, x, y, idx

    def _add(self, sums: dict[str, Tensor], counts: Tensor, grouping: Grouping, row_fn: RowFn, module: nn.Module,
             positions: list[int], batch: Any, weight: float = 1.0) -> None:
        """Add one batch's rows (``weight`` 0: only their shapes) into ``sums`` and its members into ``counts``."""
        batch, x, y, idx = self._unpack(batch, module, positions)
        ids = grouping.assignment[idx.cpu()]
        bounds, rows = (None, ids) if grouping.is_identity else segments(ids)
        for k, v in row_fn(x, y, bounds, batch).items():
            v = torch.zeros_like(v) if weight == 0 else v.detach()
            if k not in sums:
                sums[k] = v.new_zeros(grouping.num_groups, *v.shape[1:])
            sums[k].index_add_(0, rows.to(v.device), v)
        seg = torch.ones(len(ids), dtype=torch.float64) if bounds is None else bounds.diff().double()
        counts.index_add_(0, rows, seg * weight)


def data_total(runner: PassRunner, data: AttributionData, module: nn.Module, comm: Comm, samples: int | None = None,
               seed: int = 0, progress: Callable[[Iterable, int], Iterable] | None = None
               ) -> Callable[[Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]], dict[str, Tensor]]:
    """``total(fn)``: sums of ``fn(x, y, index)`` over the training data, or over a seeded random subset of
    ``samples`` examples (the same subset every call), across all ranks of ``comm``."""
    n = len(data.dataset)
    positions = None
    if samples is not None and samples < n:
        positions = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples].sort().values.tolist()
    return lambda fn: runner.total(data, fn, module, comm, positions, progress, name="curvature")
