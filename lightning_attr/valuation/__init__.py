"""Data valuation: a batched logistic-regression utility (many small models fitted at once), Data Shapley /
distributional Data Shapley / Data Banzhaf estimators, and the data they value."""

from lightning_attr.valuation.logistic import ConvergenceError
from lightning_attr.valuation.utility import LogisticUtility

__all__ = ["ConvergenceError", "LogisticUtility"]
