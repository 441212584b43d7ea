"""Batched Monte-Carlo estimators and exact ground truth for Shapley, Banzhaf and LIME attributions.

Every estimator follows one contract: ``estimator(game, x, num_samples, generator=None) -> Tensor (B, d, K)``,
reaching the model only through ``game(x, masks)`` and ``game.num_players``. ``num_samples`` is the budget of game
evaluations per example. Each carries ``.unbiased`` (bool), ``.target`` ("shapley" / "banzhaf" / "lime") and ``.name``.

Modules: :mod:`~lightning_attr.estimators.base` (the ``Game`` / ``Estimator`` protocols, the registry, input checks),
:mod:`~lightning_attr.estimators.sampling` (seeded draws, least-norm solves), then one module per family.
"""

from lightning_attr.estimators.banzhaf import banzhaf

# Importable here for existing callers, not advertised (their homes are base.py and exact.py).
from lightning_attr.estimators.base import ESTIMATORS, Estimator, Game, get_estimator  # noqa: F401, E402
from lightning_attr.estimators.exact import (  # noqa: F401, E402
    EXACT_FOR_TARGET,
    MAX_EXACT_PLAYERS,
    exact_banzhaf,
    exact_lime,
    exact_shapley,
    exact_values,
)
from lightning_attr.estimators.kernel import kernel_shap, unbiased_kernel_shap
from lightning_attr.estimators.lime import lime
from lightning_attr.estimators.permutation import permutation_shapley

__all__ = [
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
