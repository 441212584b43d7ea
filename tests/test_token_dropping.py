"""PatchGame(removal="drop"): ViT coalitions by token dropping, checked against independent definitions."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from lightning_attr import Classifier
from lightning_attr.estimators import exact_shapley
from lightning_attr.games import PatchGame, forward_tokens, get_removal, patch_tokens

VIT = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5)


def tiny_vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**VIT, **kwargs}).eval()
    for p in model.parameters():  # timm zero-initializes some weights: make every token matter
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def coalitions(b: int, m: int, d: int, seed: int = 0) -> torch.Tensor:
    masks = torch.rand(b, m, d, generator=torch.Generator().manual_seed(seed)) < 0.5
    masks[:, 0], masks[:, 1] = False, True
    return masks


def attention_masked_logits(model: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The definition through the full sequence: every token attends only to the class token and present patches
    (absent keys masked out of attention); the class token's output then equals the dropped sequence's."""
    n_prefix = model.num_prefix_tokens
    present = torch.cat([torch.ones(keep.shape[0], n_prefix, dtype=torch.bool), keep], 1)  # (B, T)
    attn_mask = present[:, None, None, :].expand(-1, 1, present.shape[1], -1)
    return model.forward_head(model.forward_features(x, attn_mask=attn_mask))


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}, {"no_embed_class": True, "reg_tokens": 1}])
def test_all_patches_present_equals_the_model_and_masking(kwargs):
    model = tiny_vit(**kwargs)
    x = torch.randn(3, 3, 16, 16)
    full = torch.ones(3, 1, 16, dtype=torch.bool)
    drop = PatchGame(model, 4, (16, 16), output="logits", removal="drop")(x, full)[:, 0]
    mask = PatchGame(model, 4, (16, 16), output="logits")(x, full)[:, 0]
    torch.testing.assert_close(drop, model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(drop, mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(forward_tokens(model, patch_tokens(model, x)), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}])
def test_drop_game_equals_attention_masking_definition(kwargs):
    model = tiny_vit(**kwargs)
    x, masks = torch.randn(2, 3, 16, 16), coalitions(2, 9, 16)
    game = PatchGame(model, 4, (16, 16), output="logits", removal="drop")
    got = game(x, masks)
    for b in range(2):
        expected = attention_masked_logits(model, x[b : b + 1].expand(9, -1, -1, -1), masks[b])
        torch.testing.assert_close(got[b], expected, atol=1e-5, rtol=1e-5)
    assert game.num_evaluations == 18


class NonInteractingTokens(nn.Module):
    """Tokens that never meet: logits = sum over present patches of a bias-free linear map of the patch pixels.
    A patch at baseline 0 then adds exactly 0, so dropping a patch equals masking it."""

    def __init__(self, grid=(4, 4), patch=4, channels=3, classes=5) -> None:
        super().__init__()
        self.grid, self.patch = grid, patch
        self.embed = nn.Linear(channels * patch * patch, 8, bias=False)
        self.out = nn.Linear(8, classes, bias=False)

    def patch_tokens(self, x):
        b, c = x.shape[:2]
        (gh, gw), p = self.grid, self.patch
        return self.embed(x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, -1))

    def forward_tokens(self, tokens):
        return self.out(tokens.sum(1))

    def forward(self, x):
        return self.forward_tokens(self.patch_tokens(x))


@pytest.mark.parametrize("output", ["probs", "logits"])
def test_drop_equals_masking_when_tokens_do_not_interact(output):
    torch.manual_seed(0)
    model = NonInteractingTokens()
    x, masks = torch.randn(3, 3, 16, 16), coalitions(3, 20, 16, seed=1)
    drop = PatchGame(model, 4, (16, 16), output=output, removal="drop")(x, masks)
    mask = PatchGame(model, 4, (16, 16), output=output, baseline=0.0)(x, masks)
    torch.testing.assert_close(drop, mask, atol=1e-5, rtol=1e-5)


def test_exact_shapley_of_drop_game_is_efficient():
    model = tiny_vit(patch_size=8)  # 4 players
    game = PatchGame(model, 8, (16, 16), removal="drop")
    x = torch.randn(2, 3, 16, 16)
    phi = exact_shapley(game, x)  # (B, d, K)
    ends = game(x, torch.stack([torch.zeros(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)], 1))
    torch.testing.assert_close(phi.sum(1), ends[:, 1] - ends[:, 0], atol=1e-6, rtol=1e-5)
    assert phi.abs().sum() > 0


def test_chunking_and_grouping_do_not_change_the_result():
    model = tiny_vit()
    x, masks = torch.randn(2, 3, 16, 16), coalitions(2, 33, 16, seed=3)
    big = PatchGame(model, 4, (16, 16), removal="drop")(x, masks)
    small = PatchGame(model, 4, (16, 16), removal="drop", chunk_size=1)(x, masks)
    torch.testing.assert_close(big, small, atol=1e-6, rtol=1e-5)
    groups = get_removal("drop").groups(masks.reshape(-1, 16))
    sizes = [set(masks.reshape(-1, 16)[g].sum(1).tolist()) for g in groups]
    assert all(len(s) == 1 for s in sizes) and sorted(torch.cat(groups).tolist()) == list(range(66))


def test_mixed_sizes_in_one_call_match_the_game():
    model = tiny_vit()
    x, keep = torch.randn(5, 3, 16, 16), coalitions(1, 5, 16, seed=4)[0]
    game = PatchGame(model, 4, (16, 16), output="logits", removal="drop")
    torch.testing.assert_close(game.removal.remove(model, x, keep, game), game(x, keep[:, None])[:, 0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: PatchGame(nn.Sequential(nn.Flatten(), nn.Linear(768, 5)), 4, (16, 16), removal="drop"), "patch-token"),
    (lambda: PatchGame(tiny_vit(), 8, (16, 16), removal="drop"), "patch grid"),
    (lambda: PatchGame(tiny_vit(), 4, (16, 16), removal="cut"), "allowed"),
])
def test_bad_removal_settings_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match="removal") as err:
        make()
    assert match in str(err.value)


def test_classifier_trained_with_token_dropping():
    clf = Classifier(model_name="vit_tiny_patch16_224", num_classes=5, image_size=16, patch_size=4,
                     model_kwargs={k: v for k, v in VIT.items() if k != "num_classes"}, removal="drop", mask_prob=1.0)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    torch.manual_seed(1)
    keep = clf.random_keep(x)
    game = PatchGame(clf.model, 4, (16, 16), output="logits", removal="drop")
    torch.testing.assert_close(clf.removal.remove(clf.model.eval(), x, keep, clf.masker), game(x, keep[:, None])[:, 0],
                               atol=1e-5, rtol=1e-5)
    clf.train()
    loss = clf.training_step({"image": x, "label": y}, 0)
    loss.backward()
    assert clf.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="removal"):
        Classifier(model_name="resnet18", num_classes=5, image_size=16, patch_size=4, removal="drop")
