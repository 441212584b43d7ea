"""Data valuation: a batched logistic-regression utility (many small models fitted at once), Data Shapley /
distributional Data Shapley / Data Banzhaf estimators, the data they value and a DataModule of on-the-fly value
labels for :class:`~lightning_attr.modules.ValuationModel`."""

from lightning_attr.valuation.data import (
    DatasetSource,
    DigitsSource,
    SyntheticSource,
    ValuationData,
    ValuationSource,
)
from lightning_attr.valuation.datamodule import ValuationDataModule
from lightning_attr.valuation.labels import ValueOracle
from lightning_attr.valuation.logistic import ConvergenceError
from lightning_attr.valuation.utility import LogisticUtility

__all__ = ["ConvergenceError", "DatasetSource", "DigitsSource", "LogisticUtility", "SyntheticSource",
           "ValuationData", "ValuationDataModule", "ValuationSource", "ValueOracle"]
