"""Cooperative games over image patches: ``v(S)`` = a classifier's output with the patches outside ``S`` removed.

A game is any callable ``game(x, masks) -> Tensor`` with an integer attribute ``num_players``; the estimators in
:mod:`lightning_attr.estimators` reach the model only through that contract, so user-defined games work too.
Patches are removed by a :class:`Removal`: replaced by a baseline (``"mask"``, any model) or, for a patch-aligned
ViT, dropped from the token sequence (``"drop"``).
"""

from lightning_attr.games.patch import PatchGame, check_masks, patch_grid
from lightning_attr.games.removal import REMOVALS, BaselineMasking, Removal, TokenDropping, get_removal
from lightning_attr.games.tokens import forward_tokens, patch_tokens

__all__ = ["PatchGame", "patch_grid", "check_masks", "Removal", "BaselineMasking", "TokenDropping", "REMOVALS",
           "get_removal", "patch_tokens", "forward_tokens"]
