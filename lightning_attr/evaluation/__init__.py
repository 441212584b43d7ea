"""Evaluation: functions a benchmark, the demo or a test calls to score attributions against ground truth.

:mod:`~lightning_attr.evaluation.features` scores feature attributions (error vs exact values, equal-error compute);
:mod:`~lightning_attr.evaluation.data` scores training-data attributions (LDS, noisy-label recall, pruning curves);
:mod:`~lightning_attr.evaluation.valuation` scores data values (amortized vs per-point Monte Carlo);
:mod:`~lightning_attr.evaluation.retrain` retrains a LightningModule on subsets (cached) for the LDS.
"""

from lightning_attr.evaluation.data import (
    lds,
    noisy_label_recall,
    prune_groups,
    pruning_curve,
    random_subsets,
    recall_at,
)
from lightning_attr.evaluation.features import (
    amortized_row,
    attribution_errors,  # noqa: F401, E402  (importable, not advertised)
    break_even,
    equal_error_budget,
    evaluations_per_example,
    inference_seconds,
    oracle_rate,
    per_example_curve,
)
from lightning_attr.evaluation.retrain import SubsetRetrainer, target_losses
from lightning_attr.evaluation.valuation import (
    fit_valuation_model,
    monte_carlo_values,
    predict_values,
    value_scores,
)

__all__ = [
    "fit_valuation_model",
    "monte_carlo_values",
    "predict_values",
    "value_scores",
    "per_example_curve",
    "amortized_row",
    "equal_error_budget",
    "break_even",
    "inference_seconds",
    "evaluations_per_example",
    "oracle_rate",
    "lds",
    "random_subsets",
    "noisy_label_recall",
    "recall_at",
    "prune_groups",
    "pruning_curve",
    "SubsetRetrainer",
    "target_losses",
]
