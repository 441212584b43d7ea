"""``TracIn(in_step=True)``: original TracIn accumulated from the user's own training steps (no attribution passes).

Per optimizer step: the learning rates and the tracked queries' gradients are read at the first micro-batch (weights
before the step), the selected layers' taps are armed for each training forward / backward, every micro-batch's
per-example contributions are computed after its backward, and they are committed once the optimizer step happened
(not for a step an AMP grad scaler skipped), gathered so every rank holds every example's sums.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_attr.callbacks.context import StrategyComm
from lightning_attr.callbacks.tracin import TracIn
from lightning_attr.data.indexed import unpack_batch
from lightning_attr.influence.groups import Grouping
from lightning_attr.influence.in_step import StepTaps, step_contributions
from lightning_attr.influence.isolation import isolated
from lightning_attr.influence.runner import Comm, to_module
from lightning_attr.influence.topk import TopK, topk_blockwise

__all__ = ["InStepTracIn"]


def _gather_rows(comm: Comm, *tensors: Tensor) -> list[Tensor]:
    """Concatenate every rank's rows of each tensor (ranks may hold different numbers of rows)."""
    if comm.world_size == 1:
        return list(tensors)
    counts = comm.all_gather(torch.tensor([len(tensors[0])], device=tensors[0].device)).flatten().tolist()
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros(max(counts) - len(t), *t.shape[1:])])
        gathered = comm.all_gather(padded)
        out.append(torch.cat([gathered[r, :c] for r, c in enumerate(counts)]))
    return out


class InStepTracIn(TracIn):
    """``TracIn(in_step=True, loss_reduction="mean")``; see :class:`TracIn`."""

    def __init__(self, *args: Any, in_step: bool = True, loss_reduction: str = "mean", **kwargs: Any) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"`loss_reduction` must be 'mean' or 'sum', got {loss_reduction!r}.")
        for name in ("every_n_steps", "at_fit_end", "group_by"):
            if kwargs.get(name):
                raise ValueError(f"`{name}`={kwargs[name]!r} does not apply to TracIn(in_step=True): it accumulates "
                                 "from every training step without passes, per example; use TracIn() for passes.")
        kwargs["prefix"] = kwargs.get("prefix") or "tracin_in_step"
        super(TracIn, self).__init__(*args, **kwargs)
        self.loss_reduction = loss_reduction
        self.taps: StepTaps | None = None
        self._contribs: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._step: dict[str, Any] | None = None  # set at the first micro-batch of an optimizer step
        self._lrs: dict[str, float] | None = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not pl_module.automatic_optimization:
            raise ValueError("TracIn(in_step=True) reads Lightning's automatic optimization (loss scaling by gradient "
                             "accumulation); with manual optimization use TracIn() passes.")
        data = self._data(trainer)
        att = self.attribution
        with isolated(pl_module):
            featurizer = att.bind(data.example(pl_module, self.keys))
        att.set_rows(Grouping.identity(len(data.dataset)))
        self.taps = StepTaps(featurizer)
        self.taps.attach()
        att.summary.setdefault("self", torch.zeros(att.n_train, dtype=torch.float64))

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        att = self.attribution
        if self._step is None:  # first micro-batch of an optimizer step: the weights before it
            self.rates.snap(trainer, pl_module)
            lrs = self.rates.of(list(att.featurizer.params))
            if lrs != self._lrs:  # scales change only when a scheduler changes the rates
                att.featurizer.set_scales({k: v**0.5 for k, v in lrs.items()})
                self._lrs = lrs
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self._step = dict(global_step=trainer.global_step, query=self._query_features(trainer, pl_module),
                              loss_scale=float(scaler.get_scale()) if scaler is not None else 1.0)
        self._index = unpack_batch(batch, **self.keys)[2]
        self.taps.armed = True

    def _query_features(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        queries = self.reporter.queries(trainer)
        if queries is None:
            return None
        with isolated(pl_module):
            qx, qy, _ = to_module(queries, pl_module)
            return self.method.query_features(self.attribution.featurizer, qx, qy, (0,))

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.taps is None or not self.taps.armed:
            return
        self.taps.armed = False
        b = len(self._index)
        scale = (b if self.loss_reduction == "mean" else 1) * trainer.accumulate_grad_batches / self._step["loss_scale"]
        if self.taps.take(torch.full((b,), float(scale))):
            sq, block = step_contributions(self.attribution.featurizer, b, self._step["query"])
            self._contribs.append((self._index.to(sq.device), sq, block))
        self.taps.clear()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.taps.armed = False
        if self._step is None or trainer.global_step == self._step["global_step"]:
            return  # accumulating gradients: the optimizer has not stepped yet
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        skipped = scaler is not None and float(scaler.get_scale()) < self._step["loss_scale"]
        if not skipped:
            self._commit(StrategyComm(trainer), pl_module.device)
        self._contribs, self._step = [], None

    def _commit(self, comm: Comm, device: torch.device) -> None:
        att, query = self.attribution, self._step["query"]
        m = 0 if query is None else len(query[0] if isinstance(query, tuple) else query)
        idx = torch.cat([p[0] for p in self._contribs]) if self._contribs else torch.zeros(0, dtype=torch.long, device=device)
        sq = torch.cat([p[1] for p in self._contribs]) if self._contribs else torch.zeros(0, device=device)
        block = torch.cat([p[2] for p in self._contribs]) if self._contribs and m else torch.zeros(len(idx), m, device=device)
        idx, sq, block = (t.cpu() for t in _gather_rows(comm, idx, sq, block))
        att.summary["self"].index_add_(0, idx, sq.double())
        if m:
            att.tracked = torch.zeros(att.n_train, m, dtype=torch.float64) if att.tracked is None else att.tracked
            att.tracked.index_add_(0, idx, block.double())

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.schedule.every_n_epochs and (trainer.current_epoch + 1) % self.schedule.every_n_epochs == 0:
            self._publish(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.taps.detach()
        self._publish(trainer)

    def _publish(self, trainer: L.Trainer) -> None:
        self.attribution.save(StrategyComm(trainer))
        if trainer.is_global_zero:
            self.metrics = self.reporter.report(trainer, self.attribution, self.prefix,
                                                f"step{trainer.global_step:06d}", self._data(trainer).dataset)

    @override
    def scores(self, query: DataLoader | Dataset | None = None, *args: Any, **kwargs: Any) -> Tensor:
        """Scores (n_train, m) of the queries tracked during training (``query`` must be None)."""
        if query is not None:
            raise ValueError("TracIn(in_step=True) keeps scores only for the queries tracked during training "
                             "(`query_data` / `num_queries`); call scores() without a query, or use TracIn() passes.")
        return self._results().tracked_scores()

    @override
    def topk(self, query: DataLoader | Dataset | None = None, k: int = 10, *args: Any, **kwargs: Any) -> TopK:
        scores = self.scores(query)
        return topk_blockwise(lambda a, b: scores[a:b], scores.shape[0], k)
