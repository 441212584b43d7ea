"""The estimator contract: what an estimator needs of a game, what it provides, the registry and input checks."""

from __future__ import annotations

import numbers
from typing import Callable, Protocol

import torch
from torch import Tensor

__all__ = ["Game", "Estimator", "ESTIMATORS", "register", "get_estimator", "check_inputs", "endpoints"]


class Game(Protocol):
    """What an estimator needs of a game: ``game(x, masks (B, M, d)) -> (B, M, K)`` and ``num_players``."""

    num_players: int

    def __call__(self, x: Tensor, masks: Tensor) -> Tensor: ...


class Estimator(Protocol):
    """``estimator(game, x, num_samples, generator=None) -> Tensor (B, d, K)`` plus metadata attributes."""

    unbiased: bool
    target: str
    name: str

    def __call__(self, game: Game, x: Tensor, num_samples: int, generator: torch.Generator | None = None) -> Tensor: ...


ESTIMATORS: dict[str, Estimator] = {}


def register(name: str, target: str, unbiased: bool) -> Callable[[Callable], Estimator]:
    """Mark a function as an estimator of ``target`` ("shapley", "banzhaf" or "lime") and register it by ``name``."""

    def wrap(fn: Callable) -> Estimator:
        fn.name, fn.target, fn.unbiased = name, target, unbiased  # type: ignore[attr-defined]
        ESTIMATORS[name] = fn  # type: ignore[assignment]
        return fn  # type: ignore[return-value]

    return wrap


def get_estimator(name: str) -> Estimator:
    """The registered estimator called ``name``; raises a ``ValueError`` listing the allowed names."""
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator `name`={name!r}; allowed: {sorted(ESTIMATORS)}.")
    return ESTIMATORS[name]


def check_inputs(game: Game, x: Tensor, num_samples: int | None, minimum: int = 1) -> int:
    """Validate ``x`` (B, ...) and ``num_samples``; return the number of players ``d``."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`x` must be a batch tensor of shape (B, ...) with B >= 1, got {shape}.")
    d = int(game.num_players)
    if d < 1:
        raise ValueError(f"`game.num_players` must be >= 1, got {d}.")
    if num_samples is not None and (
        isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < minimum
    ):
        raise ValueError(f"`num_samples` must be an integer >= {minimum} (game evaluations per example), "
                         f"got {num_samples!r}.")
    return d


def endpoints(game: Game, x: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """``v(empty)`` and ``v(all)``: two (B, K) tensors from one game call."""
    masks = torch.zeros(x.shape[0], 2, d, dtype=torch.bool, device=x.device)
    masks[:, 1] = True
    v = game(x, masks)
    return v[:, 0], v[:, 1]
