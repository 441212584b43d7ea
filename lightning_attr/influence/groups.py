"""Groupers for grouped data attribution (GGDA): which training examples are attributed to together.

Every grouper returns a :class:`Grouping`: ``assignment`` (n,) long in ``[0, num_groups)`` covering every example
exactly once, deterministic under ``seed``. Sizes are given either as ``num_groups`` or as a target ``group_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor

__all__ = ["Grouping", "GROUPERS", "resolve_num_groups", "random_groups", "class_groups", "kmeans",
           "kmeans_groups", "column_groups", "make_grouping"]

GROUPERS = ("class", "random", "embedding_kmeans", "gradient_kmeans", "column")


@dataclass
class Grouping:
    """``assignment`` (n,) long: the group of each example; ``method``: how it was made."""

    assignment: Tensor
    method: str

    def __post_init__(self) -> None:
        a = torch.as_tensor(self.assignment).long().flatten()
        if a.numel() and int(a.min()) < 0:
            raise ValueError(f"group ids must be >= 0, got {int(a.min())}.")
        _, a = torch.unique(a, return_inverse=True)  # dense ids 0..G-1 in order of first id
        self.assignment = a

    @classmethod
    def identity(cls, n: int) -> "Grouping":
        """Every example its own group: the rows of a per-example run."""
        return cls(torch.arange(n), "example")

    @property
    def is_identity(self) -> bool:
        return self.method == "example"

    @property
    def num_groups(self) -> int:
        return int(self.assignment.max()) + 1 if self.assignment.numel() else 0

    @property
    def sizes(self) -> Tensor:
        """(num_groups,) number of members of each group."""
        return torch.bincount(self.assignment, minlength=self.num_groups)

    def members(self, g: int) -> Tensor:
        return (self.assignment == g).nonzero().flatten()

    def one_hot(self) -> Tensor:
        """(num_groups, n) float membership matrix; ``one_hot() @ per_example`` sums scores over each group."""
        return torch.nn.functional.one_hot(self.assignment, self.num_groups).T.float()


def resolve_num_groups(n: int, num_groups: int | None = None, group_size: int | None = None) -> int:
    """Number of groups from exactly one of ``num_groups`` / ``group_size`` (``ceil(n / group_size)``)."""
    if (num_groups is None) == (group_size is None):
        raise ValueError(f"give exactly one of `num_groups` and `group_size`, got {num_groups} and {group_size}.")
    if group_size is not None:
        if not 1 <= group_size <= n:
            raise ValueError(f"`group_size` must be in [1, {n}] (the number of examples), got {group_size}.")
        return math.ceil(n / group_size)
    if not 1 <= num_groups <= n:
        raise ValueError(f"`num_groups` must be in [1, {n}] (the number of examples), got {num_groups}.")
    return num_groups


def _split_evenly(idx: Tensor, parts: int, generator: torch.Generator) -> list[Tensor]:
    perm = idx[torch.randperm(idx.numel(), generator=generator)]
    return [perm[i::parts] for i in range(parts)]  # sizes differ by at most one


def random_groups(n: int, num_groups: int | None = None, group_size: int | None = None, seed: int = 0) -> Grouping:
    """A uniformly random partition into groups whose sizes differ by at most one."""
    g = resolve_num_groups(n, num_groups, group_size)
    assignment = torch.empty(n, dtype=torch.long)
    for k, members in enumerate(_split_evenly(torch.arange(n), g, torch.Generator().manual_seed(seed))):
        assignment[members] = k
    return Grouping(assignment, "random")


def _per_class_counts(counts: Tensor, total: int) -> Tensor:
    """Split ``total`` groups over classes proportionally to ``counts`` (at least 1, at most the class size)."""
    share = counts.double() / counts.sum() * total
    k = share.floor().long().clamp(min=1)
    k = torch.minimum(k, counts)
    while int(k.sum()) < total:  # largest remainders first
        room = (k < counts)
        if not room.any():
            break
        gap = torch.where(room, share - k.double(), torch.full_like(share, -math.inf))
        k[int(gap.argmax())] += 1
    while int(k.sum()) > total:
        gap = torch.where(k > 1, k.double() - share, torch.full_like(share, -math.inf))
        k[int(gap.argmax())] -= 1
    return k


def _groups_per_class(counts: Tensor, n: int, num_groups: int | None, group_size: int | None) -> Tensor:
    """Groups per class: ``ceil(n_c / group_size)`` (no group above the target size), or ``num_groups`` split over
    classes by their sizes."""
    total = resolve_num_groups(n, num_groups, group_size)
    if group_size is not None:
        return (counts + group_size - 1) // group_size
    if total < len(counts):
        raise ValueError(f"`num_groups`={total} is fewer than the {len(counts)} classes; per-class groups cannot mix them.")
    return _per_class_counts(counts, total)


def class_groups(labels: Tensor, num_groups: int | None = None, group_size: int | None = None, seed: int = 0
                 ) -> Grouping:
    """Groups that never mix classes: each class split at random into near-equal groups; with neither size given,
    one group per class."""
    labels = torch.as_tensor(labels).long().flatten()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if num_groups is None and group_size is None:
        return Grouping(inverse, "class")
    per_class = _groups_per_class(counts, labels.numel(), num_groups, group_size)
    gen = torch.Generator().manual_seed(seed)
    assignment, offset = torch.empty_like(labels), 0
    for c in range(len(classes)):
        for part in _split_evenly((inverse == c).nonzero().flatten(), int(per_class[c]), gen):
            assignment[part] = offset
            offset += 1
    return Grouping(assignment, "class")


def kmeans(x: Tensor, k: int, seed: int = 0, iters: int = 50) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on rows of ``x`` (n, f); returns (n,) cluster ids. Empty clusters are
    re-seeded with the points farthest from their centres, so every cluster is used."""
    x = x.double()
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k}, n={n}.")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=gen)]
    d2 = torch.cdist(x, centres).squeeze(1).pow(2)
    for _ in range(1, k):
        p = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        nxt = x[torch.multinomial(p, 1, generator=gen)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).squeeze(1).pow(2))
    assign = torch.cdist(x, centres).argmin(1)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = torch.cdist(x, centres).gather(1, assign[:, None]).squeeze(1).argsort(descending=True)
            for j, e in enumerate(empty.tolist()):
                assign[far[j]] = e
            counts = torch.bincount(assign, minlength=k)
        centres = torch.zeros_like(centres).index_add_(0, assign, x) / counts[:, None].double()
        new = torch.cdist(x, centres).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    counts = torch.bincount(assign, minlength=k)
    for e in (counts == 0).nonzero().flatten().tolist():  # a final empty cluster takes one point of the largest
        big = int(torch.bincount(assign, minlength=k).argmax())
        assign[(assign == big).nonzero()[0, 0]] = e
    return assign


def kmeans_groups(features: Tensor, num_groups: int | None = None, group_size: int | None = None, seed: int = 0,
                  labels: Tensor | None = None, method: str = "embedding_kmeans") -> Grouping:
    """k-means on ``features`` (n, f); with ``labels``, within each class (groups never mix classes; see
    ``class_groups`` for how many per class). k-means balances sizes only on average: ``group_size`` sets the number
    of clusters, not a hard cap."""
    n = features.shape[0]
    if labels is None:
        return Grouping(kmeans(features, resolve_num_groups(n, num_groups, group_size), seed), method)
    labels = torch.as_tensor(labels).long().flatten()
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    per_class = _groups_per_class(counts, n, num_groups, group_size)
    assignment, offset = torch.empty(n, dtype=torch.long), 0
    for c in range(len(classes)):
        idx = (inverse == c).nonzero().flatten()
        assignment[idx] = kmeans(features[idx], int(per_class[c]), seed + c) + offset
        offset += int(per_class[c])
    return Grouping(assignment, method)


def column_groups(values: Sequence | Tensor, n: int) -> Grouping:
    """Groups from a user column (any hashable values, one per example)."""
    values = list(values.tolist() if isinstance(values, Tensor) else values)
    if len(values) != n:
        raise ValueError(f"the group column has {len(values)} entries, the training set {n} examples.")
    ids: dict = {}
    return Grouping(torch.tensor([ids.setdefault(v, len(ids)) for v in values], dtype=torch.long), "column")


def make_grouping(method: str, n: int, num_groups: int | None = None, group_size: int | None = None, seed: int = 0,
                  labels: Tensor | None = None, features: Tensor | None = None, column: Sequence | None = None
                  ) -> Grouping:
    """Dispatch by ``method`` (one of ``GROUPERS``) with what that grouper needs."""
    if method not in GROUPERS:
        raise ValueError(f"`group_by`={method!r} is not one of {GROUPERS}.")
    if method == "random":
        return random_groups(n, num_groups, group_size, seed)
    if method == "class":
        return class_groups(labels, num_groups, group_size, seed)
    if method == "column":
        return column_groups(column, n)
    if features is None:
        raise ValueError(f"`group_by`={method!r} needs features (embeddings or last-layer gradients).")
    per_class = labels if method == "gradient_kmeans" else None
    grouping = kmeans_groups(features, num_groups, group_size, seed, per_class, method)
    target, sizes = n / grouping.num_groups, grouping.sizes
    if int(sizes.max()) > 4 * target or int(sizes.min()) < target / 4:
        rank_zero_warn(f"`group_by`={method!r}: k-means made groups of {int(sizes.min())} to {int(sizes.max())} examples "
                       f"(target {target:.0f}); k-means balances sizes only on average. Use 'class' or 'random' "
                       "groups for even sizes.")
    return grouping
