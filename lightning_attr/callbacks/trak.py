"""TRAK as a Lightning callback: projected margin gradients, a damped kernel per checkpoint, ensembled."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_attr.callbacks.influence import InfluenceCallback
from lightning_attr.influence.method import AttributionMethod
from lightning_attr.influence.trak import TRAKMethod

__all__ = ["TRAK"]


class TRAK(InfluenceCallback):
    """TRAK ensembled over the checkpoints the passes see (Park et al., 2023); see :mod:`lightning_attr.influence.trak`
    for the formula.

    Takes every argument of :class:`TracIn` except ``in_step`` (``last_layer`` selects the classifier's parameters and
    projects their gradients like any others) plus ``damping`` (default 1e-3, relative to the mean diagonal of
    ``X^T X``). ``proj_dim=None`` keeps exact gradients (then ``X^T X`` is num_params x num_params: tiny models only).
    With ``group_by``, rows are groups (features of the group's summed margin; not additive: measure fidelity).
    """

    method_class = TRAKMethod

    def __init__(self, *args: Any, damping: float = 1e-3, **kwargs: Any) -> None:
        self.damping = damping
        super().__init__(*args, **kwargs)

    @override
    def make_method(self) -> AttributionMethod:
        return TRAKMethod(self.damping)
