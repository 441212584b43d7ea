"""Lightning callbacks of lightning-attr (drop-in YAML specs live in the top-level ``callbacks/`` folder)."""

from lightning_attr.callbacks.heatmaps import AttributionHeatmaps

__all__ = ["AttributionHeatmaps"]
