"""Data-valuation benchmark: amortized distributional Data Shapley (``ValuationModel`` on noisy labels made by the
batched utility) against per-point Monte Carlo, against ground truth, on CPU.

1. **Digits**, 1,000 valued points with 20% of labels flipped, the other 797 (clean) as the utility's validation
   set; utility = validation log-likelihood of an L2 logistic regression on the 64 standardized pixels;
   distributional Data Shapley with coalition sizes uniform in 0..30. Ground truth: 250 random points with 1,000
   samples each. Per-point Monte Carlo and the amortized model at 1, 5, 10 and 50 samples per point: MSE, explained
   variance, Pearson, Spearman, sign agreement on the 250 points; mislabeled AUROC over all 1,000 points; the
   Monte Carlo samples per point that reach the amortized model's MSE (equal-error ratio).
2. **Scaling**: scikit-learn ``make_classification`` (20 features, 2 classes, 20% flipped) with 1k, 5k and 20k
   valued points (``--full``: also 50k): the same comparison at 5 samples per point.
3. **Utility throughput**: evaluations per second of our batched utility against opendataval's and pyDVL's
   logistic-regression utilities (and a plain scikit-learn loop) on the same subsets (drawn as the estimator draws
   them), the same model (``LogisticRegression(C=1)``, intercept as a penalized ones column) and accuracy.

    python benchmarks/valuation.py --out artifacts/bench/valuation           # ~25 min, 2 idle cores
    python benchmarks/valuation.py --out /tmp/valuation_smoke --smoke        # ~2 min

Writes ``{out}/results.json``, ``{out}/results.md`` and ``{out}/valuation.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import begin, finish, fmt, progress, targets_table, verdict
from valuation_peers import opendataval_rate, pydvl_rate, sklearn_rate

from lightning_attr.evaluation import (
    equal_error_budget,
    fit_valuation_model,
    monte_carlo_values,
    predict_values,
    value_scores,
)
from lightning_attr.valuation import DigitsSource, LogisticUtility, SyntheticSource, ValuationDataModule
from lightning_attr.valuation.estimators.sampling import subsets_without

CARDINALITY = (0, 30)
BUDGETS = (1, 5, 10, 50)
log = progress("valuation")


def datamodule(source, out: Path, num_samples: int, test_num_samples: int) -> ValuationDataModule:
    return ValuationDataModule(source, estimator_options={"cardinality": list(CARDINALITY)}, num_samples=num_samples,
                               test_num_samples=test_num_samples, cache_dir=str(out / "cache"), batch_size=64)


def ground_truth(dm: ValuationDataModule) -> tuple[torch.Tensor, float]:
    dm.setup()
    start = time.perf_counter()
    truth = dm.labels("test", dm.splits["test"]).double()
    return truth, time.perf_counter() - start


def monte_carlo_rows(dm, truth, budgets, everyone: bool = True) -> list[dict]:
    """Per-point Monte Carlo at every budget: scores on the test points, AUROC over all points (``everyone``) or
    over the test points."""
    rows, test = [], dm.splits["test"]
    points = torch.arange(len(dm.data.y_train)) if everyone else test
    for k in budgets:
        values = monte_carlo_values(dm, points, k)
        scores = value_scores(values[test] if everyone else values, truth)
        scores["mislabeled_auroc"] = value_scores(values, flipped=dm.data.flipped[points])["mislabeled_auroc"]
        rows.append(dict(method="monte carlo", samples=k, evals_per_point=2 * k, **scores))
        log(f"monte carlo {k}: mse {scores['mse']:.3g} auroc {scores['mislabeled_auroc']:.3f}")
    return rows


def amortized_row(source, out: Path, k: int, truth, epochs: int, tag: str, gt_samples: int) -> dict:
    """Labels at ``k`` samples per point for every point (plus the validation labels), a ValuationModel trained on
    them; evaluations counted, time of labels and of training."""
    dm = datamodule(source, out, k, gt_samples)
    dm.setup()
    start = time.perf_counter()
    dm.labels("train", torch.arange(len(dm.data.y_train)))
    dm.labels("val", dm.splits["val"])
    label_s = time.perf_counter() - start
    evals = dm.evaluations
    model = fit_valuation_model(dm, str(out / f"run-{tag}-{k}"), max_epochs=epochs)
    train_s = time.perf_counter() - start - label_s
    values, test = predict_values(model, dm), dm.splits["test"]
    scores = value_scores(values[test], truth)
    scores["mislabeled_auroc"] = value_scores(values, flipped=dm.data.flipped)["mislabeled_auroc"]
    scores["mislabeled_auroc_test_points"] = value_scores(values[test], flipped=dm.data.flipped[test])[
        "mislabeled_auroc"]
    log(f"amortized {tag} {k}: mse {scores['mse']:.3g} auroc {scores['mislabeled_auroc']:.3f}")
    return dict(method="amortized", samples=k, evals_per_point=evals / len(dm.data.y_train), label_seconds=label_s,
                train_seconds=train_s, **scores)


def equal_error(amortized: list[dict], monte_carlo: list[dict]) -> None:
    """Monte Carlo samples per point that reach each amortized row's MSE, and the ratio to its own samples."""
    mc = [dict(evals_per_example=r["samples"], mse=r["mse"]) for r in monte_carlo]
    for row in amortized:
        row["mc_samples_equal_error"] = equal_error_budget(mc, row["mse"])
        row["equal_error_ratio"] = row["mc_samples_equal_error"] / row["samples"]


def digits(out: Path, budgets, epochs: int, gt_samples: int) -> dict:
    source = DigitsSource(num_train=1000, flip_fraction=0.2, seed=0)
    dm = datamodule(source, out, 5, gt_samples)
    truth, gt_s = ground_truth(dm)
    log(f"digits ground truth: 250 points x {gt_samples} samples in {gt_s:.0f}s")
    monte_carlo = monte_carlo_rows(dm, truth, budgets)
    amortized = [amortized_row(source, out, k, truth, epochs, "digits", gt_samples) for k in budgets]
    equal_error(amortized, monte_carlo)
    truth_auroc = value_scores(truth, flipped=dm.data.flipped[dm.splits["test"]])["mislabeled_auroc"]
    return dict(ground_truth_seconds=gt_s, ground_truth_auroc_test_points=truth_auroc, monte_carlo=monte_carlo,
                amortized=amortized)


def scaling(out: Path, sizes, epochs: int, gt_samples: int) -> list[dict]:
    """At 5 samples per point, amortized vs per-point Monte Carlo (5 and 50) as the data set grows."""
    rows = []
    for n in sizes:
        source = SyntheticSource(num_points=n, num_val=1000, num_features=20, num_classes=2, flip_fraction=0.2)
        dm = datamodule(source, out, 5, gt_samples)
        truth, gt_s = ground_truth(dm)
        monte_carlo = monte_carlo_rows(dm, truth, (1, 5, 10, 50), everyone=False)  # AUROC on the 250 test points
        amortized = amortized_row(source, out, 5, truth, epochs, f"synthetic{n}", gt_samples)
        equal_error([amortized], monte_carlo)
        rows.append(dict(points=n, ground_truth_seconds=gt_s, monte_carlo=monte_carlo, amortized=amortized))
    return rows


def throughput(num_subsets: int) -> dict:
    """Utility evaluations per second, ours (batched) vs the peers' loops, on subsets drawn as the estimator draws
    them (sizes uniform in 1..31), kept when they hold all 10 classes: there the peers' scikit-learn model and ours
    are the same model (with a class missing, scikit-learn drops it and opendataval swaps in a constant predictor)."""
    data = DigitsSource(num_train=1000, flip_fraction=0.2, seed=0).load()
    ours = LogisticUtility(data.x_train, data.y_train, data.x_val, data.y_val, metric="accuracy")
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(CARDINALITY[0] + 1, CARDINALITY[1] + 2, (40 * num_subsets,), generator=gen)
    drawn = subsets_without(torch.full_like(sizes, -1), sizes, ours.num_points, gen)
    two_classes = [s[s >= 0] for s in drawn if len(torch.unique(data.y_train[s[s >= 0]])) == 10][:num_subsets]
    lists = torch.full((len(two_classes), int(sizes.max())), -1)
    for row, s in enumerate(two_classes):
        lists[row, :len(s)] = s
    ours(lists[:8])  # warm-up
    start = time.perf_counter()
    values = ours(lists)
    r = dict(subsets=len(two_classes), mean_size=float(np.mean([len(s) for s in two_classes])),
             ours=len(two_classes) / (time.perf_counter() - start))
    ones = lambda x: np.c_[x.numpy().astype(np.float64), np.ones(len(x))]  # noqa: E731
    args = (ones(data.x_train), data.y_train.numpy(), ones(data.x_val), data.y_val.numpy(), [s.numpy() for s in
                                                                                          two_classes])
    for name, fn in (("opendataval", opendataval_rate), ("pydvl", pydvl_rate), ("sklearn", sklearn_rate)):
        rate, theirs = fn(*args, C=1.0, max_iter=1000, fit_intercept=False)
        r[name], r[f"{name}_max_abs_diff"] = rate, float(np.abs(theirs - values.numpy()).max())
        r[f"{name}_agree"] = float((np.abs(theirs - values.numpy()) < 1e-6).mean())
        log(f"throughput {name}: {rate:.0f}/s (ours {r['ours']:.0f}/s)")
    return r


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_attr.plots import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    d = r["digits"]
    for rows, style, label in ((d["monte_carlo"], "o-", "per-point Monte Carlo"), (d["amortized"], "s-", "amortized")):
        axes[0].loglog([x["samples"] for x in rows], [x["mse"] for x in rows], style, label=label)
        axes[1].semilogx([x["samples"] for x in rows], [x["mislabeled_auroc"] for x in rows], style, label=label)
    axes[0].set(xlabel="samples per point", ylabel="MSE vs ground truth", title="digits, 20% flipped")
    axes[1].set(xlabel="samples per point", ylabel="mislabeled AUROC", title="mislabeled detection (1,000 points)")
    sizes = [x["points"] for x in r["scaling"]]
    axes[2].semilogx(sizes, [x["amortized"]["equal_error_ratio"] for x in r["scaling"]], "s-")
    axes[2].set(xlabel="valued points", ylabel="MC samples to match / amortized samples",
                title="equal-error ratio at 5 samples per point")
    for ax in axes[:2]:
        ax.legend()
    save_figure(fig, str(path))


def markdown(r: dict) -> str:
    d, t = r["digits"], r["throughput"]
    cols = ["samples", "evals_per_point", "mse", "explained_variance", "pearson", "spearman", "sign_agreement",
            "mislabeled_auroc"]
    lines = [f"# Data valuation ({r['machine']}, torch {r['torch']}, {r['threads']} threads, "
             f"{r['wall_seconds']:.0f} s)", "",
             f"Digits: ground truth of 250 points x {r['ground_truth_samples']} samples in {d['ground_truth_seconds']:.0f} s (its own "
             f"AUROC on those points {fmt(d['ground_truth_auroc_test_points'])}).", "",
             "| method | " + " | ".join(cols) + " | MC samples at equal error | ratio |", "|---" * (len(cols) + 3) + "|"]
    for row in d["monte_carlo"] + d["amortized"]:
        lines.append(f"| {row['method']} | " + " | ".join(fmt(row.get(c)) for c in cols)
                     + f" | {fmt(row.get('mc_samples_equal_error'))} | {fmt(row.get('equal_error_ratio'))} |")
    lines += ["", "Scaling (make_classification, 5 samples per point):", "",
              "| points | MC 5 MSE | MC 50 MSE | amortized 5 MSE | MC samples at equal error | ratio | "
              "amortized AUROC (test points) | MC 50 AUROC (test points) | labels s | training s |",
              "|---" * 10 + "|"]
    for s in r["scaling"]:
        a, mc = s["amortized"], {x["samples"]: x for x in s["monte_carlo"]}
        lines.append(f"| {s['points']} | {fmt(mc[5]['mse'])} | {fmt(mc[50]['mse'])} | {fmt(a['mse'])} | "
                     f"{fmt(a['mc_samples_equal_error'])} | {fmt(a['equal_error_ratio'])} | "
                     f"{fmt(a['mislabeled_auroc_test_points'])} | {fmt(mc[50]['mislabeled_auroc'])} | {fmt(a['label_seconds'])} "
                     f"| {fmt(a['train_seconds'])} |")
    lines += ["", f"Utility throughput on {t['subsets']} subsets (mean size {t['mean_size']:.1f}), evaluations/s:", "",
              "| ours (batched) | opendataval | pyDVL | scikit-learn loop | agreement with ours (odv / pyDVL / sklearn) |",
              "|---|---|---|---|---|",
              f"| {t['ours']:.0f} | {t['opendataval']:.0f} | {t['pydvl']:.0f} | {t['sklearn']:.0f} | "
              f"{t['opendataval_agree']:.2f} / {t['pydvl_agree']:.2f} / {t['sklearn_agree']:.2f} |", ""]
    return "\n".join(lines + targets_table(r["verdicts"]))


def verdicts(r: dict) -> list[dict]:
    d, t = r["digits"], r["throughput"]
    am5 = next(x for x in d["amortized"] if x["samples"] == 5)
    mc50 = next(x for x in d["monte_carlo"] if x["samples"] == 50)
    return [verdict("digits: equal-error ratio of amortized at 5 samples (>= 10)", am5["equal_error_ratio"], 10),
            verdict("digits: amortized(5) AUROC - MC(50) AUROC (>= 0)",
                    am5["mislabeled_auroc"] - mc50["mislabeled_auroc"], 0.0),
            verdict("utility: ours / opendataval (>= 20)", t["ours"] / t["opendataval"], 20),
            verdict("utility: ours / pyDVL (>= 20)", t["ours"] / t["pydvl"], 20)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="artifacts/bench/valuation")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (minutes)")
    parser.add_argument("--full", action="store_true", help="also 50k points in the scaling study")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    out, start, r = begin(args.out, args.threads, cardinality=CARDINALITY)
    epochs, gt_samples = (5, 50) if args.smoke else (60, 1000)
    r.update(ground_truth_samples=gt_samples, epochs=epochs)
    r["throughput"] = throughput(40 if args.smoke else 400)
    r["digits"] = digits(out, (1, 5, 50) if args.smoke else BUDGETS, epochs, gt_samples)
    sizes = (1000,) if args.smoke else (1000, 5000, 20000) + ((50000,) if args.full else ())
    r["scaling"] = scaling(out, sizes, epochs, gt_samples)
    r["verdicts"] = verdicts(r)
    plot(r, out / "valuation.png")
    finish(r, start, out, markdown, log)


if __name__ == "__main__":
    main()
