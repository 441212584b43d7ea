"""timm model creation with pretrained weights from the hub or from a local file, and patch-grid features."""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_attr.frozen import eval_mode
from lightning_attr.io import atomic_save, atomic_write

__all__ = ["create_timm_model", "PatchFeatures", "save_timm_weights"]


def _check_name(name: str, argument: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"`{argument}`={name!r} is not a timm model name. Similar names: {close}; see timm.list_models().")


def create_timm_model(
    name: str,
    pretrained: bool = False,
    weights_file: str | None = None,
    num_classes: int | None = None,
    argument: str = "model_name",
    drop_classifier: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with pretrained weights from ``weights_file`` (local) or from the hub.

    ``weights_file`` (a ``.safetensors`` / ``.pth`` state dict of the same architecture) goes through timm's own
    loader via ``pretrained_cfg_overlay=dict(file=...)``, exactly as for hub weights, including the classifier when
    ``num_classes`` matches. ``drop_classifier`` builds the model without a classifier (``num_classes=0``) and
    lets timm discard the checkpoint's, whatever its size. ``argument`` names the caller's argument in errors.
    """
    _check_name(name, argument)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_classifier:
        kwargs["num_classes"], num_classes = 0, None
    if weights_file is not None:
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(f"Weights file {weights_file!r} for `{argument}`={name!r} does not exist.")
        overlay = dict(file=os.path.abspath(weights_file))
        if num_classes is not None:
            overlay["num_classes"] = num_classes
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        raise RuntimeError(
            f"Could not load pretrained weights for {argument}={name!r} from the hub ({type(err).__name__}: {err}). "
            "Without network, pass a local weights file instead (weights_file=...)."
        ) from err


def save_timm_weights(model: nn.Module, path: str) -> str:
    """Write ``model.state_dict()`` to ``path`` (safetensors when it ends with .safetensors), atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if path.endswith(".safetensors"):
        return atomic_write(path, lambda tmp: save_file(state, tmp))
    return atomic_save(state, path)


class PatchFeatures(nn.Module):
    """Frozen timm backbone -> one feature vector per game patch: (B, C, H, W) -> (B, d, D).

    ViT-like models (with ``num_prefix_tokens``): patch tokens of ``forward_features`` after dropping prefix tokens.
    CNNs (ResNet, ...): the deepest feature map whose grid is at least the patch grid (``features_only``).
    Either map is average-pooled to the game's ``grid`` when it is finer.
    """

    def __init__(
        self,
        name: str,
        grid: tuple[int, int],
        image_size: int,
        pretrained: bool = True,
        weights_file: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.grid = grid
        _check_name(name, "backbone")
        probe = timm.create_model(name, pretrained=False, **kwargs)
        self.is_vit = hasattr(probe, "num_prefix_tokens") and hasattr(probe, "patch_embed")
        kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
        if self.is_vit:  # num_classes=0: timm drops the checkpoint's classifier, whatever its size
            self.model = create_timm_model(name, pretrained, weights_file, argument="backbone", drop_classifier=True,
                                           **kwargs)
            self.num_prefix = int(self.model.num_prefix_tokens)
            self.dim = int(self.model.num_features)
        else:
            reductions = timm.create_model(name, pretrained=False, features_only=True, **kwargs).feature_info.reduction()
            fine_enough = [i for i, r in enumerate(reductions) if image_size // r >= max(grid)]
            if not fine_enough:
                raise ValueError(f"`backbone`={name!r} has no feature map with a grid of at least {grid}.")
            self.model = create_timm_model(
                name, pretrained, weights_file, argument="backbone", features_only=True, out_indices=(fine_enough[-1],), **kwargs
            )
            self.dim = int(self.model.feature_info.channels()[-1])
        del probe
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Patch features (B, d, D) of images (B, C, H, W), always from the eval-mode backbone (frozen: BatchNorm
        statistics and dropout never change, whatever the owner's train/eval mode)."""
        with eval_mode(self.model):
            if self.is_vit:
                tokens = self.model.forward_features(x)[:, self.num_prefix :]
                gh, gw = self.model.patch_embed.grid_size
                fmap = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
            else:
                fmap = self.model(x)[-1]
        if tuple(fmap.shape[-2:]) != self.grid:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid)
        return fmap.flatten(2).transpose(1, 2)
