"""PatchGame: ``v(S)`` = a classifier's output with the patches outside ``S`` removed (masked or dropped)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from lightning_attr.frozen import eval_mode
from lightning_attr.games.removal import get_removal

__all__ = ["PatchGame", "patch_grid", "check_masks"]

Output = Literal["probs", "logits", "log_probs"]
RemovalName = Literal["mask", "drop"]


def patch_grid(image_size: tuple[int, int], patch_size: int | tuple[int, int]) -> tuple[int, int]:
    """Return the patch grid ``(gh, gw)`` of an image of ``image_size = (H, W)`` cut into ``patch_size`` patches."""
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    h, w = image_size
    if ph <= 0 or pw <= 0:
        raise ValueError(f"`patch_size` must be positive, got {patch_size!r}.")
    if h % ph or w % pw:
        raise ValueError(
            f"`patch_size`={patch_size!r} must divide the image size (H, W)={image_size!r} exactly; "
            f"allowed patch sizes divide both {h} and {w}."
        )
    return h // ph, w // pw


def check_masks(masks: Tensor, batch_size: int, num_players: int) -> None:
    """Raise a clear error unless ``masks`` has shape ``(batch_size, M, num_players)``."""
    if masks.dim() != 3 or masks.shape[0] != batch_size or masks.shape[2] != num_players:
        raise ValueError(
            f"`masks` must have shape (B={batch_size}, M, d={num_players}) (one row of {num_players} players per "
            f"coalition), got {tuple(masks.shape)}."
        )


class PatchGame(nn.Module):
    """``v(S)`` for every class: the wrapped classifier applied to ``x`` with the patches outside ``S`` removed.

    Args:
        model: any classifier mapping ``(N, C, H, W) -> (N, K)`` logits. It is always evaluated in eval mode (inside
            :func:`~lightning_attr.frozen.eval_mode`: its own train/eval flags are restored afterwards).
        patch_size: side of a square patch (or ``(ph, pw)``); the players are the ``d = (H/ph) * (W/pw)`` patches in
            row-major order.
        image_size: ``(H, W)`` of the inputs; fixes ``num_players``.
        baseline: value given to masked pixels (a float, or a tensor broadcastable to ``(C, H, W)``), in the
            model's (normalized) input space. Default 0.
        output: ``"probs"`` (default, softmax), ``"logits"`` or ``"log_probs"``.
        chunk_size: at most this many masked images go through the model in one forward pass (token dropping: about
            as many tokens as ``chunk_size`` whole images, so more of the small coalitions).
        max_memory_mb: additionally caps a chunk so the masked input batch stays below this many MiB.
        removal: ``"mask"`` (default): absent patches take the ``baseline`` pixels, any model; ``"drop"``: for a
            patch-aligned ViT (the game's patches are its tokens), absent patches' tokens are left out of the
            sequence (:class:`~lightning_attr.games.TokenDropping`): patches embedded once per image, coalitions
            batched by size, fewer FLOPs per evaluation. A different game than masking, except when all patches are
            present; a classifier trained with random token dropping (``Classifier(removal="drop")``) matches it.

    The game counts the coalitions it evaluated in ``num_evaluations`` (the unit of compute of every comparison).
    """

    def __init__(
        self,
        model: nn.Module,
        patch_size: int | tuple[int, int],
        image_size: tuple[int, int],
        baseline: float | Tensor = 0.0,
        output: Output = "probs",
        chunk_size: int = 256,
        max_memory_mb: float = 512.0,
        removal: RemovalName = "mask",
    ) -> None:
        super().__init__()
        if output not in ("probs", "logits", "log_probs"):
            raise ValueError(f"`output` must be one of 'probs', 'logits', 'log_probs', got {output!r}.")
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}.")
        if max_memory_mb <= 0:
            raise ValueError(f"`max_memory_mb` must be > 0, got {max_memory_mb}.")
        self.model = model
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.grid = patch_grid(self.image_size, patch_size)
        self.patch_size = (self.image_size[0] // self.grid[0], self.image_size[1] // self.grid[1])
        self.output = output
        self.chunk_size = chunk_size
        self.max_memory_mb = max_memory_mb
        self.register_buffer("baseline", torch.as_tensor(baseline, dtype=torch.float32), persistent=False)
        self.num_evaluations = 0
        self.removal = get_removal(removal)
        self.removal.check(model, self)

    @property
    def num_players(self) -> int:
        return self.grid[0] * self.grid[1]

    def _check_x(self, x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"`x` must have shape (B, C, H, W) with (H, W)={self.image_size}, got {tuple(x.shape)}."
            )

    def mask_inputs(self, x: Tensor, masks: Tensor) -> Tensor:
        """Masked copies of ``x``: ``x`` (N, C, H, W) and ``masks`` (N, d) -> (N, C, H, W)."""
        n, c, h, w = x.shape
        (gh, gw), (ph, pw) = self.grid, self.patch_size
        keep = masks.to(x.dtype).view(n, 1, gh, 1, gw, 1)
        base = self.baseline.to(x.dtype)
        if base.dim() == 0:
            out = (x.view(n, c, gh, ph, gw, pw) - base) * keep + base
            return out.view(n, c, h, w)
        base = base.expand(c, h, w).reshape(1, c, gh, ph, gw, pw)
        out = (x.view(n, c, gh, ph, gw, pw) - base) * keep + base
        return out.view(n, c, h, w)

    def patches(self, x: Tensor) -> Tensor:
        """The players' pixels: ``x`` (B, C, H, W) -> (B, d, C * ph * pw), patches in player (row-major) order."""
        b, c = x.shape[:2]
        (gh, gw), (ph, pw) = self.grid, self.patch_size
        return x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * ph * pw)

    def _chunk(self, x: Tensor) -> int:
        per_image = x[0].numel() * x.element_size()
        return max(1, min(self.chunk_size, int(self.max_memory_mb * 2**20 // max(per_image, 1))))

    @torch.no_grad()
    def forward(self, x: Tensor, masks: Tensor) -> Tensor:
        """Evaluate coalitions: ``x`` (B, C, H, W), boolean ``masks`` (B, M, d) -> outputs (B, M, K).

        ``masks[b, m, i]`` is True when patch ``i`` is kept (player ``i`` is in coalition ``m`` of example ``b``).
        """
        self._check_x(x)
        check_masks(masks, x.shape[0], self.num_players)
        b, m, d = masks.shape
        flat = masks.to(device=x.device, dtype=torch.bool).reshape(b * m, d)
        owner = torch.arange(b, device=x.device).repeat_interleave(m)
        out = None
        with eval_mode(self.model):
            prepared = self.removal.prepare(self.model, x, self)
            chunk = self._chunk(prepared)
            for group in self.removal.groups(flat):
                step = self.removal.rows_per_forward(chunk, int(flat[group[0]].sum()), d)
                for rows in group.split(step):
                    values = self._transform(self.removal.logits(self.model, prepared[owner[rows]], flat[rows], self)
                                             .float())
                    out = values.new_empty(b * m, values.shape[-1]) if out is None else out
                    out[rows] = values
        self.num_evaluations += b * m
        return out.view(b, m, -1)

    def _transform(self, logits: Tensor) -> Tensor:
        if self.output == "probs":
            return logits.softmax(-1)
        if self.output == "log_probs":
            return logits.log_softmax(-1)
        return logits

    def extra_repr(self) -> str:
        text = f"grid={self.grid}, patch_size={self.patch_size}, output={self.output!r}, chunk_size={self.chunk_size}"
        return text + (f", removal={self.removal.name!r}" if self.removal.name != "mask" else "")
