"""timm models and backbones load from local weight files exactly as saved; bad names and paths fail clearly."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_RESNET, TINY_VIT

from lightning_attr import create_timm_model
from lightning_attr.modules import PatchFeatures, save_timm_weights


def test_vit_from_local_file_matches_saved_model(vit_weights):
    path, model = vit_weights
    loaded = create_timm_model("vit_tiny_patch16_224", weights_file=path, num_classes=10, **TINY_VIT).eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_resnet_from_local_file_matches_saved_model(tmp_path, suffix):
    torch.manual_seed(1)
    model = create_timm_model("resnet18", num_classes=10, **TINY_RESNET).eval()
    path = str(tmp_path / f"resnet{suffix}")
    save_timm_weights(model, path)
    loaded = create_timm_model("resnet18", weights_file=path, num_classes=10, **TINY_RESNET).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".tmp-*")), "a temporary file was left behind"


def test_vit_backbone_gives_the_saved_models_patch_tokens(vit_weights):
    path, model = vit_weights
    feats = PatchFeatures("vit_tiny_patch16_224", (2, 2), 16, weights_file=path, **TINY_VIT)
    x = torch.randn(2, 3, 16, 16)
    expected = model.forward_features(x)[:, model.num_prefix_tokens :]
    torch.testing.assert_close(feats(x), expected)
    assert feats(x).shape == (2, 4, 16) and not any(p.requires_grad for p in feats.parameters())


def test_resnet_backbone_pools_the_saved_models_feature_map(tmp_path):
    torch.manual_seed(2)
    model = create_timm_model("resnet18", num_classes=10, **TINY_RESNET).eval()
    path = str(tmp_path / "r.safetensors")
    save_timm_weights(model, path)
    feats = PatchFeatures("resnet18", (4, 4), 32, weights_file=path, **TINY_RESNET)
    x = torch.randn(2, 3, 32, 32)
    # 32x32 input: layer2 has stride 8 -> a 4x4 map, the deepest map with at least the 4x4 patch grid.
    h = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    expected = model.layer2(model.layer1(h))
    torch.testing.assert_close(feats(x), expected.flatten(2).transpose(1, 2))
    # Frozen in train mode too: the eval-mode output, BatchNorm statistics untouched, the train/eval flags restored.
    stats = {k: v.clone() for k, v in feats.model.state_dict().items()}
    feats.train()
    feats(torch.randn(4, 3, 32, 32) * 3 + 1)  # batch statistics far from the running ones
    assert all(torch.equal(v, feats.model.state_dict()[k]) for k, v in stats.items())
    torch.testing.assert_close(feats(x), expected.flatten(2).transpose(1, 2))
    assert all(m.training for m in feats.modules())


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="model_name.*not_a_model"):
        create_timm_model("not_a_model_xyz")


def test_missing_weights_file_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_timm_model("resnet18", weights_file=str(tmp_path / "missing.safetensors"), **TINY_RESNET)


def test_hub_failure_points_to_local_weights(monkeypatch):
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("no network")
        return original(*args, **kwargs)

    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError, match="weights_file"):
        create_timm_model("resnet18", pretrained=True, **TINY_RESNET)
