"""A grouping request (``GroupSpec``) and the per-example inputs its grouper needs, read in one pass
(``grouper_rows``): labels, penultimate embeddings, last-layer gradients, or a user column."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.groups import GROUPERS, Grouping, make_grouping
from lightning_attr.influence.parameters import last_linear
from lightning_attr.influence.runner import AttributionData, Comm, PassRunner

__all__ = ["GroupSpec", "grouper_rows"]


@dataclass
class GroupSpec:
    """How to group training examples (GGDA): ``by`` one of ``GROUPERS`` (None: single examples, the identity
    grouping), sized by ``num_groups`` or ``group_size``; ``column``: the batch key of ``by="column"``; ``seed``."""

    by: str | None = None
    num_groups: int | None = None
    group_size: int | None = None
    column: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.by is None:
            return
        if self.by not in GROUPERS:
            raise ValueError(f"`group_by`={self.by!r} is not one of {GROUPERS} (or None for per-example).")
        if self.by == "column" and not self.column:
            raise ValueError("`group_by='column'` needs `group_column`, the batch key holding each example's group.")
        if self.by not in ("class", "column") and (self.num_groups is None) == (self.group_size is None):
            raise ValueError(f"`group_by`={self.by!r} needs exactly one of `num_groups` and `group_size`.")

    @property
    def needs_inputs(self) -> bool:
        return self.by not in (None, "random")

    def rows(self, runner: PassRunner, data: AttributionData, module: nn.Module, comm: Comm,
             progress: Callable | None = None) -> Grouping:
        """The rows of a run over ``data``: single examples, or the groups the grouper makes from one pre-pass of
        ``runner`` (every rank computes the same grouping)."""
        n, inputs = len(data.dataset), {}
        if self.needs_inputs:
            head = last_linear(module, data.example(module, runner.keys)) if self.by.endswith("kmeans") else None
            inputs = runner.run(data, Grouping.identity(n), grouper_rows(self, module, head), module, comm,
                                progress=progress, name="grouping")
        return self.make(n, inputs)

    def make(self, n: int, inputs: dict[str, Tensor]) -> Grouping:
        """The grouping of ``n`` examples from the gathered ``grouper_rows`` (n, ...)."""
        if self.by is None:
            return Grouping.identity(n)
        return make_grouping(self.by, n, self.num_groups, self.group_size, self.seed, labels=inputs.get("labels"),
                             features=inputs.get("features"), column=inputs.get("column"))


def _column(batch: Any, column: str, b: int) -> Tensor:
    if not isinstance(batch, dict) or column not in batch:
        raise ValueError(f"`group_column`={column!r} is not a key of the batches "
                         f"({sorted(batch) if isinstance(batch, dict) else type(batch).__name__}).")
    values = torch.as_tensor(batch[column])
    if values.dtype.is_floating_point or values.shape != (b,):
        raise ValueError(f"`group_column`={column!r} must hold one integer per example, got dtype {values.dtype}, "
                         f"shape {tuple(values.shape)}.")
    return values


def grouper_rows(spec: GroupSpec, module: nn.Module, head: str | None) -> Callable[..., dict[str, Tensor]]:
    """A row function ``(x, y, bounds, batch) -> {"labels", "features" | "column"}`` for the runner: ``features`` are the
    classifier layer ``head``'s inputs (``embedding_kmeans``) or its per-example loss gradients ``g a^T``, flattened
    (``gradient_kmeans``)."""
    grads = GradientFeaturizer(module, last_layer=head) if spec.by == "gradient_kmeans" else None
    layer = dict(module.named_modules())[head] if spec.by == "embedding_kmeans" else None

    def rows(x: Tensor, y: Tensor, bounds: Tensor | None, batch: Any) -> dict[str, Tensor]:
        out = {"labels": y.long()}
        if layer is not None:
            seen: list[Tensor] = []
            handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().flatten(1)))
            try:
                with torch.no_grad():
                    module(x)
            finally:
                handle.remove()
            out["features"] = seen[-1].float()
        elif grads is not None:
            a, g = grads.factors(x, y)
            out["features"] = torch.einsum("bo,bi->boi", g, a).flatten(1)
        if spec.by == "column":
            out["column"] = _column(batch, spec.column, len(y)).to(y.device)
        return out

    return rows
