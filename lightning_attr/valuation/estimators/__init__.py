"""Data-valuation estimators: permutation Data Shapley, distributional Data Shapley, Data Banzhaf (MSR), and exact
values by enumeration. The contract and registry are in :mod:`~lightning_attr.valuation.estimators.base`."""

from lightning_attr.valuation.estimators.banzhaf import data_banzhaf
from lightning_attr.valuation.estimators.base import VALUATION_ESTIMATORS, get_valuation_estimator
from lightning_attr.valuation.estimators.distributional import DEFAULT_CARDINALITY, distributional_shapley
from lightning_attr.valuation.estimators.exact import MAX_EXACT_POINTS, exact_data_values
from lightning_attr.valuation.estimators.permutation import permutation_shapley

__all__ = ["DEFAULT_CARDINALITY", "MAX_EXACT_POINTS", "VALUATION_ESTIMATORS", "data_banzhaf",
           "distributional_shapley", "exact_data_values", "get_valuation_estimator", "permutation_shapley"]
