"""A ViT as a function of its patch tokens: embed every patch once, then run the encoder on any subset of them.

Two functions make the contract of token dropping:

* ``patch_tokens(model, x)``: images (B, C, H, W) -> patch tokens (B, d, D) in row-major patch order, position
  embeddings already added;
* ``forward_tokens(model, tokens)``: the tokens of a coalition (N, k, D), any ``k`` from 0 to d -> logits (N, K):
  prefix tokens (class / register) prepended, then the encoder blocks, the final norm and the classifier head.

``forward_tokens(model, patch_tokens(model, x))`` equals ``model(x)``. A timm ``VisionTransformer`` (absolute
position embeddings, a static image size) is supported as is; any other model can take part by defining methods
``patch_tokens(x)`` and ``forward_tokens(tokens)`` with the same meaning.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["patch_tokens", "forward_tokens", "token_grid", "check_token_model"]


def _is_timm_vit(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "pos_embed", "blocks", "forward_head", "num_prefix_tokens"))


def _own(model: nn.Module) -> bool:
    return callable(getattr(model, "patch_tokens", None)) and callable(getattr(model, "forward_tokens", None))


def token_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid of a timm ViT (``patch_embed.grid_size``), or ``None`` for a model with its own token methods."""
    if _own(model):
        return getattr(model, "grid", None)
    return tuple(int(g) for g in model.patch_embed.grid_size)


def check_token_model(model: nn.Module, grid: tuple[int, int]) -> None:
    """Raise a clear error unless ``model`` can evaluate coalitions of the ``grid`` patches by token dropping."""
    if _own(model):
        return
    name = type(model).__name__
    if not _is_timm_vit(model):
        raise ValueError(f"`removal`='drop' needs a patch-token model: a timm VisionTransformer or a model with "
                         f"`patch_tokens(x)` and `forward_tokens(tokens)` methods; {name} has neither. Use "
                         "`removal`='mask' (baseline pixels) for other models.")
    if model.pos_embed is None or getattr(model, "dynamic_img_size", False):
        raise ValueError(f"`removal`='drop' needs absolute position embeddings and a static image size; this {name} "
                         "has none (pos_embed=None) or `dynamic_img_size=True`. Use `removal`='mask'.")
    if token_grid(model) != tuple(grid):
        raise ValueError(f"`removal`='drop' needs the game's patches to be the model's tokens: the model's patch grid "
                         f"is {token_grid(model)}, the game's is {tuple(grid)}; set the game's `patch_size` to the "
                         f"model's ({tuple(model.patch_embed.patch_size)}).")


def patch_tokens(model: nn.Module, x: Tensor) -> Tensor:
    """Patch tokens with their position embeddings: ``x`` (B, C, H, W) -> (B, d, D), row-major."""
    if _own(model):
        return model.patch_tokens(x)
    tokens = model.patch_embed(x)
    if tokens.dim() == 4:  # NHWC patch embedding
        tokens = tokens.flatten(1, 2)
    return tokens + model.pos_embed[:, -tokens.shape[1]:]


def forward_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    """Logits (N, K) of the coalitions whose present patch tokens are ``tokens`` (N, k, D) (from
    :func:`patch_tokens`, any subset, in any order: their positions travel with them)."""
    if _own(model):
        return model.forward_tokens(tokens)
    n = tokens.shape[0]
    prefix = [t.expand(n, -1, -1) for t in (model.cls_token, getattr(model, "reg_token", None)) if t is not None]
    if prefix and not model.no_embed_class:  # position embeddings of the prefix tokens come first
        width = sum(p.shape[1] for p in prefix)
        prefix = [torch.cat(prefix, 1) + model.pos_embed[:, :width]]
    if not prefix and tokens.shape[1] == 0:
        raise ValueError(f"{type(model).__name__} has no class / register token: a coalition with no patches has no "
                         "tokens to pool. Use `removal`='mask' or a model with a class token.")
    h = torch.cat([*prefix, tokens], 1)
    h = model.norm_pre(model.patch_drop(model.pos_drop(h)))
    h = model.norm(model.blocks(h))
    return model.forward_head(h)
