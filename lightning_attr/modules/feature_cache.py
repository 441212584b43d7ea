"""Per-example cache of what frozen models compute for an image (backbone patch features, the game's end values),
keyed by the example's stable ``index`` and checked against a content signature of the image."""

from __future__ import annotations

from typing import Callable

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_attr.data.label_store import content_signature, signature_tolerance
from lightning_attr.io import CorruptArtifactError, load_tensors, save_tensors

__all__ = ["FeatureCache"]

FORMAT = "lightning_attr.FeatureCache/1"
Compute = Callable[[Tensor], "tuple[Tensor, Tensor]"]


def _resized(t: Tensor, rows: int) -> Tensor:
    out = t.new_empty((rows, *t.shape[1:]))
    out[: len(t)] = t
    return out


def _first_occurrences(index: Tensor) -> Tensor:
    """Boolean (B,): True at the first position of each distinct value of ``index`` (B,)."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    keep = torch.zeros_like(first)
    keep[order[first]] = True
    return keep


class FeatureCache:
    """Frozen outputs per example: features (d, D), ends (2, K) and the image's
    :func:`~lightning_attr.data.label_store.content_signature` (9,), for every example ``index`` seen so far.

    :meth:`fetch` returns cached values only for images whose signature matches the cached one (within
    :func:`~lightning_attr.data.label_store.signature_tolerance`); the others are computed. An index that comes back
    with another image than the one cached in this session (random augmentation of a fixed index set) is computed
    every time and never cached (one warning); an entry read from a file that does not match is replaced.

    Storage grows as indices arrive: compact rows (1.5x growth) plus an index -> row map; per entry it holds the
    features, the ends and the signature (in the dtype they were computed in: ends stay the game's float32).

    Args:
        key: what the values depend on (e.g. a hash of the backbone and the game); written into saved files and
            required of loaded ones.
        device: where entries are held (default: CPU memory; :meth:`fetch` returns them on the images' device).
    """

    def __init__(self, key: str = "", device: str | torch.device = "cpu") -> None:
        self.key, self.device = key, torch.device(device)
        self.clear()

    def clear(self) -> None:
        """Forget every entry (and the warning state)."""
        self._slot = torch.full((0,), -1, dtype=torch.long)  # index -> row (-1: not cached)
        self.index = torch.zeros(0, dtype=torch.long)  # row -> index
        self.features: Tensor | None = None
        self.ends: Tensor | None = None
        self.signatures = torch.zeros(0, 9, dtype=torch.float64)
        self.confirmed = torch.zeros(0, dtype=torch.bool)  # row computed / matched in this session (not only loaded)
        self.size, self.dirty, self.bypassed, self._warned = 0, False, 0, False

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes held by the entries' features, ends and signatures."""
        rows = [t[: self.size] for t in (self.features, self.ends, self.signatures) if t is not None]
        return sum(t.numel() * t.element_size() for t in rows)

    def rows(self, index: Tensor) -> Tensor:
        """Storage rows (B,) of ``index`` (B,), -1 where not cached."""
        index = index.cpu().long()
        rows = torch.full_like(index, -1)
        known = index < len(self._slot)
        rows[known] = self._slot[index[known]]
        return rows

    def _matches(self, rows: Tensor, signatures: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(hit, changed)`` (B,): cached for this image; cached for another image in this session."""
        if not self.size:
            return torch.zeros_like(rows, dtype=torch.bool), torch.zeros_like(rows, dtype=torch.bool)
        stored = self.signatures[rows.clamp(min=0)]
        scale = torch.maximum(stored[:, -1:], signatures[:, -1:]).clamp(min=1e-12)
        same = ((stored - signatures).abs() <= signature_tolerance(dtype) * scale).all(1)
        present = rows >= 0
        return present & same, present & ~same & self.confirmed[rows.clamp(min=0)]

    def fetch(self, index: Tensor, x: Tensor, compute: Compute) -> tuple[Tensor, Tensor]:
        """Features (B, d, D) in ``x``'s dtype and ends (B, 2, K) (the stored / computed dtype) on ``x``'s device,
        for images ``x`` (B, C, H, W) of examples ``index`` (B,).

        ``compute(x_subset) -> (features, ends)`` runs once, on the rows of ``x`` that are not cached (or cached for
        another image); their results are stored, except for indices already seen with another image this session.
        """
        index = index.cpu().long()
        signatures = content_signature(x)
        rows = self.rows(index)
        hit, changed = self._matches(rows, signatures, x.dtype)
        self.confirmed[rows[hit]] = True
        miss = ~hit
        computed = compute(x[miss.to(x.device)]) if miss.any() else None
        if computed is not None:
            keep = miss & ~changed
            keep[keep.clone()] = _first_occurrences(index[keep])
            self._put(index[keep], *(t[keep[miss].to(t.device)] for t in computed), signatures[keep])
        if changed.any():
            self._bypass(index[changed])
        if computed is not None and not hit.any():
            return computed[0].to(x.dtype), computed[1]
        features, ends = self._get(rows[hit], x)
        if computed is None:
            return features, ends
        out_f = features.new_empty((len(index), *features.shape[1:]))
        out_e = ends.new_empty((len(index), *ends.shape[1:]))
        hit_x, miss_x = hit.to(x.device), miss.to(x.device)
        out_f[hit_x], out_f[miss_x] = features, computed[0].to(out_f.dtype)
        out_e[hit_x], out_e[miss_x] = ends, computed[1].to(out_e.dtype)
        return out_f, out_e

    def _get(self, rows: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        assert self.features is not None and self.ends is not None
        rows = rows.to(self.device)
        return self.features[rows].to(x.device, x.dtype), self.ends[rows].to(x.device)

    def _bypass(self, index: Tensor) -> None:
        self.bypassed += len(index)
        if not self._warned:
            self._warned = True
            rank_zero_warn(
                f"FeatureCache bypassed: {len(index)} example(s) (indices {index[:8].tolist()}) came back with other "
                "images than the ones their cached backbone features were computed for (random augmentation of a "
                "fixed index set?). The features of such examples are computed for every batch and not cached; set "
                "`feature_cache=None` to drop the cache's memory when every image changes.")

    def _reserve(self, rows: int, features: Tensor, ends: Tensor) -> None:
        need = self.size + rows
        if self.features is None or self.ends is None:
            cap = max(need, 16)
            self.features = torch.empty((cap, *features.shape[1:]), dtype=features.dtype, device=self.device)
            self.ends = torch.empty((cap, *ends.shape[1:]), dtype=ends.dtype, device=self.device)
        elif tuple(features.shape[1:]) != tuple(self.features.shape[1:]) or tuple(ends.shape[1:]) != tuple(
                self.ends.shape[1:]):
            raise ValueError(f"FeatureCache holds features {tuple(self.features.shape[1:])} and ends "
                             f"{tuple(self.ends.shape[1:])} per example, got {tuple(features.shape[1:])} and "
                             f"{tuple(ends.shape[1:])}; use one cache per backbone and game (`key`).")
        cap = len(self.features)
        if need > cap:
            cap = max(need, cap + cap // 2)
            self.features, self.ends = _resized(self.features, cap), _resized(self.ends, cap)
        if need > len(self.index):
            self.index, self.signatures = _resized(self.index, cap), _resized(self.signatures, cap)
            self.confirmed = _resized(self.confirmed, cap)

    def _put(self, index: Tensor, features: Tensor, ends: Tensor, signatures: Tensor, confirmed: bool = True) -> None:
        """Store (n, ...) values of distinct ``index`` (n,), replacing their entries when present."""
        if not len(index):
            return
        rows = self.rows(index)
        new = rows < 0
        self._reserve(int(new.sum()), features, ends)
        rows[new] = torch.arange(self.size, self.size + int(new.sum()))
        self.size += int(new.sum())
        top = int(index.max()) + 1
        if top > len(self._slot):
            grown = torch.full((max(top, len(self._slot) * 3 // 2),), -1, dtype=torch.long)
            grown[: len(self._slot)] = self._slot
            self._slot = grown
        self._slot[index] = rows
        assert self.features is not None and self.ends is not None
        dev = rows.to(self.device)
        self.features[dev] = features.detach().to(self.device, self.features.dtype)
        self.ends[dev] = ends.detach().to(self.device, self.ends.dtype)
        self.index[rows], self.signatures[rows] = index, signatures.to(torch.float64).cpu()
        self.confirmed[rows] = confirmed
        self.dirty = True

    def save(self, path: str) -> None:
        """Write the entries to ``path`` (one safetensors file, atomic, with a digest and this cache's ``key``)."""
        if self.features is None or self.ends is None:
            return
        n = self.size
        tensors = {"index": self.index[:n], "features": self.features[:n], "ends": self.ends[:n],
                   "signatures": self.signatures[:n]}
        save_tensors(path, tensors, {"format": FORMAT, "feature_cache_key": self.key})
        self.dirty = False

    def load(self, path: str) -> int:
        """Replace the entries by those of ``path`` (written by :meth:`save` with the same ``key``); returns their
        number. A changed or truncated file, or one written for another key, raises
        :class:`~lightning_attr.io.CorruptArtifactError` naming it and the fix."""
        fix = f"delete {path} (or set `feature_cache` to another folder) to compute the features again"
        tensors, _ = load_tensors(path, fix=fix, expect={"format": FORMAT, "feature_cache_key": self.key})
        names = {"index", "features", "ends", "signatures"}
        sizes = {len(tensors[k]) for k in names & set(tensors)}
        index = tensors.get("index")
        if (names - set(tensors) or len(sizes) != 1 or index is None or tensors["signatures"].shape[1:] != (9,)
                or (len(index) and (int(index.min()) < 0 or not bool(_first_occurrences(index).all())))):
            raise CorruptArtifactError(f"{path}: it does not hold one entry per distinct example (tensors "
                                       f"{ {k: tuple(v.shape) for k, v in tensors.items()} }); {fix}.")
        self.clear()
        self._put(index.long(), tensors["features"], tensors["ends"], tensors["signatures"], confirmed=False)
        self.dirty = False
        return self.size
