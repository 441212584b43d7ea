"""The contract every data-attribution method implements, and the registry the results loader builds them from.

The engine runs every method the same way. At checkpoint ``c`` a pass computes ``featurize`` for every row (a
training example, or a group of them through segment ``bounds``: the gradient of the group's summed output), sums the
rows of a group's members (averaging the ``mean_keys``), and ``finish`` turns them into the tensors stored for ``c``.
Across checkpoints the engine sums ``summary_terms(stored_c)`` per row and ``block(stored_c, query_c)`` per
(row, query); ``self_influence`` and ``combine`` turn those sums into the method's numbers. The callbacks, the results
loader and the functional ``tracin_scores`` / ``trak_scores`` all call these methods: one formula in one place.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

from torch import Tensor

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.scores import Features, inner

__all__ = ["AttributionMethod", "METHODS", "register_method", "build_method", "accumulate"]

METHODS: dict[str, type["AttributionMethod"]] = {}


def register_method(cls: type["AttributionMethod"]) -> type["AttributionMethod"]:
    """Class decorator: make ``cls`` loadable by its ``name`` (stored results name their method)."""
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, config: dict[str, Any]) -> "AttributionMethod":
    """The registered method ``name`` built from its ``config()``."""
    if name not in METHODS:
        raise ValueError(f"unknown attribution method {name!r}; registered: {sorted(METHODS)}.")
    return METHODS[name](**config)


class AttributionMethod(ABC):
    """One data-attribution method: per-row features, stored tensors, accumulation over checkpoints, scores.

    Class attributes: ``name`` (registry key and file prefix), ``output`` (what the featurizer differentiates:
    ``"cross_entropy"`` or ``"margin"``), ``uses_lr`` (features carry ``sqrt(learning rate)`` per parameter),
    ``mean_keys`` (row tensors averaged, not summed, over a group's members).
    """

    name: ClassVar[str]
    output: ClassVar[str] = "cross_entropy"
    uses_lr: ClassVar[bool] = False
    mean_keys: ClassVar[tuple[str, ...]] = ()

    fit_samples: int | None = None  # training examples ``fit_state`` reads (None: all)
    has_self_influence: bool = True

    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored with the results so ``build_method(name, config)`` rebuilds the method."""
        return {}

    def fit_state(self, featurizer: GradientFeaturizer, total: Callable[..., dict[str, Tensor]]) -> dict[str, Tensor]:
        """What a checkpoint needs before its pass (e.g. curvature), from ``total(fn)``: sums of ``fn(x, y, index)``
        over the training data and all ranks, with the example ``count``. Stored with the checkpoint and handed to
        ``featurize`` / ``query_features`` as ``state``. Default: nothing."""
        return {}

    @abstractmethod
    def featurize(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...],
                  bounds: Tensor | None = None, state: dict[str, Any] | None = None) -> dict[str, Tensor]:
        """Row tensors of a batch: (B, ...) per example, or (R, ...) per segment of ``bounds`` (R + 1,)."""

    def query_features(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...],
                       state: dict[str, Any] | None = None) -> Features:
        """Features (m, ...) of query examples at the checkpoint ``key`` seeds (same projection as the train side)."""
        return featurizer(x, y, key)

    @abstractmethod
    def finish(self, rows: dict[str, Tensor], sizes: Tensor | None) -> dict[str, Tensor]:
        """A pass's rows (n_rows, ...) -> the tensors stored for the checkpoint. ``sizes`` (n_rows,): group sizes
        (None for single examples)."""

    @abstractmethod
    def train_side(self, stored: dict[str, Tensor]) -> Features:
        """The stored train features (n_rows, ...) that queries are scored against."""

    def block(self, stored: dict[str, Tensor], query: Features, rows: slice = slice(None)) -> Tensor:
        """One checkpoint's contribution (rows, m) to the score sums."""
        train = self.train_side(stored)
        train = train[rows] if isinstance(train, Tensor) else tuple(t[rows] for t in train)
        return inner(train, query)

    @abstractmethod
    def summary_terms(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-row terms (n_rows,) of one checkpoint, summed over checkpoints into the summary."""

    @abstractmethod
    def combine(self, total: Tensor, summary: dict[str, Tensor], num_checkpoints: int, rows: slice = slice(None)
                ) -> Tensor:
        """Scores (rows, m) from ``total``, the sum of ``block`` over checkpoints."""

    @abstractmethod
    def self_influence(self, summary: dict[str, Tensor], num_checkpoints: int) -> Tensor:
        """Self-influence (n_rows,) from the summary."""


def accumulate(summary: dict[str, Tensor], terms: dict[str, Tensor]) -> None:
    """``summary[k] += terms[k]`` (creating missing keys) in place."""
    for k, v in terms.items():
        summary[k] = summary[k] + v if k in summary else v
