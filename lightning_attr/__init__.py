"""lightning-attr: amortized feature attribution and training-data attribution for PyTorch Lightning."""

# Importable for existing callers, not advertised: use ``lightning_attr.estimators`` / ``lightning_attr.data``.
from lightning_attr import estimators  # noqa: F401, E402
from lightning_attr.data import (
    AugmentedImageDataModule,
    ImageDataModule,
    OracleDataModule,
    digits_dataset,  # noqa: F401, E402
)
from lightning_attr.estimators import get_estimator  # noqa: F401, E402
from lightning_attr.games import PatchGame
from lightning_attr.modules import AmortizedExplainer, Classifier, ValuationModel, create_timm_model
from lightning_attr.valuation import ValuationDataModule

__version__ = "0.1.0"

__all__ = ["AmortizedExplainer", "AugmentedImageDataModule", "Classifier", "ImageDataModule", "OracleDataModule",
           "PatchGame", "ValuationDataModule", "ValuationModel", "create_timm_model"]
