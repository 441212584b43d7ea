"""Amortization benchmark: oracle throughput against Captum and the model's own forward, and error vs compute.

Part 1 (throughput, CPU, 2 threads): game evaluations per second of the digits ViT on the 16-player patch game
(4x4 grid of 8x8 patches on 32x32 digits) for

* the model's plain batched forward (no masking) at several batch sizes: the upper limit;
* our estimators (``permutation_shapley``, ``unbiased_kernel_shap``, ``kernel_shap``, ``banzhaf``), counted by the
  game's ``num_evaluations``;
* Captum's ``ShapleyValueSampling`` and ``KernelShap`` on the same model (+ softmax), images, patch grid (as
  ``feature_mask``), baseline 0 and budget, at the best ``perturbations_per_eval``; evaluations are the input rows
  that reach the model (counted by a wrapper).

Part 2 (error vs compute): the demo's amortized explainer (``python -m lightning_attr.demo``; run here when
``{demo_out}/results.json`` is missing) against per-example permutation sampling and unbiased KernelSHAP at
budgets ``32 .. 4096`` evaluations per example, all scored against exact Shapley values (2^16 coalitions).

    python benchmarks/amortization.py --out artifacts/bench            # full run
    python benchmarks/amortization.py --out artifacts/bench --quick    # smaller run (minutes)

Prints markdown tables; writes ``{out}/amortization.json`` and ``{out}/error_vs_compute.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

import lightning_attr
from lightning_attr import ImageDataModule, PatchGame, create_timm_model
from lightning_attr.estimators import get_estimator
from lightning_attr.evaluation import amortized_row, equal_error_budget, per_example_curve
from lightning_attr.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_shapley_vit.yaml"
MODEL_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)
NUM_CLASSES, IMAGE_SIZE, PATCH_SIZE = 10, 32, 8
OURS = ("permutation_shapley", "unbiased_kernel_shap", "kernel_shap", "banzhaf")
CURVE_METHODS = ("permutation_shapley", "unbiased_kernel_shap")
TARGET_VS_CAPTUM, TARGET_VS_FORWARD = 1.5, 0.8


@dataclass
class Settings:
    """Sizes of one benchmark run (``--quick`` picks the small ones)."""

    num_images: int = 32
    budget: int = 512
    repeats: int = 3
    forward_batch_sizes: tuple[int, ...] = (64, 256, 1024, 4096)
    svs_ppe: tuple[int, ...] = (1, 4, 16, 64)
    kernel_ppe: tuple[int, ...] = (1, 16, 64, 256, 512)
    kernel_images: int = 32
    curve_budgets: tuple[int, ...] = tuple(32 * 2**i for i in range(8))  # 32 .. 4096
    curve_seeds: int = 1
    demo_epochs: tuple[int | None, int | None] = (None, None)

    @classmethod
    def quick(cls) -> Settings:
        return cls(num_images=8, budget=256, repeats=1, forward_batch_sizes=(256, 1024), svs_ppe=(1, 16),
                   kernel_ppe=(1, 64, 256), kernel_images=4, curve_budgets=(32, 128, 512), demo_epochs=(5, 5))


# --------------------------------------------------------------------------------------------------- measurement
class CountingModule(nn.Module):
    """Wraps a model; counts the input rows (= game evaluations) and the seconds spent inside its forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.rows, self.calls, self.seconds = 0, 0, 0.0

    def forward(self, x: Tensor) -> Tensor:
        start = time.perf_counter()
        out = self.model(x)
        self.seconds += time.perf_counter() - start
        self.rows += x.shape[0]
        self.calls += 1
        return out


@dataclass
class Timing:
    """Best-of-``repeats`` wall time of one job and what the model saw during that run."""

    seconds: float
    median_seconds: float
    evaluations: int
    model_seconds: float
    model_calls: int
    result: Any = field(default=None, repr=False)

    @property
    def evals_per_second(self) -> float:
        return self.evaluations / self.seconds

    @property
    def model_fraction(self) -> float:
        return self.model_seconds / self.seconds


def time_job(job: Callable[[], Any], counter: CountingModule, repeats: int,
             evaluations: Callable[[], int] | None = None) -> Timing:
    """Run ``job`` once to warm up, then ``repeats`` times; keep the fastest run.

    ``evaluations`` returns the evaluations of the last run (default: the rows ``counter`` saw).
    """
    job()
    runs: list[Timing] = []
    for _ in range(max(1, repeats)):
        counter.reset()
        before = evaluations() if evaluations else 0
        start = time.perf_counter()
        result = job()
        seconds = time.perf_counter() - start
        evals = (evaluations() - before) if evaluations else counter.rows
        runs.append(Timing(seconds, 0.0, evals, counter.seconds, counter.calls, result))
    best = min(runs, key=lambda t: t.seconds)
    best.median_seconds = statistics.median(t.seconds for t in runs)
    return best


def load_now() -> str:
    """``uptime``-style load averages (1, 5, 15 min) on this machine."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (cores: {os.cpu_count()})"


# --------------------------------------------------------------------------------------------------- model and data
def build_classifier(weights: str | None) -> nn.Module:
    """The digits ViT in eval mode with frozen parameters; trained weights from ``weights`` when the file exists."""
    use = weights if weights and os.path.isfile(weights) else None
    model = create_timm_model(MODEL_NAME, weights_file=use, num_classes=NUM_CLASSES, **MODEL_KWARGS)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def test_images(n: int) -> Tensor:
    """The first ``n`` test images (N, 3, 32, 32) of the embedded digits data (the explainer's test split)."""
    dm = ImageDataModule(dataset="digits", image_size=IMAGE_SIZE)
    dm.setup()
    test = dm.splits["test"]
    return torch.stack([test[i]["image"] for i in range(min(n, len(test)))])


def patch_feature_mask(grid: tuple[int, int] = (4, 4), patch: int = PATCH_SIZE) -> Tensor:
    """Captum ``feature_mask`` (1, 1, H, W): the row-major patch index of every pixel (the game's player order)."""
    ids = torch.arange(grid[0] * grid[1]).view(grid)
    return ids.repeat_interleave(patch, 0).repeat_interleave(patch, 1)[None, None]


# --------------------------------------------------------------------------------------------------- part 1
def bench_plain_forward(model: nn.Module, x: Tensor, batch_sizes: Sequence[int], repeats: int) -> list[dict]:
    """Evaluations per second of ``model(batch)`` (no masking, no softmax) at each batch size."""
    counter = CountingModule(model)
    rows = []
    for bs in batch_sizes:
        batch = x.repeat(math.ceil(bs / len(x)), 1, 1, 1)[:bs].contiguous()
        reps = max(1, math.ceil(8192 / bs))  # about the same number of rows per timing at every batch size

        @torch.no_grad()
        def job() -> None:
            for _ in range(reps):
                counter(batch)

        t = time_job(job, counter, repeats)
        rows.append({"method": "plain forward", "batch_size": bs, "evaluations": t.evaluations, "seconds": t.seconds,
                     "median_seconds": t.median_seconds, "evals_per_s": t.evals_per_second})
    return rows


def bench_ours(model: nn.Module, x: Tensor, pred: Tensor, names: Sequence[str], budget: int, repeats: int) -> list[dict]:
    """Our estimators on all of ``x`` in one call each; evaluations counted by the game, all K classes returned.

    ``pred`` (N,) picks the class whose attributions are kept (``pred_attr``, (N, d)) for the sanity check.
    """
    counter = CountingModule(model)
    game = PatchGame(counter, PATCH_SIZE, (IMAGE_SIZE, IMAGE_SIZE))
    rows = []
    for name in names:
        est = get_estimator(name)

        def job() -> Tensor:
            return est(game, x, budget, generator=torch.Generator().manual_seed(0))

        t = time_job(job, counter, repeats, evaluations=lambda: game.num_evaluations)
        k = t.result.shape[-1]
        rows.append({"method": f"ours: {name}", "ppe": None, "images": len(x), "evaluations": t.evaluations,
                     "evals_per_image": t.evaluations / len(x), "classes": k, "seconds": t.seconds,
                     "median_seconds": t.median_seconds, "evals_per_s": t.evals_per_second,
                     "attributions_per_s": len(x) * k / t.seconds, "model_fraction": t.model_fraction,
                     "model_calls": t.model_calls, "counted_rows_match": counter.rows == t.evaluations,
                     "pred_attr": t.result.gather(2, pred[:, None, None].expand(-1, t.result.shape[1], 1))[..., 0]})
    return rows


def _patch_values(attr: Tensor) -> Tensor:
    """Captum's input-shaped attributions (..., C, H, W) -> one value per patch (..., d), row-major."""
    return attr[..., 0, ::PATCH_SIZE, ::PATCH_SIZE].flatten(-2)


def bench_captum(model: nn.Module, x: Tensor, pred: Tensor, budget: int, svs_ppe: Sequence[int], kernel_ppe: Sequence[int],
                 kernel_images: int, repeats: int) -> list[dict]:
    """Captum ShapleyValueSampling (all images in one call) and KernelShap (one image per call, as Captum advises).

    Each at every ``perturbations_per_eval`` given, for the predicted class (``target=pred``) and, where Captum
    accepts it, for all classes at once (``target=None`` with the (B, K) softmax as a multi-output). Rows keep the
    predicted class's attributions as ``pred_attr`` (N, d).
    """
    import warnings

    from captum.attr import KernelShap, ShapleyValueSampling

    counter = CountingModule(model)
    forward = nn.Sequential(counter, nn.Softmax(dim=-1)).eval()
    mask = patch_feature_mask()
    d = int(mask.max()) + 1
    rows = []
    svs = ShapleyValueSampling(forward)
    permutations = max(1, round((budget - 1) / d))  # 1 + d * n_samples evaluations per image
    for target_mode in ("pred", "all"):
        target = pred if target_mode == "pred" else None
        for ppe in svs_ppe:
            def job() -> Tensor:
                torch.manual_seed(0)
                attr = svs.attribute(x, baselines=0.0, target=target, feature_mask=mask, n_samples=permutations,
                                     perturbations_per_eval=ppe)
                return _patch_values(attr).view(len(x), -1, d)  # (N, 1 or K, d)

            try:
                t = time_job(job, counter, repeats)
            except Exception as err:  # an unsupported combination: record why and go on
                rows.append({"method": f"captum ShapleyValueSampling (target={target_mode})", "ppe": ppe,
                             "error": f"{type(err).__name__}: {err}"})
                continue
            k = 1 if target_mode == "pred" else NUM_CLASSES
            rows.append(_captum_row(f"captum ShapleyValueSampling (target={target_mode})", ppe, len(x), k, t,
                                    _class_of(t.result, pred)))

    ks = KernelShap(forward)
    xk = x[:kernel_images]
    for target_mode in ("pred", "all"):
        for ppe in kernel_ppe:
            def job() -> Tensor:
                torch.manual_seed(0)
                outs = []
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for i in range(len(xk)):
                        target = int(pred[i]) if target_mode == "pred" else None
                        coefs = ks.attribute(xk[i : i + 1], baselines=0.0, target=target, feature_mask=mask,
                                             n_samples=budget, perturbations_per_eval=ppe, return_input_shape=False)
                        outs.append(coefs.reshape(1, -1, d))
                return torch.cat(outs)  # (N, 1 or K, d)

            try:
                t = time_job(job, counter, repeats)
            except Exception as err:
                rows.append({"method": f"captum KernelShap (target={target_mode})", "ppe": ppe,
                             "error": f"{type(err).__name__}: {err}"})
                continue
            rows.append(_captum_row(f"captum KernelShap (target={target_mode})", ppe, len(xk), t.result.shape[1], t,
                                    _class_of(t.result, pred[: len(xk)])))
    return rows


def _class_of(attr: Tensor, pred: Tensor) -> Tensor:
    """(N, 1 or K, d) attributions -> (N, d) of the predicted class (the only one when a single class was explained)."""
    if attr.shape[1] == 1:
        return attr[:, 0]
    return attr.gather(1, pred[:, None, None].expand(-1, 1, attr.shape[2]))[:, 0]


def _captum_row(method: str, ppe: int, images: int, classes: int, t: Timing, pred_attr: Tensor) -> dict:
    return {"method": method, "ppe": ppe, "images": images, "evaluations": t.evaluations,
            "evals_per_image": t.evaluations / images, "classes": classes, "seconds": t.seconds,
            "median_seconds": t.median_seconds, "evals_per_s": t.evals_per_second,
            "attributions_per_s": images * classes / t.seconds, "model_fraction": t.model_fraction,
            "model_calls": t.model_calls, "pred_attr": pred_attr}


def profile_estimator(model: nn.Module, x: Tensor, name: str, budget: int, top: int = 12) -> str:
    """torch.profiler table (self CPU time) of one estimator call: where the time goes besides the model."""
    from torch.profiler import ProfilerActivity, profile

    game = PatchGame(model, PATCH_SIZE, (IMAGE_SIZE, IMAGE_SIZE))
    est = get_estimator(name)
    est(game, x, budget, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        est(game, x, budget, generator=torch.Generator().manual_seed(0))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def best_by_method(rows: Sequence[dict]) -> dict[str, dict]:
    """The fastest (highest evals/s) row of every method (i.e. its best ``perturbations_per_eval``)."""
    best: dict[str, dict] = {}
    for r in rows:
        if "error" in r:
            continue
        if r["method"] not in best or r["evals_per_s"] > best[r["method"]]["evals_per_s"]:
            best[r["method"]] = r
    return best


def throughput_part(s: Settings, weights: str | None, profile_all: bool) -> dict:
    """Part 1: plain forward, ours and Captum on the same model, images and budget; ratios and (if needed) profiles."""
    torch.manual_seed(0)
    model = build_classifier(weights)
    x = test_images(s.num_images)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    load_before = load_now()
    t0 = time.perf_counter()
    forward_rows = bench_plain_forward(model, x, s.forward_batch_sizes, s.repeats)
    ours_rows = bench_ours(model, x, pred, OURS, s.budget, s.repeats)
    label_rows = bench_ours(model, x, pred, ["permutation_shapley"], 32, s.repeats)  # the demo's label setting
    label_rows[0]["method"] = "ours: permutation_shapley @32 (label setting)"
    captum_rows = bench_captum(model, x, pred, s.budget, s.svs_ppe, s.kernel_ppe, s.kernel_images, s.repeats)
    seconds = time.perf_counter() - t0
    load_after = load_now()

    best_forward = max(forward_rows, key=lambda r: r["evals_per_s"])
    best_captum = best_by_method(captum_rows)
    captum_evals = max(best_captum.values(), key=lambda r: r["evals_per_s"]) if best_captum else None
    captum_attrs = max(best_captum.values(), key=lambda r: r["attributions_per_s"]) if best_captum else None
    ratios = {}
    for r in ours_rows:
        ratios[r["method"]] = {
            "vs_best_forward": r["evals_per_s"] / best_forward["evals_per_s"],
            "vs_best_captum_evals": r["evals_per_s"] / captum_evals["evals_per_s"] if captum_evals else math.nan,
            "vs_best_captum_attributions": (r["attributions_per_s"] / captum_attrs["attributions_per_s"]
                                            if captum_attrs else math.nan),
            "vs_captum_same_target": _same_target_ratio(r, best_captum),
        }
    below = [m for m, v in ratios.items()
             if v["vs_best_forward"] < TARGET_VS_FORWARD or v["vs_best_captum_evals"] < TARGET_VS_CAPTUM]
    profiles = {}
    for name in (OURS if profile_all else [m.removeprefix("ours: ") for m in below]):
        profiles[name] = profile_estimator(model, x, name, s.budget)
    return {
        "weights": weights if weights and os.path.isfile(weights) else "random init", "x": x, "pred": pred,
        "images": len(x), "budget": s.budget, "threads": torch.get_num_threads(),
        "load_before": load_before, "load_after": load_after, "seconds": seconds,
        "plain_forward": forward_rows, "best_forward": best_forward,
        "ours": ours_rows + label_rows, "captum": captum_rows,
        "best_captum": {k: v["ppe"] for k, v in best_captum.items()},
        "ratios": ratios, "below_target": below, "profiles": profiles,
    }


def _same_target_ratio(ours: dict, best_captum: dict[str, dict]) -> dict[str, float]:
    """Ours vs Captum's Shapley estimator of the same kind, in evals/s (permutation vs SVS, kernel vs KernelShap)."""
    kind = "ShapleyValueSampling" if "permutation" in ours["method"] else "KernelShap" if "kernel" in ours["method"] else None
    if kind is None:
        return {}
    return {m: ours["evals_per_s"] / r["evals_per_s"] for m, r in best_captum.items() if kind in m}


# --------------------------------------------------------------------------------------------------- part 2
def ensure_demo(demo_out: str, epochs: tuple[int | None, int | None]) -> dict:
    """``{demo_out}/results.json``, running the demo (classifier + explainer stages) first when it is missing."""
    path = os.path.join(demo_out, "results.json")
    if not os.path.isfile(path):
        from lightning_attr.demo import run

        print(f"[bench] {path} missing: running the demo into {demo_out} (minutes) ...", flush=True)
        run(demo_out, *epochs)
    with open(path) as f:
        return json.load(f)


def oracle_datamodule(demo_out: str):
    """The explainer config's OracleDataModule (through the CLI parser), with the demo's label / exact cache."""
    from lightning_attr.cli import build_cli

    cli = build_cli(["--config", str(CONFIG), "--model.init_args.classifier_weights",
                     os.path.join(demo_out, "classifier_vit.safetensors"),
                     "--data.init_args.cache_dir", os.path.join(demo_out, "oracle_cache"),
                     "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"], run=False)
    return cli.datamodule


def counted_evaluations(game: PatchGame, x: Tensor, name: str, budget: int) -> int:
    """Evaluations ``name`` really spends per example at ``budget`` (counted by the game on one example)."""
    before = game.num_evaluations
    get_estimator(name)(game, x[:1], budget, generator=torch.Generator().manual_seed(0))
    return game.num_evaluations - before


def error_part(s: Settings, demo_out: str, oracle_rate: float | None, part1: dict | None) -> dict:
    """Part 2: per-example MSE curves vs the amortized explainer; compute accounting and equal-error ratios."""
    demo = ensure_demo(demo_out, s.demo_epochs)
    t0 = time.perf_counter()
    ckpt = demo["checkpoint"]
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"Explainer checkpoint {ckpt!r} named in {demo_out}/results.json does not exist.")
    explainer = lightning_attr.AmortizedExplainer.load_from_checkpoint(ckpt, map_location="cpu").eval()
    game = explainer.game
    dm = oracle_datamodule(demo_out)
    x, exact = dm.ground_truth(game, "cpu")
    n_train, n_val, n_test = len(dm.datamodule.splits["train"]), len(dm.datamodule.splits["val"]), len(x)
    n_all = n_train + n_val + len(dm.datamodule.splits["test"])
    label_name = dm.estimator.name
    label_budget, val_budget = dm.num_samples, dm.val_num_samples
    train_evals = counted_evaluations(game, x, label_name, label_budget)
    val_evals = counted_evaluations(game, x, label_name, val_budget)
    label_evaluations = n_train * train_evals + n_val * val_evals

    amortized = amortized_row(explainer, x, exact, label_budget)
    curve = []
    for seed in range(s.curve_seeds):
        curve += [dict(r, seed=seed) for r in per_example_curve(game, x, exact, CURVE_METHODS, s.curve_budgets,
                                                                 seed=seed + 1, progress=False)]
    curve = _mean_over_seeds(curve)

    stage_seconds = float(demo["seconds"]["explainer"])  # labels + training + validation of the explainer stage
    label_seconds = label_evaluations / oracle_rate if oracle_rate else math.nan
    train_seconds = max(stage_seconds - label_seconds, 0.0) if oracle_rate else stage_seconds
    to_evals = oracle_rate or math.nan  # one second of CPU = this many game evaluations (measured in part 1)
    train_equiv = train_seconds * to_evals
    infer_per_example = amortized["evals_per_example"] + amortized["seconds"] / n_test * to_evals
    fixed = label_evaluations + train_equiv

    summary: dict[str, Any] = {}
    for m in CURVE_METHODS:
        rows = [r for r in curve if r["method"] == m]
        need = equal_error_budget(rows, amortized["mse"])
        at_label = next((r for r in rows if r["budget"] == label_budget), None)
        break_even = fixed / (need - infer_per_example) if need > infer_per_example else math.inf
        summary[m] = {
            "equal_error_evals_per_example": need,
            "equal_error_ratio_vs_label_budget": need / label_budget,
            "extrapolated": need > max(r["evals_per_example"] for r in rows),
            "mse_at_label_budget": at_label["mse"] if at_label else math.nan,
            "mse_ratio_at_label_budget": at_label["mse"] / amortized["mse"] if at_label else math.nan,
            "break_even_examples": break_even,
            "compute_ratio_at_n_test": need * n_test / (fixed + infer_per_example * n_test),
            "compute_ratio_at_n_all": need * n_all / (fixed + infer_per_example * n_all),
        }
    fidelity = _throughput_fidelity(part1, x, exact)
    return {
        "demo_out": demo_out, "checkpoint": ckpt, "label_estimator": label_name,
        "label_budget": label_budget, "val_budget": val_budget, "evals_per_train_label": train_evals,
        "evals_per_val_label": val_evals, "n_train": n_train, "n_val": n_val, "n_test": n_test, "n_all": n_all,
        "label_evaluations": label_evaluations, "explainer_stage_seconds": stage_seconds,
        "label_seconds_estimated": label_seconds, "train_seconds_estimated": train_seconds,
        "oracle_evals_per_s": oracle_rate, "train_evaluation_equivalents": train_equiv,
        "amortized_fixed_compute_evals": fixed, "amortized_inference_evals_per_example": infer_per_example,
        "amortized": amortized, "curve": curve, "summary": summary, "budget_fidelity": fidelity,
        "demo_test_metrics": demo.get("test_metrics"), "seconds": time.perf_counter() - t0, "load": load_now(),
    }


def _mean_over_seeds(rows: list[dict]) -> list[dict]:
    """Average the numeric fields of rows sharing (method, budget); keeps the per-seed MSEs in ``mse_seeds``."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        row = {k: statistics.fmean(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        out.append({"method": method, "budget": budget, **row, "mse_seeds": [r["mse"] for r in rs]})
    return out


def _throughput_fidelity(part1: dict | None, x: Tensor, exact: Tensor) -> dict[str, float]:
    """MSE vs exact (predicted class only) of every part-1 run, when part 1 explained the same images and model.

    A sanity check that ours and Captum estimate the same game: at equal budget the two permutation samplers
    should land near the same error.
    """
    if not part1:
        return {}
    out = {}
    for r in part1["ours"] + part1["captum"]:
        p = r.get("pred_attr")
        if p is None:
            continue
        n = p.shape[0]
        if n > len(x) or not torch.equal(part1["x"][:n], x[:n]):
            continue
        pred = part1["pred"][:n]
        ex = exact[:n].gather(2, pred[:, None, None].expand(-1, exact.shape[1], 1))[..., 0]  # (n, d)
        label = r["method"] + (f" ppe={r['ppe']}" if r.get("ppe") else "") + f" ({n} images)"
        out[label] = float((p.double() - ex.double()).pow(2).mean())
    return out


# --------------------------------------------------------------------------------------------------- report
def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.0f}"


def throughput_tables(p: dict) -> str:
    lines = [f"### Oracle throughput (CPU, {p['threads']} threads, {p['images']} images, budget {p['budget']} "
             f"evaluations/image, weights: {p['weights']})",
             f"load before: {p['load_before']}; after: {p['load_after']}", "",
             "| method | batch size | evals/s | seconds (best / median) |", "|---|---:|---:|---:|"]
    for r in p["plain_forward"]:
        lines.append(f"| plain forward | {r['batch_size']} | {_fmt(r['evals_per_s'])} | "
                     f"{r['seconds']:.3f} / {r['median_seconds']:.3f} |")
    lines += ["", "| method | ppe | images | evals/image | classes | evals/s | attributions/s | time in model | "
              "seconds (best / median) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["ours"] + p["captum"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['ppe']} | — | — | — | not accepted: {r['error'][:90]} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['ppe'] or '—'} | {r['images']} | {r['evals_per_image']:.0f} | "
                     f"{r['classes']} | {_fmt(r['evals_per_s'])} | {_fmt(r['attributions_per_s'])} | "
                     f"{100 * r['model_fraction']:.0f}% | {r['seconds']:.3f} / {r['median_seconds']:.3f} |")
    lines += ["", f"Best plain forward: {_fmt(p['best_forward']['evals_per_s'])} evals/s "
              f"(batch {p['best_forward']['batch_size']}). Best Captum ppe: {p['best_captum']}.", "",
              f"| ours | / best plain forward (target >= {TARGET_VS_FORWARD}) | / best Captum evals/s "
              f"(target >= {TARGET_VS_CAPTUM}) | / best Captum attributions/s | / same-kind Captum (evals/s) |",
              "|---|---:|---:|---:|---|"]
    for m, v in p["ratios"].items():
        same = ", ".join(f"{k.removeprefix('captum ')}: {x:.2f}x" for k, x in v["vs_captum_same_target"].items())
        lines.append(f"| {m} | {v['vs_best_forward']:.2f} | {v['vs_best_captum_evals']:.2f}x | "
                     f"{v['vs_best_captum_attributions']:.1f}x | {same or '—'} |")
    for name, table in p["profiles"].items():
        lines += ["", f"Profile of {name} (below target):", "```", table, "```"]
    return "\n".join(lines)


def error_tables(e: dict) -> str:
    a = e["amortized"]
    lines = [f"### Error vs compute ({e['n_test']} test images, exact Shapley from 2^16 coalitions; "
             f"labels: {e['label_estimator']} @ {e['label_budget']}, {e['n_train']} train + {e['n_val']} val images)",
             f"load: {e['load']}", "",
             "| method | evals / example | MSE vs exact | Pearson | Spearman | sign agree | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| amortized (label budget {e['label_budget']}) | {a['evals_per_example']:.0f} (+ explainer forward) | "
             f"{a['mse']:.3e} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['sign_agreement']:.3f} | "
             f"{a['seconds']:.2f} |"]
    for r in sorted(e["curve"], key=lambda r: (r["method"], r["budget"])):
        lines.append(f"| {r['method']} | {r['evals_per_example']:.0f} | {r['mse']:.3e} | {r['pearson']:.3f} | "
                     f"{r['spearman']:.3f} | {r['sign_agreement']:.3f} | {r['seconds']:.2f} |")
    lines += ["", "Compute of the amortized approach: "
              f"labels {e['label_evaluations']:,} evaluations ({e['n_train']} x {e['evals_per_train_label']} + "
              f"{e['n_val']} x {e['evals_per_val_label']}); explainer stage {e['explainer_stage_seconds']:.0f} s "
              f"(of which ~{e['label_seconds_estimated']:.0f} s labels, ~{e['train_seconds_estimated']:.0f} s "
              f"training/validation = {_fmt(e['train_evaluation_equivalents'])} evaluation-equivalents at "
              f"{_fmt(e['oracle_evals_per_s'])} evals/s); fixed total {_fmt(e['amortized_fixed_compute_evals'])} "
              f"evaluation-equivalents, then {e['amortized_inference_evals_per_example']:.1f} per explained example.",
              "", "| per-example method | evals/example to match amortized MSE | equal-error ratio (/ label budget) | "
              "MSE ratio at label budget | break-even #examples | compute ratio at n_test | compute ratio at all "
              f"{e['n_all']} images |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, v in e["summary"].items():
        lines.append(f"| {m} | {_fmt(v['equal_error_evals_per_example'])}{' (extrapolated)' if v['extrapolated'] else ''}"
                     f" | {v['equal_error_ratio_vs_label_budget']:.1f}x | {v['mse_ratio_at_label_budget']:.2f}x | "
                     f"{_fmt(v['break_even_examples'])} | {v['compute_ratio_at_n_test']:.2f}x | "
                     f"{v['compute_ratio_at_n_all']:.2f}x |")
    if e["budget_fidelity"]:
        lines += ["", "Sanity check, part-1 runs at the part-1 budget vs exact (predicted class only):", "",
                  "| run | MSE vs exact |", "|---|---:|"]
        lines += [f"| {k} | {v:.3e} |" for k, v in e["budget_fidelity"].items()]
    return "\n".join(lines)


def plot_error_vs_compute(e: dict, path: str) -> str:
    """Log-log MSE vs evaluations per example: per-example curves and the amortized explainer (atomic PNG write)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m, marker in zip(CURVE_METHODS, ("o", "s")):
        rows = sorted((r for r in e["curve"] if r["method"] == m), key=lambda r: r["evals_per_example"])
        ax.plot([r["evals_per_example"] for r in rows], [r["mse"] for r in rows], marker=marker, label=m)
    a = e["amortized"]
    ax.axhline(a["mse"], color="k", ls=":", lw=1)
    ax.scatter([e["label_budget"]], [a["mse"]], marker="*", s=220, color="crimson", zorder=5,
               label=f"amortized (x = label budget {e['label_budget']})")
    per_example_total = (e["amortized_fixed_compute_evals"] / e["n_all"] + e["amortized_inference_evals_per_example"])
    if math.isfinite(per_example_total):
        ax.scatter([per_example_total], [a["mse"]], marker="*", s=220, facecolors="none", edgecolors="crimson",
                   zorder=5, label=f"amortized, all compute incl. training / {e['n_all']} images")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("game evaluations per example")
    ax.set_ylabel("MSE vs exact Shapley")
    ax.set_title(f"Digits ViT, 16 patches: error vs compute ({e['n_test']} test images)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if k not in ("pred_attr", "x", "pred")}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Tensor):
        return obj.tolist()
    return obj


# --------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/bench", help="output folder (default: artifacts/bench)")
    parser.add_argument("--demo-out", default=None,
                        help="demo artifacts folder (default: artifacts/demo; with --quick: {out}/demo_quick if "
                             "artifacts/demo has no results.json)")
    parser.add_argument("--quick", action="store_true", help="smaller run: fewer images, budgets and repeats")
    parser.add_argument("--parts", default="throughput,error", help="comma-separated: throughput, error")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--profile", action="store_true", help="profile every estimator, not only those below target")
    a = parser.parse_args(argv)
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if not parts or parts - {"throughput", "error"}:
        parser.error(f"--parts must list 'throughput' and/or 'error', got {a.parts!r}")
    s = Settings.quick() if a.quick else Settings()
    demo_out = a.demo_out or ("artifacts/demo" if not a.quick or os.path.isfile("artifacts/demo/results.json")
                              else os.path.join(a.out, "demo_quick"))
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    results: dict[str, Any] = {"settings": asdict(s), "quick": a.quick, "demo_out": demo_out,
                               "torch": torch.__version__, "platform": platform.platform(), "load_start": load_now()}
    if "error" in parts:  # train the demo first, so the throughput part explains the trained classifier
        ensure_demo(demo_out, s.demo_epochs)
        torch.set_num_threads(a.threads)
    weights = os.path.join(demo_out, "classifier_vit.safetensors")

    report = []
    oracle_rate, p1 = None, None
    if "throughput" in parts:
        import captum

        results["captum"] = captum.__version__
        p1 = throughput_part(s, weights, a.profile)
        results["throughput"] = p1
        report.append(throughput_tables(p1))
        print(report[-1], flush=True)
        oracle_rate = next(r["evals_per_s"] for r in p1["ours"] if r["method"] == "ours: permutation_shapley")
    if "error" in parts:
        p2 = error_part(s, demo_out, oracle_rate, p1)
        results["error_vs_compute"] = p2
        results["plot"] = plot_error_vs_compute(p2, os.path.join(a.out, "error_vs_compute.png"))
        report.append(error_tables(p2))
        print("\n" + report[-1], flush=True)
    results["total_seconds"] = time.perf_counter() - start
    results["load_end"] = load_now()
    json_path = os.path.join(a.out, "amortization.json")
    atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(_jsonable(results), indent=2, default=float)))
    print(f"\nTotal {results['total_seconds']:.0f} s; load at end {results['load_end']}. Wrote {json_path}"
          + (f" and {results['plot']}" if "plot" in results else ""))
    return results


if __name__ == "__main__":
    main()
