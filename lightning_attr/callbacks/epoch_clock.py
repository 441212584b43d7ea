"""EpochClock: how long each training epoch of a fit took, for compute accounting (the demo, the benchmarks)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from lightning.pytorch.callbacks import Callback

__all__ = ["EpochClock"]


class EpochClock(Callback):
    """Records when every training epoch starts and when fit ends (``time.perf_counter``).

    ``epoch_seconds()``: each epoch's duration (training + its validation, data loading and Lightning included), start
    to next start. ``seconds_per_epoch()``: the median epoch after the first (the first also fills label and feature
    caches, which are accounted for separately); ``training_seconds()``: the steady cost of the whole run, that
    median times the number of epochs.
    """

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = math.nan

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_fit_end(self, trainer: Any, module: Any) -> None:
        self.end = time.perf_counter()

    def epoch_seconds(self) -> list[float]:
        """Duration of each epoch in seconds, in order."""
        marks = [*self.starts, self.end]
        return [b - a for a, b in zip(marks, marks[1:])]

    def seconds_per_epoch(self) -> float:
        """Median epoch after the first (the only one when there is one); 0 before any epoch."""
        seconds = self.epoch_seconds()
        return statistics.median(seconds[1:] or seconds) if seconds else 0.0

    def training_seconds(self) -> float:
        """:meth:`seconds_per_epoch` times the number of epochs."""
        return self.seconds_per_epoch() * len(self.epoch_seconds())
