"""Amortization benchmark: oracle throughput against Captum and the model's own forward, and error vs compute.

Part 1 (throughput, CPU, 2 threads): game evaluations per second of the digits ViT on the 16-player patch game
(4x4 grid of 8x8 patches on 32x32 digits) for

* the model's plain batched forward (no masking) at several batch sizes: the upper limit;
* our estimators (``permutation_shapley``, ``unbiased_kernel_shap``, ``kernel_shap``, ``banzhaf``), counted by the
  game's ``num_evaluations``, on the masking game and (permutation, unbiased KernelSHAP) on the token-dropping game;
* Captum's ``ShapleyValueSampling`` and ``KernelShap`` on the same model (+ softmax), images, patch grid (as
  ``feature_mask``), baseline 0 and budget, at the best ``perturbations_per_eval``; evaluations are the input rows
  that reach the model (counted by a wrapper).

Part 2 (error vs compute): the demo's amortized explainer (``python -m lightning_attr.demo``; run here when
``{demo_out}/results.json`` is missing) against per-example permutation sampling and unbiased KernelSHAP at
budgets ``32 .. 4096`` evaluations per example, all scored against exact Shapley values (2^16 coalitions) of the
demo's game (token dropping).

Part 3 (scaling, ``amortization_scaling.py``): the epoch time with and without the feature cache, then the explainer
fit on 1.4k real and 5k / 20k / 100k streamed augmented digits; error, equal-error ratios and total compute against
the part-2 curves.

    python benchmarks/amortization.py --out artifacts/bench            # full run
    python benchmarks/amortization.py --out artifacts/bench --quick    # smaller run (minutes)

Prints markdown tables; writes ``{out}/amortization.json``, ``{out}/error_vs_compute.png`` and
``{out}/scaling/scaling.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from common import NUM_CLASSES, ROOT, Timed, best_of, load_now, progress, run_rounds, save_plot, write_json
from torch import Tensor, nn

import lightning_attr
from lightning_attr import ImageDataModule, PatchGame, create_timm_model
from lightning_attr.callbacks import EpochClock
from lightning_attr.estimators import get_estimator
from lightning_attr.evaluation import (
    amortized_row,
    break_even,
    equal_error_budget,
    evaluations_per_example,
    inference_seconds,
    oracle_rate,
    per_example_curve,
)

CONFIG = ROOT / "configs" / "digits_shapley_vit.yaml"
MODEL_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)
IMAGE_SIZE, PATCH_SIZE = 32, 8
OURS = ("permutation_shapley", "unbiased_kernel_shap", "kernel_shap", "banzhaf")
CURVE_METHODS = ("permutation_shapley", "unbiased_kernel_shap")
DROP = ("permutation_shapley", "unbiased_kernel_shap")  # also timed on the token-dropping game
TARGET_VS_CAPTUM, TARGET_VS_FORWARD = 1.5, 0.8


@dataclass
class Settings:
    """Sizes of one benchmark run (``--quick`` picks the small ones)."""

    num_images: int = 32
    budget: int = 512
    repeats: int = 5
    forward_batch_sizes: tuple[int, ...] = (64, 256, 1024, 4096)
    svs_ppe: tuple[int, ...] = (1, 4, 16, 64)
    kernel_ppe: tuple[int, ...] = (1, 16, 64, 256, 512)
    kernel_sweep_images: int = 8
    curve_budgets: tuple[int, ...] = tuple(32 * 2**i for i in range(8))  # 32 .. 4096
    curve_seeds: int = 2
    demo_epochs: tuple[int | None, int | None] = (None, None)

    @classmethod
    def quick(cls) -> Settings:
        return cls(num_images=8, budget=256, repeats=1, forward_batch_sizes=(256, 1024), svs_ppe=(1, 16),
                   kernel_ppe=(1, 64, 256), kernel_sweep_images=2, curve_budgets=(32, 128, 512), curve_seeds=1,
                   demo_epochs=(5, 5))


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
class Job(Timed):
    """One timed workload: ``run()`` explains (or just evaluates) ``images`` images through ``counter``.

    ``evaluations`` (optional) reads an evaluation counter (ours: the game's ``num_evaluations``); otherwise the
    rows ``counter`` saw are the evaluations. ``result`` keeps the output of the last run.
    """

    method: str
    run: Callable[[], Any]
    counter: CountingModule
    images: int
    ppe: int | None = None
    batch_size: int | None = None
    evaluations: Callable[[], int] | None = None
    evals: int = 0
    model_seconds: float = 0.0
    model_calls: int = 0
    result: Any = None

    def time_once(self) -> float:
        """Run once; record wall time, evaluations and time in the model of this run."""
        self.counter.reset()
        before = self.evaluations() if self.evaluations else 0
        start = time.perf_counter()
        self.result = self.run()
        seconds = time.perf_counter() - start
        evals = (self.evaluations() - before) if self.evaluations else self.counter.rows
        if not self.seconds or seconds < min(self.seconds):
            self.evals, self.model_seconds, self.model_calls = evals, self.counter.seconds, self.counter.calls
        self.seconds.append(seconds)
        return seconds

    def row(self) -> dict:
        """Summary of the fastest run (the least disturbed by other load on the machine)."""
        best = self.best
        row = {"method": self.method, "ppe": self.ppe, "batch_size": self.batch_size, "images": self.images,
               "evaluations": self.evals, "evals_per_image": self.evals / self.images, "seconds": best,
               "median_seconds": self.median, "runs": len(self.seconds),
               "evals_per_s": self.evals / best, "model_fraction": self.model_seconds / best,
               "model_calls": self.model_calls, "counted_rows": self.counter.rows}
        if isinstance(self.result, Tensor):  # (N, K', d) attributions, K' = 1 or K classes
            row["classes"] = int(self.result.shape[1])
            row["attributions_per_s"] = self.images * row["classes"] / best
        return row


def time_rounds(jobs: Sequence[Job], rounds: int) -> None:
    """Warm every job up once, then time ``rounds`` interleaved rounds (every job once per round).

    Interleaving spreads slow phases of a shared machine evenly over the methods; each job keeps its best run.
    """
    for job in jobs:
        job.run()
    run_rounds(jobs, rounds, log)


log = progress("bench")


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


# --------------------------------------------------------------------------------------------------- part 1 jobs
def forward_jobs(model: nn.Module, x: Tensor, batch_sizes: Sequence[int], rows_per_run: int = 8192) -> list[Job]:
    """``model(batch)`` (no masking, no softmax) at each batch size, about ``rows_per_run`` rows per timed run."""
    jobs = []
    for bs in batch_sizes:
        counter = CountingModule(model)
        batch = x.repeat(math.ceil(bs / len(x)), 1, 1, 1)[:bs].contiguous()
        reps = max(1, math.ceil(rows_per_run / bs))

        @torch.no_grad()
        def run(counter: CountingModule = counter, batch: Tensor = batch, reps: int = reps) -> None:
            for _ in range(reps):
                counter(batch)

        jobs.append(Job("plain forward", run, counter, images=reps * bs, batch_size=bs))
    return jobs


def our_jobs(model: nn.Module, x: Tensor, names: Sequence[str], budget: int, chunk_size: int | None = None,
             suffix: str = "", removal: str = "mask") -> list[Job]:
    """Our estimators on all of ``x`` in one call each; evaluations counted by the game; all K classes returned.
    ``removal="drop"``: the token-dropping game (the model's rows then count coalitions of fewer tokens)."""
    jobs = []
    for name in names:
        counted, counter = _counted_encoder(model) if removal == "drop" else (None, CountingModule(model))
        kwargs = {"chunk_size": chunk_size} if chunk_size else {}
        game = PatchGame(counted if removal == "drop" else counter, PATCH_SIZE, (IMAGE_SIZE, IMAGE_SIZE),
                         removal=removal, **kwargs)
        est = get_estimator(name)

        def run(est: Callable = est, game: PatchGame = game) -> Tensor:
            return est(game, x, budget, generator=torch.Generator().manual_seed(0)).transpose(1, 2)  # (N, K, d)

        jobs.append(Job(f"ours: {name}{suffix}", run, counter, images=len(x), batch_size=game.chunk_size,
                        evaluations=lambda game=game: game.num_evaluations))
    return jobs


def _counted_encoder(model: nn.Module) -> tuple[nn.Module, CountingModule]:
    """A view of the ViT ``model`` (same parameters) whose encoder blocks are counted: the token-dropping game runs
    the blocks, not ``model.forward``."""
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.blocks = CountingModule(model.blocks)
    return view, view.blocks


def _patch_values(attr: Tensor) -> Tensor:
    """Captum's input-shaped attributions (..., C, H, W) -> one value per patch (..., d), row-major."""
    return attr[..., 0, ::PATCH_SIZE, ::PATCH_SIZE].flatten(-2)


def captum_svs_job(model: nn.Module, x: Tensor, target: Tensor | None, budget: int, ppe: int) -> Job:
    """Captum ShapleyValueSampling on all of ``x`` in one call (Captum batches examples); ``target=None`` asks for
    every class at once (a multi-output forward, which Captum 0.9 accepts for this method)."""
    from captum.attr import ShapleyValueSampling

    counter = CountingModule(model)
    svs = ShapleyValueSampling(nn.Sequential(counter, nn.Softmax(dim=-1)).eval())
    mask = patch_feature_mask()
    d = int(mask.max()) + 1
    permutations = max(1, round((budget - 1) / d))  # 1 + d * n_samples evaluations per image

    def run() -> Tensor:
        torch.manual_seed(0)
        attr = svs.attribute(x, baselines=0.0, target=target, feature_mask=mask, n_samples=permutations,
                             perturbations_per_eval=ppe)
        return _patch_values(attr).view(len(x), -1, d)  # (N, 1 or K, d)

    mode = "pred" if target is not None else "all"
    return Job(f"captum ShapleyValueSampling (target={mode})", run, counter, images=len(x), ppe=ppe)


def captum_kernel_job(model: nn.Module, x: Tensor, target: Tensor | None, budget: int, ppe: int) -> Job:
    """Captum KernelShap, one image per call (Captum fits one interpretable model per example and advises it)."""
    import warnings

    from captum.attr import KernelShap

    counter = CountingModule(model)
    ks = KernelShap(nn.Sequential(counter, nn.Softmax(dim=-1)).eval())
    mask = patch_feature_mask()
    d = int(mask.max()) + 1

    def run() -> Tensor:
        torch.manual_seed(0)
        outs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(len(x)):
                coefs = ks.attribute(x[i : i + 1], baselines=0.0, target=None if target is None else int(target[i]),
                                     feature_mask=mask, n_samples=budget, perturbations_per_eval=ppe,
                                     return_input_shape=False)
                outs.append(coefs.reshape(1, -1, d))
        return torch.cat(outs)  # (N, 1 or K, d)

    mode = "pred" if target is not None else "all"
    return Job(f"captum KernelShap (target={mode})", run, counter, images=len(x), ppe=ppe)


def sweep_captum(model: nn.Module, x: Tensor, pred: Tensor, s: Settings) -> tuple[list[dict], dict[str, int]]:
    """One timed run of every (Captum method, target mode, ``perturbations_per_eval``); returns rows and best ppe.

    KernelShap sweeps on the first ``s.kernel_sweep_images`` images (it is slow at small ppe); unsupported
    combinations are recorded with Captum's error message.
    """
    rows, best = [], {}
    makers = [(captum_svs_job, s.svs_ppe, x), (captum_kernel_job, s.kernel_ppe, x[: s.kernel_sweep_images])]
    for make, ppes, xs in makers:
        for mode in ("pred", "all"):
            target = pred[: len(xs)] if mode == "pred" else None
            for ppe in ppes:
                job = make(model, xs, target, s.budget, ppe)
                try:
                    job.time_once()
                except Exception as err:  # e.g. KernelShap with a multi-class output
                    rows.append({"method": job.method, "ppe": ppe, "error": f"{type(err).__name__}: {err}"})
                    break
                row = job.row()
                rows.append(row)
                log(f"sweep {job.method} ppe={ppe}: {row['evals_per_s']:,.0f} evals/s")
                if job.method not in best or row["evals_per_s"] > best[job.method][1]:
                    best[job.method] = (ppe, row["evals_per_s"])
    return rows, {m: ppe for m, (ppe, _) in best.items()}


class _Labelled(nn.Module):
    """Runs ``model`` inside a named ``torch.profiler.record_function`` range (the profile shows its total)."""

    def __init__(self, model: nn.Module, label: str) -> None:
        super().__init__()
        self.model, self.label = model, label

    def forward(self, x: Tensor) -> Tensor:
        from torch.profiler import record_function

        with record_function(self.label):
            return self.model(x)


def profile_estimator(model: nn.Module, x: Tensor, name: str, budget: int, top: int = 15) -> str:
    """torch.profiler table (self CPU time) of one estimator call: where the time goes besides the model.

    The rows ``estimator call`` and ``model forward`` (CPU total) split the call into model and everything else
    (masking, sampling, the estimator's own algebra).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    game = PatchGame(_Labelled(model, "model forward"), PATCH_SIZE, (IMAGE_SIZE, IMAGE_SIZE))
    est = get_estimator(name)
    est(game, x, budget, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(f"estimator call ({name})"):
            est(game, x, budget, generator=torch.Generator().manual_seed(0))
    events = prof.key_averages()
    totals = {e.key: e.cpu_time_total for e in events}
    call, model_total = totals.get(f"estimator call ({name})", math.nan), totals.get("model forward", math.nan)
    head = (f"estimator call {call / 1e3:.0f} ms, of which model forward {model_total / 1e3:.0f} ms "
            f"({100 * model_total / call:.0f}%); the rest is masking, sampling and estimator algebra.\n")
    return head + events.table(sort_by="self_cpu_time_total", row_limit=top)


class _NoModel(nn.Module):
    """Stands in for the classifier: returns zeros, so a game call costs only masking, sampling and algebra."""

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(x.shape[0], NUM_CLASSES)


def overhead_rows(x: Tensor, names: Sequence[str], budget: int, chunk_sizes: Sequence[int], repeats: int) -> list[dict]:
    """Seconds per estimator call with a no-op model: the cost of everything but the model, per game chunk size."""
    rows = []
    for chunk in chunk_sizes:
        game = PatchGame(_NoModel(), PATCH_SIZE, (IMAGE_SIZE, IMAGE_SIZE), chunk_size=chunk)
        for name in names:
            est = get_estimator(name)
            est(game, x, budget)
            times = best_of(lambda: est(game, x, budget, generator=torch.Generator().manual_seed(0)), max(3, repeats))
            rows.append({"method": name, "chunk_size": chunk, "seconds": min(times)})
    return rows


def throughput_part(s: Settings, weights: str | None, profile_all: bool) -> dict:
    """Part 1: plain forward, ours and Captum on the same model, images and budget; ratios and (if needed) profiles."""
    torch.manual_seed(0)
    model = build_classifier(weights)
    x = test_images(s.num_images)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    load_before = load_now(cores=True)
    t0 = time.perf_counter()
    sweep_rows, best_ppe = sweep_captum(model, x, pred, s)

    jobs = forward_jobs(model, x, s.forward_batch_sizes)
    jobs += our_jobs(model, x, OURS, s.budget)
    jobs += our_jobs(model, x, ["permutation_shapley"], 32, suffix=" @32 (label setting)")
    jobs += our_jobs(model, x, DROP, s.budget, suffix=" (removal=drop)", removal="drop")
    default_chunk = inspect.signature(PatchGame).parameters["chunk_size"].default
    for bs in s.forward_batch_sizes:  # the game's chunk (rows per forward) at every plain-forward batch size
        if bs != default_chunk:
            jobs += our_jobs(model, x, ["permutation_shapley"], s.budget, chunk_size=bs, suffix=f" (chunk_size={bs})")
    for method, ppe in best_ppe.items():
        target = None if "target=all" in method else pred
        maker = captum_svs_job if "ShapleyValueSampling" in method else captum_kernel_job
        jobs.append(maker(model, x, target, s.budget, ppe))
    time_rounds(jobs, s.repeats)
    forward_rows = [j.row() for j in jobs if j.method == "plain forward"]
    best_forward = max(forward_rows, key=lambda r: r["evals_per_s"])
    overhead = overhead_rows(x, ["permutation_shapley", "kernel_shap"], s.budget,
                             sorted({default_chunk, *s.forward_batch_sizes}, reverse=True), s.repeats)
    seconds = time.perf_counter() - t0
    load_after = load_now(cores=True)

    method_rows = []
    for j in jobs:
        if j.method == "plain forward":
            continue
        row = j.row()
        row["pred_attr"] = _class_of(j.result, pred[: j.images])
        method_rows.append(row)
    ours_rows = [r for r in method_rows if r["method"].startswith("ours")]
    captum_rows = [r for r in method_rows if r["method"].startswith("captum")]
    best_captum_evals = max(captum_rows, key=lambda r: r["evals_per_s"])
    best_captum_attrs = max(captum_rows, key=lambda r: r["attributions_per_s"])
    ratios = {}
    for r in ours_rows:
        if "@32" in r["method"]:
            continue
        ratios[r["method"]] = {
            "vs_best_forward": r["evals_per_s"] / best_forward["evals_per_s"],
            "vs_best_captum_evals": r["evals_per_s"] / best_captum_evals["evals_per_s"],
            "vs_best_captum_attributions": r["attributions_per_s"] / best_captum_attrs["attributions_per_s"],
            "vs_captum_same_kind": _same_kind_ratio(r, captum_rows),
            "vs_masking": _vs_masking(r, ours_rows),
        }
    below = sorted(m.removeprefix("ours: ") for m, v in ratios.items() if "chunk_size" not in m
                   and (v["vs_best_forward"] < TARGET_VS_FORWARD or v["vs_best_captum_evals"] < TARGET_VS_CAPTUM))
    log("profiling" if below or profile_all else "all estimators at target; no profile needed")
    profiles = {name: profile_estimator(model, x, name, s.budget) for name in (OURS if profile_all else below)}
    return {
        "weights": weights if weights and os.path.isfile(weights) else "random init", "x": x, "pred": pred,
        "images": len(x), "budget": s.budget, "threads": torch.get_num_threads(), "rounds": s.repeats,
        "load_before": load_before, "load_after": load_after, "seconds": seconds,
        "captum_sweep": sweep_rows, "best_captum_ppe": best_ppe,
        "plain_forward": forward_rows, "best_forward": best_forward, "ours": ours_rows, "captum": captum_rows,
        "best_captum_evals": best_captum_evals["method"], "best_captum_attributions": best_captum_attrs["method"],
        "ratios": ratios, "below_target": below, "profiles": profiles, "overhead": overhead,
    }


def _class_of(attr: Tensor, pred: Tensor) -> Tensor:
    """(N, 1 or K, d) attributions -> (N, d) of the predicted class (the only one when a single class was explained)."""
    if attr.shape[1] == 1:
        return attr[:, 0]
    return attr.gather(1, pred[:, None, None].expand(-1, 1, attr.shape[2]))[:, 0]


def _vs_masking(row: dict, ours_rows: Sequence[dict]) -> float | None:
    """Evaluations per second of a token-dropping run over the same estimator on the masking game (else None)."""
    if not row["method"].endswith(" (removal=drop)"):
        return None
    mask = next((r for r in ours_rows if r["method"] == row["method"].removesuffix(" (removal=drop)")), None)
    return row["evals_per_s"] / mask["evals_per_s"] if mask else None


def _same_kind_ratio(ours: dict, captum_rows: Sequence[dict]) -> dict[str, float]:
    """Ours vs Captum's estimator of the same kind, in evals/s (permutation vs SVS, KernelSHAP vs KernelShap)."""
    m = ours["method"]
    kind = "ShapleyValueSampling" if "permutation" in m else "KernelShap" if "kernel_shap" in m else None
    if kind is None:
        return {}
    return {r["method"]: ours["evals_per_s"] / r["evals_per_s"] for r in captum_rows if kind in r["method"]}


# --------------------------------------------------------------------------------------------------- part 2
def ensure_demo(demo_out: str, epochs: tuple[int | None, int | None], rerun: bool = False) -> dict:
    """``{demo_out}/results.json``, running the demo (classifier + explainer stages) first when it is missing
    (or always, with ``rerun``)."""
    path = os.path.join(demo_out, "results.json")
    if rerun or not os.path.isfile(path):
        from lightning_attr.demo import run

        log(f"{'rerunning' if rerun else path + ' missing: running'} the demo into {demo_out} (minutes) ...")
        run(demo_out, *epochs)
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def _cli_argv() -> Any:
    """Hide this script's own arguments from LightningCLI while it parses the list it is given."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        yield
    finally:
        sys.argv = saved


def oracle_datamodule(demo_out: str):
    """The explainer config's OracleDataModule (through the CLI parser), with the demo's label / exact cache."""
    from lightning_attr.cli import build_cli

    with _cli_argv():
        cli = build_cli(["--config", str(CONFIG), "--model.init_args.classifier_weights",
                         os.path.join(demo_out, "classifier_vit.safetensors"),
                         "--data.init_args.cache_dir", os.path.join(demo_out, "oracle_cache"),
                         "--trainer.logger", "false"], run=False)
    return cli.datamodule


def fit_explainer(demo_out: str, root: str, cache_dir: str, epochs: int,
                  extra: Sequence[str] = ()) -> tuple[Any, EpochClock]:
    """Fit the explainer config on the demo's classifier (``extra``: more CLI arguments) into ``root``, quietly and
    with an :class:`~lightning_attr.callbacks.EpochClock`; returns the finished CLI and the clock."""
    from lightning_attr.cli import build_cli

    with _cli_argv():
        cli = build_cli(["--config", str(CONFIG), "--model.init_args.classifier_weights",
                         os.path.join(demo_out, "classifier_vit.safetensors"), "--data.init_args.cache_dir", cache_dir,
                         "--trainer.default_root_dir", root, "--trainer.max_epochs", str(epochs),
                         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                         "--trainer.logger", "false", *extra], run=False)
    clock = EpochClock()
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, clock


def time_training_epochs(demo_out: str, epochs: int = 3, extra: Sequence[str] = ()) -> dict:
    """Re-time the explainer stage's epochs now (same config, cached labels, a temporary log folder).

    The demo's own stage time depends on the load while it ran; this measures an epoch (training + validation,
    Lightning included, no label computation: the fixed labels come from the demo's cache) under the same
    conditions as the throughput numbers. Epoch 0 (label cache load, warm-up) is reported but not used.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cli, clock = fit_explainer(demo_out, tmp, os.path.join(demo_out, "oracle_cache"), epochs, extra)
        label_evals = sum(cli.datamodule.evaluations.values())
    return {"epoch_seconds": clock.epoch_seconds(), "seconds_per_epoch": clock.seconds_per_epoch(),
            "labels_recomputed_evaluations": label_evals}


def error_part(s: Settings, demo_out: str, part1: dict | None) -> dict:
    """Part 2: per-example MSE curves vs the amortized explainer; compute accounting and equal-error ratios."""
    demo = ensure_demo(demo_out, s.demo_epochs)  # main() has already (re)run it when asked
    t0 = time.perf_counter()
    ckpt = demo["checkpoint"]
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"Explainer checkpoint {ckpt!r} named in {demo_out}/results.json does not exist.")
    try:
        explainer = lightning_attr.AmortizedExplainer.load_from_checkpoint(ckpt, map_location="cpu").eval()
    except RuntimeError as err:  # e.g. a checkpoint written before the explainer's architecture changed
        raise RuntimeError(f"Explainer checkpoint {ckpt!r} does not fit the installed lightning_attr "
                           f"({str(err).splitlines()[0]} ...). Rerun the demo: add --rerun-demo.") from err
    game = explainer.game
    dm = oracle_datamodule(demo_out)
    x, exact = dm.ground_truth(game, "cpu")
    n_train, n_val, n_test = len(dm.datamodule.splits["train"]), len(dm.datamodule.splits["val"]), len(x)
    n_all = n_train + n_val + len(dm.datamodule.splits["test"])
    label_name = dm.estimator.name
    label_budget, val_budget = dm.num_samples, dm.val_num_samples
    train_evals = evaluations_per_example(game, x, label_name, label_budget)
    val_evals = evaluations_per_example(game, x, label_name, val_budget)
    label_evaluations = n_train * train_evals + n_val * val_evals

    amortized = amortized_row(explainer, x, exact, label_budget)
    curve = []
    for seed in range(s.curve_seeds):
        curve += [dict(r, seed=seed) for r in per_example_curve(game, x, exact, CURVE_METHODS, s.curve_budgets,
                                                                 seed=seed + 1, progress=False)]
    curve = _mean_over_seeds(curve)

    rate = part1_rate(part1, game) or oracle_rate(game, x[:32])  # evaluations/s: converts seconds into evaluations
    clock = time_training_epochs(demo_out)
    epochs_run, best_epoch = explainer_epochs(ckpt)
    train_spent = clock["seconds_per_epoch"] * epochs_run
    train_to_best = clock["seconds_per_epoch"] * (best_epoch + 1)
    infer_per_example = max(amortized["evals_per_example"], inference_seconds(explainer, x) * rate)
    fixed = label_evaluations + train_spent * rate
    fixed_to_best = label_evaluations + train_to_best * rate

    summary: dict[str, Any] = {}
    for m in CURVE_METHODS:
        rows = [r for r in curve if r["method"] == m]
        need = equal_error_budget(rows, amortized["mse"])
        at_label = next((r for r in rows if r["budget"] == label_budget), None)
        summary[m] = {
            "equal_error_evals_per_example": need,
            "equal_error_ratio_vs_label_budget": need / label_budget,
            "extrapolated": need > max(r["evals_per_example"] for r in rows) or need < min(r["evals_per_example"] for r in rows),
            "mse_at_label_budget": at_label["mse"] if at_label else math.nan,
            "mse_ratio_at_label_budget": at_label["mse"] / amortized["mse"] if at_label else math.nan,
            "break_even_examples_labels_only": break_even(label_evaluations, need, amortized["evals_per_example"]),
            "break_even_examples": break_even(fixed, need, infer_per_example),
            "break_even_examples_to_best_epoch": break_even(fixed_to_best, need, infer_per_example),
            "compute_ratio_at_n_all_labels_only": need * n_all / (label_evaluations + amortized["evals_per_example"] * n_all),
            "compute_ratio_at_n_all": need * n_all / (fixed + infer_per_example * n_all),
        }
    fidelity = _throughput_fidelity(part1, x, exact, game.removal.name)
    return {
        "demo_out": demo_out, "checkpoint": ckpt, "label_estimator": label_name,
        "label_budget": label_budget, "val_budget": val_budget, "evals_per_train_label": train_evals,
        "evals_per_val_label": val_evals, "n_train": n_train, "n_val": n_val, "n_test": n_test, "n_all": n_all,
        "label_evaluations": label_evaluations, "oracle_evals_per_s": rate,
        "demo_explainer_stage_seconds": float(demo["seconds"]["explainer"]),
        "epochs_run": epochs_run, "best_epoch": best_epoch, "training_clock": clock,
        "train_seconds_spent": train_spent, "train_seconds_to_best": train_to_best,
        "train_evaluation_equivalents": train_spent * rate,
        "amortized_fixed_compute_evals": fixed, "amortized_fixed_compute_to_best_evals": fixed_to_best,
        "amortized_inference_evals_per_example": infer_per_example,
        "amortized": amortized, "curve": curve, "summary": summary, "budget_fidelity": fidelity,
        "demo_test_metrics": demo.get("test_metrics"), "seconds": time.perf_counter() - t0,
        "load": load_now(cores=True), "x": x, "exact": exact,
    }


def part1_rate(part1: dict | None, game: PatchGame) -> float | None:
    """Part 1's evaluations per second of permutation sampling on ``game``'s kind of removal (None without part 1)."""
    if not part1:
        return None
    name = "ours: permutation_shapley" + (" (removal=drop)" if game.removal.name == "drop" else "")
    return next(r["evals_per_s"] for r in part1["ours"] if r["method"] == name)


def explainer_epochs(ckpt: str) -> tuple[int, int]:
    """(epochs the explainer stage ran, epoch of the best checkpoint) from the run's config.yaml and the checkpoint."""
    import yaml

    best_epoch = int(torch.load(ckpt, map_location="cpu", weights_only=False)["epoch"])
    for config in (Path(ckpt).parents[1] / "config.yaml", CONFIG):
        if config.is_file():
            epochs = (yaml.safe_load(config.read_text()).get("trainer") or {}).get("max_epochs")
            if epochs:
                return int(epochs), best_epoch
    return best_epoch + 1, best_epoch


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


def _throughput_fidelity(part1: dict | None, x: Tensor, exact: Tensor, removal: str) -> dict[str, dict]:
    """MSE vs exact (predicted class only) of every part-1 run of the same game (``removal``: Captum masks), when
    part 1 explained the same images and model.

    A sanity check that ours and Captum estimate the same game: at equal budget the two permutation samplers
    should land near the same error.
    """
    if not part1:
        return {}
    out = {}
    for r in part1["ours"] + part1["captum"]:
        p = r.get("pred_attr")
        name = r["method"].removeprefix("ours: ").split(" ")[0]
        if p is None or (r["method"].startswith("ours") and get_estimator(name).target != "shapley"):
            continue  # e.g. Banzhaf values: a different target than the exact Shapley values
        if ("(removal=drop)" in r["method"]) != (removal == "drop"):
            continue  # the other game: its exact values differ
        n = p.shape[0]
        if n > len(x) or not torch.equal(part1["x"][:n], x[:n]):
            continue
        pred = part1["pred"][:n]
        ex = exact[:n].gather(2, pred[:, None, None].expand(-1, exact.shape[1], 1))[..., 0]  # (n, d)
        label = r["method"] + (f" ppe={r['ppe']}" if r.get("ppe") else "")
        out[label] = {"images": n, "evals_per_image": r["evals_per_image"],
                      "mse": float((p.double() - ex.double()).pow(2).mean())}
    return out


# --------------------------------------------------------------------------------------------------- report
def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.0f}"


def _method_line(r: dict) -> str:
    if "error" in r:
        return f"| {r['method']} | {r['ppe']} | — | — | — | not accepted ({r['error'][:80]}) | | | |"
    return (f"| {r['method']} | {r['ppe'] or '—'} | {r['images']} | {r['evals_per_image']:.0f} | {r.get('classes', '—')} | "
            f"{_fmt(r['evals_per_s'])} | {_fmt(r.get('attributions_per_s', math.nan))} | "
            f"{100 * r['model_fraction']:.0f}% | {r['seconds']:.3f} / {r['median_seconds']:.3f} ({r['runs']}) |")


def throughput_tables(p: dict) -> str:
    """Markdown tables of part 1: plain forward, Captum ppe sweep, timed methods, ratios, profiles."""
    head = ("| method | ppe | images | evals/image | classes | evals/s | attributions/s | time in model | "
            "seconds best / median (runs) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [f"### Oracle throughput (CPU, {p['threads']} threads; {p['images']} images, budget {p['budget']} "
             f"evaluations per image; weights: {p['weights']})",
             f"Load average before: {p['load_before']}; after: {p['load_after']}. Best of {p['rounds']} interleaved "
             "rounds after a warm-up.", "",
             "| plain forward, batch size | evals/s | seconds best / median (runs) | time in model |",
             "|---:|---:|---:|---:|"]
    for r in p["plain_forward"]:
        lines.append(f"| {r['batch_size']} | {_fmt(r['evals_per_s'])} | {r['seconds']:.3f} / {r['median_seconds']:.3f} "
                     f"({r['runs']}) | {100 * r['model_fraction']:.0f}% |")
    lines += ["", "Captum `perturbations_per_eval` sweep (one run each; KernelShap on the first images only):", "", head]
    lines += [_method_line(r) for r in p["captum_sweep"]]
    lines += ["", "Timed side by side (Captum at its best ppe):", "", head]
    lines += [_method_line(r) for r in p["ours"] + p["captum"]]
    lines += ["", f"Best plain forward: {_fmt(p['best_forward']['evals_per_s'])} evals/s (batch "
              f"{p['best_forward']['batch_size']}). Fastest Captum in evals/s: {p['best_captum_evals']}; in "
              f"attributions/s: {p['best_captum_attributions']}.", "",
              f"| ours | / best plain forward (target >= {TARGET_VS_FORWARD}) | / fastest Captum, evals/s "
              f"(target >= {TARGET_VS_CAPTUM}) | / fastest Captum, attributions/s | / same-kind Captum, evals/s | "
              "/ same estimator on the masking game |", "|---|---:|---:|---:|---|---:|"]
    for m, v in p["ratios"].items():
        same = ", ".join(f"{k.removeprefix('captum ')}: {x:.2f}x" for k, x in v["vs_captum_same_kind"].items())
        mask = f"{v['vs_masking']:.2f}x" if v.get("vs_masking") else "—"
        lines.append(f"| {m} | {v['vs_best_forward']:.2f} | {v['vs_best_captum_evals']:.2f}x | "
                     f"{v['vs_best_captum_attributions']:.1f}x | {same or '—'} | {mask} |")
    if p.get("overhead"):
        by_method = {r["method"]: r for r in p["ours"]}
        lines += ["", "Everything but the model: one call with a no-op model (masking, sampling, estimator algebra), "
                  "by the game's `chunk_size`:", "", "| estimator | chunk_size | seconds per call (no-op model) | "
                  "share of the real call at the default chunk |", "|---|---:|---:|---:|"]
        for r in p["overhead"]:
            real = by_method.get(f"ours: {r['method']}")
            share = f"{100 * r['seconds'] / real['seconds']:.0f}%" if real else "—"
            lines.append(f"| {r['method']} | {r['chunk_size']} | {r['seconds']:.3f} | {share} |")
    for name, table in p["profiles"].items():
        lines += ["", f"torch.profiler, one call of {name} (self CPU time):", "```", table.rstrip(), "```"]
    return "\n".join(lines)


def error_tables(e: dict) -> str:
    """Markdown tables of part 2: error per method and budget, compute accounting, equal-error ratios."""
    a, c = e["amortized"], e["training_clock"]
    lines = [f"### Error vs compute ({e['n_test']} test images, exact Shapley from 2^16 coalitions; "
             f"labels: {e['label_estimator']} @ {e['label_budget']}, {e['n_train']} train + {e['n_val']} val images)",
             f"Load average: {e['load']}", "",
             "| method | evals / example | MSE vs exact | Pearson | Spearman | sign agree | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| amortized (label budget {e['label_budget']}) | {a['evals_per_example']:.0f} + explainer forward | "
             f"{a['mse']:.3e} | {a['pearson']:.3f} | {a['spearman']:.3f} | {a['sign_agreement']:.3f} | "
             f"{a['seconds']:.2f} |"]
    for r in sorted(e["curve"], key=lambda r: (r["method"], r["budget"])):
        lines.append(f"| {r['method']} | {r['evals_per_example']:.0f} | {r['mse']:.3e} | {r['pearson']:.3f} | "
                     f"{r['spearman']:.3f} | {r['sign_agreement']:.3f} | {r['seconds']:.2f} |")
    rate = e["oracle_evals_per_s"]
    lines += ["", "Compute of the amortized approach (seconds converted at the measured oracle rate of "
              f"{_fmt(rate)} evaluations/s):", "",
              "| item | seconds | evaluations (or equivalents) |", "|---|---:|---:|",
              f"| labels: {e['n_train']} x {e['evals_per_train_label']} + {e['n_val']} x {e['evals_per_val_label']} | "
              f"{e['label_evaluations'] / rate:.1f} | {e['label_evaluations']:,} |",
              f"| training + validation, {e['epochs_run']} epochs x {c['seconds_per_epoch']:.2f} s (re-timed now) | "
              f"{e['train_seconds_spent']:.0f} | {_fmt(e['train_evaluation_equivalents'])} |",
              f"| ... up to the best checkpoint only (epoch {e['best_epoch'] + 1}) | {e['train_seconds_to_best']:.0f} | "
              f"{_fmt(e['train_seconds_to_best'] * rate)} |",
              f"| total fixed cost (labels + all epochs) | {e['amortized_fixed_compute_evals'] / rate:.0f} | "
              f"{_fmt(e['amortized_fixed_compute_evals'])} |",
              f"| per explained example (v(empty), v(all) + explainer forward) | "
              f"{e['amortized_inference_evals_per_example'] / rate * 1e3:.2f} ms | "
              f"{e['amortized_inference_evals_per_example']:.1f} |",
              f"| (the demo's logged explainer stage, under its own load) | {e['demo_explainer_stage_seconds']:.0f} | |",
              "", "| per-example method | evals/example to match amortized MSE | equal-error ratio (/ label budget) | "
              "MSE ratio at the label budget | break-even #examples: labels only / + training (all epochs) / "
              f"+ training to best epoch | compute ratio on all {e['n_all']} images: labels only / + training |",
              "|---|---:|---:|---:|---:|---:|"]
    for m, v in e["summary"].items():
        lines.append(f"| {m} | {v['equal_error_evals_per_example']:.0f}{' (extrapolated)' if v['extrapolated'] else ''}"
                     f" | {v['equal_error_ratio_vs_label_budget']:.2f}x | {v['mse_ratio_at_label_budget']:.2f}x | "
                     f"{_fmt(v['break_even_examples_labels_only'])} / {_fmt(v['break_even_examples'])} / "
                     f"{_fmt(v['break_even_examples_to_best_epoch'])} | {v['compute_ratio_at_n_all_labels_only']:.2f}x / "
                     f"{v['compute_ratio_at_n_all']:.3f}x |")
    if e["budget_fidelity"]:
        lines += ["", "Sanity check: the Shapley runs of part 1 on the same game vs its exact Shapley values (predicted "
                  "class only; same images and model):", "", "| run | images | evals / image | MSE vs exact |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['images']} | {v['evals_per_image']:.0f} | {v['mse']:.3e} |"
                  for k, v in e["budget_fidelity"].items()]
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
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("game evaluations per example")
    ax.set_ylabel("MSE vs exact Shapley")
    ax.set_title(f"Digits ViT, 16 patches: error vs compute ({e['n_test']} test images)")
    return save_plot(fig, ax, path)


# --------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/bench", help="output folder (default: artifacts/bench)")
    parser.add_argument("--demo-out", default=None,
                        help="demo artifacts folder (default: artifacts/demo; with --quick: {out}/demo_quick if "
                             "artifacts/demo has no results.json)")
    parser.add_argument("--quick", action="store_true", help="smaller run: fewer images, budgets and repeats")
    parser.add_argument("--rerun-demo", action="store_true",
                        help="run the demo again even if {demo-out}/results.json exists (e.g. after library changes)")
    parser.add_argument("--parts", default="throughput,error,scaling",
                        help="comma-separated: throughput, error, scaling (scaling runs error too)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--profile", action="store_true", help="profile every estimator, not only those below target")
    a = parser.parse_args(argv)
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if not parts or parts - {"throughput", "error", "scaling"}:
        parser.error(f"--parts must list some of 'throughput', 'error', 'scaling', got {a.parts!r}")
    if "scaling" in parts:
        parts.add("error")
    s = Settings.quick() if a.quick else Settings()
    demo_out = a.demo_out or ("artifacts/demo" if not a.quick or os.path.isfile("artifacts/demo/results.json")
                              else os.path.join(a.out, "demo_quick"))
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    results: dict[str, Any] = {"settings": asdict(s), "quick": a.quick, "demo_out": demo_out,
                               "torch": torch.__version__, "platform": platform.platform(),
                               "load_start": load_now(cores=True)}
    if "error" in parts:  # train the demo first, so the throughput part explains the trained classifier
        log(f"demo artifacts: {demo_out}")
        demo_start = time.perf_counter()
        ensure_demo(demo_out, s.demo_epochs, rerun=a.rerun_demo)
        results["demo_seconds_this_run"] = time.perf_counter() - demo_start
        torch.set_num_threads(a.threads)
    weights = os.path.join(demo_out, "classifier_vit.safetensors")

    report = []
    p1 = None
    if "throughput" in parts:
        import captum

        results["captum"] = captum.__version__
        p1 = throughput_part(s, weights, a.profile)
        results["throughput"] = p1
        report.append(throughput_tables(p1))
        print(report[-1], flush=True)
    if "error" in parts:
        p2 = error_part(s, demo_out, p1)
        results["error_vs_compute"] = p2
        results["plot"] = plot_error_vs_compute(p2, os.path.join(a.out, "error_vs_compute.png"))
        report.append(error_tables(p2))
        print("\n" + report[-1], flush=True)
    if "scaling" in parts:
        from amortization_scaling import run_scaling

        p3, table = run_scaling(a.quick, demo_out, os.path.join(a.out, "scaling"), p2["x"], p2["exact"], p2["curve"],
                                p2["oracle_evals_per_s"])
        results["scaling"] = p3
        report.append(table)
        print("\n" + table, flush=True)
    results["total_seconds"] = time.perf_counter() - start
    results["load_end"] = load_now(cores=True)
    json_path = write_json(os.path.join(a.out, "amortization.json"), results, drop=("pred_attr", "x", "pred", "exact"))
    print(f"\nTotal {results['total_seconds']:.0f} s; load at end {results['load_end']}. Wrote {json_path}"
          + (f" and {results['plot']}" if "plot" in results else ""))
    return results


if __name__ == "__main__":
    main()
