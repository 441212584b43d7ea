"""Influence-function benchmark: the package's influence functions (``InfluenceFunctionMethod``: exact, cg, kfac,
ekfac) against leave-one-out retraining, the LDS of 50% retrains, Kronfluence and dattri, side by side in one run, CPU.

Convention (``lightning_attr.influence.influence_function``): ``score(z, q) = grad f(q)^T (H + lambda I)^-1 grad l(z)``
with ``H`` the curvature of the MEAN training loss; removing ``z`` changes the query's loss by about ``+score / N``.

1. **Convex case.** Multinomial logistic regression (one ``nn.Linear(64, 10)``, float64) on the 8x8 digits (the 32x32
   split average-pooled and flattened), objective ``sum_i CE_i / N + l2 / 2 ||theta||^2`` (weights and bias), fitted
   by Newton's method with the closed-form Hessian to max |gradient| <= ``grad_tol`` (a minimum, as IF assumes).
   Leave-one-out for ``loo_examples`` random training examples: the same objective without the example (``N`` kept,
   so only the example's term goes), warm-started at the full solution and solved to the same gradient tolerance
   (quasi-Newton steps with the full Hessian minus the example's term; the fixed point is the exact minimizer). The
   package's IF (``relative_damping=False``, ``damping=l2``: ``H + lambda I`` is the Hessian of the regularized
   objective) predicts the change of the mean test loss (and of each test example's loss) as ``scores / N``:
   Pearson against the actual change, for exact (Hessian and GGN, equal for a linear model), cg, kfac, ekfac; and
   every strategy against a closed-form float64 reference IF computed here.
2. **LDS on a digits MLP and the digits CNN**, both LightningModules (``common.LitClassifier``: SGD, momentum, weight
   decay, step decay). The MLP (64 -> ``mlp_hidden`` -> 10, ReLU) on the 8x8 digits; ``DigitsCNN`` on 1x32x32.
   ``SubsetRetrainer`` retrains each on ``lds_subsets`` random halves of the training set, ``lds_seeds`` seeds each
   (cached under ``{out}/retrains``, so a second run retrains nothing), and reads the per-example loss of
   ``n_targets`` validation targets; the full model is trained by the same recipe (``fit_like_retrainer``).
   LDS = mean over targets of the Spearman correlation over subsets between ``-sum_{i in S} score_i`` and the
   retrained loss. On the same trained model and the same targets: TracIn (exact gradients, last checkpoint, lr 1),
   TRAK (k=``trak_dim``), ours exact (MLP), cg, kfac, ekfac, and
   * Kronfluence EK-FAC (``Analyzer``, ``fit_all_factors``, ``compute_pairwise_scores``): its damping heuristic
     (``damping_factor=None``: 0.1 x the mean eigenvalue per module) is ours with ``damping=0.1`` (relative, per
     layer): the same rule. True Fisher (labels sampled from the model; both packages draw their own labels) and
     empirical Fisher (deterministic: the implementations must agree to float precision).
   * dattri EK-FAC (``IFAttributorEKFAC``: Linear layers only, one absolute damping; its loss function is also the
     query's measurement, so only the empirical Fisher) and dattri CG (``IFAttributorCG``: the Hessian of the mean
     loss of its ``cache`` batch, one batch = the whole training set, absolute ``regularization``, ``max_iter``
     iterations), each against ours at the same absolute damping ``lambda_abs = 0.1 x mean_z ||grad l(z)||^2 / P``
     (the mean eigenvalue of the empirical Fisher) on the same layers (ours ekfac empirical on the Linear layers;
     ours exact with the Hessian).
   Score agreement: Spearman (flattened, and mean per query) of ours vs theirs; the noise floor of the true Fisher
   is ours vs ours with another label seed. A known answer (2c): one Linear layer, every EK-FAC vs a textbook EK-FAC.
   Wall time = fitting + scoring the targets (ours: ``attribute`` + ``scores``; Kronfluence: ``fit_all_factors`` +
   ``compute_pairwise_scores``; dattri: ``cache`` + ``attribute``).
3. **Grouped IF.** (a) Speed on timm ``resnet18`` (11M parameters, random init, eval
   mode, 3x32x32 digits), EK-FAC on its Linear + Conv2d layers, count sketch k=``proj_dim``, the engine's pass
   (``PassRunner``, as ``Attribution.add_pass`` runs it): the factors fitted once on ``resnet_fit_samples`` examples
   (same for both, timed apart), then the per-example pass (timed on the first ``resnet_subset`` examples,
   extrapolated linearly) vs the grouped pass (``GroupSpec("gradient_kmeans", group_size)``: one gradient of each
   group's summed loss, preconditioned once per group). (b) On the digits CNN: ``attribute(...,
   groups=GroupSpec(...))`` against the per-example EK-FAC scores summed to the groups (IF is linear in the training
   gradient: equal up to float rounding), and both group LDS on ``group_lds_subsets`` random halves of the groups
   (the same retrainer and cache).

    python benchmarks/influence_functions.py --out artifacts/bench/influence_functions   # full (~20 min, 2 idle cores)
    python benchmarks/influence_functions.py --out /tmp/if_smoke --smoke --threads 1     # smoke (~2 min)
    python benchmarks/influence_functions.py --parts convex,mlp                          # a subset

Expected cost of the full run (2 cores): retrains ~5 min (~250 Lightning fits; cached, so a rerun skips them), the
CNN's methods ~7 min (each EK-FAC variant ~45 s), resnet18 ~4-5 min (the EK-FAC fit ~1.5 min: eigendecompositions
of 4609 x 4609 factors; the per-example pass ~3 s per example, timed on 16), the rest ~3 min. Needs the cores to
itself for timings. Writes ``{out}/results.json`` and ``{out}/results.md``; keeps the retrains' measurements in
``{out}/retrains`` (delete the folder to retrain).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars; tqdm reads it when imported (by torch)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    NUM_CLASSES,
    DigitsCNN,
    DigitsData,
    LitClassifier,
    begin,
    finish,
    fit_like_retrainer,
    fmt,
    max_rel_err,
    num_params,
    pearson,
    per_query_spearman,
    progress,
    quiet,
    spearman,
    targets_table,
    timed,
    verdict,
)
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_attr import create_timm_model  # noqa: E402
from lightning_attr.data import IndexedDataset  # noqa: E402
from lightning_attr.evaluation import SubsetRetrainer, lds, random_subsets  # noqa: E402
from lightning_attr.influence import (  # noqa: E402
    GradientFeaturizer,
    GroupSpec,
    InfluenceFunctionMethod,
    TracInMethod,
    TRAKMethod,
    attribute,
)
from lightning_attr.influence.groups import Grouping  # noqa: E402
from lightning_attr.influence.runner import AttributionData, LocalComm, PassRunner, data_total  # noqa: E402

TARGETS = dict(loo_pearson=0.95, lds_minus_kronfluence=-0.02, lds_minus_tracin=0.0, spearman_vs_kronfluence=0.9,
               speed_vs_kronfluence=1.0, grouped_speedup=10.0, group_lds_ratio=0.8)
log = progress("influence_functions")


@dataclass
class Settings:
    """Sizes of one run (``--smoke`` picks tiny ones)."""

    n_train: int | None = None  # truncate the train split (smoke runs only)
    # 1. convex case
    l2: float = 1e-3  # L2 coefficient of the logistic regression = the absolute damping of its IF
    loo_examples: int = 200
    grad_tol: float = 1e-10  # max |gradient| of the (leave-one-out) objective at convergence
    logreg_cg_iterations: int = 200
    # 2. LDS models
    n_targets: int = 100  # validation targets (every k-th of the split)
    lds_subsets: int = 50
    lds_seeds: int = 2  # retrained outputs averaged over these init / order seeds
    batch_size: int = 64
    mlp_hidden: int = 32
    mlp_epochs: int = 40
    mlp_step_epochs: int = 10  # learning rate halved every this many epochs
    cnn_epochs: int = 8
    cnn_step_epochs: int = 2
    lr: float = 0.1
    weight_decay: float = 5e-4
    damping: float = 0.1  # relative (per layer for kfac / ekfac) = Kronfluence's heuristic damping
    default_damping: float = 1e-3  # the package's default (an extra ekfac row)
    trak_dim: int = 2048
    cg_tol: float = 1e-6
    # cg: every iteration is a pass of GGN-vector products (10 classes x per-example gradients) over the curvature data
    cg_iterations: dict[str, int] = field(default_factory=lambda: {"mlp": 100, "cnn": 30})
    cg_fit_samples: dict[str, int | None] = field(default_factory=lambda: {"mlp": None, "cnn": 128})
    exact_models: tuple[str, ...] = ("mlp",)  # exact IF (a P x P matrix) only where P is small
    dattri_cg_models: tuple[str, ...] = ("mlp",)  # dattri CG: one full-batch HVP per iteration, vmapped over queries
    dattri_cg_iterations: int = 100
    # 3. grouped IF
    group_size: int = 32
    group_lds_subsets: int = 24
    group_lds_seeds: int = 1
    resnet: str = "resnet18"
    # timm zero-initializes the last BatchNorm of every residual branch (zero_init_last): at random init those branch
    # convolutions have no curvature; the package then damps them with the model's mean eigenvalue
    resnet_kwargs: dict[str, Any] = field(default_factory=dict)
    resnet_n: int | None = None  # resnet training examples (None: the whole split)
    resnet_fit_samples: int = 32  # examples the EK-FAC factors are fitted on (the same for both passes)
    resnet_subset: int = 16  # the per-example pass is timed on this many examples and extrapolated
    resnet_batch: int = 16
    group_batch: int = 128
    proj_dim: int = 2048

    @classmethod
    def smoke(cls) -> Settings:
        return cls(n_train=120, loo_examples=10, n_targets=12, lds_subsets=4, lds_seeds=1, mlp_epochs=2,
                   mlp_step_epochs=1, cnn_epochs=1, cnn_step_epochs=1, trak_dim=64, logreg_cg_iterations=10,
                   cg_iterations={"mlp": 10, "cnn": 5}, cg_fit_samples={"mlp": None, "cnn": 32}, dattri_cg_iterations=5,
                   group_size=8, group_lds_subsets=3, resnet_n=64, resnet_fit_samples=8, resnet_subset=4,
                   resnet_batch=4, group_batch=32, proj_dim=64,
                   resnet_kwargs=dict(channels=(16, 32, 64, 128), layers=(1, 1, 1, 1), stem_width=16))


# ------------------------------------------------------------------------------------------------------------ data
def flat8(x: Tensor) -> Tensor:
    """1x32x32 digits -> the 8x8 image (4x4 average pooling) flattened to 64 features."""
    return F.avg_pool2d(x, 4).flatten(1)


def target_rows(s: Settings, n_val: int) -> Tensor:
    """Indices of the validation targets: every k-th example, ``n_targets`` of them."""
    step = max(1, n_val // s.n_targets)
    return torch.arange(0, n_val, step)[: s.n_targets]


def ours(method: Any, net: nn.Module, train: IndexedDataset, targets: IndexedDataset, batch_size: int,
         gradients: dict[str, Any] | None = None, normalize: str | None = None,
         groups: GroupSpec | None = None) -> tuple[Tensor, dict[str, float], Any]:
    """``attribute(method, net, train)`` (fit + pass, files in a temporary folder) and its ``scores(targets)``;
    returns ``(scores (n_rows, n_targets), seconds, Attribution)``."""
    with tempfile.TemporaryDirectory(prefix="if_bench_") as directory:
        att, t_fit = timed(lambda: attribute(method, net, train, directory, gradients=gradients, groups=groups,
                                             batch_size=batch_size, progress=False))
        scores, t_score = timed(lambda: att.scores(targets, normalize=normalize))
    return scores.double(), dict(fit=t_fit, score=t_score, total=t_fit + t_score), att


# --------------------------------------------------------------------------------------------- 1. convex case
class SoftmaxRegression:
    """``J(theta) = sum_i w_i CE_i(theta) / N + l2 / 2 ||theta||^2`` of a linear softmax model ``theta = [W | b]``
    (K, D + 1) on features ``x`` (N, D), float64, with its closed-form gradient and Hessian (``N`` = all examples,
    whatever the weights ``w``)."""

    def __init__(self, x: Tensor, y: Tensor, l2: float) -> None:
        self.xa = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        self.onehot = F.one_hot(y, NUM_CLASSES).double()
        self.n, self.l2 = len(x), l2

    def probs(self, theta: Tensor, xa: Tensor | None = None) -> Tensor:
        return ((self.xa if xa is None else xa) @ theta.T).softmax(-1)

    def value(self, theta: Tensor, w: Tensor) -> float:
        logp = (self.xa @ theta.T).log_softmax(-1)
        return float(-(w * (logp * self.onehot).sum(1)).sum() / self.n + self.l2 / 2 * theta.pow(2).sum())

    def grad(self, theta: Tensor, w: Tensor) -> Tensor:
        return (w.unsqueeze(1) * (self.probs(theta) - self.onehot)).T @ self.xa / self.n + self.l2 * theta

    def example_hessian(self, theta: Tensor, i: int) -> Tensor:
        """The Hessian of example ``i``'s loss: ``(diag(p) - p p^T) (x) x x^T`` (K(D+1), K(D+1))."""
        p, xa = self.probs(theta)[i], self.xa[i]
        return torch.kron(torch.diag(p) - torch.outer(p, p), torch.outer(xa, xa))

    def hessian(self, theta: Tensor, w: Tensor) -> Tensor:
        p = self.probs(theta)
        z = (p.unsqueeze(2) * self.xa.unsqueeze(1)).flatten(1)  # (N, K(D+1)): p_k x_j
        blocks = torch.einsum("n,nk,nj,nm->kjm", w, p, self.xa, self.xa)
        h = torch.block_diag(*blocks) - (z * w.unsqueeze(1)).T @ z
        return h / self.n + self.l2 * torch.eye(h.shape[0], dtype=torch.float64)

    def minimize(self, theta: Tensor, w: Tensor, tol: float, chol: Tensor | None = None, max_steps: int = 200
                 ) -> tuple[Tensor, int]:
        """Newton steps with backtracking until max |gradient| <= ``tol``; with ``chol`` (the Cholesky factor of a fixed
        approximation of the Hessian) quasi-Newton steps, which converge to the same minimizer."""
        for step in range(max_steps):
            g = self.grad(theta, w)
            if float(g.abs().max()) <= tol:
                return theta, step
            c = chol if chol is not None else torch.linalg.cholesky(self.hessian(theta, w))
            d = torch.cholesky_solve(g.flatten().unsqueeze(1), c).view_as(theta)
            t, f0, slope = 1.0, self.value(theta, w), float((g * d).sum())
            while self.value(theta - t * d, w) > f0 - 1e-4 * t * slope and t > 1e-10:
                t /= 2
            theta = theta - t * d
        raise RuntimeError(f"no convergence to max |grad| <= {tol} in {max_steps} steps")


def logreg_module(theta: Tensor) -> nn.Linear:
    """``nn.Linear(D, K)`` (float64) with weights ``theta[:, :-1]`` and bias ``theta[:, -1]``."""
    lin = nn.Linear(theta.shape[1] - 1, theta.shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(theta[:, :-1])
        lin.bias.copy_(theta[:, -1])
    return lin.eval()


def test_losses(problem: SoftmaxRegression, theta: Tensor, xa_test: Tensor, y_test: Tensor) -> Tensor:
    return F.cross_entropy(xa_test @ theta.T, y_test, reduction="none")


def convex(s: Settings, data: DigitsData, r: dict) -> None:
    """1. Logistic regression: leave-one-out retraining vs the IF prediction of the test-loss change."""
    log("1. convex case: logistic regression on 8x8 digits")
    x, y = flat8(data.x_train).double(), data.y_train
    problem = SoftmaxRegression(x, y, s.l2)
    xa_test = torch.cat([flat8(data.x_val).double(), torch.ones(len(data.x_val), 1, dtype=torch.float64)], 1)
    n, ones = len(x), torch.ones(len(x), dtype=torch.float64)
    (theta, steps), t_fit = timed(lambda: problem.minimize(torch.zeros(NUM_CLASSES, x.shape[1] + 1,
                                                                       dtype=torch.float64), ones, s.grad_tol))
    base = test_losses(problem, theta, xa_test, data.y_val)
    acc = float((xa_test @ theta.T).argmax(1).eq(data.y_val).double().mean())
    log(f"  full fit: {steps} Newton steps, {t_fit:.1f}s, test loss {float(base.mean()):.4f}, test acc {acc:.3f}")

    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: s.loo_examples]
    h_full = problem.hessian(theta, ones)

    def loo() -> tuple[Tensor, list[int]]:
        changes, steps_ = [], []
        for i in idx.tolist():
            w = ones.clone()
            w[i] = 0.0
            chol = torch.linalg.cholesky(h_full - problem.example_hessian(theta, i) / n)
            th, k = problem.minimize(theta.clone(), w, s.grad_tol, chol=chol)
            changes.append(test_losses(problem, th, xa_test, data.y_val) - base)
            steps_.append(k)
        return torch.stack(changes), steps_

    (actual, loo_steps), t_loo = timed(loo)  # (loo_examples, n_test)
    log(f"  {len(idx)} leave-one-out fits in {t_loo:.1f}s (mean {sum(loo_steps) / len(loo_steps):.1f} steps)")

    # closed-form reference: grad f(test)^T H^-1 grad l(z) / N with H the Hessian of the regularized objective
    p_test = problem.probs(theta, xa_test)
    g_test = (p_test - F.one_hot(data.y_val, NUM_CLASSES).double()).unsqueeze(2) * xa_test.unsqueeze(1)  # (m, K, D+1)
    g_train = (problem.probs(theta)[idx] - problem.onehot[idx]).unsqueeze(2) * problem.xa[idx].unsqueeze(1)
    solved = torch.linalg.solve(h_full, g_test.flatten(1).T)  # (P, m)
    reference = g_train.flatten(1) @ solved / n  # (loo_examples, m)

    model = logreg_module(theta)
    train = IndexedDataset(TensorDataset(x, y))
    test = IndexedDataset(TensorDataset(flat8(data.x_val).double(), data.y_val))
    rows: dict[str, dict] = {"closed-form reference (float64, computed here)": summarize_convex(reference, actual)}
    for strategy, curvature in (("exact", "hessian"), ("exact", "ggn"), ("cg", "ggn"), ("kfac", "ggn"),
                                ("ekfac", "ggn")):
        method = InfluenceFunctionMethod(strategy, damping=s.l2, relative_damping=False, curvature=curvature,
                                         cg_iterations=s.logreg_cg_iterations, cg_tol=1e-10)
        scores, seconds, _ = ours(method, model, train, test, 256)
        predicted = scores[idx] / n
        row = summarize_convex(predicted, actual)
        row.update(seconds=seconds, max_rel_err_vs_reference=max_rel_err(predicted, reference))
        rows[f"ours {strategy} ({curvature})"] = row
        log(f"  ours {strategy:5s} {curvature:7s}: Pearson {row['pearson_mean_loss']:.4f} (mean test loss), "
            f"{row['pearson_per_example']:.4f} (per test example), scale {row['scale']:.3f}, "
            f"rel err vs reference {row['max_rel_err_vs_reference']:.2e}, {seconds['total']:.1f}s")
    r["convex"] = dict(n_train=n, n_test=len(xa_test), params=int(theta.numel()), l2=s.l2, newton_steps=steps,
                       fit_s=t_fit, test_acc=acc, test_loss=float(base.mean()), loo_examples=len(idx), loo_s=t_loo,
                       loo_steps_mean=sum(loo_steps) / len(loo_steps),
                       actual_mean_change_abs=float(actual.mean(1).abs().mean()), rows=rows)


def summarize_convex(predicted: Tensor, actual: Tensor) -> dict:
    """Pearson of the predicted vs actual change of the mean test loss (over removed examples) and of every test
    example's loss (flattened); ``scale``: least-squares slope of predicted on actual (1 = right size)."""
    pm, am = predicted.mean(1), actual.mean(1)
    return dict(pearson_mean_loss=pearson(pm, am), pearson_per_example=pearson(predicted, actual),
                spearman_mean_loss=spearman(pm, am), scale=float((pm * am).sum() / (am * am).sum()))


# --------------------------------------------------------------------------------------------------- 2. LDS models
@dataclass
class Model:
    """A trained LightningModule, its data as the engine and the retrainer read them, and its LDS retrains."""

    name: str
    module: LitClassifier
    train: IndexedDataset
    targets: IndexedDataset
    retrainer: SubsetRetrainer
    masks: Tensor
    actual: Tensor  # (lds_subsets, n_targets) retrained target losses

    @property
    def net(self) -> nn.Module:
        return self.module.net


def build_model(s: Settings, name: str, out: Path, make_net: Callable[[], nn.Module], x: Tensor, y: Tensor,
                xt: Tensor, yt: Tensor, epochs: int, step_epochs: int, info: dict) -> Model:
    """Train the full model (the retrainer's recipe, seed 0) and retrain it on the LDS subsets (cached)."""
    def make_module() -> LitClassifier:
        return LitClassifier(make_net(), lr=s.lr, weight_decay=s.weight_decay, step_epochs=step_epochs)

    train, targets = IndexedDataset(TensorDataset(x, y)), IndexedDataset(TensorDataset(xt, yt))
    key = (f"{name}-n{len(x)}-t{len(xt)}-e{epochs}-s{step_epochs}-lr{s.lr}-wd{s.weight_decay}-b{s.batch_size}"
           + (f"-h{s.mlp_hidden}" if name == "mlp" else ""))
    retrainer = SubsetRetrainer(make_module, train, targets, str(out / "retrains"), key, seeds=s.lds_seeds,
                                batch_size=s.batch_size, trainer_kwargs=dict(max_epochs=epochs), progress=False)
    module, t_train = timed(lambda: fit_like_retrainer(retrainer, seed=0))
    with torch.no_grad():
        info.update(params=num_params(module.net), train_s=t_train,
                    train_acc=float(module(x).argmax(1).eq(y).float().mean()),
                    target_acc=float(module(xt).argmax(1).eq(yt).float().mean()),
                    train_loss=float(F.cross_entropy(module(x), y)))
    log(f"  {name}: {info['params']:,} parameters, trained in {t_train:.1f}s, train acc {info['train_acc']:.3f}, "
        f"target acc {info['target_acc']:.3f}")
    masks = random_subsets(len(x), s.lds_subsets, 0.5, seed=1)
    with quiet():
        actual, t_retrain = timed(lambda: retrainer.all(masks))
    info.update(retrain_s=t_retrain, retrained=retrainer.trained, retrains=s.lds_subsets * s.lds_seeds,
                key=key)
    log(f"  {name}: {s.lds_subsets} subsets x {s.lds_seeds} seeds, {retrainer.trained} retrained now "
        f"({t_retrain:.0f}s), the rest from the cache")
    return Model(name, module, train, targets, retrainer, masks, actual)


class KronfluenceTask:
    """Kronfluence's ``Task``: summed cross-entropy (labels sampled from the model for the true Fisher), measurement =
    the query's summed cross-entropy (per query example: pairwise scores use per-sample query gradients)."""

    @staticmethod
    def make() -> Any:
        from kronfluence.task import Task

        class CrossEntropyTask(Task):
            def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
                logits = model(batch[0])
                labels = batch[1]
                if sample:
                    with torch.no_grad():
                        labels = torch.multinomial(logits.detach().softmax(-1), 1).flatten()
                return F.cross_entropy(logits, labels, reduction="sum")

            def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
                return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

        return CrossEntropyTask()


def kronfluence_ekfac(m: Model, empirical: bool, batch_size: int, damping: float | None = None
                      ) -> tuple[Tensor, dict[str, float]]:
    """Kronfluence EK-FAC scores (n_train, n_targets): ``fit_all_factors`` + ``compute_pairwise_scores`` on a copy of
    the network (``prepare_model`` wraps its layers in place)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    task = KronfluenceTask.make()
    torch.manual_seed(0)  # its label sampling draws from the global generator
    with tempfile.TemporaryDirectory(prefix="kronfluence_") as directory, quiet():
        model = prepare_model(copy.deepcopy(m.net).eval(), task)
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=directory)
        _, t_fit = timed(lambda: analyzer.fit_all_factors(
            "ekfac", m.train, per_device_batch_size=batch_size, overwrite_output_dir=True,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=empirical)))
        _, t_score = timed(lambda: analyzer.compute_pairwise_scores(
            "scores", "ekfac", m.targets, m.train, per_device_query_batch_size=len(m.targets),
            per_device_train_batch_size=batch_size, overwrite_output_dir=True,
            score_args=ScoreArguments(damping_factor=damping)))
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].T.double()
    return scores, dict(fit=t_fit, score=t_score, total=t_fit + t_score)


def dattri_task(net: nn.Module) -> Any:
    from dattri.task import AttributionTask

    def loss(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        return F.cross_entropy(torch.func.functional_call(net, params, (x,)), y)

    return AttributionTask(loss_func=loss, model=net, checkpoints=net.state_dict())


def tensors(ds: IndexedDataset) -> tuple[Tensor, Tensor]:
    base = ds.dataset
    return base.tensors[0], base.tensors[1]


def dattri_ekfac(m: Model, damping: float, batch_size: int) -> tuple[Tensor, dict[str, float]]:
    """dattri ``IFAttributorEKFAC`` on the Linear layers (its default), absolute ``damping``, the data's labels."""
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    net = copy.deepcopy(m.net).eval()
    linear = [name for name, mod in net.named_modules() if isinstance(mod, nn.Linear)]
    attributor = IFAttributorEKFAC(task=dattri_task(net), module_name=linear, device="cpu", damping=damping)
    train = DataLoader(TensorDataset(*tensors(m.train)), batch_size=batch_size)
    test = DataLoader(TensorDataset(*tensors(m.targets)), batch_size=len(m.targets))
    with quiet():
        _, t_fit = timed(lambda: attributor.cache(train))
        scores, t_score = timed(lambda: attributor.attribute(train, test))
    return scores.detach().double(), dict(fit=t_fit, score=t_score, total=t_fit + t_score)


def dattri_cg(m: Model, damping: float, iterations: int, batch_size: int) -> tuple[Tensor, dict[str, float]]:
    """dattri ``IFAttributorCG``: the Hessian of the mean loss over ONE cached batch holding the whole training set
    (with several batches it sums per-batch inverse-Hessian products), ``regularization`` = ``damping``."""
    from dattri.algorithm.influence_function import IFAttributorCG

    net = copy.deepcopy(m.net).eval()
    attributor = IFAttributorCG(task=dattri_task(net), device="cpu", max_iter=iterations, regularization=damping)
    x, y = tensors(m.train)
    train = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    test = DataLoader(TensorDataset(*tensors(m.targets)), batch_size=len(m.targets))
    with quiet():
        _, t_fit = timed(lambda: attributor.cache(DataLoader(TensorDataset(x, y), batch_size=len(x))))
        scores, t_score = timed(lambda: attributor.attribute(train, test))
    return scores.detach().double(), dict(fit=t_fit, score=t_score, total=t_fit + t_score)


def run_methods(s: Settings, m: Model) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Every method's scores (n_train, n_targets) on the same network and targets, with seconds and settings."""
    bs, d = s.batch_size, s.damping
    scores: dict[str, Tensor] = {}
    meta: dict[str, dict] = {}

    def add(name: str, fn: Callable[[], tuple[Tensor, dict[str, float]]], note: str) -> None:
        try:
            out = fn()
        except Exception as err:  # a method that fails is reported, the others still run
            log(f"    {name}: FAILED ({type(err).__name__}: {err})")
            meta[name] = dict(note=note, error=f"{type(err).__name__}: {err}")
            return
        scores[name], meta[name] = out[0], dict(seconds=out[1], note=note)
        log(f"    {name}: {out[1]['total']:.1f}s (fit {out[1]['fit']:.1f}s + score {out[1]['score']:.1f}s)")

    def our(method: Any, gradients: dict | None = None) -> Callable[[], tuple[Tensor, dict[str, float]]]:
        return lambda: ours(method, m.net, m.train, m.targets, bs, gradients)[:2]

    tracin: dict[str, Any] = {}

    def run_tracin() -> tuple[Tensor, dict[str, float]]:
        sc, seconds, tracin["att"] = ours(TracInMethod(), m.net, m.train, m.targets, bs)
        return sc, seconds

    add("TracIn", run_tracin, "exact gradients, final weights, lr 1")
    add("TRAK", our(TRAKMethod(), dict(proj_dim=s.trak_dim)), f"k={s.trak_dim} (count sketch), margin")
    if m.name in s.exact_models:
        add("ours exact", our(InfluenceFunctionMethod("exact", damping=d)),
            f"GGN (exact expectation over labels), damping {d} x mean eigenvalue")
    fit_samples, iterations = s.cg_fit_samples.get(m.name), s.cg_iterations.get(m.name, 100)
    add("ours cg", our(InfluenceFunctionMethod("cg", damping=d, fit_samples=fit_samples, cg_iterations=iterations,
                                               cg_tol=s.cg_tol)),
        f"GGN, damping {d} x mean eigenvalue, {iterations} iterations max, tol {s.cg_tol}"
        + (f", curvature on {fit_samples} examples" if fit_samples else ""))
    add("ours kfac", our(InfluenceFunctionMethod("kfac", damping=d)),
        f"true Fisher (exact over labels), damping {d} (per layer)")
    add("ours ekfac", our(InfluenceFunctionMethod("ekfac", damping=d)),
        f"true Fisher (exact over labels, the default), damping {d} (per layer)")
    add("ours ekfac (sampled)", our(InfluenceFunctionMethod("ekfac", damping=d, fisher="sampled")),
        f"true Fisher from one sampled label per example (as Kronfluence), damping {d}")
    add("ours ekfac (sampled, label seed 1)", our(InfluenceFunctionMethod("ekfac", damping=d, fisher="sampled", seed=1)),
        "the same with other sampled labels: the noise floor of a sampled Fisher")
    add("ours ekfac (sampled, queries only)", our(InfluenceFunctionMethod("ekfac", damping=d, fisher="sampled",
                                                                          self_influence=False)),
        "as Kronfluence's fit + pairwise scores: sampled labels, no per-row preconditioning (no self-influence)")
    add("ours ekfac (damping 1e-3)", our(InfluenceFunctionMethod("ekfac", damping=s.default_damping)),
        f"true Fisher, the package's default damping {s.default_damping}")
    add("ours ekfac (empirical)", our(InfluenceFunctionMethod("ekfac", damping=d, fisher="empirical")),
        f"empirical Fisher, damping {d} (per layer)")
    add("Kronfluence ekfac", lambda: kronfluence_ekfac(m, False, bs),
        "true Fisher, damping_factor=None (0.1 x mean eigenvalue per module)")
    add("Kronfluence ekfac (empirical)", lambda: kronfluence_ekfac(m, True, bs),
        "empirical Fisher, damping_factor=None")
    if "TracIn" in scores:  # lambda_abs = damping x mean eigenvalue of the empirical Fisher = mean ||g||^2 / P
        sq_norms = tracin["att"].self_influence().double()  # TracIn with lr 1 and exact gradients: ||grad l(z)||^2
        lam = d * float(sq_norms.mean()) / num_params(m.net)
        meta["lambda_abs"] = dict(value=lam, note=f"{d} x mean_z ||grad l(z)||^2 / P")
        add("ours ekfac (empirical, Linear, absolute)",
            our(InfluenceFunctionMethod("ekfac", damping=lam, relative_damping=False, fisher="empirical"),
                dict(module_types=["Linear"])), f"empirical Fisher, Linear layers, damping {lam:.3g} (absolute)")
        add("dattri ekfac", lambda: dattri_ekfac(m, lam, bs),
            f"IFAttributorEKFAC, Linear layers, data labels, damping {lam:.3g}")
        if m.name in s.dattri_cg_models:
            lam_h = lam  # the damped Hessian must be positive definite for an exact solve: raise lambda until it is
            for attempt in range(4):
                lam_h = lam * 10**attempt
                add("ours exact (Hessian, absolute)",
                    our(InfluenceFunctionMethod("exact", damping=lam_h, relative_damping=False, curvature="hessian")),
                    f"Hessian, damping {lam_h:.3g} (absolute)")
                if "ours exact (Hessian, absolute)" in scores:
                    break
            add("dattri cg", lambda: dattri_cg(m, lam_h, s.dattri_cg_iterations, bs),
                f"IFAttributorCG, Hessian, regularization {lam_h:.3g}, {s.dattri_cg_iterations} iterations")
    return scores, meta


def dattri_ekfac_check(damping: float = 1e-3) -> dict[str, float]:
    """A known answer for the EK-FAC implementations: one Linear layer (6 -> 4, with and without bias) on random data,
    empirical Fisher, absolute damping, every score against a textbook EK-FAC computed here (factors A = E[a a^T] with
    a ones column for the bias, S = E[g g^T], eigenbases Q_A, Q_S, Lambda = E[(Q_S^T G Q_A)^2], preconditioner
    Q_S [(Q_S^T V Q_A) / (Lambda + damping)] Q_A^T, with [W | b] as one (4, 7) matrix). ``textbook, rows of Q``: the
    same with the rotation ``Q_S G Q_A^T`` (basis = the ROWS of the eigenvector matrices: not an eigenbasis, and
    dependent on the eigenvectors' signs). Returns max relative errors."""
    from dattri.algorithm.influence_function import IFAttributorEKFAC

    g0 = torch.Generator().manual_seed(0)
    n, d, k, m = 200, 6, 4, 5
    x, y = torch.randn(n, d, generator=g0), torch.randint(0, k, (n,), generator=g0)
    out = {}
    for bias in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(d, k, bias=bias)).eval()
        a = torch.cat([x, torch.ones(n, 1)], 1) if bias else x
        g = (net(x).softmax(-1) - F.one_hot(y, k)).detach()
        grads = (g.unsqueeze(2) * a.unsqueeze(1)).double()  # (n, k, I')
        _, q_a = torch.linalg.eigh(a.double().T @ a.double() / n)
        _, q_s = torch.linalg.eigh(g.double().T @ g.double() / n)
        attributor = IFAttributorEKFAC(task=dattri_task(net), module_name=["0"], device="cpu", damping=damping)
        loader = DataLoader(TensorDataset(x, y), batch_size=50)
        with quiet():
            attributor.cache(loader)
            theirs = attributor.attribute(loader, DataLoader(TensorDataset(x[:m], y[:m]), batch_size=m)).detach()
        q_a_d, q_s_d = (q.double() for q in attributor.cached_q["0"])  # its eigenvectors (signs as it drew them)
        train = IndexedDataset(TensorDataset(x, y))
        method = InfluenceFunctionMethod("ekfac", damping=damping, relative_damping=False, fisher="empirical")
        mine = ours(method, net, train, IndexedDataset(TensorDataset(x[:m], y[:m])), 50)[0]
        for name, (u_a, u_s) in {"textbook": (q_a, q_s), "textbook, rows of Q": (q_a_d.T, q_s_d.T)}.items():
            lam = ((u_s.T @ grads @ u_a) ** 2).mean(0)
            pre = u_s @ ((u_s.T @ grads[:m] @ u_a) / (lam + damping)) @ u_a.T  # (m, k, I')
            ref = torch.einsum("noi,moi->nm", grads, pre)
            if name == "textbook":
                out[f"ours vs textbook ({'bias' if bias else 'no bias'})"] = max_rel_err(mine, ref)
            out[f"dattri vs {name} ({'bias' if bias else 'no bias'})"] = max_rel_err(theirs, ref)
    return out


AGREEMENT = (  # (ours, theirs, what it shows)
    ("ours ekfac (sampled)", "Kronfluence ekfac", "same damping rule, sampled true Fisher (each its own labels)"),
    ("ours ekfac (sampled)", "ours ekfac (sampled, label seed 1)", "noise floor of a sampled Fisher: other labels"),
    ("ours ekfac", "Kronfluence ekfac", "exact true Fisher vs Kronfluence's sampled one"),
    ("ours ekfac", "ours ekfac (sampled)", "exact true Fisher vs one sampled label per example"),
    ("ours ekfac (empirical)", "Kronfluence ekfac (empirical)", "same damping rule, empirical Fisher"),
    ("ours ekfac (empirical, Linear, absolute)", "dattri ekfac", "same absolute damping, Linear layers, data labels"),
    ("ours exact (Hessian, absolute)", "dattri cg", "same absolute damping, Hessian"),
    ("ours cg", "ours exact", "cg vs exact (same GGN and damping)"),
    ("ours ekfac", "ours exact", "EK-FAC vs the exact GGN"),
    ("ours kfac", "ours ekfac", "K-FAC vs EK-FAC"),
    ("ours ekfac", "TracIn", "EK-FAC vs TracIn"),
)


def lds_of(m: Model, scores: Tensor) -> dict[str, float]:
    """LDS of ``scores`` against the model's retrains (the predicted loss is ``-sum`` of the kept examples' scores:
    a positive score is a proponent, whose presence lowers the target's loss)."""
    replay = iter(list(m.actual))
    out = lds(lambda _idx: next(replay), -scores, masks=m.masks)
    per = out["per_target"]
    return dict(lds=out["lds"], sem=float(per.std() / math.sqrt(per.numel())))


def evaluate_model(s: Settings, m: Model, info: dict) -> tuple[dict, dict[str, Tensor]]:
    log(f"  {m.name}: attribution methods")
    scores, meta = run_methods(s, m)
    lds_rows = {}
    for name, sc in scores.items():
        lds_rows[name] = lds_of(m, sc)
        log(f"    LDS {name}: {lds_rows[name]['lds']:.3f} +- {lds_rows[name]['sem']:.3f}")
    agreement = {}
    for a, b, note in AGREEMENT:
        if a in scores and b in scores:
            agreement[f"{a} vs {b}"] = dict(spearman=spearman(scores[a], scores[b]),
                                            spearman_per_query=per_query_spearman(scores[a], scores[b]),
                                            max_rel_err=max_rel_err(scores[a], scores[b]), note=note)
    return dict(info=info, methods=meta, lds=lds_rows, agreement=agreement), scores


def lds_models(s: Settings, data: DigitsData, out: Path, r: dict, parts: set[str]) -> dict[str, tuple[Model, dict]]:
    """2. The MLP and the CNN: training, retrains, every method's scores, LDS and agreement."""
    rows = target_rows(s, len(data.x_val))
    built: dict[str, tuple[Model, dict]] = {}
    r.setdefault("lds_models", {})
    specs = {
        "mlp": (lambda: nn.Sequential(nn.Linear(64, s.mlp_hidden), nn.ReLU(), nn.Linear(s.mlp_hidden, NUM_CLASSES)),
                flat8(data.x_train), flat8(data.x_val[rows]), s.mlp_epochs, s.mlp_step_epochs,
                f"MLP 64-{s.mlp_hidden}-10 (ReLU) on the 8x8 digits"),
        "cnn": (lambda: DigitsCNN(), data.x_train, data.x_val[rows], s.cnn_epochs, s.cnn_step_epochs,
                "DigitsCNN on 1x32x32 digits"),
    }
    for name, (make_net, x, xt, epochs, step, description) in specs.items():
        if name not in parts and not (name == "cnn" and "grouped" in parts):
            continue
        log(f"2. {description}")
        info = dict(description=description, epochs=epochs, step_epochs=step)
        m = build_model(s, name, out, make_net, x, data.y_train, xt, data.y_val[rows], epochs, step, info)
        scores: dict[str, Tensor] = {}
        if name in parts:
            r["lds_models"][name], scores = evaluate_model(s, m, info)
        built[name] = (m, scores)
    return built


# ------------------------------------------------------------------------------------------------ 3. grouped IF
def resnet_speed(s: Settings, r: dict) -> None:
    """3a. Per-example vs grouped EK-FAC IF pass on timm resnet18, through the engine's pass runner."""
    log(f"3a. grouped IF speed on {s.resnet}")
    data3 = DigitsData.load(32, channels=3).truncated(s.resnet_n or s.n_train)
    x, y = data3.x_train, data3.y_train
    n = len(x)
    torch.manual_seed(0)
    model = create_timm_model(s.resnet, pretrained=False, num_classes=NUM_CLASSES, **s.resnet_kwargs).eval()
    method = InfluenceFunctionMethod("ekfac", damping=s.damping, fit_samples=s.resnet_fit_samples)
    feat = GradientFeaturizer(model, output=method.output, module_types=["Linear", "Conv2d"], proj_dim=s.proj_dim,
                              projection="sketch")
    runner, comm = PassRunner(cache_inputs_mb=2048), LocalComm()
    train = IndexedDataset(TensorDataset(x, y))
    _, t_setup = timed(lambda: feat(x[:2], y[:2], (0,)))  # draws the sketch's hashes (once per checkpoint)
    data = AttributionData(train, s.resnet_batch)
    state, t_fit = timed(lambda: method.fit_state(feat, data_total(runner, data, model, comm, method.fit_samples, 0)))
    log(f"  {num_params(model):,} parameters ({feat.num_params:,} in Linear + Conv2d); sketch set-up {t_setup:.1f}s, "
        f"EK-FAC fit on {s.resnet_fit_samples} examples {t_fit:.1f}s")

    def row(x_: Tensor, y_: Tensor, bounds: Tensor | None, _: Any) -> dict[str, Tensor]:
        return method.featurize(feat, x_, y_, (0,), bounds, state)

    k = min(s.resnet_subset, n)
    head = AttributionData(IndexedDataset(TensorDataset(x[:k], y[:k])), s.resnet_batch)
    _, t_example = timed(lambda: runner.run(head, Grouping.identity(k), row, model, comm, name="examples"))
    spec = GroupSpec("gradient_kmeans", group_size=s.group_size)
    grouped_data = AttributionData(train, s.group_batch)
    grouping, t_grouping = timed(lambda: spec.rows(runner, grouped_data, model, comm))
    _, t_grouped = timed(lambda: runner.run(grouped_data, grouping, row, model, comm, name="groups"))
    per_example = t_example * n / k
    res = dict(model=s.resnet, model_kwargs=dict(s.resnet_kwargs), params=num_params(model),
               selected_params=feat.num_params, n_train=n,
               proj_dim=s.proj_dim, fit_samples=s.resnet_fit_samples, sketch_setup_s=t_setup, fit_s=t_fit,
               per_example_measured=k, per_example_measured_s=t_example, per_example_s=per_example,
               groups=grouping.num_groups, mean_group_size=float(grouping.sizes.double().mean()),
               grouping_s=t_grouping, grouped_s=t_grouped, speedup=per_example / t_grouped,
               speedup_with_grouping=per_example / (t_grouped + t_grouping),
               speedup_with_fit=(t_fit + per_example) / (t_fit + t_grouping + t_grouped))
    log(f"  per-example {t_example:.1f}s for {k} -> {per_example:.0f}s for {n}; grouped ({grouping.num_groups} groups) "
        f"{t_grouped:.1f}s + grouping {t_grouping:.1f}s: speed-up {res['speedup']:.1f}x "
        f"({res['speedup_with_grouping']:.1f}x with grouping, {res['speedup_with_fit']:.1f}x with the fit)")
    r["grouped_speed"] = res


def group_lds(s: Settings, m: Model, per_example: Tensor | None, r: dict) -> None:
    """3b. Grouped EK-FAC IF on the CNN vs its per-example scores summed to the groups: equality and group LDS."""
    log("3b. grouped IF on the CNN: group LDS")
    method = InfluenceFunctionMethod("ekfac", damping=s.damping)
    if per_example is None:
        per_example, _, _ = ours(method, m.net, m.train, m.targets, s.batch_size)
    spec = GroupSpec("gradient_kmeans", group_size=s.group_size)
    grouped, seconds, att = ours(method, m.net, m.train, m.targets, s.batch_size, normalize="sum", groups=spec)
    g = att.grouping
    summed = g.one_hot().double() @ per_example
    gmasks = random_subsets(g.num_groups, s.group_lds_subsets, 0.5, seed=2)
    members = g.one_hot().bool()
    retrainer = SubsetRetrainer(m.retrainer.make_module, m.train, m.targets, m.retrainer.cache_dir, m.retrainer.key,
                                seeds=s.group_lds_seeds, batch_size=m.retrainer.batch_size,
                                trainer_kwargs=m.retrainer.trainer_kwargs, progress=False)
    with quiet():
        actual, t_retrain = timed(lambda: torch.stack([retrainer(members[gm].any(0).nonzero().flatten())
                                                       for gm in gmasks]))

    def group_lds_of(scores: Tensor) -> float:
        replay = iter(list(actual))
        return lds(lambda _idx: next(replay), -scores, masks=gmasks)["lds"]

    res = dict(groups=g.num_groups, mean_group_size=float(g.sizes.double().mean()), subsets=s.group_lds_subsets,
               seeds=s.group_lds_seeds, retrained=retrainer.trained, retrain_s=t_retrain, seconds=seconds,
               max_rel_err=max_rel_err(grouped, summed), lds_grouped=group_lds_of(grouped),
               lds_summed=group_lds_of(summed))
    res["ratio"] = res["lds_grouped"] / res["lds_summed"] if res["lds_summed"] else float("nan")
    log(f"  {g.num_groups} groups: LDS grouped {res['lds_grouped']:.3f} vs summed {res['lds_summed']:.3f} (ratio "
        f"{res['ratio']:.3f}), max rel err {res['max_rel_err']:.2e}")
    r["group_lds"] = res


# ------------------------------------------------------------------------------------------------------ reporting
def verdicts(r: dict) -> list[dict]:
    out = []

    def add(name: str, value: float | None, target: float, higher: bool = True, note: str = "") -> None:
        out.append(verdict(name, value, target, higher, note))

    if "convex" in r:
        for name in ("ours exact (hessian)", "ours exact (ggn)"):
            row = r["convex"]["rows"][name]
            add(f"logistic regression: IF vs leave-one-out, Pearson of the mean test-loss change, {name}",
                row["pearson_mean_loss"], TARGETS["loo_pearson"],
                note=f"per test example {row['pearson_per_example']:.3f}, scale {row['scale']:.3f}")
    for model, res in r.get("lds_models", {}).items():
        lds_ = {k: v["lds"] for k, v in res["lds"].items()}
        secs = {k: v["seconds"]["total"] for k, v in res["methods"].items() if "seconds" in v}
        ours_, kf, tr = lds_.get("ours ekfac"), lds_.get("Kronfluence ekfac"), lds_.get("TracIn")
        add(f"{model}: LDS ours ekfac - Kronfluence ekfac", None if ours_ is None or kf is None else ours_ - kf,
            TARGETS["lds_minus_kronfluence"], note=f"{fmt(ours_)} vs {fmt(kf)}")
        add(f"{model}: LDS ours ekfac - TracIn", None if ours_ is None or tr is None else ours_ - tr,
            TARGETS["lds_minus_tracin"], note=f"{fmt(ours_)} vs {fmt(tr)}")
        floor = res["agreement"].get("ours ekfac (sampled) vs ours ekfac (sampled, label seed 1)")
        for pair, fisher in (("ours ekfac (sampled) vs Kronfluence ekfac", "sampled true"),
                             ("ours ekfac (empirical) vs Kronfluence ekfac (empirical)", "empirical")):
            a = res["agreement"].get(pair)
            note = f"noise floor (ours, other label seed): {floor['spearman']:.3f}" if floor and "sampled" in fisher \
                else ""
            add(f"{model}: Spearman ours ekfac vs Kronfluence ekfac, {fisher} Fisher, same damping",
                None if a is None else a["spearman"], TARGETS["spearman_vs_kronfluence"], note=note)
        o, k = secs.get("ours ekfac (sampled, queries only)"), secs.get("Kronfluence ekfac")
        add(f"{model}: speed, Kronfluence fit+score time / ours (ekfac, sampled Fisher, queries only: like for like)",
            None if not o or not k else k / o, TARGETS["speed_vs_kronfluence"],
            note=f"{fmt(o)}s vs {fmt(k)}s; ours with self-influence and the exact Fisher: "
                 f"{fmt(secs.get('ours ekfac'))}s")
    if "grouped_speed" in r:
        g = r["grouped_speed"]
        add(f"{g['model']}: grouped EK-FAC pass speed-up over per-example (gradient k-means groups of ~"
            f"{g['mean_group_size']:.0f})", g["speedup"], TARGETS["grouped_speedup"],
            note=f"{g['speedup_with_grouping']:.1f}x with grouping, {g['speedup_with_fit']:.1f}x with the fit")
    if "group_lds" in r:
        g = r["group_lds"]
        add("CNN: group LDS grouped / per-example summed (EK-FAC)", g["ratio"], TARGETS["group_lds_ratio"],
            note=f"{g['lds_grouped']:.3f} vs {g['lds_summed']:.3f}, max rel err {g['max_rel_err']:.1e}")
    return out


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [f"# Influence-function benchmark ({'smoke' if r['smoke'] else 'full'} run)", "",
             f"CPU only, {r['threads']} torch threads, torch {r['torch']}, {r['machine']}; wall time "
             f"{r['wall_seconds']:.0f} s; load average {r['load_start']} at the start, {r['load_end']} at the end.", ""]
    if "convex" in r:
        c = r["convex"]
        lines += ["## 1. Convex case: logistic regression, IF vs leave-one-out retraining", "",
                  f"nn.Linear(64, 10) (float64, {c['params']} parameters) on {c['n_train']} 8x8 digits, L2 "
                  f"{c['l2']:g} on all parameters, Newton to max |grad| <= {s['grad_tol']:g} ({c['newton_steps']} "
                  f"steps, {c['fit_s']:.1f} s); test loss {c['test_loss']:.4f}, test accuracy {c['test_acc']:.3f} "
                  f"on {c['n_test']} examples. Leave-one-out of {c['loo_examples']} random training examples, "
                  f"warm-started, to the same tolerance ({c['loo_s']:.1f} s, {c['loo_steps_mean']:.1f} steps on "
                  f"average); mean |change of the mean test loss| {c['actual_mean_change_abs']:.2e}. Package IF with "
                  f"`relative_damping=False, damping={c['l2']:g}`; predicted change = scores / N.", "",
                  "| method | Pearson (mean test loss) | Spearman (mean test loss) | Pearson (per test example) | "
                  "scale (pred / actual) | max rel err vs closed form | seconds |", "|---|---|---|---|---|---|---|"]
        for name, row in c["rows"].items():
            lines.append(f"| {name} | {row['pearson_mean_loss']:.4f} | {row['spearman_mean_loss']:.4f} | "
                         f"{row['pearson_per_example']:.4f} | {row['scale']:.3f} | "
                         f"{fmt(row.get('max_rel_err_vs_reference'))} | "
                         f"{fmt(row['seconds']['total'], 2) if 'seconds' in row else ''} |")
    for model, res in r.get("lds_models", {}).items():
        info = res["info"]
        lines += ["", f"## 2. LDS: {info['description']}", "",
                  f"{info['params']:,} parameters; SGD lr {s['lr']} momentum 0.9 weight decay {s['weight_decay']}, "
                  f"{info['epochs']} epochs, lr halved every {info['step_epochs']}, batch {s['batch_size']}; full "
                  f"model (seed 0) train acc {info['train_acc']:.3f}, target acc {info['target_acc']:.3f}, train loss "
                  f"{info['train_loss']:.4f}. LDS over {s['lds_subsets']} random halves x {s['lds_seeds']} seeds "
                  f"({info['retrained']} of {info['retrains']} retrained in this run, {info['retrain_s']:.0f} s; "
                  f"cache key `{info['key']}`), measurement = each of {s['n_targets']} validation targets' loss.", "",
                  "| method | LDS | +- s.e. | fit s | score s | total s | settings |", "|---|---|---|---|---|---|---|"]
        for name, meta in res["methods"].items():
            if name == "lambda_abs":
                continue
            if "error" in meta:
                lines.append(f"| {name} | failed | | | | | {meta['note']}: {meta['error']} |")
                continue
            row, sec = res["lds"][name], meta["seconds"]
            lines.append(f"| {name} | {row['lds']:.3f} | {row['sem']:.3f} | {sec['fit']:.1f} | {sec['score']:.1f} | "
                         f"{sec['total']:.1f} | {meta['note']} |")
        if "lambda_abs" in res["methods"]:
            lam = res["methods"]["lambda_abs"]
            lines += ["", f"Absolute damping of the dattri comparisons: {lam['value']:.3g} ({lam['note']})."]
        lines += ["", "| agreement | Spearman | Spearman per query (mean) | max rel err | what it shows |",
                  "|---|---|---|---|---|"]
        for pair, a in res["agreement"].items():
            lines.append(f"| {pair} | {a['spearman']:.4f} | {a['spearman_per_query']:.4f} | {a['max_rel_err']:.2e} | "
                         f"{a['note']} |")
    if "ekfac_check" in r:
        lines += ["", "## 2c. Known answer: EK-FAC of one Linear layer (6 -> 4), empirical Fisher, absolute damping",
                  "",
                  "Max relative error of the scores against a textbook EK-FAC computed in the benchmark "
                  "(`dattri_ekfac_check`); `rows of Q`: the same with the rotation Q_S G Q_A^T (dattri's).", "",
                  "| implementation vs reference | max rel err |", "|---|---|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in r["ekfac_check"].items()]
    if "grouped_speed" in r:
        g = r["grouped_speed"]
        lines += ["", f"## 3a. Grouped IF speed: timm {g['model']}", "",
                  f"`create_model({g['model']!r}, **{g['model_kwargs']})`: {g['params']:,} parameters "
                  f"({g['selected_params']:,} in Linear + Conv2d, all preconditioned), "
                  f"{g['n_train']} 3x32x32 digits, EK-FAC (true Fisher, damping {s['damping']}) fitted on "
                  f"{g['fit_samples']} examples in {g['fit_s']:.1f} s (both modes), count sketch k={g['proj_dim']} "
                  f"(set-up {g['sketch_setup_s']:.1f} s). The pass computes each row's gradient, its preconditioned "
                  f"gradient (self-influence) and both sketches.", "",
                  "| pass | rows | measured | seconds (whole split) | speed-up |", "|---|---|---|---|---|",
                  f"| per-example | {g['n_train']} | {g['per_example_measured']} ex in "
                  f"{g['per_example_measured_s']:.1f} s (extrapolated) | {g['per_example_s']:.0f} | 1.0x |",
                  f"| grouped (gradient k-means, ~{g['mean_group_size']:.0f}) | {g['groups']} | all | "
                  f"{g['grouped_s']:.1f} (+ grouping {g['grouping_s']:.1f}) | {g['speedup']:.1f}x "
                  f"({g['speedup_with_grouping']:.1f}x with grouping, {g['speedup_with_fit']:.1f}x with the fit) |"]
    if "group_lds" in r:
        g = r["group_lds"]
        lines += ["", "## 3b. Grouped IF fidelity: DigitsCNN, EK-FAC", "",
                  f"`attribute(..., groups=GroupSpec('gradient_kmeans', group_size={s['group_size']}))`, scores with "
                  f"`normalize='sum'`: {g['groups']} groups (mean size {g['mean_group_size']:.1f}); max |grouped - "
                  f"summed per-example| / max |summed| = {g['max_rel_err']:.2e}. Group LDS over {g['subsets']} random "
                  f"halves of the groups x {g['seeds']} seeds ({g['retrained']} retrained in this run).", "",
                  "| rows | group LDS |", "|---|---|", f"| grouped | {g['lds_grouped']:.3f} |",
                  f"| per-example summed to groups | {g['lds_summed']:.3f} |", f"| ratio | {g['ratio']:.3f} |"]
    lines += ["", "## Reading the numbers", "",
              "- Sign: a positive score is a proponent (removing it raises the target's loss), so the LDS correlates "
              "`-sum` of the kept examples' scores with the retrained loss, for every method alike.",
              "- True Fisher: ours weights every label by the model's probability (exact, one backward per class: "
              "the slower `ours ekfac` rows); `(sampled)` and Kronfluence draw one label per example (ours seeded by "
              "the example's index, Kronfluence from the global generator), so two sampled runs differ by sampling "
              "noise; `ours ekfac (sampled) vs ours ekfac (sampled, label seed 1)` is that noise floor, and the "
              "empirical-Fisher pair compares the two implementations without sampling (it should be ~1).",
              "- `nan` agreement: the two score matrices are not both finite (Spearman and the relative error are undefined there); the LDS of each is still defined.",
              "- Wall time: ours = `attribute` (factors, then one pass that stores every training row's gradient AND "
              "its preconditioned gradient, for self-influence) + `scores`; Kronfluence = `fit_all_factors` + "
              "`compute_pairwise_scores` (preconditions the queries only); dattri = `cache` + `attribute`.",
              "- dattri: its EK-FAC is checked against a textbook EK-FAC in 2c; its CG solves with the Hessian of one "
              "cached batch (the whole training set here) for a fixed number of iterations (its `tol` is unused)."]
    lines += targets_table(r["verdicts"])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------- main
PARTS = ("convex", "mlp", "cnn", "grouped")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="artifacts/bench/influence_functions")
    p.add_argument("--smoke", "--quick", dest="smoke", action="store_true", help="smoke run with tiny sizes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        p.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {PARTS}")
    s = Settings.smoke() if args.smoke else Settings()
    out, start, r = begin(args.out, args.threads, smoke=args.smoke, parts=sorted(parts), settings=asdict(s),
                          targets=TARGETS)
    data = DigitsData.load(32).truncated(s.n_train)
    if "convex" in parts:
        convex(s, data, r)
    built = lds_models(s, data, out, r, parts)
    if parts & {"mlp", "cnn"}:
        log("2c. known-answer check of the EK-FAC implementations (one Linear layer)")
        r["ekfac_check"] = dattri_ekfac_check()
        log("  " + ", ".join(f"{k} {v:.1e}" for k, v in r["ekfac_check"].items()))
    if "grouped" in parts:
        resnet_speed(s, r)
        m, scores = built["cnn"]
        group_lds(s, m, scores.get("ours ekfac"), r)
    r["verdicts"] = verdicts(r)
    return finish(r, start, out, markdown, log)


if __name__ == "__main__":
    main()
