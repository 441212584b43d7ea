"""The damped curvature ``H + lambda I`` of the mean training loss at the current weights, and its inverse applied to
gradients: what influence functions need.

``H`` is the Gauss-Newton matrix of the softmax cross-entropy (``curvature="ggn"``; the true Fisher) taken with every
label weighted by the model's probability (``fisher="true"``: exactly ``sum_y p_y g_y g_y^T``, one backward per class),
with one label per example drawn from the model (``fisher="sampled"``: unbiased, one backward, noisy for confident
models), or with the data's labels (``fisher="empirical"``); or the Hessian (``curvature="hessian"``; ``exact``,
``cg``, ``lissa``). Strategies:

- ``exact``: the matrix over the selected parameters, formed and Cholesky-factored in float64 (tiny models).
- ``cg`` / ``lissa``: matrix-free, from Hessian- or GGN-vector products over the training data (``torch.func``; any
  module). Each solve passes over the data many times, so they precondition queries only (no self-influence).
- ``kfac`` / ``ekfac``: per Linear / Conv2d layer (see :mod:`lightning_attr.influence.kfac`).

``damping`` is relative by default: ``lambda = damping * mean eigenvalue`` (per layer for kfac / ekfac; for the other
strategies the mean eigenvalue of the Gauss-Newton / Fisher, ``trace / num_params``, computed exactly from per-example
gradients, so ``exact`` and ``cg`` / ``lissa`` use the same ``lambda``); ``relative_damping=False`` takes it as is.

Gradients are flat (m, num_params) in the featurizer's parameter order. Fitting sums over the training data through
``total(fn)``: ``fn(x, y, index)`` returns sums over its batch, ``total`` adds them over (a subsample of) the data and
all ranks, with the example ``count``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.kfac import (
    eigenbasis,
    factor_sums,
    inverse_quadratic,
    kfac_eigenvalues,
    precondition,
    rotated_sq_sums,
)
from lightning_attr.influence.projector import mix_seed

__all__ = ["Curvature", "CURVATURES", "DataTotal", "make_curvature"]

DataTotal = Callable[[Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]]], dict[str, Tensor]]


def sampled_labels(logits: Tensor, index: Tensor, seed: int) -> Tensor:
    """One label per example drawn from ``softmax(logits)`` with a uniform seeded by ``(seed, index)``: the same draw
    for an example whatever the batch or rank."""
    u = torch.tensor([torch.rand(1, generator=torch.Generator().manual_seed(mix_seed(seed, int(i)))).item()
                      for i in index.tolist()], dtype=torch.float64, device=logits.device)
    cdf = logits.detach().double().softmax(-1).cumsum(-1)
    return (cdf < u.unsqueeze(1)).sum(-1).clamp(max=logits.shape[-1] - 1)


class Curvature(ABC):
    """A strategy: ``fit`` (state tensors, stored with the checkpoint) and ``solve`` (``(H + lambda I)^-1 v``)."""

    name: ClassVar[str]
    per_row: ClassVar[bool] = True  # cheap enough to precondition every training row (self-influence)
    curvatures: ClassVar[tuple[str, ...]] = ("ggn", "hessian")

    def __init__(self, damping: float = 1e-3, relative_damping: bool = True, curvature: str = "ggn",
                 fisher: str = "true", seed: int = 0, **options: Any) -> None:
        if not damping >= 0 or not math.isfinite(damping):
            raise ValueError(f"`damping` must be a finite number >= 0, got {damping}.")
        if curvature not in self.curvatures:
            raise ValueError(f"`curvature`={curvature!r} is not available with strategy={self.name!r}; allowed: "
                             f"{self.curvatures}.")
        if fisher not in ("true", "sampled", "empirical"):
            raise ValueError(f"`fisher` must be 'true' (every label, weighted by the model's probability), 'sampled' "
                             f"(one label per example drawn from the model) or 'empirical' (the data's), got {fisher!r}.")
        self.damping, self.relative, self.curvature, self.fisher, self.seed = (damping, relative_damping, curvature,
                                                                               fisher, seed)
        self.options = options

    @abstractmethod
    def fit(self, featurizer: GradientFeaturizer, total: DataTotal) -> dict[str, Tensor]:
        """The state of the damped curvature at the module's current weights."""

    @abstractmethod
    def solve(self, featurizer: GradientFeaturizer, v: Tensor, state: dict[str, Tensor], total: DataTotal | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
        """``(H + lambda I)^-1 v`` for flat ``v`` (m, num_params); ``dtype`` of the math where a strategy can choose
        (float32 for the many training rows, float64 for queries)."""

    def quadratic(self, featurizer: GradientFeaturizer, v: Tensor, state: dict[str, Tensor],
                  dtype: torch.dtype = torch.float32) -> Tensor:
        """``v_i^T (H + lambda I)^-1 v_i`` (m,) float64 for flat ``v`` (m, num_params): self-influence."""
        return (v.double() * self.solve(featurizer, v, state, dtype=dtype).double()).sum(1)

    # -------------------------------------------------------------------------------------------------- helpers
    def _lambda(self, mean_eigenvalue: float) -> float:
        lam = self.damping * mean_eigenvalue if self.relative else self.damping
        if not math.isfinite(lam):
            raise FloatingPointError(f"the curvature is not finite (mean eigenvalue {mean_eigenvalue}); check the "
                                     "model's outputs and loss on the training data.")
        return lam

    def _fisher_terms(self, featurizer: GradientFeaturizer, x: Tensor, y: Tensor, index: Tensor
                      ) -> list[tuple[Tensor, Tensor]]:
        """``[(labels (B,), weights (B,))]`` whose weighted per-example gradient outer products sum to the GGN /
        Fisher: every class weighted by ``p_y`` (true: exact, one backward per class), one label drawn from ``p``
        (sampled: unbiased, one backward) or the data's labels (empirical), weight 1."""
        if self.fisher == "empirical":
            return [(y, torch.ones(len(y), device=x.device))]
        with torch.no_grad():
            logits = featurizer.module(x).float()
        if self.fisher == "sampled":
            return [(sampled_labels(logits, index, self.seed).to(y), torch.ones(len(y), device=x.device))]
        p = logits.softmax(-1)
        return [(torch.full_like(y, k), p[:, k]) for k in range(p.shape[1])]

    def _trace(self, featurizer: GradientFeaturizer, total: DataTotal) -> dict[str, Tensor]:
        """``{"trace": sum over examples of the GGN / Fisher trace, "count"}``."""

        def fn(x: Tensor, y: Tensor, index: Tensor) -> dict[str, Tensor]:
            terms = self._fisher_terms(featurizer, x, y, index)
            return {"trace": sum((w.double() * featurizer.sq_norms(x, lab).double()).sum() for lab, w in terms)}

        return total(fn)


class ExactCurvature(Curvature):
    """The damped matrix (num_params, num_params), Cholesky-factored in float64."""

    name = "exact"

    def fit(self, featurizer: GradientFeaturizer, total: DataTotal) -> dict[str, Tensor]:
        def fn(x: Tensor, y: Tensor, index: Tensor) -> dict[str, Tensor]:
            if self.curvature == "hessian":
                return {"h": _batch_hessian(featurizer, x, y)}
            h = 0
            for lab, w in self._fisher_terms(featurizer, x, y, index):
                g = featurizer.flat_grads(x, lab).double() * w.double().sqrt().unsqueeze(1)
                h = h + g.T @ g
            return {"h": h}

        sums = total(fn)
        h = sums["h"] / sums["count"]
        scale = (self._trace(featurizer, total)["trace"] / sums["count"] / h.shape[0] if self.curvature == "hessian"
                 else h.diagonal().mean())
        lam = self._lambda(float(scale))
        chol, info = torch.linalg.cholesky_ex(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        if int(info) != 0:
            raise ValueError(f"H + lambda I is not positive definite (lambda={lam:.3g}; the Hessian can be indefinite):"
                             " increase `damping` or use curvature='ggn'.")
        return {"cholesky": chol, "damping": torch.tensor(lam, dtype=torch.float64)}

    def solve(self, featurizer: GradientFeaturizer, v: Tensor, state: dict[str, Tensor], total: DataTotal | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
        chol = state["cholesky"].to(v.device)
        return torch.cholesky_solve(v.double().T, chol).T.to(v.dtype)


def _batch_hessian(featurizer: GradientFeaturizer, x: Tensor, y: Tensor) -> Tensor:
    """Hessian (P, P) of the summed loss of a batch w.r.t. the selected parameters, float64."""
    from torch.func import functional_call, hessian

    names = list(featurizer.params)
    shapes = [p.shape for p in featurizer.params.values()]
    flat0 = torch.cat([p.detach().flatten() for p in featurizer.params.values()]).double()

    def loss(flat: Tensor) -> Tensor:
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        params = {n: t.view(s).to(x.dtype) for n, t, s in zip(names, parts, shapes)}
        return featurizer.output_fn(functional_call(featurizer.module, params, (x,)), y).sum().double()

    with torch.enable_grad():
        return hessian(loss)(flat0)


class IterativeCurvature(Curvature):
    """Matrix-free solves from curvature-vector products summed over the training data (every product is a pass)."""

    per_row = False

    def fit(self, featurizer: GradientFeaturizer, total: DataTotal) -> dict[str, Tensor]:
        sums = self._trace(featurizer, total)
        lam = self._lambda(float(sums["trace"] / sums["count"] / featurizer.num_params))
        return {"damping": torch.tensor(lam, dtype=torch.float64)}

    def _product(self, featurizer: GradientFeaturizer, v: Tensor, total: DataTotal, lam: float) -> Tensor:
        """``(H + lambda I) v`` for ``v`` (m, P), float64."""

        def fn(x: Tensor, y: Tensor, index: Tensor) -> dict[str, Tensor]:
            if self.curvature == "hessian":
                return {"hv": _batch_hvp(featurizer, x, y, v)}
            hv = 0
            for lab, w in self._fisher_terms(featurizer, x, y, index):
                g = featurizer.flat_grads(x, lab).double()
                hv = hv + ((g @ v.T.to(g)) * w.double().unsqueeze(1)).T @ g
            return {"hv": hv}

        sums = total(fn)
        return sums["hv"].to(v) / sums["count"] + lam * v


def _batch_hvp(featurizer: GradientFeaturizer, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """Hessian-vector products (m, P) of the summed loss of a batch, by double backward, float64."""
    params = list(featurizer.params.values())
    with torch.enable_grad():
        loss = featurizer.output_fn(featurizer.module(x), y).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        flat = torch.cat([g.flatten() for g in grads])
        rows = []
        for vi in v.to(flat.dtype):
            hv = torch.autograd.grad(flat @ vi, params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(h if h is not None else torch.zeros_like(p)).flatten()
                                   for h, p in zip(hv, params)]))
    return torch.stack(rows).double()


class CGCurvature(IterativeCurvature):
    """Conjugate gradients, every column of ``v`` at once (``cg_iterations``, relative residual ``cg_tol``)."""

    name = "cg"

    def solve(self, featurizer: GradientFeaturizer, v: Tensor, state: dict[str, Tensor], total: DataTotal | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
        lam, b = float(state["damping"]), v.double()
        x, r = torch.zeros_like(b), b.clone()
        p, rs = r.clone(), (r * r).sum(1)
        stop = self.options.get("cg_tol", 1e-8) ** 2 * rs
        for _ in range(self.options.get("cg_iterations", 200)):
            ap = self._product(featurizer, p, _required(total, self.name), lam)
            alpha = rs / (p * ap).sum(1).clamp_min(1e-300)
            x, r = x + alpha.unsqueeze(1) * p, r - alpha.unsqueeze(1) * ap
            rs_new = (r * r).sum(1)
            if bool((rs_new <= stop).all()):
                break
            p, rs = r + (rs_new / rs.clamp_min(1e-300)).unsqueeze(1) * p, rs_new
        return x.to(v.dtype)


class LiSSACurvature(IterativeCurvature):
    """LiSSA: ``x_{j+1} = v + x_j - (H + lambda I) x_j / s``, ``lissa_depth`` steps, result ``x / s`` with ``s`` above the
    largest eigenvalue (estimated by power iteration at fit). Full-data products: deterministic."""

    name = "lissa"

    def fit(self, featurizer: GradientFeaturizer, total: DataTotal) -> dict[str, Tensor]:
        state = super().fit(featurizer, total)
        lam = float(state["damping"])
        u = torch.randn(1, featurizer.num_params, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
        for _ in range(self.options.get("power_iterations", 20)):
            u = self._product(featurizer, u / u.norm(), total, lam)
        state["scale"] = torch.tensor(1.5 * float(u.norm()), dtype=torch.float64)
        return state

    def solve(self, featurizer: GradientFeaturizer, v: Tensor, state: dict[str, Tensor], total: DataTotal | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
        lam, s, b = float(state["damping"]), float(state["scale"]), v.double()
        x = b.clone()
        for _ in range(self.options.get("lissa_depth", 1000)):
            x = b + x - self._product(featurizer, x, _required(total, self.name), lam) / s
        return (x / s).to(v.dtype)


def _required(total: DataTotal | None, name: str) -> DataTotal:
    if total is None:
        raise ValueError(f"strategy={name!r} solves with curvature-vector products over the training data: pass the "
                         "training data (`train_data=`) to score queries outside the fit.")
    return total


class KFACCurvature(Curvature):
    """K-FAC (``corrected=False``) / EK-FAC per Linear / Conv2d layer, damping per layer."""

    name = "kfac"
    curvatures = ("ggn",)
    corrected = False

    def _check(self, featurizer: GradientFeaturizer) -> None:
        bad = [layer.name for layer in featurizer.layers or [] if not layer.factored]
        if featurizer.layers is None or bad:
            raise ValueError(f"strategy={self.name!r} has Kronecker factors for Linear and Conv2d layers only; the "
                             f"selected parameters include {bad or 'parameters of other modules'}: select them with "
                             "`module_types=['Linear', 'Conv2d']` or `parameters=`, or use strategy='cg'.")

    def fit(self, featurizer: GradientFeaturizer, total: DataTotal) -> dict[str, Tensor]:
        self._check(featurizer)

        def factors(x: Tensor, y: Tensor, index: Tensor) -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for t, (labels, w) in enumerate(self._fisher_terms(featurizer, x, y, index)):
                with featurizer.taps(x, labels, _weighted_loss(w)):
                    for name, calls in featurizer.layer_factors().items():
                        for a, g in calls:
                            a_sum, s_sum = factor_sums(a, g)
                            if t == 0:  # the inputs do not depend on the label
                                out[f"{name}.A"] = out.get(f"{name}.A", 0) + a_sum
                            out[f"{name}.S"] = out.get(f"{name}.S", 0) + s_sum
            return out

        sums, state = total(factors), {}
        bad = [k for k, v in sums.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise FloatingPointError(f"strategy={self.name!r}: non-finite Kronecker factors {bad[:4]}; check the model's "
                                     "outputs and loss on the training data.")
        for layer in featurizer.layers:
            l_a, q_a = eigenbasis(sums[f"{layer.name}.A"] / sums["count"])
            l_s, q_s = eigenbasis(sums[f"{layer.name}.S"] / sums["count"])
            state.update({f"{layer.name}.q_a": q_a, f"{layer.name}.q_s": q_s,
                          f"{layer.name}.eigenvalues": kfac_eigenvalues(l_a, l_s)})
        if self.corrected:
            self._correct(featurizer, total, state)
        means = {layer.name: float(state[f"{layer.name}.eigenvalues"].mean()) for layer in featurizer.layers}
        overall = sum(float(state[f"{n}.eigenvalues"].sum()) for n in means) / sum(
            state[f"{n}.eigenvalues"].numel() for n in means)
        for name, mean in means.items():  # a layer without curvature (e.g. zero-initialized) takes the model's mean
            state[f"{name}.damping"] = torch.tensor(self._lambda(mean if mean > 0 else overall), dtype=torch.float64)
        return state

    def _correct(self, featurizer: GradientFeaturizer, total: DataTotal, state: dict[str, Tensor]) -> None:
        """EK-FAC: eigenvalues from per-example gradients projected onto the eigenbasis."""

        def moments(x: Tensor, y: Tensor, index: Tensor) -> dict[str, Tensor]:
            out: dict[str, Tensor] = {}
            for labels, w in self._fisher_terms(featurizer, x, y, index):
                with featurizer.taps(x, labels, _weighted_loss(w)):
                    for name, calls in featurizer.layer_factors().items():
                        q_a, q_s = (state[f"{name}.{k}"].to(x.device) for k in ("q_a", "q_s"))
                        out[name] = out.get(name, 0) + rotated_sq_sums(calls, q_a, q_s)
            return out

        sums = total(moments)
        for layer in featurizer.layers:
            state[f"{layer.name}.eigenvalues"] = sums[layer.name] / sums["count"]

    def solve(self, featurizer: GradientFeaturizer, v: Tensor, state: dict[str, Tensor], total: DataTotal | None = None,
              dtype: torch.dtype = torch.float64) -> Tensor:
        out = torch.empty_like(v)
        for layer, cols in _layout(featurizer):
            pre = precondition(_layer_matrix(v, layer, cols), *_layer_state(state, layer.name, v.device), dtype)
            start = 0
            for c in cols:
                width = (c.stop - c.start) // layer.out_dim
                out[:, c] = pre[..., start : start + width].reshape(len(v), -1)
                start += width
        return out


    @override
    def quadratic(self, featurizer: GradientFeaturizer, v: Tensor, state: dict[str, Tensor],
                  dtype: torch.dtype = torch.float32) -> Tensor:
        return sum(inverse_quadratic(_layer_matrix(v, layer, cols), *_layer_state(state, layer.name, v.device), dtype)
                   for layer, cols in _layout(featurizer))


def _layer_matrix(v: Tensor, layer: Any, cols: list[slice]) -> Tensor:
    """A factored layer's part of flat ``v`` (m, num_params) as (m, O, I'): weight columns, then the bias column."""
    return torch.cat([v[:, c].reshape(len(v), layer.out_dim, -1) for c in cols], -1)


def _layer_state(state: dict[str, Tensor], name: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(q_a, q_s, eigenvalues, damping)`` of layer ``name``."""
    return (*(state[f"{name}.{k}"].to(device) for k in ("q_a", "q_s", "eigenvalues")), float(state[f"{name}.damping"]))


class EKFACCurvature(KFACCurvature):
    name = "ekfac"
    corrected = True


def _weighted_loss(w: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-example cross-entropy times ``sqrt(w)``: output gradients whose outer products carry the weight ``w``."""
    return lambda logits, y: F.cross_entropy(logits, y, reduction="none") * w.to(logits.dtype).sqrt()


def _layout(featurizer: GradientFeaturizer) -> list[tuple[Any, list[slice]]]:
    """Per factored layer, the slices of its weight and bias (in that order) in the flat parameter vector."""
    offsets, start = {}, 0
    for name, p in featurizer.params.items():
        offsets[name] = slice(start, start + p.numel())
        start += p.numel()
    return [(layer, [offsets[n] for n in (layer.weight, layer.bias) if n]) for layer in featurizer.layers]


def make_curvature(strategy: str, **kwargs: Any) -> Curvature:
    """The curvature strategy ``strategy`` (one of ``CURVATURES``)."""
    if strategy not in CURVATURES:
        raise ValueError(f"`strategy`={strategy!r} is not one of {sorted(CURVATURES)}.")
    return CURVATURES[strategy](**kwargs)


CURVATURES: dict[str, type[Curvature]] = {c.name: c for c in (ExactCurvature, CGCurvature, LiSSACurvature,
                                                                KFACCurvature, EKFACCurvature)}
