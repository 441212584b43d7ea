"""PatchGame on a tiny real torch model, checked against a hand-written masking loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_attr.estimators import exact_shapley
from lightning_attr.games import PatchGame, check_masks, patch_grid

C, H, W, K = 2, 4, 6, 3


def tiny_model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(C * H * W, K))


def inputs(b: int = 2, m: int = 7, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, C, H, W, generator=g)
    masks = torch.rand(b, m, d, generator=g) < 0.5
    masks[:, 0] = False  # always include the empty and the full coalition
    masks[:, 1] = True
    return x, masks


def loop_game(model, x, masks, patch=(2, 2), baseline=0.0, output="probs"):
    """The definition, one masked image at a time: patches (row-major) outside the coalition get the baseline."""
    ph, pw = patch
    gw = W // pw
    base = torch.as_tensor(baseline, dtype=x.dtype).expand(C, H, W)
    out = torch.zeros(masks.shape[0], masks.shape[1], K)
    model.eval()
    with torch.no_grad():
        for b in range(masks.shape[0]):
            for m in range(masks.shape[1]):
                img = x[b].clone()
                for i in range(masks.shape[2]):
                    if not masks[b, m, i]:
                        r, c = divmod(i, gw)
                        rows, cols = slice(r * ph, (r + 1) * ph), slice(c * pw, (c + 1) * pw)
                        img[:, rows, cols] = base[:, rows, cols]
                logits = model(img.unsqueeze(0))[0]
                out[b, m] = {"probs": logits.softmax(-1), "logits": logits, "log_probs": logits.log_softmax(-1)}[output]
    return out


def test_num_players_is_grid_size():
    assert PatchGame(tiny_model(), 2, (H, W)).num_players == 2 * 3
    assert PatchGame(tiny_model(), (2, 3), (H, W)).num_players == 2 * 2
    assert PatchGame(tiny_model(), 1, (H, W)).num_players == H * W
    assert patch_grid((H, W), (4, 6)) == (1, 1)


@pytest.mark.parametrize("output", ["probs", "logits", "log_probs"])
def test_matches_hand_made_masking_loop(output):
    model = tiny_model()
    game = PatchGame(model, 2, (H, W), output=output)
    x, masks = inputs()
    out = game(x, masks)
    assert out.shape == (2, 7, K) and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, loop_game(model, x, masks, output=output), atol=1e-5, rtol=1e-5)


def test_non_square_patches_match_loop():
    model = tiny_model(1)
    game = PatchGame(model, (2, 3), (H, W))
    x, masks = inputs(d=4, seed=1)
    torch.testing.assert_close(game(x, masks), loop_game(model, x, masks, patch=(2, 3)), atol=1e-5, rtol=1e-5)


def test_endpoints_are_model_on_image_and_on_baseline():
    model = tiny_model(2)
    game = PatchGame(model, 2, (H, W))
    x, _ = inputs()
    masks = torch.zeros(2, 2, 6, dtype=torch.bool)
    masks[:, 1] = True
    out = game(x, masks)
    with torch.no_grad():
        torch.testing.assert_close(out[:, 1], model(x).softmax(-1))
        torch.testing.assert_close(out[:, 0], model(torch.zeros_like(x)).softmax(-1))


def test_probabilities_sum_to_one():
    game = PatchGame(tiny_model(), 2, (H, W))
    x, masks = inputs(m=20)
    out = game(x, masks)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 20))


@pytest.mark.parametrize("kwargs", [dict(chunk_size=1), dict(chunk_size=3), dict(max_memory_mb=1e-6)])
def test_chunking_does_not_change_result(kwargs):
    model = tiny_model()
    x, masks = inputs(m=9)
    big = PatchGame(model, 2, (H, W), chunk_size=4096)(x, masks)
    small = PatchGame(model, 2, (H, W), **kwargs)(x, masks)
    torch.testing.assert_close(small, big, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "baseline",
    [0.7, torch.randn(C, H, W, generator=torch.Generator().manual_seed(3)), torch.tensor([-1.0, 2.0]).view(C, 1, 1)],
    ids=["float", "per-pixel", "per-channel"],
)
def test_baseline(baseline):
    model = tiny_model()
    game = PatchGame(model, 2, (H, W), baseline=baseline)
    x, masks = inputs()
    torch.testing.assert_close(game(x, masks), loop_game(model, x, masks, baseline=baseline), atol=1e-5, rtol=1e-5)


def test_counts_evaluations():
    game = PatchGame(tiny_model(), 2, (H, W), chunk_size=4)
    assert game.num_evaluations == 0
    x, masks = inputs(b=2, m=7)
    game(x, masks)
    assert game.num_evaluations == 2 * 7
    game(x[:1], masks[:1, :3])
    assert game.num_evaluations == 2 * 7 + 3


def test_model_is_evaluated_in_eval_mode_and_keeps_its_flags():
    """A dropout model gives deterministic outputs: the game evaluates it in eval mode even in train mode, and leaves
    every train/eval flag as it was (no module sits in eval mode when its owner trains)."""
    model = tiny_model(dropout=0.5)
    game = PatchGame(model, 2, (H, W))
    game.train()
    x, masks = inputs()
    first = game(x, masks)
    assert game.training and all(m.training for m in model.modules())
    assert torch.equal(first, game(x, masks))
    torch.testing.assert_close(first, loop_game(model, x, masks), atol=1e-5, rtol=1e-5)


def test_works_with_estimators():
    """Exact Shapley on a real PatchGame: efficiency against the model's own outputs on x and on the baseline."""
    model = tiny_model(4)
    game = PatchGame(model, 2, (H, W))
    x, _ = inputs(b=3)
    phi = exact_shapley(game, x)
    assert phi.shape == (3, 6, K)
    assert game.num_evaluations == 3 * 2**6
    with torch.no_grad():
        total = model(x).softmax(-1) - model(torch.zeros_like(x)).softmax(-1)
    torch.testing.assert_close(phi.sum(1), total, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("shape", [(C, H, W), (1, C, H, W + 1), (1, C, H + 2, W)])
def test_bad_x_shape(shape):
    game = PatchGame(tiny_model(), 2, (H, W))
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, C, H, W\)"):
        game(torch.zeros(shape), torch.ones(1, 1, 6, dtype=torch.bool))
    assert game.num_evaluations == 0


@pytest.mark.parametrize("shape", [(1, 2, 5), (1, 2, 7), (2, 2, 6), (1, 6)])
def test_bad_masks_shape(shape):
    game = PatchGame(tiny_model(), 2, (H, W))
    with pytest.raises(ValueError, match="`masks` must have shape"):
        game(torch.zeros(1, C, H, W), torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match="`masks`"):
        check_masks(torch.ones(shape, dtype=torch.bool), 1, 6)
    assert game.num_evaluations == 0


@pytest.mark.parametrize("patch_size", [5, (3, 2), (2, 4), 0, -2])
def test_patch_size_must_divide_image(patch_size):
    with pytest.raises(ValueError, match="`patch_size`"):
        PatchGame(tiny_model(), patch_size, (H, W))


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        (dict(output="softmax"), "`output`"),
        (dict(chunk_size=0), "`chunk_size`"),
        (dict(max_memory_mb=0), "`max_memory_mb`"),
    ],
)
def test_bad_options(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        PatchGame(tiny_model(), 2, (H, W), **kwargs)


def test_patches_are_the_players_pixels_in_player_order():
    game = PatchGame(torch.nn.Identity(), (2, 3), (4, 6))
    x = torch.randn(2, 3, 4, 6)
    patches = game.patches(x)
    assert patches.shape == (2, 4, 3 * 2 * 3)
    for i in range(game.num_players):
        r, c = divmod(i, game.grid[1])
        torch.testing.assert_close(patches[:, i], x[:, :, 2 * r : 2 * r + 2, 3 * c : 3 * c + 3].reshape(2, -1))
