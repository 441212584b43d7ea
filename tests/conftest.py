"""Shared fixtures: tiny timm models on 16x16 digits so the module tests stay fast on 2 CPU cores."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")

TINY_VIT = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)
TINY_RESNET = dict(channels=(8, 8, 8, 8), layers=(1, 1, 1, 1), stem_width=8)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # helpers' parallel jobs run with 1
    yield


@pytest.fixture
def vit_weights(tmp_path):
    """A tiny digits-sized ViT (2x2 patch grid on 16x16 images) saved as safetensors: (path, model)."""
    from lightning_attr import create_timm_model
    from lightning_attr.modules import save_timm_weights

    torch.manual_seed(0)
    model = create_timm_model("vit_tiny_patch16_224", num_classes=10, **TINY_VIT).eval()
    path = str(tmp_path / "vit.safetensors")
    save_timm_weights(model, path)
    return path, model


def explainer_kwargs(weights: str, **over) -> dict:
    kw = dict(classifier="vit_tiny_patch16_224", classifier_weights=weights, classifier_kwargs=TINY_VIT, num_classes=10,
              image_size=16, patch_size=8, head_dim=16, head_depth=1, head_heads=2)
    kw.update(over)
    return kw


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI(args=...) warns when pytest's own argv is present."""
    monkeypatch.setattr("sys.argv", ["lightning-attr"])
