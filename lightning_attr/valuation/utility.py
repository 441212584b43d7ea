"""LogisticUtility: ``v(S)`` for many training subsets at once, the validation score of a logistic regression
fitted on each subset's (fixed) features."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from torch import Tensor

from lightning_attr.valuation.logistic import fit_logistic

__all__ = ["LogisticUtility", "Metric", "as_index_lists"]

Metric = Literal["accuracy", "log_likelihood"]


def as_index_lists(subsets: Tensor, num_points: int) -> Tensor:
    """Subsets as index lists (B, k) long, ``-1`` padding last, a point at most once per subset.

    ``subsets``: boolean masks (B, N) or index lists (B, k) (``-1`` padded)."""
    if subsets.dtype == torch.bool:
        if subsets.dim() != 2 or subsets.shape[1] != num_points:
            raise ValueError(f"Boolean `subsets` must have shape (B, {num_points}), got {tuple(subsets.shape)}.")
        k = int(subsets.sum(1).max()) if len(subsets) else 0
        order = subsets.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
        return torch.where(subsets.gather(1, order), order, torch.full_like(order, -1))
    if subsets.dim() != 2 or subsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"`subsets` must be boolean masks (B, N) or index lists (B, k) of int64, got "
                         f"{subsets.dtype} {tuple(subsets.shape)}.")
    if subsets.numel() and (int(subsets.max()) >= num_points or int(subsets.min()) < -1):
        raise ValueError(f"`subsets` holds indices outside -1..{num_points - 1} (-1 pads): "
                         f"min {int(subsets.min())}, max {int(subsets.max())}.")
    subsets = subsets.long()
    return subsets.gather(1, (subsets < 0).to(torch.int8).argsort(dim=1, stable=True))  # padding last


class LogisticUtility:
    """``v(S)`` = validation ``metric`` of a multinomial logistic regression fitted on the features of ``S``.

    Each fit minimizes ``C * sum_{n in S} CE + ||theta||^2 / 2`` (scikit-learn's ``LogisticRegression(C=C)``, with the
    intercept as a penalized ones column, so the empty set and one-class sets have well-defined fits: the empty
    set predicts the uniform distribution). Subsets are fitted ``batch_size`` at a time, sorted by size, by batched
    L-BFGS (:func:`~lightning_attr.valuation.logistic.fit_logistic`) on the features' device.

    Args:
        x_train: (N, D) features of the points being valued. y_train: (N,) their labels in ``0..K-1``.
        x_val / y_val: (V, D) / (V,) the validation set the utility scores on.
        num_classes: K (default: ``max(label) + 1`` over both sets).
        C: inverse regularization strength. metric: ``"accuracy"`` (ties of the argmax go to the lowest class) or
            ``"log_likelihood"`` (mean log-probability of the validation labels; smoother).
        tol / max_iter: convergence test of every fit (see ``fit_logistic``); a fit that misses it raises.
        batch_size: fits held at once. dtype: of the fits (float64: probabilities agree with scikit-learn's to 1e-5; float32 cannot reach `tol`).

    ``num_evaluations`` counts the subsets evaluated (the unit of compute of every valuation budget).
    """

    def __init__(self, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, num_classes: int | None = None,
                 C: float = 1.0, metric: Metric = "accuracy", tol: float = 1e-5, max_iter: int = 300,
                 batch_size: int = 256, dtype: torch.dtype = torch.float64) -> None:
        if metric not in ("accuracy", "log_likelihood"):
            raise ValueError(f"`metric` must be 'accuracy' or 'log_likelihood', got {metric!r}.")
        if C <= 0:
            raise ValueError(f"`C` must be > 0, got {C}.")
        for name, x, y in (("train", x_train, y_train), ("val", x_val, y_val)):
            if x.dim() != 2 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
                raise ValueError(f"`x_{name}` must be (n, D) and `y_{name}` (n,) with n >= 1, got "
                                 f"{tuple(x.shape)} and {tuple(y.shape)}.")
        if x_train.shape[1] != x_val.shape[1]:
            raise ValueError(f"`x_train` has {x_train.shape[1]} features, `x_val` {x_val.shape[1]}.")
        k = int(max(y_train.max(), y_val.max())) + 1
        self.num_classes = num_classes or k
        if self.num_classes < k or int(min(y_train.min(), y_val.min())) < 0:
            raise ValueError(f"Labels must lie in 0..{self.num_classes - 1} (`num_classes`={self.num_classes}).")
        ones = torch.ones(len(x_train), 1, dtype=x_train.dtype, device=x_train.device)
        self.x_train = torch.cat([x_train, ones], 1).to(dtype)
        self.x_val = torch.cat([x_val, ones[:1].expand(len(x_val), 1)], 1).to(dtype)
        self.y_train, self.y_val = y_train.long().to(x_train.device), y_val.long().to(x_train.device)
        self.C, self.metric, self.tol, self.max_iter, self.batch_size = C, metric, tol, max_iter, batch_size
        self.num_evaluations = 0

    @property
    def num_points(self) -> int:
        return len(self.x_train)

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def fingerprint(self) -> str:
        """A short hash of the data, the labels and the settings (keys label caches)."""
        digest = hashlib.sha1(f"{self.C}|{self.metric}|{self.tol}|{self.num_classes}".encode())
        for t in (self.x_train, self.y_train, self.x_val, self.y_val):
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:12]

    def _rows(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        safe = index.clamp(min=0)
        return self.x_train[safe], self.y_train[safe], index >= 0

    def fit(self, subsets: Tensor, init: Tensor | None = None) -> Tensor:
        """Fitted weights (B, D + 1, K) (last row: intercept) of the models of ``subsets`` (see ``as_index_lists``);
        ``init`` (B, D + 1, K): warm starts (e.g. the fit of a subset one point smaller)."""
        index = as_index_lists(subsets, self.num_points).to(self.device)
        sizes = (index >= 0).sum(1)
        order = sizes.argsort()
        theta = torch.empty(len(index), self.x_train.shape[1], self.num_classes, dtype=self.x_train.dtype,
                            device=self.device)
        for start in range(0, len(index), self.batch_size):
            rows = order[start:start + self.batch_size]
            chunk = index[rows][:, : max(1, int(sizes[rows].max()))]
            x, y, w = self._rows(chunk)
            start_at = None if init is None else init[rows]
            theta[rows], _ = fit_logistic(x, y, w, self.num_classes, self.C, self.tol, self.max_iter, start_at)
        self.num_evaluations += len(index)
        return theta

    def score(self, theta: Tensor) -> Tensor:
        """Validation ``metric`` (B,) of weights ``theta`` (B, D + 1, K)."""
        logits = self.x_val @ theta
        if self.metric == "accuracy":
            return (logits.argmax(-1) == self.y_val).to(self.x_val.dtype).mean(1)
        logp = logits.log_softmax(-1)
        return logp.gather(-1, self.y_val.expand(len(theta), -1).unsqueeze(-1)).squeeze(-1).mean(1)

    def __call__(self, subsets: Tensor) -> Tensor:
        """``v(S)`` (B,) float64 for boolean masks (B, N) or ``-1``-padded index lists (B, k)."""
        if len(subsets) == 0:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return self.score(self.fit(subsets)).double()
