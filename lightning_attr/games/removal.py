"""How a classifier sees an image with some patches removed: baseline pixels, or dropped ViT tokens.

A :class:`Removal` evaluates coalitions in two steps so per-image work is done once: ``prepare`` (per image: the
pixels themselves, or the embedded patch tokens) and ``logits`` (per coalition, differentiable; the game wraps it in
``no_grad``, the classifier's training calls it with gradients). ``groups`` orders the coalitions of one game call
into batches that go through the model together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from lightning_attr.games.tokens import check_token_model, forward_tokens, patch_tokens

if TYPE_CHECKING:
    from lightning_attr.games.patch import PatchGame

__all__ = ["Removal", "BaselineMasking", "TokenDropping", "REMOVALS", "get_removal"]


class Removal(ABC):
    """One way of removing the patches outside a coalition."""

    name: ClassVar[str]

    def check(self, model: nn.Module, game: PatchGame) -> None:
        """Raise a clear error when ``model`` cannot be evaluated this way on ``game``'s patches."""

    @abstractmethod
    def prepare(self, model: nn.Module, x: Tensor, game: PatchGame) -> Tensor:
        """Per-image state (B, ...) of images ``x`` (B, C, H, W), computed once per game call."""

    @abstractmethod
    def logits(self, model: nn.Module, prepared: Tensor, keep: Tensor, game: PatchGame) -> Tensor:
        """Logits (N, K) of the prepared rows (N, ...) of the coalitions' images with the patches ``keep`` (N, d)."""

    def remove(self, model: nn.Module, x: Tensor, keep: Tensor, game: PatchGame) -> Tensor:
        """Logits (B, K) of ``model`` on ``x`` (B, C, H, W) with the patches outside ``keep`` (B, d) removed;
        differentiable and in the model's current mode (the classifier's training uses it)."""
        return self.logits(model, self.prepare(model, x, game), keep, game)

    def groups(self, keep: Tensor) -> list[Tensor]:
        """Row indices of ``keep`` (N, d), in batches that share one forward pass (here: all rows, in order)."""
        return [torch.arange(keep.shape[0], device=keep.device)]

    def rows_per_forward(self, chunk: int, present: int, d: int) -> int:
        """Rows per forward pass of a batch whose coalitions hold ``present`` of ``d`` patches."""
        return chunk

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BaselineMasking(Removal):
    """Patches outside the coalition take the game's ``baseline`` pixels; works for any image model."""

    name = "mask"

    def prepare(self, model: nn.Module, x: Tensor, game: PatchGame) -> Tensor:
        return x

    def logits(self, model: nn.Module, prepared: Tensor, keep: Tensor, game: PatchGame) -> Tensor:
        return model(game.mask_inputs(prepared, keep))


class TokenDropping(Removal):
    """For a patch-aligned ViT: the absent patches' tokens are left out of the sequence (attention over the present
    tokens only, each with its own position embedding). Patches are embedded once per image, and coalitions are
    batched by size, so a coalition of ``k`` patches costs the encoder on ``k`` (+ prefix) tokens instead of all."""

    name = "drop"

    def check(self, model: nn.Module, game: PatchGame) -> None:
        check_token_model(model, game.grid)

    def prepare(self, model: nn.Module, x: Tensor, game: PatchGame) -> Tensor:
        return patch_tokens(model, x)  # (B, d, D)

    def logits(self, model: nn.Module, prepared: Tensor, keep: Tensor, game: PatchGame) -> Tensor:
        keep = keep.to(device=prepared.device, dtype=torch.bool)
        groups = self.groups(keep)
        if len(groups) == 1:
            return forward_tokens(model, self._present(prepared, keep))
        parts = [(rows, forward_tokens(model, self._present(prepared[rows], keep[rows]))) for rows in groups]
        out = parts[0][1].new_empty(keep.shape[0], parts[0][1].shape[-1])
        for rows, values in parts:
            out[rows] = values
        return out

    @staticmethod
    def _present(tokens: Tensor, keep: Tensor) -> Tensor:
        """The kept tokens of rows that all keep ``k`` patches: (N, d, D), (N, d) -> (N, k, D), patch order kept."""
        return tokens[keep].view(keep.shape[0], -1, tokens.shape[-1])

    def groups(self, keep: Tensor) -> list[Tensor]:
        sizes = keep.sum(1)
        order = torch.argsort(sizes, stable=True)
        counts = torch.bincount(sizes, minlength=keep.shape[1] + 1).tolist()
        return [rows for rows in order.split(counts) if len(rows)]

    def rows_per_forward(self, chunk: int, present: int, d: int) -> int:
        return max(1, chunk * (d + 1) // (present + 1))  # about the tokens of ``chunk`` full images per forward


REMOVALS: dict[str, type[Removal]] = {cls.name: cls for cls in (BaselineMasking, TokenDropping)}


def get_removal(name: str) -> Removal:
    """The removal called ``name``: ``"mask"`` or ``"drop"``."""
    if name not in REMOVALS:
        raise ValueError(f"`removal`={name!r} is not a known removal; allowed: {sorted(REMOVALS)}.")
    return REMOVALS[name]()
