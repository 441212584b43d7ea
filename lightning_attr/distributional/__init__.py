"""Distributional training data attribution (d-TDA, arXiv 2506.12965).

``unrolled``: forward-mode unrolled differentiation of torch.optim.SGD training (the response ``r = d theta / d
epsilon`` of down-weighting tracked examples, and the predicted change ``grad m^T r`` of measurements; the math, sign
and 1/N are written there); ``reverse``: reverse mode, the adjoint sweep over a recorded run for every example at
once; ``recording``: that record gathered from data-parallel processes and the sweep shared out over them;
``measurements``: what is measured (query losses, logits, the same on items of a data split bound at fit start, any
function of the weights); ``tracking``: forward mode inside a training loop (row weights, steps summed over processes,
batch statistics, determinism checks, the responses file); ``optimizers``: the SGD settings both follow and
torch.optim.SGD's step as a function; ``statistics``: mean / variance / Wasserstein-2 / quantile influence from coupled
per-seed samples; ``results``: one run's result on disk; ``influence_function``: the per-seed influence function's
result; ``ensemble``: one run per seed (sequential, processes or Ray); ``aggregate``: the distributional influence of
the finished seeds; ``reporting``: the aggregate in W&B. The names below are the public surface; the modules hold the
rest.
"""

from lightning_attr.distributional.aggregate import DistributionalInfluence
from lightning_attr.distributional.ensemble import EnsembleReport, SeedEnsemble, parse_seeds
from lightning_attr.distributional.measurements import (
    FunctionMeasurement,
    Measurement,
    Measurements,
    QueryLogits,
    QueryLosses,
    SplitLogits,
    SplitLosses,
    as_measurement,
)
from lightning_attr.distributional.optimizers import (
    SGDHyperparameters,
    hyperparameters_by_name,
    momentum_buffers_by_name,
    sgd_hyperparameters,
)
from lightning_attr.distributional.reporting import log_to_wandb
from lightning_attr.distributional.results import RunResult, read_run_result, write_run_result
from lightning_attr.distributional.reverse import RecordedBatch, Trajectory, replay, replay_divergence, reverse_sweep
from lightning_attr.distributional.statistics import (
    mean_influence,
    quantile_influence,
    variance_influence,
    wasserstein_influence,
)
from lightning_attr.distributional.tracking import load_responses
from lightning_attr.distributional.unrolled import (
    ForwardResponse,
    LossFn,
    MicroBatch,
    forward_step,
    measurement_jacobian,
    predict_change,
)

__all__ = ["DistributionalInfluence", "EnsembleReport", "ForwardResponse", "FunctionMeasurement", "LossFn",
           "Measurement", "Measurements", "MicroBatch", "QueryLogits", "QueryLosses", "RecordedBatch", "RunResult",
           "SGDHyperparameters", "SeedEnsemble", "SplitLogits", "SplitLosses", "Trajectory", "as_measurement",
           "forward_step", "hyperparameters_by_name", "load_responses", "log_to_wandb", "mean_influence",
           "measurement_jacobian", "momentum_buffers_by_name", "parse_seeds", "predict_change", "quantile_influence",
           "read_run_result", "replay", "replay_divergence", "reverse_sweep", "sgd_hyperparameters",
           "variance_influence", "wasserstein_influence", "write_run_result"]
