"""Scaling study of the amortized explainer: error and total compute against the number of training images.

For each training-set size (the 1,437 real digits, then streamed augmented copies up to 100k) the explainer config
(``configs/digits_shapley_vit.yaml``, token-dropping game) is fit on ``AugmentedImageDataModule(train_size=n)`` with
fixed labels of 32 evaluations per image, then scored on the demo's held-out test images against exact Shapley
values. Each size gets:

* its MSE and the equal-error ratio against per-example permutation sampling and unbiased KernelSHAP (curves on the
  same test images);
* its compute: label evaluations, frozen features (v(empty), v(all), backbone: counted as 3 evaluations per image),
  head training seconds (every epoch, Lightning and data loading included) converted at the oracle's measured rate;
* break-even (explained images from which amortization costs less than per-example sampling at equal error) and
  the total compute for 1k, 10k and 100k explained images.

Run through ``python benchmarks/amortization.py --parts scaling`` (it needs the demo's classifier and test cache).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from amortization import (
    CURVE_METHODS,
    fit_explainer,
    log,
    time_training_epochs,
)
from common import save_plot
from torch import Tensor

from lightning_attr.evaluation import (
    amortized_row,
    break_even,
    equal_error_budget,
    evaluations_per_example,
    inference_seconds,
)

BIG_HEAD = (128, 3, 0.002)  # head_dim, head_depth, lr for 5k+ images (the config's small head underfits them)
FROZEN_EVALS_PER_IMAGE = 3  # v(empty), v(all) and one backbone forward, computed once per image (feature cache)


@dataclass
class ScalingSettings:
    """Training-set sizes, epochs, batch size and head (``(head_dim, head_depth, lr)``, ``None``: the config's) per
    size, and the numbers of explained images of the compute table; everything else is the config's."""

    sizes: tuple[int, ...] = (1437, 5_000, 20_000, 100_000)
    epochs: tuple[int, ...] = (6, 12, 10, 5)
    batch_sizes: tuple[int, ...] = (64, 128, 128, 256)
    heads: tuple[tuple[int, int, float] | None, ...] = (None, BIG_HEAD, BIG_HEAD, BIG_HEAD)  # None: the config's
    explained: tuple[int, ...] = (1_000, 10_000, 100_000)

    @classmethod
    def quick(cls) -> ScalingSettings:
        return cls(sizes=(1437, 5_000), epochs=(3, 2), batch_sizes=(64, 128), heads=(None, BIG_HEAD))


def fit_size(demo_out: str, out: str, n: int, epochs: int, batch_size: int,
             head: tuple[int, int, float] | None) -> dict:
    """Fit the explainer on ``n`` training images (real first, then augmented); returns the finished CLI's model,
    datamodule, per-epoch seconds and the best checkpoint."""
    start = time.perf_counter()
    cli, clock = fit_explainer(demo_out, os.path.join(out, f"n{n}"), os.path.join(out, "oracle_cache"), epochs,
                               ["--data.init_args.datamodule.class_path", "lightning_attr.AugmentedImageDataModule",
                                "--data.init_args.datamodule.init_args.train_size", str(n),
                                "--data.init_args.datamodule.init_args.batch_size", str(batch_size), *_head_args(head)])
    return {"cli": cli, "epoch_seconds": clock.epoch_seconds(), "train_seconds": clock.training_seconds(),
            "fit_seconds": time.perf_counter() - start,
            "checkpoint": cli.trainer.checkpoint_callback.best_model_path}


def _head_args(head: tuple[int, int, float] | None) -> list[str]:
    if head is None:
        return []
    dim, depth, lr = head
    return ["--model.init_args.head_dim", str(dim), "--model.init_args.head_depth", str(depth),
            "--model.init_args.lr", str(lr)]


def size_row(fit: dict, n: int, x: Tensor, exact: Tensor, rate: float, curve: Sequence[dict]) -> dict:
    """Error, compute and equal-error numbers of one fitted size (``rate``: oracle evaluations per second)."""
    cli = fit["cli"]
    dm, game = cli.datamodule, cli.model.game
    explainer = type(cli.model).load_from_checkpoint(fit["checkpoint"], map_location="cpu").eval()
    amortized = amortized_row(explainer, x, exact, dm.num_samples)
    n_val = len(dm.datamodule.splits["val"])
    per_train = evaluations_per_example(game, x, dm.estimator.name, dm.num_samples)
    per_val = evaluations_per_example(game, x, dm.estimator.name, dm.val_num_samples)
    label_evals = n * per_train + n_val * per_val + FROZEN_EVALS_PER_IMAGE * (n + n_val)
    train_seconds = fit["train_seconds"]  # steady epochs: epoch 0 also computed the labels and frozen features
    fixed = label_evals + train_seconds * rate
    infer = max(amortized["evals_per_example"], inference_seconds(explainer, x) * rate)
    row = {"n_train": n, "epochs": len(fit["epoch_seconds"]), "hparams": dict(explainer.hparams),
           "mse": amortized["mse"], "pearson": amortized["pearson"],
           "label_evaluations": label_evals, "train_seconds": train_seconds, "fit_seconds": fit["fit_seconds"],
           "epoch_seconds": fit["epoch_seconds"], "fixed_evals": fixed, "fixed_seconds": fixed / rate,
           "inference_evals_per_example": infer, "methods": {}}
    for method in CURVE_METHODS:
        need = equal_error_budget([r for r in curve if r["method"] == method], amortized["mse"])
        row["methods"][method] = {"equal_error_evals": need, "equal_error_ratio": need / dm.num_samples,
                                  "break_even_examples": break_even(fixed, need, infer)}
    return row


def compute_at(row: dict, method: str, explained: Sequence[int], rate: float) -> list[dict]:
    """Total compute (evaluation-equivalents and seconds) of amortization vs ``method`` for each number of images."""
    need = row["methods"][method]["equal_error_evals"]
    out = []
    for n in explained:
        amortized = row["fixed_evals"] + n * row["inference_evals_per_example"]
        out.append({"explained": n, "amortized_evals": amortized, "per_example_evals": n * need,
                    "amortized_seconds": amortized / rate, "per_example_seconds": n * need / rate,
                    "ratio": n * need / amortized})
    return out


def scaling_part(s: ScalingSettings, demo_out: str, out: str, x: Tensor, exact: Tensor, curve: Sequence[dict],
                 rate: float) -> dict:
    """Fit every size, score it, and account its compute against the per-example ``curve`` (same test images)."""
    rows = []
    for n, epochs, batch_size, head in zip(s.sizes, s.epochs, s.batch_sizes, s.heads):
        log(f"scaling: fitting the explainer on {n:,} training images for {epochs} epochs (batch {batch_size}, "
            f"head {head or 'of the config'})")
        row = size_row(fit_size(demo_out, out, n, epochs, batch_size, head), n, x, exact, rate, curve)
        hp = row.pop("hparams")
        row.update(batch_size=batch_size, head=f"{hp['head_dim']}/{hp['head_depth']}", lr=hp["lr"])
        row["compute"] = {m: compute_at(row, m, s.explained, rate) for m in CURVE_METHODS}
        log(f"scaling: n={n:,}: MSE {row['mse']:.3e}, equal-error ratio vs permutation "
            f"{row['methods']['permutation_shapley']['equal_error_ratio']:.1f}x, break-even "
            f"{row['methods']['permutation_shapley']['break_even_examples']:,.0f} images")
        rows.append(row)
    return {"rows": rows, "oracle_evals_per_s": rate, "n_test": len(x), "explained": list(s.explained)}


def _num(v: float) -> str:
    return "inf" if v is None or not math.isfinite(v) else f"{v:,.0f}"


def scaling_tables(p: dict) -> str:
    """Markdown tables: error and equal-error ratio by training-set size; compute against per-example sampling."""
    perm, kern = CURVE_METHODS
    c = p["feature_cache"]
    lines = [f"Head training epoch on the 1,437 digits (labels cached): {c['uncached_seconds_per_epoch']:.2f} s "
             f"recomputing the frozen backbone and v(empty), v(all) every step, {c['cached_seconds_per_epoch']:.2f} s "
             f"with the feature cache ({c['ratio']:.2f}x).", "",
             f"### Scaling: amortized explainer vs number of training images ({p['n_test']} held-out test images, "
             f"exact Shapley; oracle {p['oracle_evals_per_s']:,.0f} evaluations/s)", "",
             "| training images | head dim / depth | epochs | MSE vs exact | Pearson | equal-error ratio vs permutation / vs unbiased "
             "KernelSHAP (at label budget 32) | labels + frozen features (evals) | head training (s) | break-even "
             "images vs permutation |", "|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in p["rows"]:
        m = r["methods"]
        lines.append(f"| {r['n_train']:,} | {r['head']} | {r['epochs']} | {r['mse']:.3e} | {r['pearson']:.3f} | "
                     f"{m[perm]['equal_error_ratio']:.1f}x / {m[kern]['equal_error_ratio']:.1f}x | "
                     f"{r['label_evaluations']:,.0f} | {r['train_seconds']:.1f} | {_num(m[perm]['break_even_examples'])} |")
    lines += ["", "Total compute, amortized (labels + frozen features + head training + inference) vs per-example "
              "permutation sampling at equal error, in seconds at the oracle's rate:", "",
              "| training images | " + " | ".join(f"{n:,} explained: amortized / per-example (ratio)"
                                                 for n in p["explained"]) + " |",
              "|---:|" + "---:|" * len(p["explained"])]
    for r in p["rows"]:
        cells = [f"{c['amortized_seconds']:,.0f} s / {c['per_example_seconds']:,.0f} s ({c['ratio']:.2f}x)"
                 for c in r["compute"][perm]]
        lines.append(f"| {r['n_train']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scaling(p: dict, curve: Sequence[dict], path: str) -> str:
    """MSE against training-set size, with the per-example permutation MSE at 32, 128 and 512 evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot([r["n_train"] for r in p["rows"]], [r["mse"] for r in p["rows"]], marker="*", ms=12, color="crimson",
            label="amortized (labels: 32 evaluations per image)")
    for r in curve:
        if r["method"] == CURVE_METHODS[0] and r["budget"] in (32, 128, 512):
            ax.axhline(r["mse"], ls=":", color="gray", lw=1)
            ax.annotate(f"permutation @{r['budget']}", (p["rows"][0]["n_train"], r["mse"]), fontsize=8,
                        va="bottom")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training images (real, then streamed augmented copies)")
    ax.set_ylabel("MSE vs exact Shapley (held-out digits)")
    return save_plot(fig, ax, path)


def feature_cache_ratio(demo_out: str, epochs: int = 4) -> dict:
    """Seconds per training epoch (labels cached, epochs after the first) without and with the feature cache."""
    off = time_training_epochs(demo_out, epochs, ["--model.init_args.feature_cache", "null"])
    on = time_training_epochs(demo_out, epochs)
    return {"uncached_seconds_per_epoch": off["seconds_per_epoch"], "cached_seconds_per_epoch": on["seconds_per_epoch"],
            "ratio": off["seconds_per_epoch"] / on["seconds_per_epoch"]}


def run_scaling(quick: bool, demo_out: str, out: str, x: Tensor, exact: Tensor, curve: Sequence[dict],
                rate: float) -> tuple[dict, str]:
    """The scaling part end to end: (results, markdown); writes ``{out}/scaling.png``."""
    s = ScalingSettings.quick() if quick else ScalingSettings()
    torch.manual_seed(0)
    cache = feature_cache_ratio(demo_out)
    log(f"feature cache: {cache['uncached_seconds_per_epoch']:.2f} s per epoch without, "
        f"{cache['cached_seconds_per_epoch']:.2f} s with ({cache['ratio']:.2f}x)")
    p = scaling_part(s, demo_out, out, x, exact, curve, rate)
    p["feature_cache"] = cache
    p["plot"] = plot_scaling(p, curve, os.path.join(out, "scaling.png"))
    return p, scaling_tables(p)


__all__: list[Any] = ["run_scaling", "ScalingSettings"]
