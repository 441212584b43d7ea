"""Atomic file writes: readers never see a half-written file, and a crash leaves no partial file behind."""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import torch

__all__ = ["atomic_write", "atomic_save"]


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
