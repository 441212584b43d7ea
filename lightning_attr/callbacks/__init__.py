"""Lightning callbacks of lightning-attr (drop-in YAML specs live in the top-level ``callbacks/`` folder)."""

from lightning_attr.callbacks.epoch_clock import EpochClock
from lightning_attr.callbacks.heatmaps import AttributionHeatmaps
from lightning_attr.callbacks.in_step import InStepTracIn
from lightning_attr.callbacks.influence import InfluenceCallback
from lightning_attr.callbacks.influence_function import InfluenceFunction
from lightning_attr.callbacks.predictions import AttributionWriter
from lightning_attr.callbacks.tracin import TracIn
from lightning_attr.callbacks.trak import TRAK
from lightning_attr.callbacks.unrolled import UnrolledDifferentiation

__all__ = ["AttributionHeatmaps", "AttributionWriter", "EpochClock", "InStepTracIn", "InfluenceCallback", "InfluenceFunction", "TRAK",
           "TracIn", "UnrolledDifferentiation"]
