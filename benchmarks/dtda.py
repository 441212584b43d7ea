"""d-TDA benchmark: distributional influence across training seeds, predicted by forward-mode unrolled
differentiation (``lightning_attr.distributional``), against coupled retraining without each example, CPU.

Convention (``lightning_attr.distributional.unrolled``): a training step minimizes ``sum_i w_i l_i`` over its batch
(``w_i = 1 / |B|``); removing example ``k`` sets its ``w_k`` to 0 in every step it appears in. Per seed ``s`` (the
seed draws the initialization and the batch order), ``X_s = m(theta_T)`` for Q measurements and the predicted change
``G_{s,k} = grad m(theta_T)^T r_T(k)`` of removing ``k`` (``r`` from ``forward_step`` before every optimizer step,
all K examples tracked at once). Ground truth: for every seed and every chosen example, the same run (same
initialization, same batch order) with that example's weight 0: ``Y_{s,k}``. The statistics over seeds
(``mean_influence``, ``variance_influence``, ``wasserstein_influence``) are compared predicted vs actual.

1. **Regression**: scikit-learn's diabetes data (442 x 10, standardized; 342 train / 100 test), MLP 10-32-1 (tanh),
   squared error, SGD with momentum, float64; measurements = the predictions for ``n_measurements`` test points.
   UD -> IF: at snapshots during training, the per-seed influence function at the same weights (the package's exact
   Hessian of the mean training loss, weight decay as damping; the Gauss-Newton matrix where that is not positive
   definite) against UD, for a linear model and the MLP under full-batch gradient descent and the MLP under the
   ensemble's minibatch SGD.
2. **Digits**: the 8x8 digits (1437 train), a small CNN (conv 8 - pool - 32 - 10, ReLU), cross-entropy, SGD with
   momentum, float64; measurements = the losses of ``n_measurements`` validation images.

    python benchmarks/dtda.py --out artifacts/bench/dtda            # full (~10 min, 2 idle cores)
    python benchmarks/dtda.py --out /tmp/dtda_smoke --smoke         # smoke (~1 min)

Writes ``{out}/results.json``, ``{out}/results.md`` and ``{out}/dtda.png`` (predicted vs actual per statistic, and
the distribution over seeds with and without the example whose removal moves the variance most relative to its mean).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from common import (
    DigitsData,
    begin,
    finish,
    fmt,
    num_params,
    pearson,
    progress,
    spearman,
    targets_table,
    timed,
    verdict,
)
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from lightning_attr.data import IndexedDataset
from lightning_attr.distributional import (
    ForwardResponse,
    MicroBatch,
    SGDHyperparameters,
    Trajectory,
    forward_step,
    mean_influence,
    measurement_jacobian,
    momentum_buffers_by_name,
    predict_change,
    reverse_sweep,
    variance_influence,
    wasserstein_influence,
)
from lightning_attr.influence import GradientFeaturizer
from lightning_attr.influence.curvature import make_curvature
from lightning_attr.influence.outputs import cross_entropy, mse  # the featurizer's outputs of the same names
from lightning_attr.influence.runner import AttributionData, LocalComm, PassRunner, data_total

log = progress("dtda")
F64 = torch.float64
TARGETS = dict(mean_pearson_regression=0.9, mean_pearson_digits=0.8, variance_spearman_regression=0.7,
               w2_spearman_regression=0.7)


@dataclass
class Settings:
    seeds: int = 16
    examples: int = 20
    n_measurements: int = 5
    regression_epochs: int = 60
    regression_batch: int = 32
    regression_lr: float = 0.02
    digits_epochs: int = 10
    digits_batch: int = 64
    digits_lr: float = 0.02
    digits_momentum: float = 0.5  # lr 0.05 with momentum 0.9 is chaotic here (first-order predictions fail: see README)
    momentum: float = 0.9
    weight_decay: float = 1e-3
    study_seeds: int = 3
    study_steps: tuple[int, ...] = (10, 30, 100, 300, 1000)  # full-batch steps (epochs for minibatch SGD: /10)
    study_lr: float = 0.1

    @classmethod
    def smoke(cls) -> Settings:
        return cls(seeds=3, examples=4, n_measurements=2, regression_epochs=6, digits_epochs=1, study_seeds=2,
                   study_steps=(5, 20))


@dataclass
class Task:
    """One training problem: data (float64), a model factory, the per-example loss and Q measurements."""

    name: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    make_model: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> (B,)
    measure_kind: str  # "prediction" or "loss"
    output: str  # the GradientFeaturizer output of the same loss (for the influence function)
    epochs: int
    batch: int
    lr: float
    momentum: float
    accuracy: Callable[[nn.Module], float] | None = None  # a quality check of the trained model
    examples: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def measurements(self, model: nn.Module, params: dict[str, Tensor] | None = None) -> Tensor:
        """(Q,) measurements of the model (optionally at other ``params``)."""
        out = functional_call(model, params, (self.x_test,)) if params is not None else model(self.x_test)
        return out.squeeze(-1) if self.measure_kind == "prediction" else self.loss(out, self.y_test)


# ---------------------------------------------------------------------------------------------------------- tasks
def regression_task(s: Settings) -> Task:
    from sklearn.datasets import load_diabetes

    x, y = (torch.as_tensor(a, dtype=F64) for a in load_diabetes(return_X_y=True))
    x = (x - x.mean(0)) / x.std(0)
    y = ((y - y.mean()) / y.std()).unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:342], order[342:][: s.n_measurements]
    return Task("regression", x[train], y[train], x[test], y[test],
                lambda: nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1)).double(), mse,
                "prediction", "mse", s.regression_epochs, s.regression_batch, s.regression_lr, s.momentum)


def digits_task(s: Settings) -> Task:
    data = DigitsData.load(8)
    rows = torch.randperm(len(data.x_val), generator=torch.Generator().manual_seed(0))[: s.n_measurements]

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)).double()

    def accuracy(net: nn.Module) -> float:
        with torch.no_grad():
            return float((net(data.x_val.double()).argmax(1) == data.y_val).double().mean())

    return Task("digits", data.x_train.double(), data.y_train, data.x_val[rows].double(), data.y_val[rows], model,
                cross_entropy, "loss", "cross_entropy", s.digits_epochs, s.digits_batch, s.digits_lr,
                s.digits_momentum, accuracy)


def choose_examples(task: Task, k: int) -> Tensor:
    return torch.randperm(len(task.x), generator=torch.Generator().manual_seed(1))[:k].sort().values


# ---------------------------------------------------------------------------------------------------- training
def batch_order(n: int, batch: int, epochs: int, seed: int) -> list[list[Tensor]]:
    """Per epoch, the index batches of a seeded shuffle (the seed's batch order)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return [list(torch.randperm(n, generator=g).split(batch)) for _ in range(epochs)]


@dataclass
class Run:
    values: Tensor  # (Q,)
    change: Tensor | None = None  # (K, Q) predicted by UD
    snapshots: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # epoch -> (UD, IF) (K, Q)
    seconds: float = 0.0
    accuracy: float | None = None
    model: nn.Module | None = None


def train(task: Task, s: Settings, seed: int, removed: int | None = None, track: bool = False,
          snapshot_epochs: Sequence[int] = (), record: Trajectory | None = None) -> Run:
    """One run of ``seed``: SGD over the seed's batch order; ``removed`` gets weight 0; ``track``: forward-mode UD of
    ``task.examples`` before every step, with UD / IF predictions at ``snapshot_epochs``; ``record``: the steps and
    weights the reverse sweep replays."""
    torch.manual_seed(seed)
    model = task.make_model()
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=task.lr, momentum=task.momentum, weight_decay=s.weight_decay)
    hyper = SGDHyperparameters(lr=task.lr, momentum=task.momentum, weight_decay=s.weight_decay)
    state = ForwardResponse.zeros(task.examples, params) if track else None
    run, start = Run(values=torch.zeros(0)), time.perf_counter()
    for epoch, batches in enumerate(batch_order(len(task.x), task.batch, task.epochs, seed), 1):
        for idx in batches:
            w = torch.full((len(idx),), 1 / len(idx), dtype=F64)
            if removed is not None:
                w[idx == removed] = 0.0
            if record is not None:
                if record.due(record.num_steps):
                    record.checkpoint(record.num_steps, params, momentum_buffers_by_name(opt, params))
                record.record_step(MicroBatch(task.x[idx], task.y[idx], w, idx), hyper)
            if state is not None:
                state = forward_step(model, params, state, MicroBatch(task.x[idx], task.y[idx], w, idx), task.loss,
                                     hyper)
            opt.zero_grad(set_to_none=True)
            (w * task.loss(model(task.x[idx]), task.y[idx])).sum().backward()
            opt.step()
        if state is not None and epoch in snapshot_epochs:  # not part of the tracking cost
            snap_start = time.perf_counter()
            run.snapshots[epoch] = (ud_change(task, model, state), if_change(task, model, s.weight_decay))
            start += time.perf_counter() - snap_start
    run.seconds = time.perf_counter() - start
    with torch.no_grad():
        run.values = task.measurements(model).detach()
    run.accuracy = task.accuracy(model) if task.accuracy else None
    run.model = model
    if state is not None:
        run.change = ud_change(task, model, state)
    return run


def ud_change(task: Task, model: nn.Module, state: ForwardResponse) -> Tensor:
    """``grad m^T r`` (K, Q): UD's predicted change of the measurements when each tracked example is removed."""
    jac = measurement_jacobian(lambda p: task.measurements(model, p), dict(model.named_parameters()))
    return predict_change(jac, state).detach()


def if_change(task: Task, model: nn.Module, weight_decay: float) -> Tensor:
    """The influence function's predicted change (K, Q): ``grad m^T (H + wd I)^-1 grad l_k / N`` with ``H`` the exact
    Hessian of the mean training loss (GGN if the damped Hessian is not positive definite)."""
    feat = GradientFeaturizer(model, output=task.output)
    total = data_total(PassRunner(), AttributionData(IndexedDataset(TensorDataset(task.x, task.y)), 128), model,
                       LocalComm())
    jac = measurement_jacobian(lambda p: task.measurements(model, p), dict(model.named_parameters()))
    flat_jac = torch.cat([jac[n].flatten(1) for n in feat.params], 1)
    for curvature in ("hessian", "ggn"):
        solver = make_curvature("exact", damping=weight_decay, relative_damping=False, curvature=curvature,
                                fisher="empirical")
        try:
            pre = solver.solve(feat, flat_jac, solver.fit(feat, total)).double()  # (Q, P)
            break
        except ValueError:  # H + wd I not positive definite away from a minimum: the Gauss-Newton instead
            continue
    grads = feat.flat_grads(task.x[task.examples], task.y[task.examples]).double()  # (K, P)
    return grads @ pre.T / len(task.x)


# ---------------------------------------------------------------------------------------------------- ensemble
def ensemble(task: Task, s: Settings) -> dict[str, Any]:
    """Per seed: the tracked run (X_s, predicted G_s) and the K coupled retrains (actual G_s)."""
    x, predicted, actual, tracked_s, plain_s, accuracy = [], [], [], [], [], []
    for seed in range(s.seeds):
        base = train(task, s, seed, track=True)
        plain = train(task, s, seed)
        x.append(base.values)
        predicted.append(base.change)
        tracked_s.append(base.seconds)
        accuracy.append(base.accuracy)
        plain_s.append(plain.seconds)
        if not torch.allclose(plain.values, base.values, rtol=1e-12, atol=1e-12):
            raise RuntimeError("tracking changed the training run: the benchmark's coupling is broken.")
        actual.append(torch.stack([train(task, s, seed, removed=int(k)).values - plain.values
                                   for k in task.examples]))
        log(f"  {task.name}: seed {seed} done ({base.seconds:.1f}s tracked, {plain.seconds:.1f}s plain, "
            f"{len(task.examples)} retrains)")
    return dict(x=torch.stack(x), predicted=torch.stack(predicted), actual=torch.stack(actual),
                tracked_seconds=sum(tracked_s), plain_seconds=sum(plain_s), accuracy=accuracy)


def reverse_cost(task: Task, s: Settings, every: int = 32) -> dict[str, Any]:
    """Reverse mode on seed 0: the effect of EVERY training example on one measurement (their sum) and on all Q, by
    the adjoint sweep over the recorded run (weights stored every ``every`` steps, recomputed between); seconds
    against the plain run; the tracked examples' rows against forward mode."""
    plain = train(task, s, 0)
    trajectory = Trajectory(every=every)
    recorded = train(task, s, 0, record=trajectory)
    forward = train(task, s, 0, track=True)
    model = recorded.model
    jac = measurement_jacobian(lambda p: task.measurements(model, p), dict(model.named_parameters()))
    out = dict(plain_s=plain.seconds, record_s=recorded.seconds, steps=trajectory.num_steps, every=every,
               n_train=len(task.x))
    for name, grads in (("one measurement (sum of Q)", {n: g.sum(0, keepdim=True) for n, g in jac.items()}),
                        (f"{len(task.x_test)} measurements", jac)):
        changes, seconds = timed(lambda g=grads: reverse_sweep(model, trajectory, lambda i: (task.x[i], task.y[i]),
                                                              task.loss, g, len(task.x)))
        out[name] = dict(sweep_s=seconds, ratio=(recorded.seconds + seconds) / plain.seconds)
        if changes.shape[1] == forward.change.shape[1]:
            rows = changes[task.examples]
            out["max_rel_err_vs_forward"] = float((rows - forward.change).norm() / forward.change.norm())
    return out


STATISTICS = {"mean": mean_influence, "variance": variance_influence, "W2": wasserstein_influence}


def compare(res: dict[str, Any]) -> dict[str, Any]:
    """Predicted vs actual change of each statistic over seeds, over all (example, measurement) pairs."""
    out = {}
    for name, fn in STATISTICS.items():
        p, a = fn(res["x"], res["predicted"]), fn(res["x"], res["actual"])
        out[name] = dict(pearson=pearson(p, a), spearman=spearman(p, a), predicted=p, actual=a)
    return out


def finding(res: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """The (example, measurement) whose removal moves the variance most relative to the mean, in actual retrains:
    variance change / var(X) against mean change / sd(X)."""
    sd = res["x"].std(0)  # (Q,)
    mean_shift = stats["mean"]["actual"].abs() / sd
    var_shift = stats["variance"]["actual"].abs() / sd.pow(2)
    ratio = var_shift / mean_shift.clamp_min(1e-12)
    k, q = divmod(int(ratio.argmax()), ratio.shape[1])
    row = {name: dict(predicted=float(st["predicted"][k, q]), actual=float(st["actual"][k, q]))
           for name, st in stats.items()}
    return dict(example_row=k, measurement=q, mean_shift_in_sd=float(mean_shift[k, q]),
                variance_change_relative=float(var_shift[k, q]), statistics=row)


def ud_vs_if(task: Task, s: Settings, snapshot_epochs: Sequence[int]) -> dict[int, dict[str, float]]:
    """Per snapshot epoch, UD against the per-seed IF over (seed, example, measurement): Pearson and the relative
    error ``||UD - IF|| / ||IF||``."""
    runs = [train(task, s, seed, track=True, snapshot_epochs=snapshot_epochs) for seed in range(s.study_seeds)]
    out = {}
    for e in snapshot_epochs:
        ud, inf = (torch.stack([r.snapshots[e][i] for r in runs]) for i in (0, 1))
        out[e] = dict(pearson=pearson(ud, inf), rel_err=float((ud - inf).norm() / inf.norm()))
    return out


def ud_if_study(s: Settings) -> dict[str, dict[int, dict[str, float]]]:
    """UD -> IF as training converges: full-batch gradient descent (momentum, weight decay) on the regression data
    with a linear model (a GLM: UD must reach the IF) and with the MLP (non-convex), and the MLP under the
    ensemble's minibatch SGD (snapshots at the same numbers of steps / 10 epochs)."""
    out = {}
    for name, linear, full in (("linear, full-batch GD", True, True), ("MLP, full-batch GD", False, True),
                               ("MLP, minibatch SGD (the ensemble's recipe)", False, False)):
        task = regression_task(s)
        task.examples = choose_examples(task, s.examples)
        if linear:
            task.make_model = lambda: nn.Linear(10, 1).double()
        if full:
            task.batch, task.epochs, task.lr, epochs = len(task.x), max(s.study_steps), s.study_lr, s.study_steps
        else:
            epochs = tuple(sorted({max(1, k // 10) for k in s.study_steps} | {task.epochs}))
            task.epochs = max(epochs)
        out[name] = ud_vs_if(task, s, epochs)
        log(f"  UD vs IF, {name}: " + ", ".join(f"{e}: {v['pearson']:.3f}" for e, v in out[name].items()))
    return out


# ---------------------------------------------------------------------------------------------------- reporting
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(len(tasks), 4, figsize=(16, 3.8 * len(tasks)), squeeze=False)
    for row, name in zip(axes, tasks):
        r = results[name]
        for ax, (stat, st) in zip(row[:3], r["stats"].items()):
            p, a = st["predicted"].flatten(), st["actual"].flatten()
            ax.scatter(a, p, s=10, alpha=0.7)
            lo, hi = float(min(a.min(), p.min())), float(max(a.max(), p.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set(title=f"{name}: {stat} change (Pearson {st['pearson']:.2f})", xlabel="actual (retrained)",
                   ylabel="predicted (UD)")
        f = r["finding"]
        x = r["ensemble"]["x"][:, f["measurement"]]
        k = f["example_row"]
        for label, values in (("with the example", x), ("without (retrained)", x + r["ensemble"]["actual"][:, k,
                              f["measurement"]]), ("without (predicted)", x + r["ensemble"]["predicted"][:, k,
                                                                                                       f["measurement"]])):
            v = values.sort().values
            row[3].step(v, torch.arange(1, len(v) + 1) / len(v), where="post", label=label)
        row[3].set(title=f"{name}: removing {int(r['examples'][k])}, measurement {f['measurement']}",
                   xlabel="measurement", ylabel="ECDF")
        row[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(r: dict[str, Any]) -> str:
    s = r["settings"]
    lines = [f"# d-TDA benchmark ({'smoke' if r['smoke'] else 'full'} run)", "",
             f"CPU, {r['threads']} torch threads, torch {r['torch']}, {r['machine']}; wall time "
             f"{r['wall_seconds']:.0f} s; load {r['load_start']} at the start, {r['load_end']} at the end. "
             f"{s['seeds']} seeds, {s['examples']} removed examples, {s['n_measurements']} measurements per task; "
             f"SGD with weight decay {s['weight_decay']}, float64.", "",
             "| task | params | steps per run, lr, momentum | val acc | statistic | Pearson (pred vs actual) | Spearman "
             "| target |", "|---|---|---|---|---|---|---|---|"]
    for name, t in r["tasks"].items():
        for stat, st in t["stats"].items():
            target = TARGETS.get(f"{'mean_pearson' if stat == 'mean' else stat.lower() + '_spearman'}_{name}")
            lines.append(f"| {name} | {t['params']:,} | {t['steps']}, {t['lr']}, {t['momentum']} | "
                         f"{fmt(t['accuracy'])} | {stat} | {st['pearson']:.3f} | {st['spearman']:.3f} | "
                         f"{fmt(target)} |")
    lines += ["", "Cost of forward mode (all K examples tracked at once, every step):", "",
              "| task | tracked run / plain run (time) | per tracked example |", "|---|---|---|"]
    for name, t in r["tasks"].items():
        lines.append(f"| {name} | {t['tracking_cost']:.1f}x | {t['cost_per_example']:.2f}x a plain run |")
    rv = r["reverse"]
    lines += ["", f"Reverse mode (digits, seed 0, all {rv['n_train']} training examples, {rv['steps']} steps, weights stored every {rv['every']}): plain run "
              f"{rv['plain_s']:.2f} s, recording run {rv['record_s']:.2f} s; agrees with forward mode on the tracked "
              f"examples to {rv.get('max_rel_err_vs_forward', float('nan')):.1e} (relative).", "",
              "| measurements | sweep s | (recording + sweep) / plain run |", "|---|---|---|"]
    lines += [f"| {k} | {v['sweep_s']:.2f} | {v['ratio']:.1f}x |" for k, v in rv.items() if isinstance(v, dict)]
    lines += ["", "UD against the per-seed influence function at the same weights (Pearson; relative error), "
              f"{s['study_seeds']} seeds, regression data:", "", "| training | snapshots (step or epoch: Pearson, rel. err) |",
              "|---|---|"]
    for name, rows in r["ud_vs_if"].items():
        lines.append(f"| {name} | " + "; ".join(f"{e}: {v['pearson']:.3f}, {v['rel_err']:.2g}" for e, v in rows.items())
                     + " |")
    lines += ["", "Variance moved more than the mean (actual retrains):", ""]
    for name, t in r["tasks"].items():
        f = t["finding"]
        st = ", ".join(f"{k} {v['actual']:.3g} (predicted {v['predicted']:.3g})" for k, v in f["statistics"].items())
        lines.append(f"- {name}: removing training example {f['example']} shifts the mean of measurement "
                     f"{f['measurement']} by {f['mean_shift_in_sd']:.3f} sd but changes its variance by "
                     f"{100 * f['variance_change_relative']:.1f}% ({st}).")
    lines += targets_table(r["verdicts"])
    return "\n".join(lines) + "\n"


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    checks = [("regression", "mean", "pearson", "mean_pearson_regression"),
              ("digits", "mean", "pearson", "mean_pearson_digits"),
              ("regression", "variance", "spearman", "variance_spearman_regression"),
              ("regression", "W2", "spearman", "w2_spearman_regression")]
    out = []
    for task, stat, metric, key in checks:
        if task in r["tasks"]:
            value = r["tasks"][task]["stats"][stat][metric]
            out.append(verdict(f"{task}: {stat} change, {metric} predicted vs actual", value, TARGETS[key]))
    return out


# --------------------------------------------------------------------------------------------------------- main
def run_task(task: Task, s: Settings) -> dict[str, Any]:
    task.examples = choose_examples(task, s.examples)
    log(f"{task.name}: {len(task.x)} training examples, {num_params(task.make_model())} parameters, "
        f"{len(task.examples)} tracked / removed, {s.seeds} seeds")
    res = ensemble(task, s)
    stats = compare(res)
    found = finding(res, stats)
    found["example"] = int(task.examples[found["example_row"]])
    for name, st in stats.items():
        log(f"  {task.name} {name}: Pearson {st['pearson']:.3f}, Spearman {st['spearman']:.3f}")
    steps = task.epochs * -(-len(task.x) // task.batch)
    cost = res["tracked_seconds"] / res["plain_seconds"]
    acc = [a for a in res["accuracy"] if a is not None]
    return dict(params=num_params(task.make_model()), steps=steps, examples=task.examples, ensemble=res,
                lr=task.lr, momentum=task.momentum, accuracy=sum(acc) / len(acc) if acc else None,
                stats=stats, finding=found, tracking_cost=cost,
                cost_per_example=(cost - 1) / len(task.examples))


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/bench/dtda")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    s = Settings.smoke() if args.smoke else Settings()
    out, start, r = begin(args.out, args.threads, smoke=args.smoke, settings=asdict(s), targets=TARGETS, tasks={})
    r["tasks"]["regression"] = run_task(regression_task(s), s)
    r["tasks"]["digits"] = run_task(digits_task(s), s)
    log("UD -> IF")
    r["ud_vs_if"] = ud_if_study(s)
    log("reverse mode: every training example at once (digits, seed 0)")
    digits = digits_task(s)
    digits.examples = choose_examples(digits, s.examples)
    r["reverse"] = reverse_cost(digits, s)
    log(f"  {r['reverse']}")
    plot(r["tasks"], out / "dtda.png")
    r["verdicts"] = verdicts(r)
    return finish(r, start, out, markdown, log, drop=("ensemble",))


if __name__ == "__main__":
    main()
