"""Figures: attribution heatmaps next to the images they explain; data values against their ground truth."""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from lightning_attr.io import atomic_write

__all__ = ["attribution_heatmaps", "save_figure", "value_scatter"]


def save_figure(fig, path: str, dpi: int = 110) -> str:
    """Write a matplotlib figure to ``path`` as PNG, atomically, and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def attribution_heatmaps(
    images: Tensor,
    attributions: Mapping[str, Tensor],
    classes: Tensor,
    grid: tuple[int, int],
    path: str,
    mean: float = 0.5,
    std: float = 0.5,
    titles: Sequence[str] | None = None,
) -> str:
    """Save a PNG: one row per image (N, C, H, W), the image, then one heatmap per method for class ``classes[n]``.

    ``attributions``: method name -> (N, d, K). Each row shares a symmetric colour scale (red +, blue -), so the
    methods are directly comparable. ``titles``: one per image (default ``"class N"``, the class drawn; pass e.g.
    ``"pred N"`` when ``classes`` are the model's predictions). Written atomically; returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, cols = images.shape[0], 1 + len(attributions)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    for r in range(n):
        img = (images[r].float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).squeeze(-1)
        axes[r, 0].imshow(img.numpy(), cmap="gray" if img.dim() == 2 else None)
        axes[r, 0].set_title(titles[r] if titles else f"class {int(classes[r])}", fontsize=8)
        maps = {k: v[r, :, int(classes[r])].float().cpu().view(*grid) for k, v in attributions.items()}
        vmax = max(float(m.abs().max()) for m in maps.values()) or 1.0
        for c, (name, m) in enumerate(maps.items(), start=1):
            axes[r, c].imshow(m.numpy(), cmap="bwr", vmin=-vmax, vmax=vmax)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return save_figure(fig, path)


def value_scatter(truth: Tensor, estimates: Mapping[str, Tensor], flipped: Tensor, path: str) -> str:
    """Save a PNG: one panel per method, its data values (P,) against the ground truth (P,), flipped-label points in
    red, with the identity line. Written atomically; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(estimates), figsize=(4 * len(estimates), 3.8), squeeze=False, sharey=True)
    t, bad = truth.double().cpu(), flipped.bool().cpu()
    lo, hi = float(t.min()), float(t.max())
    for ax, (name, est) in zip(axes[0], estimates.items()):
        e = est.double().cpu()
        ax.scatter(t[~bad], e[~bad], s=8, alpha=0.6, label="clean label")
        ax.scatter(t[bad], e[bad], s=8, alpha=0.8, color="tab:red", label="flipped label")
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(title=name, xlabel="ground-truth value")
    axes[0, 0].set_ylabel("estimated value")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
