"""``make demo``: the whole amortized-Shapley job on the embedded digits data, end to end.

1. ``lightning-attr fit --config configs/digits_classifier_vit.yaml``: train the ViT to explain; export its weights.
2. ``lightning-attr fit --config configs/digits_shapley_vit.yaml``: load them back frozen through timm's local-file
   path as the backbone, and train the explainer on fixed noisy labels (32 evaluations per image).
3. ``trainer.test``: metrics against exact Shapley values (2^16 coalitions per test image, cached).
4. Per-example permutation sampling and unbiased KernelSHAP at 1x, 4x, 16x, 64x the label budget on the same
   test images; the table, a JSON file and a PNG of heatmaps go to ``--out``.
5. Training-data attribution inside training: ``lightning-attr fit --config configs/digits_noisy_resnet.yaml
   --trainer.callbacks+=callbacks/trak.yaml`` (a digits ResNet on 10% flipped labels with TracIn, last-layer TracIn
   and TRAK callbacks) and the noisy-label AUC / recall of each callback's self-influence.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lightning_attr.cli import build_cli
from lightning_attr.evaluation import amortized_row, equal_error_budget, per_example_curve
from lightning_attr.plots import attribution_heatmaps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _table(rows: list[dict]) -> str:
    head = "| method | evals / example | MSE vs exact | Pearson | Spearman | sign agree | seconds |\n|---|---:|---:|---:|---:|---:|---:|"
    lines = [
        f"| {r['method']}{' (label budget ' + str(r['budget']) + ')' if r['method'] == 'amortized' else ''} | "
        f"{r['evals_per_example']:.0f} | {r['mse']:.3e} | {r['pearson']:.3f} | {r['spearman']:.3f} | "
        f"{r['sign_agreement']:.3f} | {r['seconds']:.2f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def run(out: str = "artifacts/demo", classifier_epochs: int | None = None, explainer_epochs: int | None = None,
        attribution_epochs: int | None = None) -> dict:
    """Run the five stages; returns the results dict also written to ``{out}/results.json``."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, "classifier_vit.safetensors")
    t0 = time.perf_counter()
    args = ["fit", "--config", str(CONFIGS / "digits_classifier_vit.yaml"), "--trainer.default_root_dir", f"{out}/classifier",
            "--model.init_args.export_path", weights]
    if classifier_epochs:
        args += ["--trainer.max_epochs", str(classifier_epochs)]
    build_cli(args)
    t1 = time.perf_counter()

    args = ["fit", "--config", str(CONFIGS / "digits_shapley_vit.yaml"), "--trainer.default_root_dir", f"{out}/explainer",
            "--model.init_args.classifier_weights", weights, "--data.init_args.cache_dir", f"{out}/oracle_cache"]
    if explainer_epochs:
        args += ["--trainer.max_epochs", str(explainer_epochs)]
    cli = build_cli(args)
    trainer, dm = cli.trainer, cli.datamodule
    best = trainer.checkpoint_callback.best_model_path
    t2 = time.perf_counter()
    test_metrics = trainer.test(cli.model, datamodule=dm, ckpt_path=best, verbose=False)[0]
    t3 = time.perf_counter()

    explainer = type(cli.model).load_from_checkpoint(best, map_location="cpu").eval()
    game = explainer.game
    x, exact = dm.ground_truth(game, "cpu")
    label_budget = dm.num_samples
    budgets = [label_budget * m for m in (1, 4, 16, 64)]
    rows = [amortized_row(explainer, x, exact, label_budget)]
    curve = per_example_curve(game, x, exact, ["permutation_shapley", "unbiased_kernel_shap"], budgets, seed=1)
    rows += curve
    t4 = time.perf_counter()

    amortized_mse = rows[0]["mse"]
    perm = [r for r in curve if r["method"] == "permutation_shapley"]
    perm_at_budget = perm[0]["mse"]
    results = {
        "test_metrics": test_metrics,
        "rows": rows,
        "label_budget": label_budget,
        "train_examples": len(dm.datamodule.splits["train"]),
        "test_examples": len(x),
        "mse_ratio_permutation_at_label_budget": perm_at_budget / amortized_mse,
        "equal_error_budget": {
            m: equal_error_budget([r for r in curve if r["method"] == m], amortized_mse)
            for m in ("permutation_shapley", "unbiased_kernel_shap")
        },
        "seconds": {"classifier": t1 - t0, "explainer": t2 - t1, "test": t3 - t2, "per_example": t4 - t3},
        "checkpoint": best,
    }
    with torch.no_grad():
        amortized = explainer(x[:6])
        probs = game(x[:6], torch.ones(6, 1, game.num_players, dtype=torch.bool))[:, 0]
    png = attribution_heatmaps(x[:6], {"exact Shapley": exact[:6], "amortized": amortized,
                                       f"permutation @{label_budget}": per_example_curve_preds(game, x[:6], label_budget)},
                               probs.argmax(-1), game.grid, os.path.join(out, "heatmaps.png"))
    results["heatmaps"] = png
    table = _table(rows)
    ratio = results["equal_error_budget"]["permutation_shapley"] / label_budget
    summary = (
        f"\nAmortized Shapley on digits ({results['train_examples']} training images, {label_budget} evaluations each; "
        f"{len(x)} test images, exact Shapley from 2^{game.num_players} coalitions)\n\n{table}\n\n"
        f"Amortized MSE is {results['mse_ratio_permutation_at_label_budget']:.2f}x lower than per-example permutation "
        f"sampling at the same {label_budget} evaluations; permutation sampling needs about "
        f"{results['equal_error_budget']['permutation_shapley']:.0f} evaluations per example ({ratio:.1f}x) to match it.\n"
        f"Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["seconds"].items()) + f"\nHeatmaps: {png}\n"
    )
    tda = attribution_stage(out, attribution_epochs)
    results["attribution"] = tda
    lines = [f"| {r['callback']} | {r['checkpoints']} | {r['auc']:.3f} | {r['recall_at_10pct']:.3f} |" for r in tda["rows"]]
    summary += (
        f"\nTraining-data attribution during training: digits ResNet, 10% of the labels flipped (val acc "
        f"{tda['val_acc']:.3f}; {tda['seconds']:.0f} s with the callbacks); self-influence flags the flipped labels:\n\n"
        "| callback | checkpoints | noisy-label AUC | flipped labels found in the top 10% |\n|---|---:|---:|---:|\n"
        + "\n".join(lines) + "\n"
    )
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(summary)
    print(summary)
    return results


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
             "recall_at_10pct": cb.metrics[f"{cb.prefix}/noisy_recall_at_10pct"], "checkpoints": len(cb.records),
             "results": cb.directory} for cb in found]
    return {"rows": rows, "seconds": time.perf_counter() - t0,
            "val_acc": float(cli.trainer.callback_metrics.get("val/acc", float("nan")))}


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
    a = parser.parse_args()
    run(a.out, a.classifier_epochs, a.explainer_epochs, a.attribution_epochs)


if __name__ == "__main__":
    main()
