"""Functional core of training-data attribution: per-example gradient features, projections, TracIn-CP, TRAK."""

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.grads import func_grads, plan_layers
from lightning_attr.influence.outputs import cross_entropy, get_output_fn, margin
from lightning_attr.influence.parameters import last_linear, select_parameters
from lightning_attr.influence.projector import CountSketch, KroneckerProjector, RandomProjector, mix_seed
from lightning_attr.influence.scores import (
    damped_inverse,
    inner,
    out_to_loss,
    self_inner,
    tracin_scores,
    tracin_self_influence,
    trak_kernel,
    trak_scores,
    trak_self_influence,
    xtx,
)
from lightning_attr.influence.topk import topk_blockwise

__all__ = ["CountSketch", "GradientFeaturizer", "KroneckerProjector", "RandomProjector", "cross_entropy", "damped_inverse",
           "func_grads", "get_output_fn", "inner", "last_linear", "margin", "mix_seed", "out_to_loss", "plan_layers",
           "select_parameters", "self_inner", "topk_blockwise", "tracin_scores", "tracin_self_influence",
           "trak_kernel", "trak_scores", "trak_self_influence", "xtx"]
