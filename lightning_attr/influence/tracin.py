"""TracIn-CP (Pruthi et al., 2020) as an attribution method, and its functional form over stored checkpoints.

``score(z, z') = sum_c eta_c <grad l_c(z), grad l_c(z')>``; self-influence ``sum_c eta_c ||grad l_c(z)||^2``, with
``l`` the cross-entropy loss and ``eta_c`` the learning rate in effect at checkpoint ``c``. The engine folds
``sqrt(eta)`` of every parameter into its gradient features (``uses_lr``), so rows and queries carry it already.
A group's row is the gradient of its summed loss, so a group's score is the sum of its members' scores (exactly).
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor
from typing_extensions import override

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.grads import contract
from lightning_attr.influence.method import AttributionMethod, accumulate, register_method
from lightning_attr.influence.scores import Features, self_inner

__all__ = ["TracInMethod", "tracin_scores", "tracin_self_influence"]


@register_method
class TracInMethod(AttributionMethod):
    """TracIn-CP. With an exact last-layer featurizer the per-example rows are the factors ``(a, g)`` of
    ``G = g a^T`` (O(I + O) each); a group's row is its whole ``O x I`` gradient, flattened."""

    name = "tracin"
    output = "cross_entropy"
    uses_lr = True

    @override
    def featurize(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...],
                  bounds: Tensor | None = None, state: dict[str, Any] | None = None) -> dict[str, Tensor]:
        if not featurizer.last_layer:
            return {"features": featurizer(x, y, key, bounds)}
        a, g = featurizer.factors(x, y)
        if bounds is None:
            return {"a": a, "g": g}
        return {"features": contract(a.unsqueeze(1), g.unsqueeze(1), bounds).flatten(1)}

    @override
    def query_features(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...],
                       state: dict[str, Any] | None = None) -> Features:
        return featurizer.factors(x, y) if featurizer.last_layer else featurizer(x, y, key)

    @override
    def finish(self, rows: dict[str, Tensor], sizes: Tensor | None) -> dict[str, Tensor]:
        return {**rows, "self_influence": self_inner(self.train_side(rows))}

    @override
    def train_side(self, stored: dict[str, Tensor]) -> Features:
        return stored["features"] if "features" in stored else (stored["a"], stored["g"])

    @override
    def summary_terms(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"self": stored["self_influence"]}

    @override
    def combine(self, total: Tensor, summary: dict[str, Tensor], num_checkpoints: int, rows: slice = slice(None)
                ) -> Tensor:
        return total

    @override
    def self_influence(self, summary: dict[str, Tensor], num_checkpoints: int) -> Tensor:
        return summary["self"]


def _stored(features: Features) -> dict[str, Tensor]:
    return {"features": features} if isinstance(features, Tensor) else {"a": features[0], "g": features[1]}


def _rates(n: int, lrs: Sequence[float] | None) -> Sequence[float]:
    lrs = [1.0] * n if lrs is None else lrs
    if len(lrs) != n:
        raise ValueError(f"need one learning rate per checkpoint: {n} checkpoints, {len(lrs)} `lrs`.")
    return lrs


def tracin_scores(train: Sequence[Features], query: Sequence[Features], lrs: Sequence[float] | None = None) -> Tensor:
    """TracIn-CP scores (n_train, n_query): ``sum_c lr_c <train_c, query_c>`` (``lrs`` None: already folded in)."""
    if len(train) != len(query):
        raise ValueError(f"need one feature set per checkpoint: {len(train)} train, {len(query)} query.")
    method = TracInMethod()
    total = sum(lr * method.block(_stored(t), q) for t, q, lr in zip(train, query, _rates(len(train), lrs)))
    return method.combine(total, {}, len(train))


def tracin_self_influence(train: Sequence[Features], lrs: Sequence[float] | None = None) -> Tensor:
    """TracIn-CP self-influence (n,): ``sum_c lr_c ||grad l_c(z)||^2``."""
    method, summary = TracInMethod(), {}
    for t, lr in zip(train, _rates(len(train), lrs)):
        accumulate(summary, {k: lr * v for k, v in method.summary_terms(method.finish(_stored(t), None)).items()})
    return method.self_influence(summary, len(train))
