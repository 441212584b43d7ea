"""Influence benchmark: our TracIn-CP / TRAK against Captum and TRAK's ``traker``, side by side on CPU.

Everything runs in one process on the same small digits CNN and the same checkpoints:

1. **Model and checkpoints.** ``DigitsCNN`` (two 3x3 convs + two linear layers, 136,586 parameters, 1x32x32
   digits) trained with plain torch SGD (momentum 0.9, 6 epochs, learning rate 0.1 halved every 2 epochs); a
   checkpoint every 2 epochs keeps the state dict and the learning rate in effect. Every method loads these.
2. **Agreement** (Spearman flattened and mean per query, max |a - b| / max |b|, top-10 overlap).
   * TracIn-CP, exact gradients of all parameters: ours (``GradientFeaturizer(proj_dim=None)`` + ``tracin_scores``)
     vs Captum ``TracInCP(sample_wise_grads_per_batch=True, loss_fn=CrossEntropyLoss(reduction="sum"))``; and our
     projected TracIn-CP (count sketch = the default ``projection="auto"`` here, Kronecker, dense; two seeds) against
     our exact scores (sketch quality).
   * Last layer: ours ``last_layer=True`` (weight and bias, factored) and ours ``fc2.weight`` only vs Captum
     ``TracInCPFast(final_fc_layer=fc2)`` (which uses the weight only).
   * TRAK without projection (the classifier layer: ours ``parameters=["fc2.*"]``, ``traker`` with
     ``NoOpProjector`` and ``grad_wrt``), the same absolute damping, at several dampings, both against a float64
     solve. One checkpoint agrees up to one positive scalar (traker divides gradients by sqrt(#params) and rescales
     ``(X^T X + lambda I)^-1`` by its mean absolute value); with several checkpoints that rescaling weights them
     differently, so ours is also compared after applying traker's weights.
   * TRAK with projection (all parameters, every checkpoint, ``proj_dim`` 512 (< n, X^T X full rank) and 2048):
     ours count sketch (default), Kronecker and dense vs ``traker`` (``BasicProjector``, Gaussian), ours vs ours
     with another seed (noise floor), and every sketch against exact unprojected TRAK (an n x n solve via
     ``X (X^T X + l I)^-1 = (X X^T + l I)^-1 X``).
3. **Throughput** of one attribution pass (examples/s, all trainable parameters, batch 64, ``--threads`` threads,
   warm-up excluded, interleaved rounds, best round kept): ours count sketch (the default) and Kronecker (each with
   and without TRAK's Q), ours dense (matrix redrawn per batch / cached), ours exact features and exact self-influence, ``traker`` ``featurize`` (its default CPU projector, and a
   one-block projector drawn once), Captum ``TracInCP`` ``self_influence`` and ``compute_intermediate_quantities``,
   and a plain batched forward + backward of the summed loss (the limit).
4. **Callback overhead:** (a) a plain LightningModule around the CNN fitted for N epochs with and without
   ``lightning_attr.callbacks.TracIn(last_layer=True, proj_dim=None, every_n_epochs=1)``; (b) a realistic set-up:
   ``lightning_attr.Classifier("resnet18", model_kwargs=dict(channels=[16, 32, 64, 128], layers=[1, 1, 1, 1],
   stem_width=16), image_size=32, mask_prob=0)`` on ``ImageDataModule("digits", image_size=32, batch_size=64)`` with
   and without ``TracIn(last_layer=True, every_n_epochs=1, num_queries=0, progress_bar=False)``. Overhead in %, time
   per pass, and whether the final weights are bit-identical.
5. **Overhead of in-step TracIn** (part ``overhead``): the digits ResNet ``Classifier`` and the noisy digits exactly
   as ``configs/digits_noisy_resnet.yaml`` configures them (read from the file), ``trainer.fit`` wall time over
   ``overhead_epochs`` epochs for: no callback; ``TracIn(in_step=True, last_layer=True, num_queries=0)``; the same
   with 8 tracked queries (the default); ``TracIn(in_step=True, module_types=["Linear", "Conv2d"], num_queries=0)``
   (every Linear / Conv2d layer; BatchNorm parameters are not selected); pass-based ``TracIn(last_layer=True,
   num_queries=0)`` every epoch and every 3 epochs. The datamodule is built once, every configuration is warmed up
   once, then interleaved rounds (each configuration once per round), best of the rounds. Also: whether the final
   weights are bit-identical to the run without callback (same seed), and the noisy-label AUC of ``self_influence``
   after every timed run and after one full ``overhead_auc_epochs``-epoch run of each in-step configuration.

    python benchmarks/influence.py --out artifacts/bench/influence            # full run (~10 min on 2 idle cores)
    python benchmarks/influence.py --out artifacts/bench/influence --quick    # smaller sizes, 1 round
    python benchmarks/influence.py --out /tmp/bench_smoke --smoke             # smoke test: minimal sizes (~1-2 min)
    python benchmarks/influence.py --parts tracin,throughput                  # a subset
    python benchmarks/influence.py --only overhead                            # in-step overhead alone (~4-5 min)

Prints markdown tables; writes ``{out}/results.json`` and ``{out}/results.md`` (and the checkpoints under
``{out}/checkpoints``, the callbacks' files under ``{out}/callback`` and ``{out}/overhead``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("TQDM_DISABLE", "1")  # traker's progress bars; tqdm reads it when imported (by torch)

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    ROOT,
    Checkpoint,
    CNNTraining,
    DigitsCNN,
    DigitsData,
    Timed,
    batches,
    load_cnn,
    load_now,
    max_rel_err,
    num_params,
    progress,
    quiet,
    run_rounds,
    timed,
    train_cnn,
    write_json,
    write_text,
)
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import lightning_attr  # noqa: E402
from lightning_attr import Classifier, ImageDataModule  # noqa: E402
from lightning_attr.callbacks import TracIn  # noqa: E402
from lightning_attr.influence import (  # noqa: E402
    GradientFeaturizer,
    damped_inverse,
    out_to_loss,
    tracin_scores,
    trak_kernel,
    trak_scores,
    xtx,
)
from lightning_attr.metrics import noisy_label_auc  # noqa: E402

TARGETS = dict(tracin_spearman=0.99, trak_proj_spearman=0.95, vs_traker=10.0, vs_captum=1.2, vs_plain=0.5,
               callback_overhead_pct=10.0, in_step_overhead_pct=5.0, in_step_auc=0.95,
               trak_noproj_rel_err=1e-3)  # "float tolerance" for float32 scores (max |a - b| / max |b|)
NOISY_RESNET_CONFIG = ROOT / "configs" / "digits_noisy_resnet.yaml"
log = progress("influence")


@dataclass
class Settings(CNNTraining):
    """Sizes of one run (``--quick`` / ``--smoke`` pick smaller ones); the CNN's training in ``CNNTraining``."""

    num_queries: int = 20
    tracin_train: int = 500  # train subset of the TracIn agreement
    trak_train: int = 0  # train subset of the TRAK agreement (0: the whole train split)
    trak_proj_dim: int = 2048  # projected TracIn-CP agreement
    trak_proj_dims: tuple[int, ...] = (512, 2048)  # projected TRAK agreement: below and above n_train (1437)
    damping: float = 1e-3  # relative: lambda = damping * mean(diag(X^T X)) (the package's default)
    trak_noproj_dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    throughput_proj_dim: int = 2048
    throughput_round_s: float = 3.0  # each timed round processes about this many seconds of batches
    throughput_max_batches: int = 16
    throughput_rounds: int = 5
    callback_epochs: int = 5
    callback_repeats: int = 3
    resnet_epochs: int = 5
    overhead_epochs: int = 6  # epochs of each timed fit of the in-step overhead part
    overhead_rounds: int = 5  # interleaved rounds (best of)
    overhead_warmup_epochs: int = 1  # one untimed fit of each configuration first
    overhead_auc_epochs: int | None = None  # the full run for the AUC (None: the config's max_epochs, 12)

    @classmethod
    def quick(cls) -> Settings:
        return cls(epochs=4, num_queries=8, tracin_train=192, trak_train=640, trak_proj_dim=256,
                   trak_proj_dims=(256, 1024), throughput_round_s=1.0, throughput_max_batches=4, throughput_rounds=1,
                   callback_epochs=2, callback_repeats=1, resnet_epochs=2, overhead_epochs=2, overhead_rounds=1,
                   overhead_auc_epochs=2)

    @classmethod
    def smoke(cls) -> Settings:
        return cls(epochs=2, checkpoint_every=1, num_queries=4, tracin_train=64, trak_train=128, trak_proj_dim=64,
                   trak_proj_dims=(32, 64), trak_noproj_dampings=(1e-2,), throughput_proj_dim=64,
                   throughput_round_s=0.1, throughput_max_batches=1, throughput_rounds=1, callback_epochs=1,
                   callback_repeats=1, resnet_epochs=1, overhead_epochs=1, overhead_rounds=1, overhead_auc_epochs=1)


# ----------------------------------------------------------------------------------------------------------- utils
def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (flattened)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def per_query_spearman(a: Tensor, b: Tensor) -> float:
    """Mean over query columns of the Spearman correlation of the train scores, (n_train, n_query) inputs."""
    return float(np.mean([spearman(a[:, j], b[:, j]) for j in range(a.shape[1])]))


def fit_scale(a: Tensor, b: Tensor) -> float:
    """Least-squares scalar ``s`` minimizing ``||s a - b||``."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a @ a))


def agreement(ours: Tensor, ref: Tensor) -> dict[str, float]:
    """Spearman (flattened and mean per query), max relative error, top-10 overlap of each query's proponents."""
    k = min(10, ours.shape[0])
    top_ours, top_ref = ours.topk(k, 0).indices, ref.topk(k, 0).indices
    overlap = np.mean([len(set(top_ours[:, j].tolist()) & set(top_ref[:, j].tolist())) / k
                       for j in range(ours.shape[1])])
    return dict(spearman=spearman(ours, ref), spearman_per_query=per_query_spearman(ours, ref),
                max_rel_err=max_rel_err(ours, ref), top10_overlap=float(overlap))


# ---------------------------------------------------------------------------------------------- model and data
# the projections compared; dense gets a memory cap above its matrix so it is drawn once per checkpoint (with the
# default max_memory_mb=1024 a 136586 x 2048 matrix, 1067 MiB, is redrawn on every batch; scores are the same)
PROJECTIONS = {"sketch": {}, "kronecker": {}, "dense": dict(max_memory_mb=8192)}


def default_projection(model: nn.Module, k: int) -> str:
    """What ``projection="auto"`` (the default) resolves to for this model."""
    return GradientFeaturizer(model, proj_dim=k).projection


def proj_label(projection: str, default: str) -> str:
    return f"{projection} (default)" if projection == default else projection


def train_checkpoints(data: DigitsData, s: Settings, out: Path, seed: int = 0) -> tuple[DigitsCNN, list[Checkpoint]]:
    """``train_cnn`` with a checkpoint every ``checkpoint_every`` epochs, each also saved (state dict, lr, epoch) to
    ``{out}/checkpoints``: Captum reads checkpoints by path."""
    model, ckpts = train_cnn(data.x_train, data.y_train, s, seed=seed, checkpoints=True, val=(data.x_val, data.y_val),
                             log=log)
    for ck in ckpts:
        ck.path = str(out / "checkpoints" / f"epoch-{ck.epoch:02d}.pt")
        os.makedirs(os.path.dirname(ck.path), exist_ok=True)
        torch.save({"state_dict": ck.state, "lr": ck.lr, "epoch": ck.epoch}, ck.path)
    return model, ckpts


def captum_loader(ckpts: Sequence[Checkpoint]) -> Callable[[nn.Module, str], float]:
    """Captum ``checkpoints_load_func``: load the checkpoint's state dict (kept in memory) and return its lr."""
    by_path = {ck.path: ck for ck in ckpts}

    def load(model: nn.Module, path: str) -> float:
        model.load_state_dict(by_path[path].state)
        return by_path[path].lr

    return load


# ---------------------------------------------------------------------------------------------- TracIn agreement
def ours_features(feat: GradientFeaturizer, x: Tensor, y: Tensor, key: tuple[int, ...], bs: int, factored=False):
    parts = [feat.factors(xb, yb) if factored else feat(xb, yb, key) for xb, yb in batches(x, y, bs)]
    return tuple(torch.cat(p) for p in zip(*parts)) if factored else torch.cat(parts)


def tracin_ours(s: Settings, ckpts: Sequence[Checkpoint], xt: Tensor, yt: Tensor, xq: Tensor, yq: Tensor,
                factored: bool = False, **kw: Any) -> Tensor:
    """Our TracIn-CP scores (n_train, n_query) over the checkpoints."""
    train, query = [], []
    for c, ck in enumerate(ckpts):
        model = load_cnn(ck, s.image_size)
        feat = GradientFeaturizer(model, output="cross_entropy", **kw)
        train.append(ours_features(feat, xt, yt, (c,), s.batch_size, factored))
        query.append(ours_features(feat, xq, yq, (c,), s.batch_size, factored))
    return tracin_scores(train, query, lrs=[ck.lr for ck in ckpts])


def tracin_captum(s: Settings, ckpts: Sequence[Checkpoint], xt: Tensor, yt: Tensor, xq: Tensor, yq: Tensor,
                  fast: bool = False) -> Tensor:
    """Captum ``TracInCP`` (all layers, sample-wise grads per batch) or ``TracInCPFast`` (fc2) scores
    (n_train, n_query)."""
    from captum.influence import TracInCP, TracInCPFast

    model = load_cnn(ckpts[0], s.image_size)
    loader = DataLoader(TensorDataset(xt, yt), batch_size=s.batch_size, shuffle=False)
    common = dict(train_dataset=loader, checkpoints=[ck.path for ck in ckpts],
                  checkpoints_load_func=captum_loader(ckpts), loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                  batch_size=s.batch_size)
    with quiet():
        if fast:
            tracin = TracInCPFast(model, final_fc_layer=model.fc2, **common)
        else:
            tracin = TracInCP(model, sample_wise_grads_per_batch=True, **common)
        return tracin.influence((xq, yq)).T.contiguous()


def run_tracin_agreement(s: Settings, data: DigitsData, ckpts: Sequence[Checkpoint]) -> dict:
    n = min(s.tracin_train, data.x_train.shape[0])
    xt, yt = data.x_train[:n], data.y_train[:n]
    xq, yq = data.x_val[: s.num_queries], data.y_val[: s.num_queries]
    res: dict[str, Any] = dict(n_train=n, n_query=xq.shape[0], checkpoints=len(ckpts))

    t = time.perf_counter()
    ours = tracin_ours(s, ckpts, xt, yt, xq, yq, proj_dim=None)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = tracin_captum(s, ckpts, xt, yt, xq, yq)
    t_ref = time.perf_counter() - t
    res["exact"] = dict(**agreement(ours, ref), seconds_ours=t_ours, seconds_captum=t_ref, params=num_params(
        load_cnn(ckpts[0], s.image_size)))
    log(f"TracIn exact vs Captum TracInCP: {res['exact']}")

    rows = []  # how well projected TracIn reproduces the exact scores
    default = default_projection(load_cnn(ckpts[0], s.image_size), s.trak_proj_dim)
    for projection, extra in PROJECTIONS.items():
        for seed in (0, 1):
            t = time.perf_counter()
            sk = tracin_ours(s, ckpts, xt, yt, xq, yq, proj_dim=s.trak_proj_dim, projection=projection, seed=seed,
                             **extra)
            seconds = time.perf_counter() - t
            dim = GradientFeaturizer(load_cnn(ckpts[0], s.image_size), proj_dim=s.trak_proj_dim,
                                     projection=projection).feature_dim
            rows.append(dict(projection=projection, default=projection == default, seed=seed, feature_dim=dim,
                             seconds=seconds, **agreement(sk, ours)))
            log(f"TracIn projected ({projection}, seed {seed}) vs exact: Spearman {rows[-1]['spearman']:.4f} "
                f"({seconds:.1f} s)")
    res["sketch"] = dict(proj_dim=s.trak_proj_dim, default=default, rows=rows)

    fast = tracin_captum(s, ckpts, xt, yt, xq, yq, fast=True)
    ll = tracin_ours(s, ckpts, xt, yt, xq, yq, factored=True, last_layer=True)
    w_only = tracin_ours(s, ckpts, xt, yt, xq, yq, factored=True, parameters=["fc2.weight"])
    res["last_layer"] = agreement(ll, fast)
    res["last_layer_weight_only"] = agreement(w_only, fast)
    log(f"TracIn last layer (w+b) vs TracInCPFast: {res['last_layer']}")
    log(f"TracIn last layer (weight only) vs TracInCPFast: {res['last_layer_weight_only']}")
    return res


# ------------------------------------------------------------------------------------------------ TRAK agreement
@dataclass
class TrakOut:
    """Our TRAK scores and what the comparisons with traker need."""

    scores: Tensor  # (n_train, n_query) = mean_c(K_c Phi_c^T) * mean_c(Q_c)
    blocks: list[Tensor]  # per checkpoint K_c Phi_c^T
    inv_mean_abs: list[float]  # per checkpoint mean |(X_c^T X_c + lambda I)^-1| (traker divides by it)
    q_mean: Tensor  # (n_train,) mean_c(Q_c)
    fp64: Tensor | None = None  # the same scores from the same features, X^T X and the solve in float64

    def traker_weighted(self) -> Tensor:
        """The scores with traker's checkpoint weights: ``mean_c(K_c Phi_c^T / mean|inverse_c|) * mean_c(Q_c)``
        (proportional to ours when there is one checkpoint)."""
        return sum(b / m for b, m in zip(self.blocks, self.inv_mean_abs)) / len(self.blocks) * self.q_mean[:, None]


def trak_ours(s: Settings, ckpts: Sequence[Checkpoint], xt: Tensor, yt: Tensor, xq: Tensor, yq: Tensor,
              damping: float, fp64: bool = False, **kw: Any) -> TrakOut:
    """Our TRAK: ``GradientFeaturizer(output="margin")``, ``xtx``, ``damped_inverse``, ``trak_kernel``,
    ``trak_scores``."""
    kernels, phis, qs, blocks, inv_abs, blocks64 = [], [], [], [], [], []
    for c, ck in enumerate(ckpts):
        model = load_cnn(ck, s.image_size)
        feat = GradientFeaturizer(model, output="margin", **kw)
        x_c = ours_features(feat, xt, yt, (c,), s.batch_size)
        inverse = damped_inverse(xtx(x_c), damping)
        k_c = trak_kernel(x_c, inverse)
        phi = ours_features(feat, xq, yq, (c,), s.batch_size)
        with torch.no_grad():
            q = torch.cat([out_to_loss(model(xb), yb) for xb, yb in batches(xt, yt, 512)])
        kernels.append(k_c)
        phis.append(phi)
        qs.append(q)
        blocks.append(k_c @ phi.T)
        inv_abs.append(float(inverse.abs().mean()))
        if fp64:
            x64 = x_c.double()
            gram = x64.T @ x64
            lam = damping * float(gram.diagonal().mean())
            blocks64.append(x64 @ torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                                                     phi.double().T))
    q_mean = sum(qs) / len(qs)
    ref = (sum(blocks64) / len(blocks64)) * q_mean.double()[:, None] if fp64 else None
    return TrakOut(trak_scores(kernels, phis, qs), blocks, inv_abs, q_mean, ref)


def make_traker(model: nn.Module, n_train: int, save_dir: str, proj_dim: int | None, seed: int = 0,
                grad_wrt: Sequence[str] | None = None, projector: Any = None):
    """A ``trak.TRAKer`` on CPU in fp32; ``proj_dim=None``: ``NoOpProjector`` (exact gradients)."""
    from trak import TRAKer
    from trak.projectors import NoOpProjector

    if proj_dim is None:
        projector = NoOpProjector(device="cpu")
    with quiet():
        return TRAKer(model=model, task="image_classification", train_set_size=n_train, save_dir=save_dir,
                      load_from_save_dir=True, device="cpu", projector=projector, proj_dim=proj_dim or 0,
                      use_half_precision=False, projector_seed=seed, grad_wrt=list(grad_wrt) if grad_wrt else None,
                      logging_level=logging.ERROR)


def trak_traker(s: Settings, ckpts: Sequence[Checkpoint], xt: Tensor, yt: Tensor, xq: Tensor, yq: Tensor,
                dampings: Sequence[float], save_dir: str, proj_dim: int | None, seed: int = 0,
                grad_wrt: Sequence[str] | None = None, projector: Any = None) -> dict[float, dict[str, Any]]:
    """``traker`` scores (n_train, n_query) for each relative damping, over all checkpoints (``"all"``) and the last
    one only (``"last"``), from one featurization.

    ``lambda_reg`` is set per checkpoint to ``damping * mean(diag(X^T X))`` of traker's own features (the same
    relative, hence absolute, damping as ours) and each checkpoint is finalized on its own.
    """
    model = load_cnn(ckpts[0], s.image_size)
    traker = make_traker(model, xt.shape[0], save_dir, proj_dim, seed, grad_wrt, projector)
    out: dict[float, dict[str, Any]] = {}
    with quiet():
        for c, ck in enumerate(ckpts):
            traker.load_checkpoint(ck.state, model_id=c)
            for xb, yb in batches(xt, yt, s.batch_size):
                traker.featurize(batch=(xb, yb), num_samples=xb.shape[0])
        diag_means = []
        for c in range(len(ckpts)):
            traker.saver.load_current_store(c)
            g = torch.as_tensor(np.asarray(traker.saver.current_store["grads"]), dtype=torch.float64)
            diag_means.append(float(g.pow(2).sum(0).mean()))
        for i, damping in enumerate(dampings):
            for c in range(len(ckpts)):
                traker.saver.model_ids[c]["is_finalized"] = 0  # re-finalize with this checkpoint's lambda
                traker.score_computer.lambda_reg = damping * diag_means[c]
                if not getattr(traker.projector, "proj_matrix_available", True):
                    # traker bug: finalize_features() calls projector.free_memory(), whose `del self.proj_matrix`
                    # raises AttributeError on a second call; give it something to delete
                    traker.projector.proj_matrix = torch.empty(0)
                traker.finalize_features(model_ids=[c])
            exp = f"queries_{i}"
            if hasattr(traker.projector, "model_id"):
                # traker bug: after free_memory() a one-block BasicProjector only regenerates its matrix when the
                # model id changes; force it
                traker.projector.model_id = -1
            for c, ck in enumerate(ckpts):
                traker.start_scoring_checkpoint(exp_name=exp, checkpoint=ck.state, model_id=c, num_targets=xq.shape[0])
                traker.score(batch=(xq, yq), num_samples=xq.shape[0])
            every = torch.as_tensor(np.array(traker.finalize_scores(exp_name=exp))).float()
            last = torch.as_tensor(np.array(traker.finalize_scores(exp_name=exp, model_ids=[len(ckpts) - 1]))).float()
            out[damping] = dict(all=every, last=last, lambdas=[damping * d for d in diag_means])
    return out


def run_trak_agreement(s: Settings, data: DigitsData, ckpts: Sequence[Checkpoint], out: Path) -> dict:
    n = s.trak_train or data.x_train.shape[0]
    xt, yt = data.x_train[:n], data.y_train[:n]
    xq, yq = data.x_val[: s.num_queries], data.y_val[: s.num_queries]
    res: dict[str, Any] = dict(n_train=n, n_query=xq.shape[0], damping=s.damping)
    tmp = Path(tempfile.mkdtemp(prefix="traker-", dir=out))
    try:
        # (a) no projection, classifier layer only: ours and traker against a float64 solve from our features.
        # One checkpoint: traker = ours / (p * mean|inverse|), one scalar. Several: traker weights checkpoint c by
        # 1 / mean|inverse_c|, so ours re-weighted the same way must match after one scalar too.
        names = ["fc2.weight", "fc2.bias"]
        params = sum(load_cnn(ckpts[0], s.image_size).get_parameter(nm).numel() for nm in names)
        t = time.perf_counter()
        refs = trak_traker(s, ckpts, xt, yt, xq, yq, s.trak_noproj_dampings, str(tmp / "noproj"), None, grad_wrt=names)
        res["noproj_seconds_traker"] = time.perf_counter() - t
        rows = []
        for damping in s.trak_noproj_dampings:
            for cks, which in ((ckpts[-1:], "last"), (ckpts, "all")):
                ours = trak_ours(s, cks, xt, yt, xq, yq, damping, fp64=True, parameters=names, proj_dim=None)
                ref = refs[damping][which]
                reweighted = ours.traker_weighted()
                scale = fit_scale(reweighted, ref)
                scale64 = fit_scale(ours.fp64, ref)
                row = dict(damping=damping, checkpoints=len(cks), params=params, traker_lambda=refs[damping]["lambdas"],
                           ours_vs_fp64=max_rel_err(ours.scores, ours.fp64),
                           traker_vs_fp64_after_scale=max_rel_err(scale64 * ours.fp64, ref) if len(cks) == 1 else None,
                           ours_vs_traker_after_scale=max_rel_err(scale * reweighted, ref), scale=scale,
                           spearman_reweighted=spearman(reweighted, ref),
                           **{f"plain_{k}": v for k, v in agreement(ours.scores, ref).items()})
                rows.append(row)
                log(f"TRAK no projection, damping {damping:g}, {len(cks)} checkpoint(s): ours vs fp64 "
                    f"{row['ours_vs_fp64']:.2e}, traker vs fp64 {row['traker_vs_fp64_after_scale']}, ours (re-weighted)"
                    f" vs traker {row['ours_vs_traker_after_scale']:.2e}, Spearman {row['plain_spearman']:.4f}")
        res["noproj"] = rows

        # (b) projected, all parameters, every checkpoint, k below and above n: ours (sketch = default, Kronecker,
        # dense) and traker, each against the other, against a second seed, and against exact (unprojected) TRAK
        res["proj"] = run_trak_projected(s, ckpts, xt, yt, xq, yq, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def trak_exact(s: Settings, ckpts: Sequence[Checkpoint], xt: Tensor, yt: Tensor, xq: Tensor, yq: Tensor,
               damping: float, ks: Sequence[int]) -> dict[int, Tensor]:
    """Exact TRAK on all parameters (no projection) by the push-through identity
    ``X (X^T X + lambda I)^-1 Phi^T = (X X^T + lambda I)^-1 X Phi^T`` (an n x n solve in float64), for each k in
    ``ks`` with ``lambda = damping * ||X||_F^2 / k``: the absolute damping a k-dimensional sketch gets
    (E ||P x||^2 = ||x||^2)."""
    blocks: dict[int, list[Tensor]] = {k: [] for k in ks}
    qs = []
    for c, ck in enumerate(ckpts):
        model = load_cnn(ck, s.image_size)
        feat = GradientFeaturizer(model, output="margin", proj_dim=None)
        x_c = ours_features(feat, xt, yt, (c,), s.batch_size)
        phi = ours_features(feat, xq, yq, (c,), s.batch_size)
        gram, cross = (x_c @ x_c.T).double(), (x_c @ phi.T).double()
        del x_c
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        for k in ks:
            lam = damping * float(gram.diagonal().sum()) / k
            blocks[k].append(torch.linalg.solve(gram + lam * eye, cross))
        with torch.no_grad():
            qs.append(torch.cat([out_to_loss(model(xb), yb) for xb, yb in batches(xt, yt, 512)]))
    q = (sum(qs) / len(qs)).double()[:, None]
    return {k: ((sum(b) / len(b)) * q).float() for k, b in blocks.items()}


def run_trak_projected(s: Settings, ckpts: Sequence[Checkpoint], xt: Tensor, yt: Tensor, xq: Tensor, yq: Tensor,
                       tmp: Path) -> dict:
    """For each k: ours (every projection, seeds 0 and 1), traker (seed 0) and exact TRAK, compared pairwise."""
    from trak.projectors import BasicProjector, ProjectionType

    dmp, p = s.damping, num_params(load_cnn(ckpts[0], s.image_size))
    default = default_projection(load_cnn(ckpts[0], s.image_size), max(s.trak_proj_dims))
    t = time.perf_counter()
    exact = trak_exact(s, ckpts, xt, yt, xq, yq, dmp, s.trak_proj_dims)
    exact_seconds = time.perf_counter() - t
    log(f"TRAK projected: exact reference done ({exact_seconds:.1f} s)")
    per_k = []
    for k in s.trak_proj_dims:
        scores: dict[str, Tensor] = {"exact": exact[k]}
        seconds: dict[str, float] = {}
        reweighted: dict[str, float] = {}
        dims: dict[str, int] = {}
        for projection, extra in PROJECTIONS.items():
            name = f"ours {projection}"
            dims[projection] = GradientFeaturizer(load_cnn(ckpts[0], s.image_size), proj_dim=k, projection=projection).feature_dim
            for seed in (0, 1):
                t = time.perf_counter()
                out = trak_ours(s, ckpts, xt, yt, xq, yq, dmp, proj_dim=k, projection=projection, seed=seed, **extra)
                seconds[f"{name} seed {seed}"] = time.perf_counter() - t
                scores[f"{name} seed {seed}"] = out.scores
                if seed == 0:
                    reweighted[name] = out.traker_weighted()
                log(f"TRAK projected k={k}: {name} seed {seed} done ({seconds[f'{name} seed {seed}']:.1f} s)")
        with quiet():  # traker's own CPU projector (Gaussian), as one block so the matrix is drawn once per checkpoint
            projector = BasicProjector(grad_dim=p, proj_dim=k, seed=0, proj_type=ProjectionType.normal, device="cpu",
                                       block_size=k, dtype=torch.float32)
        t = time.perf_counter()
        scores["traker seed 0"] = trak_traker(s, ckpts, xt, yt, xq, yq, [dmp], str(tmp / f"proj-{k}"), k,
                                              projector=projector)[dmp]["all"]
        seconds["traker seed 0"] = time.perf_counter() - t
        log(f"TRAK projected k={k}: traker done ({seconds['traker seed 0']:.1f} s)")
        pairs = [(f"ours {pr} seed 0", "traker seed 0") for pr in PROJECTIONS]
        pairs += [(f"ours {pr} seed 0", f"ours {pr} seed 1") for pr in PROJECTIONS]  # noise floor
        pairs += [(f"ours {pr} seed {sd}", "exact") for pr in PROJECTIONS for sd in (0, 1)]
        pairs += [("traker seed 0", "exact")]
        rows = [dict(a=a, b=b, **agreement(scores[a], scores[b])) for a, b in pairs]
        for row in rows:
            log(f"TRAK projected k={k}: {row['a']} vs {row['b']}: Spearman {row['spearman']:.4f}")
        per_k.append(dict(proj_dim=k, feature_dims=dims, rows=rows, seconds=seconds,
                          spearman_default_vs_traker=rows[list(PROJECTIONS).index(default)]["spearman"],
                          spearman_reweighted_vs_traker={n: spearman(r, scores["traker seed 0"])
                                                         for n, r in reweighted.items()}))
    return dict(proj_dims=list(s.trak_proj_dims), default=default, checkpoints=len(ckpts), damping=dmp, params=p,
                n_train=xt.shape[0], exact_seconds=exact_seconds, per_k=per_k)


# ---------------------------------------------------------------------------------------------------- throughput
@dataclass
class Job(Timed):
    """One timed workload: ``run(n)`` processes the first ``n`` batches of the pass (``before`` runs untimed);
    ``time_once()`` times ``batches`` batches and records the seconds."""

    method: str
    note: str
    run: Callable[[int], Any]
    before: Callable[[], None] | None = None
    batches: int = 1

    def seconds_for(self, n: int) -> float:
        if self.before is not None:
            self.before()
        return timed(lambda: self.run(n))[1]

    def time_once(self) -> float:
        self.seconds.append(self.seconds_for(self.batches))
        return self.seconds[-1]


def throughput_jobs(s: Settings, model: nn.Module, ck: Checkpoint, data: DigitsData, bs: int, tmp: Path) -> list[Job]:
    """The workloads, all on the same model, checkpoint, data, batch size and projection size."""
    from captum.influence import TracInCP
    from trak.projectors import BasicProjector, ProjectionType

    k = s.throughput_proj_dim
    data_batches = batches(data.x_train, data.y_train, bs)
    jobs = []

    def plain(n: int) -> None:
        for xb, yb in data_batches[:n]:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    jobs.append(Job("plain forward+backward", "summed CE loss, batched (the limit)", plain))

    def ours(output: str, with_q: bool, **kw: Any) -> Callable[[int], None]:
        feat = GradientFeaturizer(model, output=output, **kw)

        def run(n: int) -> None:
            for xb, yb in data_batches[:n]:
                feat(xb, yb, key=(0,))
                if with_q:
                    with torch.no_grad():
                        out_to_loss(model(xb), yb)

        return run

    default = default_projection(model, k)
    tag = {pr: " [default: projection='auto']" if pr == default else "" for pr in ("sketch", "kronecker", "dense")}
    kron_dim = GradientFeaturizer(model, proj_dim=k, projection="kronecker").feature_dim
    jobs.append(Job("ours sketch", f"CE-gradient features, count sketch k={k} (the TracIn callback's pass with "
                    f"projection){tag['sketch']}", ours("cross_entropy", False, proj_dim=k, projection="sketch")))
    jobs.append(Job("ours sketch + Q", f"margin-gradient features, count sketch k={k} + Q = 1 - p_y (a TRAK "
                    f"featurize){tag['sketch']}", ours("margin", True, proj_dim=k, projection="sketch")))
    jobs.append(Job("ours kronecker", f"CE-gradient features, Kronecker k={kron_dim}{tag['kronecker']}",
                    ours("cross_entropy", False, proj_dim=k, projection="kronecker")))
    jobs.append(Job("ours kronecker + Q", f"margin-gradient features, Kronecker k={kron_dim} + Q{tag['kronecker']}",
                    ours("margin", True, proj_dim=k, projection="kronecker")))
    mib = num_params(model) * k * 4 / 2**20
    jobs.append(Job("ours dense + Q", f"margin-gradient features, dense k={k} + Q; the matrix ({mib:.0f} MiB) is "
                    f"{'kept' if mib <= 1024 else 'over max_memory_mb=1024 (default), so redrawn every batch'}",
                    ours("margin", True, proj_dim=k, projection="dense")))
    jobs.append(Job("ours dense + Q (cached)", f"as above with max_memory_mb=8192: the matrix ({mib:.0f} MiB) is "
                    "drawn once (in the warm-up) and kept", ours("margin", True, proj_dim=k, projection="dense",
                                                                 max_memory_mb=8192)))
    exact = GradientFeaturizer(model, output="cross_entropy", proj_dim=None)
    jobs.append(Job("ours exact features", f"flat per-example CE gradients (B, {exact.num_params})",
                    ours("cross_entropy", False, proj_dim=None)))

    def ours_sq_norms(n: int) -> None:
        for xb, yb in data_batches[:n]:
            exact.sq_norms(xb, yb)

    jobs.append(Job("ours exact self-influence", "`sq_norms`: squared per-example gradient norms", ours_sq_norms))

    def traker_job(name: str, note: str, projector: Any = None) -> Job:
        traker = make_traker(model, data.x_train.shape[0], str(tmp / name.replace(" ", "_")), k, projector=projector)
        with quiet():
            traker.load_checkpoint(ck.state, model_id=0)

        def reset() -> None:
            traker.saver.current_store["is_featurized"][:] = 0

        def run(n: int) -> None:
            with quiet():
                for i, (xb, yb) in enumerate(data_batches[:n]):
                    traker.featurize(batch=(xb, yb), inds=np.arange(i * bs, i * bs + xb.shape[0]))

        return Job(name, note, run, before=reset)

    jobs.append(traker_job("traker featurize", f"default on CPU: BasicProjector, Gaussian, k={k} in blocks of 100 "
                           "columns redrawn every batch; vmap gradients + projection + Q + mmap store"))
    with quiet():
        single = BasicProjector(grad_dim=num_params(model), proj_dim=k, seed=0, proj_type=ProjectionType.normal,
                                device="cpu", block_size=k, dtype=torch.float32)
    jobs.append(traker_job("traker featurize (1 block)", f"BasicProjector(block_size={k}): the matrix "
                           f"({num_params(model) * k * 4 / 2**30:.1f} GiB) drawn once; otherwise as above", single))

    loader_cache: dict[int, DataLoader] = {}

    def loader(n: int) -> DataLoader:
        if n not in loader_cache:
            m = min(n * bs, data.x_train.shape[0])
            loader_cache[n] = DataLoader(TensorDataset(data.x_train[:m], data.y_train[:m]), batch_size=bs)
        return loader_cache[n]

    with quiet():
        captum = TracInCP(model, loader(1), checkpoints=[ck.path], checkpoints_load_func=captum_loader([ck]),
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=bs, sample_wise_grads_per_batch=True)

    def captum_self(n: int) -> None:
        with quiet():
            captum.self_influence(loader(n), show_progress=False)

    def captum_features(n: int) -> None:
        with quiet():
            captum.compute_intermediate_quantities(loader(n))

    jobs.append(Job("Captum TracInCP self_influence", "1 checkpoint (state dict from memory); per-layer per-example "
                    "gradients via hooks, squared norms", captum_self))
    jobs.append(Job("Captum TracInCP compute_intermediate_quantities", "1 checkpoint; per-example gradients "
                    "flattened and concatenated (B, #params), times lr", captum_features))
    return jobs


CAPTUM_FASTEST = "Captum TracInCP (fastest)"  # the faster of its self_influence / compute_intermediate_quantities
RATIOS = {  # name: (numerator, denominator)
    "ours sketch + Q / traker featurize": ("ours sketch + Q", "traker featurize"),
    "ours sketch + Q / traker featurize (1 block)": ("ours sketch + Q", "traker featurize (1 block)"),
    "ours kronecker + Q / traker featurize": ("ours kronecker + Q", "traker featurize"),
    "ours kronecker + Q / traker featurize (1 block)": ("ours kronecker + Q", "traker featurize (1 block)"),
    "ours dense + Q / traker featurize": ("ours dense + Q", "traker featurize"),
    "ours dense + Q (cached) / traker featurize": ("ours dense + Q (cached)", "traker featurize"),
    "ours sketch / Captum TracInCP (fastest)": ("ours sketch", CAPTUM_FASTEST),
    "ours kronecker / Captum TracInCP (fastest)": ("ours kronecker", CAPTUM_FASTEST),
    "ours exact self-influence / Captum self_influence": (
        "ours exact self-influence", "Captum TracInCP self_influence"),
    "ours exact features / Captum compute_intermediate_quantities": (
        "ours exact features", "Captum TracInCP compute_intermediate_quantities"),
    "ours sketch / plain fwd+bwd": ("ours sketch", "plain forward+backward"),
    "ours sketch + Q / plain fwd+bwd": ("ours sketch + Q", "plain forward+backward"),
    "ours kronecker / plain fwd+bwd": ("ours kronecker", "plain forward+backward"),
    "ours kronecker + Q / plain fwd+bwd": ("ours kronecker + Q", "plain forward+backward"),
    "ours exact features / plain fwd+bwd": ("ours exact features", "plain forward+backward"),
    "ours exact self-influence / plain fwd+bwd": ("ours exact self-influence", "plain forward+backward"),
}


def run_throughput(s: Settings, data: DigitsData, ckpts: Sequence[Checkpoint], out: Path) -> dict:
    ck = ckpts[-1]
    model = load_cnn(ck, s.image_size)
    bs = s.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="traker-tp-", dir=out))
    try:
        jobs = throughput_jobs(s, model, ck, data, bs, tmp)
        max_batches = min(s.throughput_max_batches, math.ceil(data.x_train.shape[0] / bs))
        for job in jobs:  # warm-up (untimed) sizes each job's round to about `throughput_round_s` seconds
            job.seconds_for(1)
            t1 = job.seconds_for(1)
            job.batches = int(min(max_batches, max(1, round(s.throughput_round_s / max(t1, 1e-6)))))
            log(f"warm-up {job.method}: {bs / t1:.0f} ex/s on one batch -> {job.batches} batches per round")
        run_rounds(jobs, s.throughput_rounds, log, "throughput ")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for job in jobs:
        n = min(job.batches * bs, data.x_train.shape[0])
        rows.append(dict(method=job.method, note=job.note, examples=n, batch_size=bs, rounds=len(job.seconds),
                         seconds=job.best, median_seconds=job.median, examples_per_s=n / job.best))
    by = {r["method"]: r["examples_per_s"] for r in rows}
    by[CAPTUM_FASTEST] = max(v for m, v in by.items() if m.startswith("Captum TracInCP"))
    ratios = {name: by[num] / by[den] for name, (num, den) in RATIOS.items()}
    for name, v in ratios.items():
        log(f"ratio {name}: {v:.2f}")
    return dict(proj_dim=s.throughput_proj_dim, params=num_params(model), checkpoint=ck.epoch, rows=rows, ratios=ratios,
                default=default_projection(model, s.throughput_proj_dim))


# ----------------------------------------------------------------------------------------------- callback overhead
class TimedTracIn(TracIn):
    """TracIn that records the wall time of each attribution pass (storage and logging included)."""

    pass_seconds: list[float]

    def run_pass(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start = time.perf_counter()
        super().run_pass(trainer, pl_module)
        self.pass_seconds = getattr(self, "pass_seconds", []) + [time.perf_counter() - start]


class LitCNN(L.LightningModule):
    """A plain LightningModule around ``DigitsCNN``: cross-entropy, torch SGD (momentum 0.9), no validation."""

    def __init__(self, image_size: int, lr: float) -> None:
        super().__init__()
        self.model, self.lr = DigitsCNN(image_size), lr

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return F.cross_entropy(self.model(batch["image"]), batch["label"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer_fit(make_module: Callable[[], L.LightningModule], datamodule: L.LightningDataModule,
                callbacks: Sequence[L.Callback], epochs: int, root: Path, seed: int = 0
                ) -> tuple[float, dict[str, Tensor], L.LightningModule]:
    """Seed everything, build the module and fit it for ``epochs`` epochs on the CPU without logger, checkpoints,
    progress bar or model summary. Returns the seconds of ``trainer.fit`` alone, the final weights and the module."""
    gc.collect()  # not inside the timing: garbage of earlier fits
    L.seed_everything(seed, verbose=False)
    module = make_module()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        default_root_dir=str(root))
    _, seconds = timed(lambda: trainer.fit(module, datamodule=datamodule))
    return seconds, {k: v.detach().clone() for k, v in module.state_dict().items()}, module


def weight_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[bool, float]:
    """(bit-identical, max |a - b| over the floating tensors) of two state dicts."""
    same = all(torch.equal(a[k], b[k]) for k in a)
    diff = max([0.0] + [float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()])
    return same, diff


def pass_floor(module: nn.Module, dataset: Any, batch_size: int) -> tuple[float, float]:
    """Best of 3: seconds to read ``dataset`` once through an unshuffled DataLoader (a cost the callback's input cache
    pays only on the first pass), and of one eval forward over it without grad (the floor of a pass)."""
    loading, forward = [], []
    module.eval()
    for _ in range(3):
        loaded, t = timed(lambda: list(DataLoader(dataset, batch_size=batch_size)))
        loading.append(t)
        with torch.no_grad():
            forward.append(timed(lambda: [module(b["image"]) for b in loaded])[1])
    return min(loading), min(forward)


def callback_setups(s: Settings) -> dict[str, dict]:
    """(a) ``cnn`` and (b) ``resnet`` of the callback overhead part."""
    return {
        "cnn": dict(
            module=lambda: LitCNN(s.image_size, s.lr), channels=1, epochs=s.callback_epochs,
            callback=dict(every_n_epochs=1, last_layer=True, proj_dim=None, progress_bar=False, num_queries=0),
            description=f"LightningModule around DigitsCNN (plain torch SGD, no validation), 1x{s.image_size}x"
                        f"{s.image_size}; TracIn(last_layer=True, proj_dim=None, every_n_epochs=1, num_queries=0)"),
        "resnet": dict(
            module=lambda: Classifier("resnet18", model_kwargs=dict(channels=[16, 32, 64, 128], layers=[1, 1, 1, 1],
                                                                    stem_width=16), image_size=32, mask_prob=0.0),
            channels=3, epochs=s.resnet_epochs,
            callback=dict(every_n_epochs=1, last_layer=True, num_queries=0, progress_bar=False),
            description="lightning_attr.Classifier('resnet18', model_kwargs=dict(channels=[16, 32, 64, 128], "
                        "layers=[1, 1, 1, 1], stem_width=16), image_size=32, mask_prob=0.0) on ImageDataModule("
                        "'digits', image_size=32, batch_size=64) (AdamW + cosine, validation every epoch); "
                        "TracIn(last_layer=True, every_n_epochs=1, num_queries=0, progress_bar=False)"),
    }


def run_callback_overhead(s: Settings, out: Path) -> dict:
    """(a) ``cnn``: a plain LightningModule around ``DigitsCNN``, ``TracIn(last_layer=True, proj_dim=None)``;
    (b) ``resnet``: ``lightning_attr.Classifier`` with a small timm ResNet-18 on 3x32x32 digits (validation every
    epoch, AdamW + cosine), ``TracIn(last_layer=True)`` with its defaults otherwise. Both with ``every_n_epochs=1``,
    fitted with and without the callback from the same seed, runs interleaved, best and median kept."""
    shutil.rmtree(out / "callback", ignore_errors=True)  # no stale files from an earlier run
    return {name: callback_overhead(s, name, setup, out / "callback" / name)
            for name, setup in callback_setups(s).items()}


def callback_overhead(s: Settings, name: str, setup: dict, root: Path) -> dict:
    """One set-up fitted without and with ``TimedTracIn`` (a fresh datamodule each fit), ``callback_repeats``
    interleaved pairs after one warm-up fit."""

    def fit(with_callback: bool, run: int) -> tuple[float, dict[str, Tensor], dict, Any]:
        dm = ImageDataModule("digits", image_size=32 if setup["channels"] == 3 else s.image_size,
                             channels=setup["channels"], batch_size=s.batch_size)
        cbs = [TimedTracIn(dirpath=str(root / f"tracin-{run}"), **setup["callback"])] if with_callback else []
        seconds, state, module = trainer_fit(setup["module"], dm, cbs, setup["epochs"], root)
        info = {}
        if cbs:
            cb, featurizer = cbs[0], cbs[0].attribution.featurizer
            info = dict(passes=len(cb.records), n_train=cb.attribution.n_train, pass_seconds=cb.pass_seconds,
                        self_influence_mean=float(cb.self_influence.mean()),
                        projection=featurizer.projection, selected_params=featurizer.num_params)
        return seconds, state, info, (module, dm)

    times: dict[bool, list[float]] = {False: [], True: []}
    identical, max_diff, info = True, 0.0, {}
    with quiet():
        _, _, _, (module, dm) = fit(False, -1)  # warm-up (imports, data, first-touch allocations)
        for r in range(s.callback_repeats):
            states = {}
            for flag in (False, True):
                sec, states[flag], inf, _ = fit(flag, r)
                times[flag].append(sec)
                info = inf or info
                log(f"callback overhead ({name}): fit {'with' if flag else 'without'} TracIn, run {r + 1}: {sec:.2f} s")
            same, diff = weight_diff(states[False], states[True])
            identical, max_diff = identical and same, max(max_diff, diff)
        loading, forward = pass_floor(module, dm.splits["train"], s.batch_size)
    off, on = Timed(seconds=times[False]), Timed(seconds=times[True])
    epoch = off.best / setup["epochs"]
    res = dict(description=setup["description"], epochs=setup["epochs"], repeats=s.callback_repeats,
               params=num_params(module), seconds_without=off.seconds, seconds_with=on.seconds,
               overhead_pct=100 * (on.best - off.best) / off.best,
               overhead_pct_median=100 * (on.median - off.median) / off.median,
               bit_identical=bool(identical), max_abs_weight_diff=max_diff, callback=info,
               train_split_read_seconds=loading, train_split_forward_seconds=forward,
               epoch_seconds=epoch, passes_seconds=sum(info["pass_seconds"]),
               outside_passes_seconds=on.best - off.best - sum(info["pass_seconds"]),
               # a pass needs at least one forward over the train split: its share of an epoch
               forward_floor_pct=100 * forward / epoch)
    log(f"callback overhead ({name}): {res['overhead_pct']:.1f} % (best), {res['overhead_pct_median']:.1f} % "
        f"(median); bit-identical {identical}")
    return res


# ------------------------------------------------------------------------------ in-step TracIn overhead (issue 9)
OVERHEAD_BASE = "no callback"
OVERHEAD_CONFIGS: dict[str, dict[str, Any] | None] = {  # name: TracIn arguments (None: no callback)
    OVERHEAD_BASE: None,
    "in-step, last layer": dict(in_step=True, last_layer=True, num_queries=0),
    "in-step, last layer, 8 queries": dict(in_step=True, last_layer=True),  # num_queries=8 (default): val split
    "in-step, Linear + Conv2d": dict(in_step=True, module_types=["Linear", "Conv2d"], num_queries=0),
    "passes, last layer, every epoch": dict(last_layer=True, num_queries=0),
    "passes, last layer, every 3 epochs": dict(last_layer=True, num_queries=0, every_n_epochs=3),
}


def noisy_resnet_config(path: Path = NOISY_RESNET_CONFIG) -> tuple[dict, dict, int, int]:
    """``(Classifier init_args, ImageDataModule init_args, seed_everything, trainer max_epochs)`` of the config."""
    import yaml

    cfg = yaml.safe_load(path.read_text())
    model, data = cfg["model"], cfg["data"]
    if (model["class_path"], data["class_path"]) != ("lightning_attr.Classifier", "lightning_attr.ImageDataModule"):
        raise ValueError(f"{path} no longer configures a Classifier on an ImageDataModule; update this benchmark.")
    return (dict(model["init_args"]), dict(data["init_args"]), int(cfg.get("seed_everything", 0)),
            int(cfg["trainer"]["max_epochs"]))


TIMED_HOOKS = ("setup", "on_train_start", "on_train_batch_start", "on_after_backward", "on_train_batch_end",
               "on_train_epoch_end", "on_train_end")


def time_hooks(cb: Any) -> dict[str, float]:
    """Wrap the callback's training hooks so the seconds spent inside them add up in the returned dict (the forward
    and tensor hooks in-step TracIn places on the selected layers are not counted: they only keep references)."""
    spent = {"seconds": 0.0}
    for name in TIMED_HOOKS:
        hook = getattr(cb, name)

        def timed(*args: Any, _hook: Any = hook, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _hook(*args, **kwargs)
            finally:
                spent["seconds"] += time.perf_counter() - start

        setattr(cb, name, timed)
    return spent


@dataclass
class OverheadRun(Timed):
    """One configuration: ``time_once()`` fits a fresh ``Classifier(**model_args)`` from ``seed`` for ``epochs``
    epochs on the shared datamodule with a fresh ``TracIn(**callback)`` (None: without) and records the seconds of
    ``trainer.fit``, the final weights and the noisy-label AUC of the callback's ``self_influence``."""

    name: str
    callback: dict[str, Any] | None
    model_args: dict[str, Any]
    dm: ImageDataModule
    seed: int
    epochs: int
    root: Path
    states: list[dict[str, Tensor]] = field(default_factory=list)
    aucs: list[float] = field(default_factory=list)
    hook_seconds: list[float] = field(default_factory=list)  # time spent inside the callback's hooks per timed run
    last: Any = None  # the callback of the last timed run

    def fit(self, epochs: int, tag: str) -> tuple[float, dict[str, Tensor], Any]:
        cb = None if self.callback is None else TracIn(dirpath=str(self.root / tag), progress_bar=False,
                                                        **self.callback)
        spent = time_hooks(cb) if cb is not None else {"seconds": 0.0}
        seconds, state, _ = trainer_fit(lambda: Classifier(**self.model_args), self.dm, [cb] if cb else [], epochs,
                                        self.root / tag, self.seed)
        if tag.startswith("run-"):
            self.hook_seconds.append(spent["seconds"])
        return seconds, state, cb

    def auc(self, cb: Any) -> float | None:
        """Noisy-label AUC of ``cb.self_influence``; None without callback or before its first pass."""
        if cb is None or cb.attribution is None or cb.attribution.grouping is None:
            return None
        return float(noisy_label_auc(cb.self_influence, self.dm.noisy_mask))

    def time_once(self) -> float:
        seconds, state, cb = self.fit(self.epochs, f"run-{len(self.seconds)}")
        self.seconds.append(seconds)
        self.states.append(state)
        self.last = cb
        self.aucs.append(self.auc(cb))
        log(f"overhead: {self.name}: {seconds:.2f} s")
        return seconds


def run_in_step_overhead(s: Settings, out: Path) -> dict:
    """The configurations of ``OVERHEAD_CONFIGS`` on the digits ResNet of ``configs/digits_noisy_resnet.yaml``: a
    warm-up fit each, ``overhead_rounds`` interleaved timed rounds, then one ``overhead_auc_epochs``-epoch fit of the
    baseline and of each in-step configuration (noisy-label AUC, bit-identical weights at the config's length)."""
    model_args, data_args, seed, max_epochs = noisy_resnet_config()
    full_epochs = s.overhead_auc_epochs or max_epochs
    root = out / "overhead"
    shutil.rmtree(root, ignore_errors=True)  # no stale files from an earlier run
    dm = ImageDataModule(**data_args)
    dm.setup()  # dataset preparation once, outside every timing
    runs = [OverheadRun(name, cb, model_args, dm, seed, s.overhead_epochs, root / f"config-{i}")
            for i, (name, cb) in enumerate(OVERHEAD_CONFIGS.items())]
    with quiet():
        for run in runs:
            run.fit(s.overhead_warmup_epochs, "warm-up")
        log(f"overhead: warm-up done ({s.overhead_warmup_epochs} epoch(s) per configuration)")
        run_rounds(runs, s.overhead_rounds, log, "overhead ")
        full = {}
        for run in runs:
            if run.callback is None or run.callback.get("in_step"):
                seconds, state, cb = run.fit(full_epochs, "full")
                full[run.name] = dict(seconds=seconds, state=state, auc=run.auc(cb))
                log(f"overhead: {run.name}, {full_epochs} epochs: {seconds:.1f} s, AUC {run.auc(cb)}")
    summary = overhead_summary(s, runs, full, dm)
    return dict(config=str(NOISY_RESNET_CONFIG.relative_to(ROOT)), model=model_args, data=data_args, seed=seed,
                params=num_params(Classifier(**model_args)), config_max_epochs=max_epochs, full_epochs=full_epochs,
                **summary)


def overhead_summary(s: Settings, runs: Sequence[OverheadRun], full: dict[str, dict], dm: ImageDataModule) -> dict:
    """Per configuration: runs, best / median, overhead vs no callback, bit-identity, callback facts, AUCs."""
    base = next(r for r in runs if r.callback is None)
    rows = []
    for run in runs:
        same = [weight_diff(base.states[i], st) for i, st in enumerate(run.states)]
        featurizer = run.last.attribution.featurizer if run.last is not None else None
        row = dict(name=run.name, callback=run.callback, seconds=run.seconds, best=run.best, median=run.median,
                   ratio=run.best / base.best, overhead_pct=100 * (run.best / base.best - 1),
                   overhead_pct_median=100 * (run.median / base.median - 1),
                   bit_identical=all(b for b, _ in same), max_abs_weight_diff=max(d for _, d in same),
                   hook_pct=100 * float(np.median(run.hook_seconds)) / base.median if run.hook_seconds else 0.0,
                   selected_params=featurizer.num_params if featurizer else None,
                   selected_tensors=len(featurizer.params) if featurizer else None,
                   passes=len(run.last.records) if run.last is not None else None,
                   auc=run.aucs[-1] if run.aucs else None)
        if run.name in full and run.callback is not None:
            same_full, diff_full = weight_diff(full[OVERHEAD_BASE]["state"], full[run.name]["state"])
            row.update(full_seconds=full[run.name]["seconds"], full_auc=full[run.name]["auc"],
                       full_bit_identical=same_full, full_max_abs_weight_diff=diff_full)
        rows.append(row)
        log(f"overhead: {run.name}: best {run.best:.2f} s, overhead {row['overhead_pct']:.1f} %, "
            f"bit-identical {row['bit_identical']}, AUC {row['auc']}")
    return dict(epochs=s.overhead_epochs, rounds=s.overhead_rounds, warmup_epochs=s.overhead_warmup_epochs,
                full_baseline_seconds=full[OVERHEAD_BASE]["seconds"], n_train=len(dm.splits["train"]),
                n_noisy=int(dm.noisy_mask.sum()), rows=rows)


# --------------------------------------------------------------------------------------------------------- report
def verdicts(r: dict) -> list[dict]:
    """Each target with the measured value and whether it is met."""
    out = []

    def add(name: str, value: float | None, target: float, higher: bool = True) -> None:
        if value is None:
            return
        met = value >= target if higher else value <= target
        out.append(dict(target=name, value=value, goal=f"{'>=' if higher else '<='} {target:g}", met=bool(met)))

    ag = r.get("tracin")
    if ag:
        add("TracIn exact vs Captum TracInCP: Spearman", ag["exact"]["spearman"], TARGETS["tracin_spearman"])
    tk = r.get("trak")
    if tk:
        for row in tk["noproj"]:
            if row["checkpoints"] == 1:
                add(f"TRAK no projection (1 checkpoint, damping {row['damping']:g}) vs traker: max rel err after one "
                    "scalar", row["ours_vs_traker_after_scale"], TARGETS["trak_noproj_rel_err"], higher=False)
        p = tk["proj"]
        for blk in p["per_k"]:
            for row in blk["rows"]:
                if row["b"] == "traker seed 0":
                    proj = row["a"].split()[1]
                    tag = " (default)" if proj == p["default"] else ""
                    add(f"TRAK projected k={blk['proj_dim']}, ours {proj}{tag} vs traker: Spearman", row["spearman"],
                        TARGETS["trak_proj_spearman"])
    tp = r.get("throughput")
    if tp:
        for name, key in (("vs_traker", "ours sketch + Q / traker featurize"),
                          ("vs_traker", "ours kronecker + Q / traker featurize"),
                          ("vs_captum", "ours sketch / Captum TracInCP (fastest)"),
                          ("vs_captum", "ours exact self-influence / Captum self_influence"),
                          ("vs_captum", "ours exact features / Captum compute_intermediate_quantities"),
                          ("vs_plain", "ours sketch / plain fwd+bwd"),
                          ("vs_plain", "ours kronecker / plain fwd+bwd")):
            add(f"throughput {key}", tp["ratios"][key], TARGETS[name])
    for name, cb in (r.get("callback") or {}).items():
        add(f"TracIn callback overhead % ({name}, best of {cb['repeats']})", cb["overhead_pct"],
            TARGETS["callback_overhead_pct"], higher=False)
        out.append(dict(target=f"weights bit-identical with / without callback ({name})", value=cb["bit_identical"],
                        goal="True", met=bool(cb["bit_identical"])))
    o = r.get("overhead")
    for row in (o or {}).get("rows", []):
        if not (row["callback"] or {}).get("in_step"):
            continue
        if row["callback"].get("last_layer"):
            add(f"in-step TracIn overhead % ({row['name']}, best of {o['rounds']}, {o['epochs']} epochs)",
                row["overhead_pct"], TARGETS["in_step_overhead_pct"], higher=False)
            add(f"in-step TracIn noisy-label AUC ({row['name']}, {o['full_epochs']} epochs)", row.get("full_auc"),
                TARGETS["in_step_auc"])
        for key, when in (("bit_identical", f"{o['epochs']} epochs, every round"),
                          ("full_bit_identical", f"{o['full_epochs']} epochs")):
            out.append(dict(target=f"weights bit-identical with / without in-step TracIn ({row['name']}, {when})",
                            value=row[key], goal="True", met=bool(row[key])))
    return out

def fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def md_header(r: dict) -> list[str]:
    """Title, command, wall time and environment."""
    size = "smoke" if r["settings"].get("smoke") else "quick" if r["settings"].get("quick") else "full"
    lines = [f"# Influence benchmark ({size} run)", "",
             f"Command: `{r['command']}`  ", f"Wall time: {r['wall_seconds']:.0f} s; {r['environment']['device']}, "
             f"torch {r['environment']['torch']} ({r['environment']['threads']} threads), captum "
             f"{r['environment']['captum']}, traker {r['environment']['traker']}; load average at start / end: "
             f"{r['environment']['load_start']} / {r['environment']['load_end']}", ""]
    return lines


def md_model(m: dict) -> list[str]:
    """The CNN and its checkpoints."""
    lines = [f"Model: `DigitsCNN` on 1x{m['image_size']}x{m['image_size']} digits, {m['params']} parameters; "
             f"{m['n_train']} train / {m['n_val']} val examples. Checkpoints (SGD, momentum 0.9):", "",
             "| checkpoint | lr | train acc | val acc |", "|---|---|---|---|"]
    lines += [f"| {c['epoch']} | {c['lr']:g} | {c['train_acc']:.3f} | {c['val_acc']:.3f} |" for c in m["checkpoints"]]
    return lines


def md_tracin(t: dict) -> list[str]:
    """TracIn-CP agreement with Captum and sketch quality."""
    lines = ["", f"## TracIn-CP agreement ({t['n_train']} train x {t['n_query']} val queries, {t['checkpoints']} "
             "checkpoints)", "",
             "| ours | reference | Spearman | Spearman per query | max rel err | top-10 overlap |",
             "|---|---|---|---|---|---|"]
    for key, ours, ref in (("exact", "exact, all params", "Captum TracInCP (all layers)"),
                           ("last_layer", "last_layer=True (fc2 weight+bias)", "Captum TracInCPFast(fc2)"),
                           ("last_layer_weight_only", "fc2.weight only (factored)", "Captum TracInCPFast(fc2)")):
        a = t[key]
        lines.append(f"| {ours} | {ref} | {fmt(a['spearman'], 6)} | {fmt(a['spearman_per_query'], 6)} | "
                     f"{fmt(a['max_rel_err'])} | {fmt(a['top10_overlap'], 3)} |")
    sk = t["sketch"]
    lines += ["", "max rel err = max |ours - ref| / max |ref|.", "",
              f"Projected TracIn-CP (k={sk['proj_dim']}, all params) against our exact TracIn-CP (sketch quality); "
              f"`projection=\"auto\"` (the default) resolves to `{sk['default']}` here:", "",
              "| projection | features | seed | Spearman vs exact | Spearman per query | top-10 overlap | seconds |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {proj_label(row['projection'], sk['default'])} | {row['feature_dim']} | {row['seed']} | "
              f"{fmt(row['spearman'])} | {fmt(row['spearman_per_query'])} | {fmt(row['top10_overlap'], 3)} | "
              f"{row['seconds']:.1f} |" for row in sk["rows"]]
    return lines


def md_trak(t: dict) -> list[str]:
    """TRAK agreement with traker (no projection; projected) and exact TRAK."""
    lines = ["", f"## TRAK agreement ({t['n_train']} train x {t['n_query']} val queries)", "",
             f"(a) No projection, classifier layer only ({t['noproj'][0]['params']} params; ours "
             "`parameters=['fc2.*'], proj_dim=None` vs traker `NoOpProjector` + `grad_wrt`), the same absolute "
             "damping. fp64 = the same scores from our features with X^T X and the solve in float64. "
             "Ours re-weighted = ours with traker's per-checkpoint weights 1 / mean|(X_c^T X_c + lambda I)^-1| "
             "(identical to ours for one checkpoint).", "",
             "| damping (rel.) | checkpoints | ours vs fp64 | traker vs fp64 (1 scalar) | ours re-weighted vs "
             "traker (1 scalar) | Spearman ours vs traker | Spearman re-weighted vs traker |",
             "|---|---|---|---|---|---|---|"]
    for row in t["noproj"]:
        tv = row["traker_vs_fp64_after_scale"]
        lines.append(f"| {row['damping']:g} | {row['checkpoints']} | {fmt(row['ours_vs_fp64'])} | "
                     f"{fmt(tv) if tv is not None else ''} | {fmt(row['ours_vs_traker_after_scale'])} | "
                     f"{fmt(row['plain_spearman'], 6)} | {fmt(row['spearman_reweighted'], 6)} |")
    p = t["proj"]
    ks = [blk["proj_dim"] for blk in p["per_k"]]
    dims = "; ".join(f"k={blk['proj_dim']}: " + ", ".join(f"{pr} {d}" for pr, d in blk["feature_dims"].items())
                     for blk in p["per_k"])
    lines += ["", f"(b) Projected, all {p['params']} params, {p['checkpoints']} checkpoints, {p['n_train']} train "
              f"examples, relative damping {p['damping']:g}, k = {', '.join(map(str, ks))}: ours count sketch "
              f"(`projection=\"auto\"` resolves to `{p['default']}`), Kronecker (Rademacher), dense (Rademacher); "
              "traker (BasicProjector, Gaussian, one block). exact = unprojected TRAK on all parameters (n x n "
              f"solve) with the absolute damping of a k-dim sketch. Feature dims: {dims}. Rows `ours X seed 0` vs "
              "`ours X seed 1` are the noise floor (two draws of the same sketch).", "",
              "| a | b | " + " | ".join(f"k={k} Spearman | k={k} per query | k={k} top-10" for k in ks) + " |",
              "|---|---|" + "---|---|---|" * len(ks)]
    def label(n: str) -> str:
        return n.replace(f"ours {p['default']}", f"ours {p['default']} (default)")

    for i, row in enumerate(p["per_k"][0]["rows"]):
        cells = []
        for blk in p["per_k"]:
            rw = blk["rows"][i]
            cells += [fmt(rw["spearman"]), fmt(rw["spearman_per_query"]), fmt(rw["top10_overlap"], 3)]
        lines.append(f"| {label(row['a'])} | {label(row['b'])} | " + " | ".join(cells) + " |")
    for name in p["per_k"][0]["spearman_reweighted_vs_traker"]:
        lines.append(f"| {label(name)} seed 0, re-weighted like traker | traker seed 0 | " + " | ".join(
            f"{fmt(blk['spearman_reweighted_vs_traker'][name])} | |" for blk in p["per_k"]) + " |")
    secs = "; ".join(f"k={blk['proj_dim']}: " + ", ".join(f"{n} {v:.1f}" for n, v in blk["seconds"].items())
                     for blk in p["per_k"])
    lines += ["", f"Seconds (3 checkpoints, train + query features and scores): {secs}; exact reference "
              f"{p['exact_seconds']:.1f}."]
    return lines


def md_throughput(t: dict) -> list[str]:
    """Throughput of one attribution pass, and the ratios."""
    lines = ["", f"## Throughput (checkpoint {t['checkpoint']}, all {t['params']} params, k={t['proj_dim']}, "
             f"batch {t['rows'][0]['batch_size']}, best of {t['rows'][0]['rounds']} rounds; `projection=\"auto\"` "
             f"= `{t['default']}`)", "",
             "| method | examples/s | examples per round | what it includes |", "|---|---|---|---|"]
    lines += [f"| {row['method']} | {row['examples_per_s']:.1f} | {row['examples']} | {row['note']} |"
              for row in t["rows"]]
    lines += ["", f"{CAPTUM_FASTEST} = the faster of the two Captum rows.", "", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in t["ratios"].items()]
    return lines


def md_callback(name: str, c: dict) -> list[str]:
    """One set-up of the callback overhead part."""
    lines = ["", f"## TracIn callback overhead: {name} ({c['epochs']} epochs, best of {c['repeats']})", "",
             f"{c['description']}; {c['params']} parameters ({c['callback'].get('selected_params')} in the "
             f"classifier); `projection=\"auto\"` resolved to `{c['callback'].get('projection')}`, unused with "
             "`last_layer=True` (exact factors a, g are stored).", "",
             "| without (s) | with (s) | overhead (best) | overhead (median) | bit-identical weights |",
             "|---|---|---|---|---|",
             f"| {', '.join(f'{v:.2f}' for v in c['seconds_without'])} | "
             f"{', '.join(f'{v:.2f}' for v in c['seconds_with'])} | {c['overhead_pct']:.1f} % | "
             f"{c['overhead_pct_median']:.1f} % | {c['bit_identical']} (max diff {c['max_abs_weight_diff']:g}) |",
             "", f"Each pass (last run): {', '.join(f'{v:.3f}' for v in c['callback']['pass_seconds'])} s over "
             f"{c['callback']['n_train']} examples; reading the train split once through a DataLoader takes "
             f"{c['train_split_read_seconds']:.3f} s and one eval forward over it (no grad) "
             f"{c['train_split_forward_seconds']:.3f} s; one epoch without the callback takes about "
             f"{c['epoch_seconds']:.3f} s, so a pass that is one forward costs {c['forward_floor_pct']:.0f} % of "
             f"an epoch (the floor of the overhead with a pass every epoch). Passes sum to "
             f"{c['passes_seconds']:.2f} s; best with - best without - passes = {c['outside_passes_seconds']:.2f} "
             "s (overhead outside the passes, plus noise)."]
    return lines


def md_overhead(o: dict) -> list[str]:
    """The in-step TracIn overhead part (issue 9)."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in o["model"].items())
    data = ", ".join(f"{k}={v!r}" for k, v in o["data"].items())
    lines = ["", f"## In-step TracIn overhead ({o['epochs']} epochs, best of {o['rounds']} interleaved rounds)", "",
             f"As `{o['config']}` configures them: `Classifier({kwargs})` ({o['params']} parameters) on "
             f"`ImageDataModule({data})`, seed {o['seed']}; {o['n_noisy']} of {o['n_train']} train labels flipped. "
             "`trainer.fit` "
             "wall time with `Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)` on the "
             "CPU; "
             f"the datamodule is built once, each configuration is warmed up once ({o['warmup_epochs']} epoch) before "
             "the timed rounds. Bit-identical: the final weights equal those of the run without callback of the same "
             f"round (same seed). AUC: noisy-label AUC of `self_influence` after the last timed run, and after one "
             f"{o['full_epochs']}-epoch run (the config's `max_epochs` is {o['config_max_epochs']}; without callback "
             f"it took {o['full_baseline_seconds']:.1f} s).", "",
             "| configuration | TracIn arguments | selected params | fit seconds (runs) | best | "
             f"vs no callback (best) | overhead (median) | time in the callback's hooks (median, % of fit) | "
             f"bit-identical weights | AUC after {o['epochs']} epochs | "
             f"AUC after {o['full_epochs']} epochs (s, bit-identical) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in o["rows"]:
        args = ", ".join(f"{k}={v!r}" for k, v in row["callback"].items()) if row["callback"] else "-"
        auc = fmt(row["auc"], 4) if row["auc"] is not None else "-"
        full = (f"{fmt(row['full_auc'], 4)} ({row['full_seconds']:.1f} s, {row['full_bit_identical']})"
                if "full_auc" in row else "")
        lines.append(f"| {row['name']} | `{args}` | {row['selected_params'] or '-'} | "
                     f"{', '.join(f'{v:.2f}' for v in row['seconds'])} | {row['best']:.2f} | "
                     f"{row['ratio']:.3f}x ({row['overhead_pct']:+.1f} %) | {row['overhead_pct_median']:+.1f} % | "
                     f"{row['hook_pct']:.1f} % | {row['bit_identical']} "
                     f"(max diff {row['max_abs_weight_diff']:g}) | {auc} | {full} |")
    return lines


def md_targets(verdicts: list[dict]) -> list[str]:
    lines = ["", "## Targets", "", "| target | value | goal | met |", "|---|---|---|---|"]
    lines += [f"| {v['target']} | {fmt(v['value'])} | {v['goal']} | {'yes' if v['met'] else '**no**'} |"
              for v in verdicts]
    return lines


SECTIONS = (("tracin", md_tracin), ("trak", md_trak), ("throughput", md_throughput))


def markdown(r: dict) -> str:
    lines = md_header(r) + (md_model(r["model"]) if "model" in r else [])
    for key, section in SECTIONS:
        if key in r:
            lines += section(r[key])
    for name, c in (r.get("callback") or {}).items():
        lines += md_callback(name, c)
    if "overhead" in r:
        lines += md_overhead(r["overhead"])
    return "\n".join(lines + md_targets(r["verdicts"])) + "\n"



# ----------------------------------------------------------------------------------------------------------- main
PARTS = ("tracin", "trak", "throughput", "callback", "overhead")
CNN_PARTS = ("tracin", "trak", "throughput")  # the parts that read the CNN checkpoints


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/bench/influence", help="output folder")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes, one round")
    size.add_argument("--smoke", action="store_true", help="smoke test: minimal sizes, one round (about 1-2 minutes)")
    parser.add_argument("--parts", "--only", dest="parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown or not args.parts:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    return args


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed(package)
    except PackageNotFoundError:  # the `bench` extra is needed by the agreement and throughput parts only
        return "not installed"


def environment() -> dict:
    return dict(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                torch=torch.__version__, captum=version("captum"), traker=version("traker"),
                threads=torch.get_num_threads(), python=platform.python_version(),
                lightning_attr=getattr(lightning_attr, "__version__", "?"), load_start=load_now())


def run_parts(s: Settings, parts: Sequence[str], out: Path, seed: int) -> dict:
    """The requested parts; the CNN and its checkpoints only when a part reads them."""
    results: dict[str, Any] = {}
    if set(parts) & set(CNN_PARTS):
        data = DigitsData.load(s.image_size)
        _, ckpts = train_checkpoints(data, s, out, seed)
        results["model"] = dict(image_size=s.image_size, params=num_params(DigitsCNN(s.image_size)),
                                n_train=data.x_train.shape[0], n_val=data.x_val.shape[0],
                                checkpoints=[dict(ck.info(), path=ck.path) for ck in ckpts])
    if "tracin" in parts:
        results["tracin"] = run_tracin_agreement(s, data, ckpts)
    if "trak" in parts:
        results["trak"] = run_trak_agreement(s, data, ckpts, out)
    if "throughput" in parts:
        results["throughput"] = run_throughput(s, data, ckpts, out)
    if "callback" in parts:
        results["callback"] = run_callback_overhead(s, out)
    if "overhead" in parts:
        results["overhead"] = run_in_step_overhead(s, out)
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    s = Settings.smoke() if args.smoke else Settings.quick() if args.quick else Settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = dict(
        command="python benchmarks/influence.py " + " ".join(sys.argv[1:] if argv is None else argv),
        settings=dict(asdict(s), quick=args.quick, smoke=args.smoke, parts=args.parts, seed=args.seed),
        targets=TARGETS, environment=environment())
    start = time.perf_counter()
    log(f"settings: {asdict(s)}")
    results.update(run_parts(s, args.parts, out, args.seed))
    results["verdicts"] = verdicts(results)
    results["wall_seconds"] = time.perf_counter() - start
    results["environment"]["load_end"] = load_now()

    md = markdown(results)
    print(md)
    write_json(out / "results.json", results)
    write_text(out / "results.md", md)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} ({results['wall_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
