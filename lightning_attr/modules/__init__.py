"""LightningModules: the classifier to explain, the amortized explainer and the amortized data valuer."""

from lightning_attr.modules.classifier import Classifier
from lightning_attr.modules.explainer import AmortizedExplainer
from lightning_attr.modules.feature_cache import FeatureCache
from lightning_attr.modules.heads import MLPHead, TransformerHead
from lightning_attr.modules.timm_models import PatchFeatures, create_timm_model, save_timm_weights
from lightning_attr.modules.valuation import ValuationModel

__all__ = ["AmortizedExplainer", "Classifier", "FeatureCache", "MLPHead", "PatchFeatures", "TransformerHead", "create_timm_model",
           "save_timm_weights", "ValuationModel"]
