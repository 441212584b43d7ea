"""``make demo``: the whole amortized-Shapley job on the embedded digits data, end to end.

1. ``lightning-attr fit --config configs/digits_classifier_vit.yaml``: train the ViT to explain (with random token
   dropping, the game's way of removing patches); export its weights.
2. ``lightning-attr fit --config configs/digits_shapley_vit.yaml``: load them back frozen through timm's local-file
   path as the backbone, and train the explainer on fixed noisy labels (32 evaluations per image, token-dropping
   game); frozen features are computed once per image.
3. ``trainer.test``: metrics against exact Shapley values (2^16 coalitions per test image, cached).
4. Per-example permutation sampling and unbiased KernelSHAP at 1x, 4x, 16x, 64x the label budget on the same
   test images; the oracle's rate by token dropping vs masking, the whole stage-2 compute and its break-even
   against per-example sampling; the table, a JSON file and a PNG of heatmaps go to ``--out``.
5. Training-data attribution inside training: ``lightning-attr fit --config configs/digits_noisy_resnet.yaml
   --trainer.callbacks+=callbacks/trak.yaml`` (a digits ResNet on 10% flipped labels with TracIn, last-layer TracIn
   and TRAK callbacks) and the noisy-label AUC / recall of each callback's self-influence.
6. Amortized data valuation: ``lightning-attr fit --config configs/digits_distributional_shapley.yaml`` (1,000
   digits points, 20% of labels flipped, 5 samples per point made by the batched utility), its test metrics, the
   equal-compute table against per-point Monte Carlo, mislabeled-point detection and a scatter plot.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lightning_attr.callbacks import EpochClock
from lightning_attr.cli import AttrCLI, build_cli
from lightning_attr.evaluation import amortized_row, equal_error_budget, per_example_curve
from lightning_attr.plots import attribution_heatmaps

if TYPE_CHECKING:
    from lightning_attr.modules import AmortizedExplainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _table(rows: list[dict]) -> str:
    head = ("| method | evals / example | MSE vs exact | Pearson | Spearman | sign agree | seconds |\n"
            "|---|---:|---:|---:|---:|---:|---:|")
    lines = [
        f"| {r['method']}{' (label budget ' + str(r['budget']) + ')' if r['method'] == 'amortized' else ''} | "
        f"{r['evals_per_example']:.0f} | {r['mse']:.3e} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
        f"{r['sign_agreement']:.3f} | {r['seconds']:.2f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def run(out: str = "artifacts/demo", classifier_epochs: int | None = None, explainer_epochs: int | None = None,
        attribution_epochs: int | None = None, valuation_epochs: int | None = None) -> dict:
    """Run the six stages; returns the results dict also written to ``{out}/results.json``."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    weights = classifier_stage(out, classifier_epochs)
    t1 = time.perf_counter()
    cli, clock = explainer_stage(out, weights, explainer_epochs)
    trainer, dm = cli.trainer, cli.datamodule
    best = trainer.checkpoint_callback.best_model_path
    t2 = time.perf_counter()
    test_metrics = trainer.test(cli.model, datamodule=dm, ckpt_path=best, verbose=False)[0]
    t3 = time.perf_counter()

    explainer = type(cli.model).load_from_checkpoint(best, map_location="cpu").eval()
    x, exact = dm.ground_truth(explainer.game, "cpu")
    label_budget = dm.num_samples
    rows, curve = comparison_stage(explainer, x, exact, label_budget)
    t4 = time.perf_counter()

    results = {
        "test_metrics": test_metrics,
        "rows": rows,
        "label_budget": label_budget,
        "train_examples": len(dm.datamodule.splits["train"]),
        "test_examples": len(x),
        **_equal_error(rows[0]["mse"], curve),
        "seconds": {"classifier": t1 - t0, "explainer": t2 - t1, "test": t3 - t2, "per_example": t4 - t3},
        "checkpoint": best,
    }
    results["heatmaps"] = _heatmaps(out, explainer, x, exact, label_budget)
    results["compute"] = compute_stage(explainer, dm, x, results, clock.training_seconds())
    summary = _amortization_summary(results, explainer.game.num_players) + _compute_summary(results["compute"])
    tda = attribution_stage(out, attribution_epochs)
    results["attribution"] = tda
    summary += _attribution_summary(tda)
    results["valuation"] = valuation_stage(out, valuation_epochs)
    summary += _valuation_summary(results["valuation"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(summary)
    print(summary)
    return results


def classifier_stage(out: str, epochs: int | None = None) -> str:
    """Stage 1: train the ViT to explain and export its weights; returns the safetensors path."""
    weights = os.path.join(out, "classifier_vit.safetensors")
    args = ["fit", "--config", str(CONFIGS / "digits_classifier_vit.yaml"),
            "--trainer.default_root_dir", f"{out}/classifier", "--model.init_args.export_path", weights]
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    build_cli(args)
    return weights


def explainer_stage(out: str, weights: str, epochs: int | None = None) -> tuple[AttrCLI, EpochClock]:
    """Stage 2: train the amortized explainer on the frozen classifier ``weights``; returns the finished CLI and the
    clock of its training epochs (head training and validation: with the labels, the compute of this stage)."""
    args = ["--config", str(CONFIGS / "digits_shapley_vit.yaml"), "--trainer.default_root_dir",
            f"{out}/explainer", "--model.init_args.classifier_weights", weights,
            "--data.init_args.cache_dir", f"{out}/oracle_cache"]
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = build_cli(args, run=False)
    clock = EpochClock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, clock


def comparison_stage(explainer: AmortizedExplainer, x: torch.Tensor, exact: torch.Tensor,
                     label_budget: int) -> tuple[list[dict], list[dict]]:
    """Stage 4: the amortized row, then per-example estimators at 1x, 4x, 16x, 64x ``label_budget`` on ``x``
    (N, C, H, W) against ``exact`` (N, d, K). Returns ``(all rows, per-example rows)``."""
    budgets = [label_budget * m for m in (1, 4, 16, 64)]
    rows = [amortized_row(explainer, x, exact, label_budget)]
    methods = ["permutation_shapley", "unbiased_kernel_shap"]
    curve = per_example_curve(explainer.game, x, exact, methods, budgets, seed=1)
    return rows + curve, curve


def _equal_error(amortized_mse: float, curve: list[dict]) -> dict:
    perm = [r for r in curve if r["method"] == "permutation_shapley"]
    return {
        "mse_ratio_permutation_at_label_budget": perm[0]["mse"] / amortized_mse,
        "equal_error_budget": {
            m: equal_error_budget([r for r in curve if r["method"] == m], amortized_mse)
            for m in ("permutation_shapley", "unbiased_kernel_shap")
        },
    }


def oracle_rates(game, x: torch.Tensor, budget: int = 512) -> dict[str, float]:
    """Evaluations per second of permutation sampling on ``x`` through ``game`` and through the same classifier with
    the other removal (token dropping vs baseline masking), best of 3 after a warm-up."""
    from lightning_attr.evaluation import oracle_rate
    from lightning_attr.games import PatchGame

    rates = {}
    for removal in ("drop", "mask"):
        g = game if game.removal.name == removal else PatchGame(game.model, game.patch_size, game.image_size,
                                                                 output=game.output, removal=removal)
        rates[removal] = oracle_rate(g, x, budget)
    return rates


def compute_stage(explainer: AmortizedExplainer, dm, x: torch.Tensor, results: dict, train_seconds: float) -> dict:
    """Total compute of the amortized explainer in evaluations at the game's measured rate: its labels (train + val,
    whether computed now or read from the cache), its frozen features (v(empty), v(all), backbone: 3 per image) and
    ``train_seconds`` of head training and validation; and the break-even number of explained images against
    per-example permutation sampling at equal error."""
    from lightning_attr.evaluation import break_even, evaluations_per_example, inference_seconds

    rates = oracle_rates(explainer.game, x)
    rate = rates[explainer.game.removal.name]
    images = len(dm.datamodule.splits["train"]) + len(dm.datamodule.splits["val"])
    labels = images * (evaluations_per_example(explainer.game, x, dm.estimator.name, dm.num_samples) + 3)
    infer = max(2.0, inference_seconds(explainer, x) * rate)  # v(empty), v(all), backbone and head per image
    fixed = labels + train_seconds * rate
    need = results["equal_error_budget"]["permutation_shapley"]
    return {"oracle_evals_per_s": rates, "removal": explainer.game.removal.name, "train_seconds": train_seconds,
            "label_evaluations": labels, "fixed_evaluations": fixed, "inference_evaluations_per_image": infer,
            "break_even_images": break_even(fixed, need, infer)}


def _compute_summary(c: dict) -> str:
    rates = c["oracle_evals_per_s"]
    return (f"Oracle: {rates['drop']:,.0f} evaluations/s by token dropping vs {rates['mask']:,.0f} by baseline masking "
            f"({rates['drop'] / rates['mask']:.2f}x; the game uses {c['removal']!r}). All amortization compute (labels and "
            f"frozen features, {c['label_evaluations']:,} evaluations, + {c['train_seconds']:.1f} s of head training) = "
            f"{c['fixed_evaluations']:,.0f} evaluations; "
            f"it breaks even with per-example permutation sampling at equal error after "
            f"{c['break_even_images']:,.0f} explained images.\n")


def _heatmaps(out: str, explainer: AmortizedExplainer, x: torch.Tensor, exact: torch.Tensor, label_budget: int) -> str:
    """PNG of exact, amortized and permutation (at the label budget) heatmaps for the first 6 test images."""
    game = explainer.game
    with torch.no_grad():
        amortized = explainer(x[:6])
        probs = game(x[:6], torch.ones(6, 1, game.num_players, dtype=torch.bool))[:, 0]
    maps = {"exact Shapley": exact[:6], "amortized": amortized,
            f"permutation @{label_budget}": per_example_curve_preds(game, x[:6], label_budget)}
    pred = probs.argmax(-1)
    return attribution_heatmaps(x[:6], maps, pred, game.grid, os.path.join(out, "heatmaps.png"),
                                titles=[f"pred {int(c)}" for c in pred])


def _amortization_summary(results: dict, num_players: int) -> str:
    label_budget, matched = results["label_budget"], results["equal_error_budget"]["permutation_shapley"]
    return (
        f"\nAmortized Shapley on digits ({results['train_examples']} training images, {label_budget} evaluations "
        f"each; {results['test_examples']} test images, exact Shapley from 2^{num_players} coalitions)\n\n"
        f"{_table(results['rows'])}\n\n"
        f"Amortized MSE is {results['mse_ratio_permutation_at_label_budget']:.2f}x lower than per-example permutation "
        f"sampling at the same {label_budget} evaluations; permutation sampling needs about "
        f"{matched:.0f} evaluations per example ({matched / label_budget:.1f}x) to match it.\n"
        f"Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items())
        + f"\nHeatmaps: {results['heatmaps']}\n"
    )


def _attribution_summary(tda: dict) -> str:
    lines = [f"| {r['callback']} | {r['checkpoints']} | {r['auc']:.3f} | {r['recall_at_10pct']:.3f} |"
             for r in tda["rows"]]
    return (
        f"\nTraining-data attribution during training: digits ResNet, 10% of the labels flipped (val acc "
        f"{tda['val_acc']:.3f}; {tda['seconds']:.0f} s with the callbacks); self-influence flags the flipped "
        "labels:\n\n"
        "| callback | checkpoints | noisy-label AUC | flipped labels found in the top 10% |\n|---|---:|---:|---:|\n"
        + "\n".join(lines) + "\n"
    )


def attribution_stage(out: str, epochs: int | None = None) -> dict:
    """Stage 5: the noisy-label config with its TracIn callbacks plus the TRAK spec; returns each callback's metrics."""
    t0 = time.perf_counter()
    args = ["fit", "--config", str(CONFIGS / "digits_noisy_resnet.yaml"), "--trainer.default_root_dir", f"{out}/noisy",
            "--trainer.callbacks+=" + str(CONFIGS.parent / "callbacks" / "trak.yaml"),
            "--trainer.callbacks.noisy_labels=noisy_mask"]
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = build_cli(args)
    found = [cb for cb in cli.trainer.callbacks if hasattr(cb, "prefix") and hasattr(cb, "records")]
    rows = [{"callback": cb.prefix, "auc": cb.metrics[f"{cb.prefix}/noisy_label_auc"],
             "recall_at_10pct": cb.metrics[f"{cb.prefix}/noisy_recall_at_10pct"],
             "checkpoints": len(cb.records) or "every step",
             "results": cb.directory} for cb in found]
    return {"rows": rows, "seconds": time.perf_counter() - t0,
            "val_acc": float(cli.trainer.callback_metrics.get("val/acc", float("nan")))}


def valuation_stage(out: str, epochs: int | None = None, truth_samples: int = 200) -> dict:
    """Stage 6: amortized distributional Data Shapley of digits (the config), tested against ``truth_samples`` samples
    per test point (the benchmark uses 1,000), and per-point Monte Carlo at 5 and 50 samples on the same points."""
    from lightning_attr.evaluation import monte_carlo_values, predict_values, value_scores
    from lightning_attr.plots import value_scatter

    t0 = time.perf_counter()
    args = ["fit", "--config", str(CONFIGS / "digits_distributional_shapley.yaml"), "--trainer.default_root_dir",
            f"{out}/valuation", "--data.init_args.cache_dir", f"{out}/valuation_cache",
            "--data.init_args.test_num_samples", str(truth_samples)]
    if epochs:
        args += ["--trainer.max_epochs", str(epochs)]
    cli = build_cli(args)
    dm, best = cli.datamodule, cli.trainer.checkpoint_callback.best_model_path
    t1 = time.perf_counter()
    test = dm.splits["test"]
    truth = dm.labels("test", test).double()
    model = type(cli.model).load_from_checkpoint(best, map_location="cpu").eval()
    values = predict_values(model, dm)
    label_evals = 2 * dm.num_samples * (len(values) + len(dm.splits["val"]))  # train + val labels (also when cached)
    rows = [dict(method="amortized", samples=dm.num_samples, evals_per_point=label_evals / len(values),
                 **value_scores(values[test], truth, dm.data.flipped[test]),
                 auroc_all=value_scores(values, flipped=dm.data.flipped)
                 ["mislabeled_auroc"])]
    mc = {k: monte_carlo_values(dm, test, k) for k in (dm.num_samples, 10 * dm.num_samples)}
    rows += [dict(method="per-point Monte Carlo", samples=k, evals_per_point=2 * k,
                  **value_scores(v, truth, dm.data.flipped[test])) for k, v in mc.items()]
    panels = {f"amortized ({dm.num_samples} samples)": values[test],
              f"Monte Carlo ({dm.num_samples} samples)": mc[dm.num_samples]}
    plot = value_scatter(truth, panels, dm.data.flipped[test], os.path.join(out, "valuation.png"))
    return {"rows": rows, "points": len(values), "test_points": len(test), "truth_samples": truth_samples,
            "seconds": {"fit": t1 - t0, "evaluation": time.perf_counter() - t1}, "plot": plot, "checkpoint": best}


def _valuation_summary(v: dict) -> str:
    lines = [f"| {r['method']} | {r['samples']} | {r['evals_per_point']:.1f} | {r['mse']:.3e} | {r['pearson']:.3f} | "
             f"{r['spearman']:.3f} | {r['sign_agreement']:.3f} | {r['mislabeled_auroc']:.3f} |" for r in v["rows"]]
    am = v["rows"][0]
    return (
        f"\nAmortized distributional Data Shapley on digits ({v['points']} points, 20% of labels flipped; ground truth "
        f"{v['truth_samples']} samples on {v['test_points']} points):\n\n"
        "| method | samples / point | evaluations / point | MSE | Pearson | Spearman | sign agree | mislabeled AUROC |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(lines)
        + f"\n\nMislabeled-point AUROC of the amortized values over all {v['points']} points: {am['auroc_all']:.3f}. "
        f"Stage times (s): fit {v['seconds']['fit']:.0f}, evaluation {v['seconds']['evaluation']:.0f}. "
        f"Plot: {v['plot']}\n"
    )


def per_example_curve_preds(game, x: torch.Tensor, budget: int) -> torch.Tensor:
    """Permutation-sampling estimates (N, d, K) at ``budget`` for the heatmap figure."""
    from lightning_attr.estimators import permutation_shapley

    return permutation_shapley(game, x, budget, generator=torch.Generator().manual_seed(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/demo", help="output folder (default: artifacts/demo)")
    parser.add_argument("--classifier-epochs", type=int, default=None, help="override the classifier's max_epochs")
    parser.add_argument("--explainer-epochs", type=int, default=None, help="override the explainer's max_epochs")
    parser.add_argument("--attribution-epochs", type=int, default=None, help="override the noisy-label run's epochs")
    parser.add_argument("--valuation-epochs", type=int, default=None, help="override the valuation model's epochs")
    a = parser.parse_args()
    run(a.out, a.classifier_epochs, a.explainer_epochs, a.attribution_epochs, a.valuation_epochs)


if __name__ == "__main__":
    main()
