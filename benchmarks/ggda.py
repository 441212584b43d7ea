"""GGDA benchmark: Generalized Group Data Attribution (one gradient per group of training points) against
per-example attribution, side by side in one run, CPU only.

A group's attribution features are those of its *summed* loss (TracIn) or margin (TRAK): ``GradientFeaturizer``
called with segment ``bounds`` computes them from one batched forward / backward, contracting each layer's inputs and
output gradients over the group's rows, so per-example gradients are never formed. Every pass here runs through the
engine the callbacks (``lightning_attr.callbacks.TracIn / TRAK(group_by=...)``) run: ``PassRunner`` over the split as
``AttributionData`` (whole groups per batch via ``group_batches``, their ``segments``), and the gradient_kmeans
groupings from its grouping pre-pass (``grouper_rows``, ``GroupSpec``).

1. **Speed of one attribution pass over the whole train split** (1,437 digits; forward, backward, gradients,
   projection and accumulation all included; the one-time projection set-up, i.e. drawing the count-sketch hashes,
   and the grouping are reported separately), per-example vs grouped, for four groupings: ``gradient_kmeans`` with
   groups of about 8, 32 and 128 examples, and ``random`` groups of 32.
   Each pass runs ``timing_repeats`` times and the fastest counts.
   (a) timm ``resnet18`` (11.2M parameters, random init, eval mode) on 3x32x32 digits, ALL parameters, count sketch
       to k=2048. Per-example sketch is timed on the first ``resnet_subset`` examples and extrapolated linearly to
       1,437 (it is linear: one fixed-size batch after another). The per-example Kronecker (LoGra) pass, which never
       forms per-example gradients either, and a plain batched forward + backward are timed on the full split.
   (b) the small ``DigitsCNN`` (136,586 parameters) on 1x32x32 digits: per-example sketch, per-example Kronecker,
       grouped sketch, and a plain batched forward + backward of the summed loss (the floor), all on the full split.
2. **Fidelity** on digits with the CNN (SGD, 6 epochs, 3 checkpoints with their learning rates):
   * group-level LDS: per grouping, ``lds_subsets`` random halves of the GROUPS; the CNN is retrained from scratch
     (fixed seed) on the members of the kept groups and the margin of the true class is read on ``lds_targets``
     validation examples. The same retrains score (i) grouped TracIn (exact, sketch, Kronecker) and grouped TRAK
     (sketch) and (ii) the per-example scores summed to the groups (``one_hot @ per_example``).
     Grouped TracIn equals the summed per-example scores for every linear projection (checked: max relative error),
     so the non-trivial comparison is TRAK, whose kernel ``(X^T X + lambda I)^-1`` and ``Q`` are not additive.
     A damping sweep of TRAK and two diagnostic variants (not package outputs) locate the loss of fidelity: the
     package builds ``X^T X`` from the group rows, ``sum_G x_G x_G^T``, which weights a group by its size squared
     where the per-example ``X^T X`` weights it by its size; the diagnostics use the same group features with
     ``X^T X`` from ``x_G / sqrt(|G|)`` (no per-example gradients) or the per-example ``X^T X``.
   * noisy labels: the CNN trained on 10% flipped labels; TracIn self-influence per example vs per group (group
     gradient's squared norm): noisy-label AUC (each example scored by its group), recall of flipped labels after
     inspecting 10% / 20% of the data (groups ranked by self-influence), and pruning: fraction of flipped labels
     removed when removing the most self-influential groups (``prune_groups(order="highest")``) vs random groups.
     Also reported: the group score divided by the squared group size (squared norm of the group's MEAN gradient; a
     diagnostic, not a package output) and the members' per-example self-influences summed.
3. ``speedup_vs_fidelity.png`` (one point per grouping) and markdown tables.

    python benchmarks/ggda.py --out artifacts/bench/ggda            # full run (~4-5 min on 2 idle cores)
    python benchmarks/ggda.py --out artifacts/bench/ggda --quick    # smoke run (~30 s; --smoke is the same)

Timings need the cores to themselves: another CPU-heavy process on the 2 cores slowed the grouped resnet18 pass
by more than 10x in one trial (wrap runs in ``flock /tmp/bench.lock`` when several benchmarks share a machine).

Writes ``{out}/results.json``, ``{out}/results.md`` and ``{out}/speedup_vs_fidelity.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from common import (
    NUM_CLASSES,
    Checkpoint,
    CNNTraining,
    DigitsData,
    best_of,
    fmt,
    load_cnn,
    max_rel_err,
    num_params,
    predict,
    progress,
    targets_table,
    timed,
    train_cnn,
    verdict,
    write_json,
    write_text,
)
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_attr import create_timm_model
from lightning_attr.evaluation import lds, noisy_label_recall, prune_groups, random_subsets, recall_at
from lightning_attr.influence import (
    GradientFeaturizer,
    damped_inverse,
    margin,
    out_to_loss,
    tracin_scores,
    trak_kernel,
    trak_scores,
    xtx,
)
from lightning_attr.influence.batching import group_batches
from lightning_attr.influence.grouping_pass import GroupSpec, grouper_rows
from lightning_attr.influence.groups import Grouping
from lightning_attr.influence.parameters import last_linear
from lightning_attr.influence.runner import AttributionData, LocalComm, PassRunner, RowFn
from lightning_attr.metrics.noisy_label import noisy_label_auc

TARGETS = dict(resnet_speedup_32=10.0, lds_ratio=0.8, tracin_additive_max_rel_err=1e-4, prune_vs_random=2.0)
log = progress("ggda")


@dataclass
class Settings(CNNTraining):
    """Sizes of one run (``--quick`` picks the small ones); the CNN's training (SGD, 6 epochs, checkpoint every 2) in
    ``CNNTraining``."""

    proj_dim: int = 2048
    damping: float = 1e-3  # TRAK, relative: lambda = damping * mean(diag(X^T X))
    group_sizes: tuple[int, ...] = (8, 32, 128)  # gradient_kmeans target sizes; plus random groups of 32
    random_size: int = 32
    # speed
    resnet: str = "resnet18"
    resnet_subset: int = 256  # per-example resnet passes are timed on this many examples and extrapolated
    resnet_example_batch: int = 16
    cnn_example_batch: int = 64
    group_batch: int = 128  # grouped passes pack whole groups into batches of at most this many examples
    timing_repeats: int = 2  # each timed pass runs this many times in a row; the fastest counts
    # LDS
    lds_subsets: int = 32
    lds_targets: int = 96
    retrain_epochs: int = 6
    retrain_seeds: int = 2  # retrained outputs are averaged over these init / order seeds
    trak_dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)  # sweep (same features, same retrains)
    # noisy labels
    label_noise: float = 0.1
    prune_fractions: tuple[float, ...] = (0.05, 0.1, 0.2)
    random_prune_seeds: int = 20
    n_train: int | None = None  # truncate the train split (smoke runs only)

    @classmethod
    def quick(cls) -> Settings:
        return cls(n_train=320, proj_dim=256, resnet_subset=32, epochs=2, checkpoint_every=1, lds_subsets=4,
                   lds_targets=16, retrain_epochs=1, retrain_seeds=1, trak_dampings=(1e-3, 1e-1), random_prune_seeds=3)


# --------------------------------------------------------------------------------------------- attribution passes
class Split:
    """Examples ``(x, y)`` as the engine's attribution data (items ``(x, y, index)``), read by its ``PassRunner``: the
    pass the callbacks run, one row per example (identity grouping) or per group (a group's members are consecutive in
    a batch, ``group_batches``, and contracted in one backward; partial sums of a group split over batches add up).
    The runner keeps each pass's input batches in memory, as the callbacks do between passes, so the timed passes
    read them from memory, like the tensor slices of the per-example passes."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y
        self.runner = PassRunner(cache_inputs_mb=2048)
        self._heads: dict[int, Split] = {}

    def head(self, m: int) -> Split:
        """The first ``m`` examples (a split of their own)."""
        if m >= len(self.x):
            return self
        return self._heads.setdefault(m, Split(self.x[:m], self.y[:m]))

    def data(self, bs: int) -> AttributionData:
        return AttributionData(TensorDataset(self.x, self.y, torch.arange(len(self.x))), bs)

    def rows(self, row_fn: RowFn, module: nn.Module, grouping: Grouping | None, bs: int, name: str
             ) -> dict[str, Tensor]:
        """``row_fn``'s rows summed per group (per example without ``grouping``); ``name`` keys the batch cache."""
        grouping = grouping or Grouping.identity(len(self.x))
        return self.runner.run(self.data(bs), grouping, row_fn, module, LocalComm(), name=name)

    def features(self, feat: GradientFeaturizer, key: tuple[int, ...], bs: int, grouping: Grouping | None = None,
                 name: str = "examples") -> Tensor:
        """Gradient features (n, k) per example, or (num_groups, k) of each group's summed output."""
        return self.rows(lambda x, y, bounds, _: {"f": feat(x, y, key, bounds)}, feat.module, grouping, bs,
                         f"{name}-{bs}")["f"]

    def preload(self, bs: int, grouping: Grouping | None = None, name: str = "examples") -> None:
        """Read a pass's input batches into the runner's cache (untimed), as an earlier pass would."""
        grouping = grouping or Grouping.identity(len(self.x))
        for _ in self.runner.batches(self.data(bs), group_batches(grouping.assignment, bs), f"{name}-{bs}"):
            pass


def grouping_inputs(split: Split, model: nn.Module, bs: int = 128) -> dict[str, Tensor]:
    """The engine's grouping pre-pass for ``gradient_kmeans`` (``grouper_rows``): labels and the classifier layer's
    per-example loss gradients (n, O*I'), the layer found from the forward graph."""
    head = last_linear(model, split.x[:1])
    return split.rows(grouper_rows(GroupSpec("gradient_kmeans", group_size=1), model, head), model, None, bs,
                      "grouping")


def make_groupings(s: Settings, model: nn.Module, split: Split) -> tuple[dict[str, Grouping], dict]:
    """The benchmark's groupings (``gk8``, ``gk32``, ``gk128``: gradient_kmeans within class; ``rand32``) and the
    seconds each took (the gradient feature pass is shared by the k-means groupings and reported once)."""
    n = len(split.x)
    inputs, t_feats = timed(lambda: grouping_inputs(split, model))
    groupings, seconds = {}, {"gradient_features": t_feats}
    for size in s.group_sizes:
        spec = GroupSpec("gradient_kmeans", group_size=size, seed=0)
        groupings[f"gk{size}"], seconds[f"gk{size}"] = timed(lambda: spec.make(n, inputs))
    spec = GroupSpec("random", group_size=s.random_size, seed=0)
    groupings[f"rand{s.random_size}"], seconds[f"rand{s.random_size}"] = timed(lambda: spec.make(n, {}))
    return groupings, seconds


def grouping_info(g: Grouping) -> dict:
    sizes = g.sizes.double()
    return dict(method=g.method, num_groups=g.num_groups, mean_size=float(sizes.mean()), min_size=int(sizes.min()),
                max_size=int(sizes.max()))


# -------------------------------------------------------------------------------------------------------- 1. speed
def run_speed(s: Settings, model: nn.Module, split: Split, groupings: dict[str, Grouping],
              grouping_seconds: dict, example_bs: int, subset: int | None, kronecker: bool = True,
              plain: bool = False) -> dict:
    """Each configuration's pass ``timing_repeats`` times (fastest kept; all in ``runs_s``) after a one-batch warm-up
    of each featurizer (the sketch hashes are drawn in the warm-up, reported as ``sketch_setup_s``) and after its
    input batches were read once (untimed). ``subset``: the per-example sketch pass runs on that many examples and is
    extrapolated linearly."""
    x, y = split.x, split.y
    n = x.shape[0]
    res: dict[str, Any] = dict(n_train=n, params=num_params(model), proj_dim=s.proj_dim, example_batch=example_bs,
                               group_batch=s.group_batch, grouping_seconds=grouping_seconds, rows=[])
    sketch = GradientFeaturizer(model, proj_dim=s.proj_dim, projection="sketch")
    _, setup = timed(lambda: sketch(x[:2], y[:2], (0,)))
    res["sketch_setup_s"] = setup
    sketch(x[:example_bs], y[:example_bs], (0,))  # warm-up at the real batch size
    log(f"  sketch set-up (hashes for {sketch.num_params} coordinates) {setup:.1f}s")

    def add(mode: str, projection: str, grouping: str | None, runs: list[float], examples: int, note: str = ""
            ) -> None:
        seconds = min(runs)
        total = seconds * n / examples
        res["rows"].append(dict(mode=mode, projection=projection, grouping=grouping, measured_examples=examples,
                                measured_s=seconds, runs_s=runs, total_s=total, examples_per_s=n / total,
                                extrapolated=examples < n, note=note))
        log(f"  {mode:11s} {projection:9s} {grouping or '':7s} {examples} ex in {seconds:.2f}s -> "
            f"{total:.1f}s / {n} ({n / total:.1f} ex/s)")

    m = n if subset is None else min(subset, n)
    part = split.head(m)
    part.preload(example_bs)
    t = best_of(lambda: part.features(sketch, (0,), example_bs), s.timing_repeats)
    add("per-example", "sketch", None, t, m, "" if m == n else f"first {m} examples, extrapolated x{n / m:.2f}")
    if kronecker:
        kron = GradientFeaturizer(model, proj_dim=s.proj_dim, projection="kronecker")
        kron(x[:example_bs], y[:example_bs], (0,))
        split.preload(example_bs)
        t = best_of(lambda: split.features(kron, (0,), example_bs), s.timing_repeats)
        add("per-example", "kronecker", None, t, n)
        res["kronecker_dim"] = kron.feature_dim
    bounds = torch.tensor([0, s.group_batch // 2, s.group_batch])
    sketch(x[: s.group_batch], y[: s.group_batch], (0,), bounds)  # warm-up of the grouped path
    for name, g in groupings.items():
        split.preload(s.group_batch, g, name)
        t = best_of(lambda: split.features(sketch, (0,), s.group_batch, g, name), s.timing_repeats)
        add("grouped", "sketch", name, t, n, f"mean group size {float(g.sizes.double().mean()):.1f}")
    if plain:
        def fb() -> None:
            for i in range(0, n, s.group_batch):
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[i : i + s.group_batch]), y[i : i + s.group_batch], reduction="sum").backward()
            model.zero_grad(set_to_none=True)
        fb()
        t = best_of(fb, s.timing_repeats)
        add("plain f+b", "-", None, t, n, "batched forward + backward of the summed loss, no attribution")
    base = next(r for r in res["rows"] if r["mode"] == "per-example" and r["projection"] == "sketch")["total_s"]
    for r in res["rows"]:
        r["speedup"] = base / r["total_s"]
        if r["grouping"]:
            gs = grouping_seconds.get(r["grouping"], 0.0) + (grouping_seconds["gradient_features"]
                                                               if r["grouping"].startswith("gk") else 0.0)
            r["grouping_s"] = gs
            r["speedup_with_grouping"] = base / (r["total_s"] + gs)
    return res


# ------------------------------------------------------------------------------------------------------ 2. fidelity
@dataclass
class Attributions:
    """Per-example (n, m) and per-group (g, m) scores of the LDS targets, per method."""

    per_example: dict[str, Tensor]
    grouped: dict[str, dict[str, Tensor]]  # grouping -> method -> (g, m)
    trak_sweep: dict[float, tuple[Tensor, dict[str, Tensor]]]  # damping -> (per-example, grouping -> grouped)


DIAG_SIZEW = "trak_sketch, unweighted X^T X of group sums (diagnostic)"
DIAG_EXGRAM = "trak_sketch, per-example X^T X (diagnostic)"
TRACIN_VARIANTS = {"tracin_exact": dict(proj_dim=None), "tracin_sketch": dict(projection="sketch"),
                   "tracin_kronecker": dict(projection="kronecker")}


def attributions(s: Settings, ckpts: Sequence[Checkpoint], train: Split, query: Split, groupings: dict[str, Grouping]
                 ) -> tuple[Attributions, dict]:
    """TracIn-CP (exact, sketch, Kronecker) and TRAK (sketch) scores, per example and per group, every checkpoint."""
    x, y = train.x, train.y
    bs, gb = s.cnn_example_batch, s.group_batch
    lrs = [ck.lr for ck in ckpts]
    pe: dict[str, list] = {k: [] for k in TRACIN_VARIANTS}
    gr: dict[str, dict[str, list]] = {name: {k: [] for k in TRACIN_VARIANTS} for name in groupings}
    q_pe: dict[str, list] = {k: [] for k in TRACIN_VARIANTS}
    trak: dict[str, list[Tensor]] = dict(x=[], phi=[], q=[])
    trak_g = {name: dict(x=[], q=[]) for name in groupings}
    for c, ck in enumerate(ckpts):
        model = load_cnn(ck, s.image_size)
        for name, kw in TRACIN_VARIANTS.items():
            kw = dict(kw, proj_dim=kw.get("proj_dim", s.proj_dim))
            feat = GradientFeaturizer(model, output="cross_entropy", **kw)
            pe[name].append(train.features(feat, (c,), bs))
            q_pe[name].append(query.features(feat, (c,), bs))
            for gname, g in groupings.items():
                gr[gname][name].append(train.features(feat, (c,), gb, g, gname))
        feat = GradientFeaturizer(model, output="margin", proj_dim=s.proj_dim, projection="sketch")
        trak["x"].append(train.features(feat, (c,), bs))
        with torch.no_grad():
            trak["q"].append(out_to_loss(predict(model, x), y))
        trak["phi"].append(query.features(feat, (c,), bs))
        for gname, g in groupings.items():
            trak_g[gname]["x"].append(train.features(feat, (c,), gb, g, gname))
            trak_g[gname]["q"].append(g.one_hot() @ trak["q"][-1] / g.sizes.float())  # a group's Q: members' mean
        log(f"  attribution features of checkpoint {c} done")

    def trak_of(xs: list[Tensor], qs: list[Tensor], damping: float, grams: list[Tensor] | None = None) -> Tensor:
        """TRAK scores; the kernel's ``X^T X`` from ``xs`` themselves (the package) or from ``grams`` rows."""
        grams = xs if grams is None else grams
        kernels = [trak_kernel(x_c, damped_inverse(xtx(r_c), damping)) for x_c, r_c in zip(xs, grams)]
        return trak_scores(kernels, trak["phi"], qs)

    per_example = {name: tracin_scores(pe[name], q_pe[name], lrs) for name in TRACIN_VARIANTS}
    per_example["trak_sketch"] = trak_of(trak["x"], trak["q"], s.damping)
    grouped = {}
    for gname in groupings:
        grouped[gname] = {name: tracin_scores(gr[gname][name], q_pe[name], lrs) for name in TRACIN_VARIANTS}
        # the package (callbacks.TRAK with group_by): X^T X from rows x_G / sqrt(|G|) (sum_G |G| xbar xbar^T: each
        # example counted once, as in the per-example X^T X, minus the within-group scatter)
        sizes = groupings[gname].sizes.float().sqrt().unsqueeze(1)
        grouped[gname]["trak_sketch"] = trak_of(trak_g[gname]["x"], trak_g[gname]["q"], s.damping,
                                                [x_c / sizes for x_c in trak_g[gname]["x"]])
        # diagnostics (not package outputs): X^T X of the plain group sums (weights groups by size^2), or the
        # per-example X^T X itself (needs per-example features)
        grouped[gname][DIAG_SIZEW] = trak_of(trak_g[gname]["x"], trak_g[gname]["q"], s.damping)
        grouped[gname][DIAG_EXGRAM] = trak_of(trak_g[gname]["x"], trak_g[gname]["q"], s.damping, trak["x"])
    sweep = {d: (trak_of(trak["x"], trak["q"], d), {
        gname: trak_of(trak_g[gname]["x"], trak_g[gname]["q"], d,
                       [x_c / groupings[gname].sizes.float().sqrt().unsqueeze(1) for x_c in trak_g[gname]["x"]])
        for gname in groupings}) for d in s.trak_dampings}
    # GGDA TracIn is additive for any linear projection: grouped == one_hot @ per-example (same seeds / keys)
    checks = {gname: {name: max_rel_err(grouped[gname][name], groupings[gname].one_hot() @ per_example[name])
                      for name in per_example} for gname in groupings}
    per_example[DIAG_SIZEW] = per_example[DIAG_EXGRAM] = per_example["trak_sketch"]  # their per-example reference
    return Attributions(per_example, grouped, sweep), checks


def retrain_margins(s: Settings, data: DigitsData, xq: Tensor, yq: Tensor) -> Callable[[Tensor], Tensor]:
    """``train_fn(kept example indices) -> (m,)`` margins of the true class on the targets after retraining the CNN
    from scratch on those examples (mean over ``retrain_seeds`` init / order seeds)."""

    def train_fn(idx: Tensor) -> Tensor:
        outs = []
        for seed in range(s.retrain_seeds):
            model, _ = train_cnn(data.x_train[idx], data.y_train[idx], s, s.retrain_epochs, seed=seed)
            outs.append(margin(predict(model, xq), yq))
        return torch.stack(outs).mean(0)

    return train_fn


def run_lds(s: Settings, data: DigitsData, groupings: dict[str, Grouping], att: Attributions, xq: Tensor, yq: Tensor
            ) -> dict:
    train_fn = retrain_margins(s, data, xq, yq)
    out: dict[str, Any] = {}
    for k, (gname, g) in enumerate(groupings.items()):
        masks = random_subsets(g.num_groups, s.lds_subsets, 0.5, seed=100 + k)
        member = g.one_hot().bool()  # (g, n)
        actual, t = timed(lambda: torch.stack([train_fn((m.double() @ member.double()).bool().nonzero().flatten())
                                               for m in masks]))
        rows = {}
        for method in att.per_example:
            res = {}
            for kind, scores in (("grouped", att.grouped[gname][method]),
                                 ("per_example_summed", g.one_hot() @ att.per_example[method])):
                replay = iter(list(actual))  # the same retrains score every method, replayed in mask order
                res[kind] = lds(lambda _idx, it=replay: next(it), scores, masks=masks)["lds"]
            res["ratio"] = res["grouped"] / res["per_example_summed"] if res["per_example_summed"] else float("nan")
            rows[method] = res
        sweep = {}
        for d, (pe_scores, g_scores) in att.trak_sweep.items():
            sweep[str(d)] = {}
            for kind, scores in (("grouped", g_scores[gname]), ("per_example_summed", g.one_hot() @ pe_scores)):
                replay = iter(list(actual))
                sweep[str(d)][kind] = lds(lambda _idx, it=replay: next(it), scores, masks=masks)["lds"]
        out[gname] = dict(trak_damping_sweep=sweep, num_groups=g.num_groups, subsets=s.lds_subsets, retrain_s=t,
                          kept_examples_mean=float((masks.double() @ g.sizes.double()).mean()), methods=rows)
        log(f"  LDS {gname}: " + ", ".join(f"{m} {r['grouped']:.3f}/{r['per_example_summed']:.3f}"
                                          for m, r in rows.items()) + f" ({t:.0f}s retraining)")
    return out


def run_noisy(s: Settings, split: Split, noisy: Tensor, ckpts: Sequence[Checkpoint], groupings: dict[str, Grouping]
              ) -> dict:
    """TracIn-CP self-influence (exact, all parameters) per example and per group on the noisy-label model (``noisy``
    flags the flipped labels of ``split``)."""
    x, y = split.x, split.y
    n = x.shape[0]
    for name, g in groupings.items():
        split.preload(s.group_batch, g, name)
    self_pe = torch.zeros(n)
    self_g = {name: torch.zeros(g.num_groups) for name, g in groupings.items()}
    t_pe = t_g = 0.0
    for c, ck in enumerate(ckpts):
        feat = GradientFeaturizer(load_cnn(ck, s.image_size), output="cross_entropy", proj_dim=None)
        v, t = timed(lambda: torch.cat([feat.sq_norms(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]))
        self_pe += ck.lr * v
        t_pe += t
        for name, g in groupings.items():
            v, t = timed(lambda: split.features(feat, (c,), s.group_batch, g, name).pow(2).sum(1))
            self_g[name] += ck.lr * v
            t_g += t

    def evaluate(scores: Tensor, assignment: Tensor) -> dict:
        curve = noisy_label_recall(scores, assignment, noisy)
        row = dict(auc=float(noisy_label_auc(scores[assignment], noisy)), recall_10=recall_at(curve, 0.1),
                   recall_20=recall_at(curve, 0.2), prune={})
        for f in s.prune_fractions:
            def removed_noisy(kept: Tensor) -> tuple[float, float]:
                mask = torch.ones(n, dtype=torch.bool)
                mask[kept] = False
                return float(noisy[mask].sum() / noisy.sum()), float(mask.double().mean())
            top, top_frac = removed_noisy(prune_groups(scores, assignment, f, "highest"))
            rnd = [removed_noisy(prune_groups(scores, assignment, f, seed=r)) for r in range(s.random_prune_seeds)]
            row["prune"][str(f)] = dict(highest=top, highest_removed=top_frac,
                                        random=float(np.mean([r[0] for r in rnd])),
                                        random_removed=float(np.mean([r[1] for r in rnd])))
        return row

    rows = {"per-example": dict(num_groups=n, **evaluate(self_pe, torch.arange(n)))}
    for name, g in groupings.items():
        # the package's ranking (self_influence, normalize="mean" = summed-gradient self-influence / size^2)
        rows[name] = dict(num_groups=g.num_groups, **evaluate(self_g[name] / g.sizes.double().pow(2).float(),
                                                              g.assignment))
        rows[name + " (summed gradient)"] = dict(num_groups=g.num_groups, **evaluate(self_g[name], g.assignment))
        rows[name + " (per-example summed)"] = dict(num_groups=g.num_groups,
                                                    **evaluate(g.one_hot() @ self_pe, g.assignment))
        # how pure the groups are: fraction of flipped labels that sit in groups that are mostly flipped
        frac = (g.one_hot() @ noisy.float()) / g.sizes.float()
        rows[name]["flipped_in_majority_flipped_groups"] = float(noisy[frac[g.assignment] > 0.5].sum() / noisy.sum())
    for name, r in rows.items():
        log(f"  noisy {name}: AUC {r['auc']:.3f}, recall@10% {r['recall_10']:.3f}, recall@20% {r['recall_20']:.3f}")
    return dict(n_noisy=int(noisy.sum()), seconds_per_example=t_pe, seconds_grouped=t_g, rows=rows)


# ------------------------------------------------------------------------------------------------------ reporting
def verdicts(r: dict) -> list[dict]:
    out = []

    def add(name: str, value: float | None, target: float, higher: bool = True, note: str = "") -> None:
        out.append(verdict(name, value, target, higher, note))

    res = r["speed"]["resnet"]
    for row in res["rows"]:
        if row["mode"] == "grouped" and row["grouping"].endswith("32"):
            add(f"resnet18 grouped ({row['grouping']}) speed-up over per-example sketch", row["speedup"],
                TARGETS["resnet_speedup_32"], note=f"with grouping time: {row['speedup_with_grouping']:.1f}x")
    for gname, lr in r["lds"].items():
        for method in ("trak_sketch", "tracin_sketch", "tracin_kronecker", DIAG_SIZEW):
            m = lr["methods"][method]
            add(f"LDS ratio grouped / per-example summed, {method}, {gname}", m["ratio"], TARGETS["lds_ratio"],
                note=f"{m['grouped']:.3f} vs {m['per_example_summed']:.3f}")
    worst = max(v for g in r["additivity"].values() for k, v in g.items() if k.startswith("tracin"))
    add("grouped TracIn == summed per-example (max rel err, all TracIn variants and groupings)", worst,
        TARGETS["tracin_additive_max_rel_err"], higher=False)
    for name, row in r["noisy"]["rows"].items():
        if "summed" in name:
            continue
        p = row["prune"]["0.1"]
        add(f"pruning top self-influence {'examples' if name == 'per-example' else 'groups'} ({name}), flipped "
            "removed at 10% vs random", p["highest"] / max(p["random"], 1e-9), TARGETS["prune_vs_random"],
            note=f"{p['highest']:.3f} vs {p['random']:.3f}" + (" (diagnostic, not a package output)" if "summed "
                                                                   "gradient" in name else ""))
    return out


def speed_table(res: dict) -> list[str]:
    lines = ["| pass | projection | grouping | measured (runs) | total s (full split) | ex/s | speed-up | grouping s | "
             "speed-up incl. grouping |", "|---|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        measured = f"{row['measured_examples']} ex, " + " / ".join(f"{v:.2f}s" for v in row["runs_s"]) + (
            " (extrapolated)" if row["extrapolated"] else "")
        lines.append(f"| {row['mode']} | {row['projection']} | {row['grouping'] or ''} | {measured} | "
                     f"{row['total_s']:.1f} | {row['examples_per_s']:.1f} | {row['speedup']:.1f}x | "
                     f"{fmt(row.get('grouping_s'), 2)} | "
                     f"{fmt(row.get('speedup_with_grouping'), 1) + 'x' if 'speedup_with_grouping' in row else ''} |")
    return lines


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"# GGDA benchmark ({'quick' if r['quick'] else 'full'} run)", "",
             f"CPU only, {r['threads']} torch threads, torch {r['torch']}, {r['machine']}; wall time "
             f"{r['wall_seconds']:.0f} s; 1-min load average {r['load_start']:.1f} at the start, "
             f"{r['load_end']:.1f} at the end.", ""]
    lines += ["## Groupings", "", "gradient_kmeans: k-means on the classifier layer's per-example loss gradients, "
              "within each (given) label; sizes are a target, not a cap. random: uniform partition.", "",
              "| part | grouping | groups | mean size | min | max |", "|---|---|---|---|---|---|"]
    for part, infos in r["groupings"].items():
        for name, gi in infos.items():
            lines.append(f"| {part} | {name} | {gi['num_groups']} | {gi['mean_size']:.1f} | {gi['min_size']} | "
                         f"{gi['max_size']} |")
    for key, title in (("resnet", "(a) timm resnet18"), ("cnn", "(b) DigitsCNN")):
        res = r["speed"][key]
        lines += ["", f"## Speed {title}: one attribution pass over the train split", "",
                  f"{res['params']:,} parameters (all), k={res['proj_dim']}; per-example batch {res['example_batch']}, "
                  f"grouped batches of at most {res['group_batch']} examples (whole groups); each pass run "
                  f"{len(res['rows'][0]['runs_s'])} times, the fastest counts. Count-sketch set-up "
                  f"(hashes of every coordinate, once per checkpoint, same for both modes, excluded): "
                  f"{res['sketch_setup_s']:.1f} s. Grouping time of gradient_kmeans = the last-layer gradient "
                  f"pass ({res['grouping_seconds']['gradient_features']:.2f} s) + k-means.", ""]
        if "kronecker_dim" in res:
            lines[-2] += f" Kronecker (LoGra) per-example features: {res['kronecker_dim']}."
        lines += speed_table(res)
    fid = r["fidelity"]
    lines += ["", "## Fidelity: group-level LDS (DigitsCNN, clean labels)", "",
              "Checkpoints (SGD, momentum 0.9): " + ", ".join(f"epoch {c['epoch']} lr {c['lr']:g} train acc "
                                                                f"{c['train_acc']:.3f} val acc {c['val_acc']:.3f}"
                                                                for c in fid["checkpoints"]) + ".",
              f"{s['lds_subsets']} random halves of the groups per grouping; retrain from scratch "
              f"({s['retrain_epochs']} epochs, outputs averaged over {s['retrain_seeds']} seeds) on the kept groups' "
              f"examples; output = margin of the true class on {s['lds_targets']} "
              f"validation targets. LDS = mean over targets of the Spearman correlation over subsets; both columns "
              f"use the same retrains. k={s['proj_dim']} for sketch / Kronecker.", "",
              "| grouping | groups | method | LDS grouped | LDS per-example summed | ratio |",
              "|---|---|---|---|---|---|"]
    for gname, row in r["lds"].items():
        for method, m in row["methods"].items():
            lines.append(f"| {gname} | {row['num_groups']} | {method} | {m['grouped']:.3f} | "
                         f"{m['per_example_summed']:.3f} | {m['ratio']:.3f} |")
    ds = list(next(iter(r["lds"].values()))["trak_damping_sweep"])
    lines += ["", f"TRAK damping sweep (relative damping; default {s['damping']}): LDS grouped / per-example summed, "
              "same features and retrains.", "", "| grouping | " + " | ".join(f"damping {d}" for d in ds) + " |",
              "|---" * (1 + len(ds)) + "|"]
    for gname, row in r["lds"].items():
        sw = row["trak_damping_sweep"]
        lines.append(f"| {gname} | " + " | ".join(f"{sw[d]['grouped']:.3f} / {sw[d]['per_example_summed']:.3f}"
                                                   for d in ds) + " |")
    lines += ["", "Additivity check: max |grouped - one_hot @ per-example| / max |one_hot @ per-example| of the "
              "scores.",
              "", "| grouping | " + " | ".join(next(iter(r["additivity"].values()))) + " |",
              "|---" * (1 + len(next(iter(r["additivity"].values())))) + "|"]
    for gname, row in r["additivity"].items():
        lines.append(f"| {gname} | " + " | ".join(f"{v:.2e}" for v in row.values()) + " |")
    nz = r["noisy"]
    lines += ["", "## Noisy labels: TracIn-CP self-influence (DigitsCNN, exact gradients, all parameters)", "",
              f"{nz['n_noisy']} of {r['fidelity']['n_train']} train labels flipped. Checkpoints: " +
              ", ".join(f"epoch {c['epoch']} lr {c['lr']:g} train acc {c['train_acc']:.3f} val acc {c['val_acc']:.3f}"
                        for c in nz["checkpoints"]) + ". Grouped = the package's "
              "`self_influence` (normalize='mean'): squared norm of the group's summed-loss gradient / size^2 (the "
              "group's mean gradient); summed gradient = without the division (`self_influence('sum')`; diagnostic); "
              "per-example summed = sum of the members' per-example "
              "self-influences. Pruning: fraction of the flipped "
              f"labels removed when removing whole groups (highest self-influence first) until the fraction is reached "
              f"(the crossing group goes too; the actual removed fraction in brackets) vs random group order (mean of "
              f"{s['random_prune_seeds']} orders).", "",
              "| scores | groups | AUC | recall@10% | recall@20% | " + " | ".join(
                  f"flipped removed @{int(float(f) * 100)}% (random)" for f in s["prune_fractions"]) + " |",
              "|---" * (5 + len(s["prune_fractions"])) + "|"]
    for name, row in nz["rows"].items():
        cells = [f"{p['highest']:.3f} [{p['highest_removed']:.2f}] ({p['random']:.3f})" for p in row["prune"].values()]
        lines.append(f"| {name} | {row['num_groups']} | {row['auc']:.3f} | {row['recall_10']:.3f} | "
                     f"{row['recall_20']:.3f} | " + " | ".join(cells) + " |")
    lines += targets_table(r["verdicts"])
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    speed = {row["grouping"]: row for row in r["speed"]["resnet"]["rows"] if row["grouping"]}
    cnn = {row["grouping"]: row for row in r["speed"]["cnn"]["rows"] if row["grouping"]}
    ax = axes[0]
    for method, marker in (("trak_sketch", "o"), ("tracin_sketch", "s"), (DIAG_SIZEW, "^")):
        xs = [speed[g]["speedup"] for g in r["lds"]]
        ys = [r["lds"][g]["methods"][method]["ratio"] for g in r["lds"]]
        ax.scatter(xs, ys, marker=marker, label=f"{method} (resnet18 speed-up)")
        if method == "trak_sketch":
            for g, xv, yv in zip(r["lds"], xs, ys):
                ax.annotate(g, (xv, yv), textcoords="offset points", xytext=(5, 5), fontsize=8)
            ax.scatter([cnn[g]["speedup"] for g in r["lds"]], ys, marker="o", facecolors="none", edgecolors="C0",
                       label="trak_sketch (DigitsCNN speed-up)")
    ax.axhline(TARGETS["lds_ratio"], ls="--", c="gray", lw=0.8)
    ax.axvline(TARGETS["resnet_speedup_32"], ls=":", c="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"speed-up of the grouped pass over per-example (sketch, k={r['settings']['proj_dim']})")
    ax.set_ylabel("group LDS: grouped / per-example summed")
    ax.set_title("fidelity of group attribution")
    ax.legend(fontsize=7)
    ax = axes[1]
    rows = r["noisy"]["rows"]
    xs = [speed[g]["speedup"] for g in r["lds"]]
    ys = [rows[g]["auc"] for g in r["lds"]]
    ax.scatter(xs, ys, label="grouped self-influence")
    ax.scatter(xs, [rows[g + " (per-example summed)"]["auc"] for g in r["lds"]], marker="x",
               label="per-example summed to groups")
    ax.scatter(xs, [rows[g + " (summed gradient)"]["auc"] for g in r["lds"]], marker="^",
               label="summed-gradient self-influence (diagnostic)")
    for g, xv, yv in zip(r["lds"], xs, ys):
        ax.annotate(g, (xv, yv), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(rows["per-example"]["auc"], ls="--", c="C2", lw=0.8, label="per-example (1x)")
    ax.set_xscale("log")
    ax.set_xlabel("speed-up (resnet18, grouped vs per-example)")
    ax.set_ylabel("noisy-label AUC")
    ax.set_title("noisy-label detection (10% flipped)")
    ax.legend(fontsize=7)
    for ax in axes:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- parts
def infos(groupings: dict[str, Grouping]) -> dict[str, dict]:
    return {k: grouping_info(g) for k, g in groupings.items()}


def resnet_speed(s: Settings, r: dict) -> None:
    """1a. timm resnet18 (random init, eval mode) on 3x32x32 digits: its groupings and the speed of one pass."""
    log("1a. resnet18 speed")
    data3 = DigitsData.load(s.image_size, channels=3).truncated(s.n_train)
    split = Split(data3.x_train, data3.y_train)
    torch.manual_seed(0)
    resnet = create_timm_model(s.resnet, pretrained=False, num_classes=NUM_CLASSES).eval()
    groupings, gsec = make_groupings(s, resnet, split)
    r["groupings"]["resnet18 (speed)"] = infos(groupings)
    r["speed"]["resnet"] = run_speed(s, resnet, split, groupings, gsec, s.resnet_example_batch, s.resnet_subset,
                                     kronecker=True, plain=True)


def clean_cnn(s: Settings, r: dict) -> None:
    """2a. the CNN on clean digits: checkpoints and groupings; 1b. its speed (final checkpoint); 2b. attributions and
    group LDS."""
    log("2. DigitsCNN on clean digits")
    data = DigitsData.load(s.image_size, channels=1).truncated(s.n_train)
    train = Split(data.x_train, data.y_train)
    final, ckpts = train_cnn(data.x_train, data.y_train, s, seed=0, checkpoints=True, val=(data.x_val, data.y_val),
                             log=log)
    groupings, gsec = make_groupings(s, final, train)
    r["groupings"]["DigitsCNN clean"] = infos(groupings)

    log("1b. DigitsCNN speed")
    r["speed"]["cnn"] = run_speed(s, final, train, groupings, gsec, s.cnn_example_batch, None, kronecker=True,
                                  plain=True)

    log("2b. attributions and group LDS")
    step = max(1, data.x_val.shape[0] // s.lds_targets)
    xq, yq = data.x_val[::step][: s.lds_targets], data.y_val[::step][: s.lds_targets]
    att, r["additivity"] = attributions(s, ckpts, train, Split(xq, yq), groupings)
    r["fidelity"] = dict(n_train=data.x_train.shape[0], n_targets=xq.shape[0], checkpoints=[c.info() for c in ckpts])
    r["lds"] = run_lds(s, data, groupings, att, xq, yq)


def noisy_cnn(s: Settings, r: dict) -> None:
    """2c. the CNN trained on flipped labels: self-influence per example and per group."""
    log("2c. noisy labels")
    noisy = DigitsData.load(s.image_size, channels=1, label_noise=s.label_noise).truncated(s.n_train)
    split = Split(noisy.x_train, noisy.y_train)
    nfinal, nckpts = train_cnn(noisy.x_train, noisy.y_train, s, seed=0, checkpoints=True,
                               val=(noisy.x_val, noisy.y_val), log=log)
    ngroupings, _ = make_groupings(s, nfinal, split)
    r["groupings"]["DigitsCNN noisy"] = infos(ngroupings)
    r["noisy"] = run_noisy(s, split, noisy.noisy, nckpts, ngroupings)
    r["noisy"]["checkpoints"] = [c.info() for c in nckpts]


# ----------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/bench/ggda")
    p.add_argument("--quick", "--smoke", dest="quick", action="store_true", help="smoke run with tiny sizes")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    s = Settings.quick() if args.quick else Settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    r: dict[str, Any] = dict(quick=args.quick, threads=args.threads, torch=torch.__version__,
                             machine=f"{platform.machine()}, {os.cpu_count()} cores, "
                                     f"Python {platform.python_version()}",
                             load_start=os.getloadavg()[0], settings=asdict(s), targets=TARGETS, groupings={}, speed={})
    resnet_speed(s, r)
    clean_cnn(s, r)
    noisy_cnn(s, r)
    r["verdicts"] = verdicts(r)
    r["wall_seconds"] = time.perf_counter() - start
    r["load_end"] = os.getloadavg()[0]
    md = markdown(r)
    plot(r, out / "speedup_vs_fidelity.png")
    write_json(out / "results.json", r, indent=1, nonfinite=lambda _: None)
    write_text(out / "results.md", md)
    print(md)
    log(f"done in {r['wall_seconds']:.0f}s; wrote {out}/results.json, results.md, speedup_vs_fidelity.png")
    return r


if __name__ == "__main__":
    main()
