"""lightning-attr: amortized feature attribution and training-data attribution for PyTorch Lightning."""

from lightning_attr import estimators
from lightning_attr.data import ImageDataModule, OracleDataModule, digits_dataset
from lightning_attr.estimators import get_estimator
from lightning_attr.games import PatchGame
from lightning_attr.modules import AmortizedExplainer, Classifier, create_timm_model

__version__ = "0.1.0"

__all__ = ["AmortizedExplainer", "Classifier", "ImageDataModule", "OracleDataModule", "PatchGame", "create_timm_model",
           "digits_dataset", "estimators", "get_estimator"]
