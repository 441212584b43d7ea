"""Callbacks whose class follows their arguments."""

from __future__ import annotations

from typing import Any

import lightning as L

__all__ = ["VariantCallback"]


class VariantCallback(L.Callback):
    """A callback whose class follows its arguments: ``cls(**kwargs)`` builds ``cls.variant(**kwargs)``, a subclass
    (``TracIn(in_step=True)`` is an ``InStepTracIn``). ``__new__`` lives here, not on the callbacks, so LightningCLI
    (jsonargparse) reads their ``__init__`` signatures."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "VariantCallback":
        return super().__new__(cls.variant(**kwargs))

    @classmethod
    def variant(cls, **kwargs: Any) -> type["VariantCallback"]:
        return cls
