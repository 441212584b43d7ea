"""Artifacts on disk: atomic writes (readers never see a half-written file, a crash leaves no partial file behind)
and safetensors files whose content is checked on every load (a truncated or changed file is an error that names
the file and the fix, never a silent wrong number)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["atomic_write", "atomic_save", "save_json", "CorruptArtifactError", "sha256_file", "save_tensors", "load_tensors",
           "tensors_digest"]


class CorruptArtifactError(RuntimeError):
    """A stored file is missing, truncated, or differs from what was recorded when it was written."""


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it to ``path``; returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj: object, path: str) -> str:
    """``torch.save(obj)`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_json(obj: Any, path: str, indent: int = 1) -> str:
    """``obj`` as JSON text in ``path``, atomically (UTF-8); returns ``path``."""
    text = json.dumps(obj, indent=indent)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """Hex SHA-256 of named tensors (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy())  # the buffer, not a copy
    return digest.hexdigest()


def save_tensors(path: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as safetensors atomically, with their ``tensors_digest`` in the file's metadata (``sha256``)
    next to ``metadata``; returns the SHA-256 of the written file (to record in an index)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "sha256": tensors_digest(tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return sha256_file(path)


def load_tensors(path: str, sha256: str | None = None, fix: str = "delete it and run again",
                 expect: dict[str, str] | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a file written by :func:`save_tensors`, checked: it parses, its tensors
    match the digest in its own metadata (or, when given, the file matches ``sha256`` recorded in an index: the bytes
    that were written, whose digest was taken from the tensors themselves) and its metadata holds every ``expect``
    entry. Any failure raises :class:`CorruptArtifactError` naming ``path`` and ``fix``.
    """
    from safetensors import safe_open

    def fail(why: str) -> CorruptArtifactError:
        return CorruptArtifactError(f"{path}: {why}; {fix}.")

    if not os.path.isfile(path):
        raise fail("the file is missing")
    if sha256 is not None and sha256_file(path) != sha256:
        raise fail("its content differs from the checksum recorded when it was written (changed or overwritten)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises several types for truncated / garbled files
        raise fail(f"it cannot be read ({type(err).__name__}: {err})") from err
    if sha256 is None and meta.get("sha256") != tensors_digest(tensors):  # a recorded file checksum already matched
        raise fail("its tensors do not match the digest stored with them (the file was changed after writing)")
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise fail(f"it was written for {key}={meta.get(key)!r}, not {value!r}")
    return tensors, meta
