"""Batched Monte-Carlo estimators and exact ground truth for Shapley, Banzhaf and LIME attributions.

Every estimator follows one contract: ``estimator(game, x, num_samples, generator=None) -> Tensor (B, d, K)``,
reaching the model only through ``game(x, masks)`` and ``game.num_players``. ``num_samples`` is the budget of game
evaluations per example. Each carries ``.unbiased`` (bool), ``.target`` ("shapley" / "banzhaf" / "lime") and ``.name``.
"""

from lightning_attr.estimators._common import ESTIMATORS, Estimator, Game
from lightning_attr.estimators.banzhaf import banzhaf
from lightning_attr.estimators.exact import MAX_EXACT_PLAYERS, exact_banzhaf, exact_lime, exact_shapley, exact_values
from lightning_attr.estimators.kernel import kernel_shap, unbiased_kernel_shap
from lightning_attr.estimators.lime import lime
from lightning_attr.estimators.permutation import permutation_shapley

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Game",
    "MAX_EXACT_PLAYERS",
    "banzhaf",
    "exact_banzhaf",
    "exact_lime",
    "exact_shapley",
    "exact_values",
    "get_estimator",
    "kernel_shap",
    "lime",
    "permutation_shapley",
    "unbiased_kernel_shap",
]

EXACT_FOR_TARGET = {"shapley": exact_shapley, "banzhaf": exact_banzhaf, "lime": exact_lime}


def get_estimator(name: str) -> Estimator:
    """The registered estimator called ``name``; raises a ``ValueError`` listing the allowed names."""
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator `name`={name!r}; allowed: {sorted(ESTIMATORS)}.")
    return ESTIMATORS[name]
