"""Per-example oracle labels kept in memory and persisted as checked safetensors files, one file per rank, merged by
example index, each label stored with a content signature of the input it was computed for."""

from __future__ import annotations

import functools
import glob

import torch
from torch import Tensor

from lightning_attr.io import CorruptArtifactError, load_tensors, save_tensors

__all__ = ["LabelStore", "StaleLabelsError", "content_signature", "signature_tolerance"]

SIGNATURE_DIM = 8


class StaleLabelsError(RuntimeError):
    """Stored labels were computed for other inputs than the ones they are asked for."""


@functools.lru_cache(maxsize=4)
def _projection(dim: int) -> Tensor:
    gen = torch.Generator().manual_seed(20240115)
    return torch.randn(dim, SIGNATURE_DIM, generator=gen, dtype=torch.float64) / dim**0.5


def content_signature(x: Tensor) -> Tensor:
    """Per-example fingerprint of inputs: ``x`` (B, ...) -> (B, 9) float64 on the CPU: 8 fixed seeded Gaussian
    projections of the flattened input (entries N(0, 1/D)) and its RMS.

    Equal inputs give equal signatures up to float64 rounding; a change of ``delta`` in one of ``D`` values moves a
    projection by about ``delta / sqrt(D)`` (``1/255`` of one pixel of a 3x32x32 image: ~1e-4), far above
    :func:`signature_tolerance`.
    """
    flat = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    rms = flat.pow(2).mean(1, keepdim=True).sqrt()
    return torch.cat([flat @ _projection(flat.shape[1]), rms], 1)


def signature_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance (times the RMS of the input) between signatures of the same inputs held in ``dtype``
    (rounding to ``dtype`` moves a projection by at most ~eps/2 of the RMS)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    return 8 * max(eps, torch.finfo(torch.float32).eps)


class LabelStore:
    """Labels (n, *shape), a draw count and a :func:`content_signature` (n, 9) per example.

    ``path_prefix``: when given, labels are loaded from every ``{path_prefix}-rank*.safetensors`` at creation (each
    file checked with :func:`~lightning_attr.io.load_tensors`: a truncated or changed file, or one written with other
    ``metadata``, raises :class:`~lightning_attr.io.CorruptArtifactError` naming it) and :meth:`save` writes this
    process's labels to ``{path_prefix}-rank{rank}.safetensors``, so any number of processes can share one cache and
    a later run with another world size reads it back. ``metadata`` (str -> str) is written into every file and
    required of every file read.
    """

    def __init__(self, n: int, path_prefix: str | None = None, rank: int = 0,
                 metadata: dict[str, str] | None = None) -> None:
        self.n = n
        self.values: Tensor | None = None
        self.count = torch.zeros(n, dtype=torch.long)
        self.signatures = torch.full((n, SIGNATURE_DIM + 1), float("nan"), dtype=torch.float64)
        self.path_prefix, self.rank = path_prefix, rank
        self.metadata = {**(metadata or {}), "n": str(n)}
        if path_prefix:
            for file in sorted(glob.glob(f"{glob.escape(path_prefix)}-rank*.safetensors")):
                self._load(file)

    @property
    def files(self) -> str:
        """The glob of this store's cache files (for messages)."""
        return f"{self.path_prefix}-rank*.safetensors"

    def _load(self, file: str) -> None:
        fix = f"delete {self.files} (or set `cache_dir` to another folder) to compute the labels again"
        tensors, _ = load_tensors(file, fix=fix, expect=self.metadata)
        index = tensors.get("index")
        if index is None or {"values", "signatures"} - set(tensors) or (len(index) and int(index.max()) >= self.n):
            raise CorruptArtifactError(f"{file}: it does not hold labels of examples 0..{self.n - 1} "
                                       f"(tensors {sorted(tensors)}); {fix}.")
        self.put(index, tensors["values"], tensors["signatures"])

    def has(self, index: Tensor) -> Tensor:
        """Boolean (B,) : which of ``index`` already have a label."""
        return self.count[index.cpu()] > 0

    def get(self, index: Tensor) -> Tensor:
        """Stored labels (B, ...) of ``index`` (all must be present, see :meth:`has`)."""
        assert self.values is not None
        return self.values[index.cpu()]

    def _remember(self, index: Tensor, signatures: Tensor | None) -> None:
        if signatures is not None:
            self.signatures[index] = signatures.to(torch.float64).cpu()

    def put(self, index: Tensor, values: Tensor, signatures: Tensor | None = None) -> None:
        """Store (B, ...) ``values`` (and their inputs' (B, 9) ``signatures``) for ``index``, replacing earlier ones."""
        index, values = index.cpu(), values.detach().float().cpu()
        if self.values is None:
            self.values = torch.zeros(self.n, *values.shape[1:])
        self.values[index] = values
        self.count[index] = self.count[index].clamp(min=1)
        self._remember(index, signatures)

    def update_mean(self, index: Tensor, values: Tensor, signatures: Tensor | None = None) -> Tensor:
        """Fold a new draw into the running mean of each example and return the means (B, ...)."""
        index, values = index.cpu(), values.detach().float().cpu()
        if self.values is None:
            self.values = torch.zeros(self.n, *values.shape[1:])
        c = self.count[index].unsqueeze(-1).view(-1, *([1] * (values.dim() - 1))).float()
        self.values[index] = (self.values[index] * c + values) / (c + 1)
        self.count[index] += 1
        self._remember(index, signatures)
        return self.values[index]

    def check(self, index: Tensor, signatures: Tensor, dtype: torch.dtype = torch.float32) -> None:
        """Raise :class:`StaleLabelsError` when a stored label of ``index`` belongs to other inputs than those with
        ``signatures`` (B, 9) (held in ``dtype``): never hand out labels of other images."""
        index = index.cpu()
        stored, new = self.signatures[index], signatures.to(torch.float64).cpu()
        known = (self.count[index] > 0) & ~stored.isnan().any(1)
        scale = torch.maximum(stored[:, -1:], new[:, -1:]).clamp(min=1e-12)
        bad = known & ((stored - new).abs() > signature_tolerance(dtype) * scale).any(1)
        if bad.any():
            where = (f"{self.files}: the cached labels" if self.path_prefix else
                     "the labels held in memory (e.g. restored from a checkpoint)")
            fix = (f"delete {self.files} (or set `cache_dir` to another folder) and run again" if self.path_prefix else
                   "resume with the same data and preprocessing, or start a new fit")
            raise StaleLabelsError(
                f"{where} of {int(bad.sum())} example(s) (indices {index[bad][:8].tolist()}) were computed for other "
                f"images than this batch's (their content signatures differ: the data, its split or its preprocessing "
                f"changed under the same cache key); {fix}.")

    def fetch(self, index: Tensor, signatures: Tensor, compute, dtype: torch.dtype = torch.float32) -> Tensor:
        """Stored labels (B, ...) of ``index`` (B,) whose inputs have ``signatures`` (B, 9): the missing ones are
        computed first (``compute(missing)``, ``missing`` a (B,) CPU boolean mask) and saved. Raises
        :class:`StaleLabelsError` (see :meth:`check`) when a stored label belongs to other inputs."""
        self.check(index, signatures, dtype)
        missing = ~self.has(index)
        if missing.any():
            self.put(index.cpu()[missing], compute(missing), signatures[missing])
            self.save()
        return self.get(index)

    def save(self) -> None:
        """Write the labels this store holds (no-op without ``path_prefix``), atomically."""
        if not self.path_prefix or self.values is None:
            return
        index = torch.nonzero(self.count > 0).flatten()
        tensors = {"index": index, "values": self.values[index], "signatures": self.signatures[index]}
        save_tensors(f"{self.path_prefix}-rank{self.rank}.safetensors", tensors, self.metadata)

    def state_dict(self) -> dict:
        return {"values": self.values, "count": self.count, "signatures": self.signatures}

    def load_state_dict(self, state: dict) -> None:
        self.values, self.count = state["values"], state["count"]
        if state.get("signatures") is not None:  # checkpoints written before signatures existed: none to check
            self.signatures = state["signatures"]
