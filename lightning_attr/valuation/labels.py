"""Noisy value labels of points, drawn in fixed chunks of points with one seeded generator per chunk, so a label
never depends on the batch or the process that asked for it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor

from lightning_attr.valuation.estimators import MAX_EXACT_POINTS, exact_data_values, get_valuation_estimator
from lightning_attr.valuation.estimators.base import ValuationEstimator

__all__ = ["ValueOracle"]

_SALT = {"train": 1, "val": 2, "test": 3}


class ValueOracle:
    """Draws labels ``estimator(utility, chunk, budget, generator(seed, split, draw, chunk))`` for chunks of
    ``chunk_size`` points (all ``N`` at once for estimators that share samples across points, which cost the same
    for one point as for all).

    ``exact(points)`` gives exact values by enumeration when ``N <= 12``."""

    def __init__(self, utility, estimator: str = "distributional_shapley", options: dict[str, Any] | None = None,
                 seed: int = 0, chunk_size: int = 128) -> None:
        self.utility = utility
        self.estimator: ValuationEstimator = get_valuation_estimator(estimator)
        self.options = dict(options or {})
        self.seed, self.chunk_size = seed, chunk_size
        self._exact: Tensor | None = None
        self._memo: dict[str, tuple[tuple, dict[int, Tensor]]] = {}  # split -> (draw key, chunk -> member labels)

    @property
    def num_points(self) -> int:
        return self.utility.num_points

    def key(self, split: str, budget: int | str) -> dict[str, str]:
        """What determines the labels of ``split``: utility (data and settings), estimator, options, budget, seed."""
        return dict(split=split, utility=self.utility.fingerprint(), estimator=self.estimator.name,
                    options=json.dumps(self.options, sort_keys=True), budget=str(budget), seed=str(self.seed))

    def _members(self, population: Tensor, chunk: int) -> Tensor:
        if self.estimator.shares_samples:
            return population
        return population[chunk * self.chunk_size:(chunk + 1) * self.chunk_size]

    def _generator(self, split: str, draw: int, chunk: int) -> torch.Generator:
        words = f"{self.seed}|{_SALT[split]}|{draw}|{chunk}".encode()
        return torch.Generator().manual_seed(int(hashlib.sha1(words).hexdigest()[:15], 16))

    def draw(self, points: Tensor, split: str, draw: int, budget: int, population: Tensor | None = None) -> Tensor:
        """Labels (P,) of ``points`` (P,) for ``draw`` of ``split``, whose points are ``population`` (default: all):
        every chunk of the population they touch is drawn whole (and kept until another draw of ``split``)."""
        points = points.cpu()
        population = torch.arange(self.num_points) if population is None else population.cpu()
        position = torch.full((self.num_points,), -1, dtype=torch.long)
        position[population] = torch.arange(len(population))
        if (position[points] < 0).any():
            raise ValueError(f"Points {points[position[points] < 0][:8].tolist()} are not in the {split!r} split.")
        key = (draw, budget, hashlib.sha1(population.numpy().tobytes()).hexdigest())
        if self._memo.get(split, (None,))[0] != key:
            self._memo[split] = (key, {})
        memo = self._memo[split][1]
        size = len(population) if self.estimator.shares_samples else self.chunk_size
        chunks, offset = position[points] // size, position[points] % size
        out = torch.empty(len(points), dtype=torch.float64)
        for chunk in chunks.unique().tolist():
            if chunk not in memo:
                memo[chunk] = self.estimator(self.utility, self._members(population, chunk).to(self.utility.device),
                                             budget, self._generator(split, draw, chunk), **self.options).cpu()
            mine = chunks == chunk
            out[mine] = memo[chunk][offset[mine]]
        return out

    def exact(self, points: Tensor) -> Tensor:
        """Exact values (P,) of the estimator's target (``N <= 12``)."""
        if self.num_points > MAX_EXACT_POINTS:
            raise ValueError(f"Exact values need at most {MAX_EXACT_POINTS} points, the utility has {self.num_points}.")
        if self._exact is None:
            cardinality = self.options.get("cardinality")
            self._exact = exact_data_values(self.utility, cardinality)[self.estimator.target]
        return self._exact[points.cpu()]
