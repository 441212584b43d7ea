"""Distributional training data attribution (d-TDA, arXiv 2506.12965): the functional core.

``unrolled``: forward-mode unrolled differentiation of torch.optim.SGD training (the response ``r = d theta / d
epsilon`` of down-weighting tracked examples, and the predicted change ``grad m^T r`` of measurements);
``optimizers``: the SGD settings it follows; ``statistics``: mean / variance / Wasserstein-2 / quantile influence from
coupled per-seed samples.
"""

from lightning_attr.distributional.optimizers import SGDHyperparameters, hyperparameters_by_name, sgd_hyperparameters
from lightning_attr.distributional.statistics import (
    mean_influence,
    quantile_influence,
    variance_influence,
    wasserstein_influence,
)
from lightning_attr.distributional.unrolled import (
    ForwardResponse,
    LossFn,
    MicroBatch,
    forward_step,
    measurement_jacobian,
    predict_change,
)

__all__ = ["ForwardResponse", "LossFn", "MicroBatch", "SGDHyperparameters", "forward_step", "hyperparameters_by_name",
           "mean_influence", "measurement_jacobian", "predict_change", "quantile_influence", "sgd_hyperparameters",
           "variance_influence", "wasserstein_influence"]
