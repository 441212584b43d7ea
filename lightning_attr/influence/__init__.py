"""Data attribution: the functional core (per-example gradient features, projections, the TracIn / TRAK formulas)
and the engine (methods as objects, the pass runner, the results store, the ``Attribution`` front object).

Layers: ``features`` / ``grads`` / ``projector`` / ``scores`` compute; ``method`` (the ``AttributionMethod`` contract)
with ``tracin`` / ``trak`` say what a method does with features; ``runner`` / ``store`` / ``attribution`` run passes,
keep their files and answer queries. The Lightning callbacks in :mod:`lightning_attr.callbacks` only decide when.
"""

from lightning_attr.influence.attribute import attribute
from lightning_attr.influence.attribution import Attribution
from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.grouping_pass import GroupSpec
from lightning_attr.influence.groups import Grouping, make_grouping
from lightning_attr.influence.influence_function import InfluenceFunctionMethod, influence_scores
from lightning_attr.influence.method import METHODS, AttributionMethod, register_method
from lightning_attr.influence.outputs import cross_entropy, margin  # noqa: F401
from lightning_attr.influence.parameters import last_linear, select_parameters  # noqa: F401
from lightning_attr.influence.projector import CountSketch, KroneckerProjector, RandomProjector  # noqa: F401
from lightning_attr.influence.scores import damped_inverse, inner, out_to_loss, self_inner, trak_kernel, xtx  # noqa: F401
from lightning_attr.influence.topk import TopK, topk_blockwise  # noqa: F401
from lightning_attr.influence.tracin import TracInMethod, tracin_scores, tracin_self_influence
from lightning_attr.influence.trak import TRAKMethod, trak_scores, trak_self_influence

__all__ = ["Attribution", "AttributionMethod", "GradientFeaturizer", "GroupSpec", "Grouping", "InfluenceFunctionMethod",
           "METHODS", "TRAKMethod", "TopK", "TracInMethod", "attribute", "influence_scores", "make_grouping",
           "register_method", "tracin_scores", "tracin_self_influence", "trak_scores", "trak_self_influence"]
