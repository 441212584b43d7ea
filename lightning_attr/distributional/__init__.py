"""Distributional training data attribution (d-TDA, arXiv 2506.12965): the functional core.

``unrolled``: forward-mode unrolled differentiation of torch.optim.SGD training (the response ``r = d theta / d
epsilon`` of down-weighting tracked examples, and the predicted change ``grad m^T r`` of measurements);
``reverse``: reverse mode, the adjoint sweep over a recorded run for every example at once; ``recording``: that record
gathered from data-parallel processes and the sweep shared out over them; ``measurements``: what is measured
(query losses, logits, the same on items of a data split bound at fit start, any function of the weights); ``tracking``: forward mode inside a training loop (row weights,
steps summed over processes, batch statistics, determinism checks, the responses file); ``optimizers``: the SGD
settings both follow and torch.optim.SGD's step as a function; ``statistics``: mean / variance / Wasserstein-2 /
quantile influence from coupled per-seed samples; ``influence_function``: the per-seed influence function's result
(``change = scores / N`` on query losses).
"""

from lightning_attr.distributional.aggregate import DistributionalInfluence
from lightning_attr.distributional.ensemble import EnsembleReport, SeedEnsemble, SeedOutcome, parse_seeds, run_seed
from lightning_attr.distributional.influence_function import (
    IF_METHOD,
    check_loss_measurement,
    influence_run_result,
    loss_queries,
)
from lightning_attr.distributional.measurements import (
    LOSSES,
    FunctionMeasurement,
    Measurement,
    Measurements,
    QueryLogits,
    QueryLosses,
    SplitLogits,
    SplitLosses,
    SplitQueries,
    as_measurement,
    measure_change,
    measure_value,
    per_example_loss,
    value_and_jacobian,
)
from lightning_attr.distributional.optimizers import (
    SGDHyperparameters,
    hyperparameters_by_name,
    momentum_buffers_by_name,
    sgd_hyperparameters,
    sgd_step,
)
from lightning_attr.distributional.recording import AllGather, gather_step, measurement_shares, sweep_in_shares
from lightning_attr.distributional.reporting import log_to_wandb
from lightning_attr.distributional.reverse import (
    Checkpoint,
    DataFn,
    RecordedBatch,
    RecordedStep,
    ReplayState,
    Trajectory,
    adjoint_step,
    replay,
    replay_divergence,
    reverse_sweep,
)
from lightning_attr.distributional.statistics import (
    mean_influence,
    quantile_influence,
    variance_influence,
    wasserstein_influence,
)
from lightning_attr.distributional.tracking import (
    RESPONSES_FILE,
    batch_statistics,
    check_deterministic,
    load_responses,
    micro_batch,
    save_responses,
    step_responses,
    trained_parameters,
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
           "variance_influence", "wasserstein_influence",
           "Checkpoint", "DataFn", "RecordedBatch", "RecordedStep", "ReplayState", "Trajectory", "adjoint_step",
           "momentum_buffers_by_name", "replay", "reverse_sweep", "sgd_step",
           "DistributionalInfluence", "EnsembleReport", "SeedEnsemble", "SeedOutcome", "parse_seeds", "run_seed",
           "LOSSES", "FunctionMeasurement", "Measurement", "Measurements", "QueryLogits", "QueryLosses", "SplitLogits",
           "SplitLosses", "SplitQueries", "as_measurement",
           "measure_change", "measure_value", "per_example_loss", "value_and_jacobian",
           "RESPONSES_FILE", "batch_statistics", "check_deterministic", "load_responses", "micro_batch",
           "save_responses", "step_responses", "trained_parameters",
           "AllGather", "gather_step", "measurement_shares", "replay_divergence", "sweep_in_shares",
           "IF_METHOD", "check_loss_measurement", "influence_run_result", "loss_queries", "log_to_wandb"]
