"""Per-example gradient features: exact, densely projected, or Kronecker-projected per layer (LoGra).

``GradientFeaturizer(module, ...)(x, y, key) -> (B, k)`` with ``<f_i, f_j>`` equal (projection off) or unbiased for
(projection on) ``sum_p s_p^2 <grad_p out_i, grad_p out_j>`` over the selected parameters ``p`` (``s_p`` = optional
per-parameter scales, e.g. sqrt of the learning rate). ``key`` (e.g. the checkpoint number) seeds the projection, so
train and query features of one checkpoint share it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_attr.influence.grads import (
    Layer,
    check_bounds,
    contract,
    factor_grads,
    func_grads,
    func_group_grads,
    layer_taps,
    linear_factors,
    norm_grads,
    output_grads,
    plan_layers,
    project_inputs,
    segment_sum,
)
from lightning_attr.influence.outputs import OutputFn, get_output_fn
from lightning_attr.influence.parameters import last_linear, select_parameters
from lightning_attr.influence.projector import CountSketch, KroneckerProjector, RandomProjector

__all__ = ["GradientFeaturizer", "PROJECTIONS", "ROUTES"]

PROJECTIONS = ("auto", "sketch", "kronecker", "dense")
ROUTES = ("auto", "layers", "func")


def _check_finite(t: Tensor, what: str) -> Tensor:
    rows = t.reshape(t.shape[0], -1)
    if bool(torch.isfinite(rows.sum()).item()):  # a NaN / inf anywhere makes the sum non-finite: one cheap pass
        return t
    bad = ~torch.isfinite(rows).all(1)
    if bad.any():
        raise FloatingPointError(f"non-finite {what} for batch positions {bad.nonzero().flatten().tolist()[:10]}; "
                                 "check the model's outputs and the loss on these examples.")
    return t


class GradientFeaturizer:
    """Gradient features of ``output(module(x), y)`` (B,) per example.

    Args:
        module: the (unwrapped) model; ``module(x)`` must return outputs (B, K).
        parameters: ``fnmatch`` name patterns of the parameters to differentiate (default: all trainable).
        module_types: restrict to parameters of these module types (``["Linear", "Conv2d"]``).
        last_layer: differentiate only the classifier layer: ``True`` (timm ``get_classifier()`` or the last registered
            ``nn.Linear``; see ``parameters.last_linear`` to find it from the forward graph) or the layer's name.
        output: ``"cross_entropy"`` (TracIn), ``"margin"`` (TRAK), ``"mse"`` or a callable ``(out, y) -> (B,)``.
        proj_dim: projection size k; None or 0 keeps exact gradients (k = number of selected parameters).
        projection: ``"sketch"`` (count sketch of the flat per-example gradient: the accuracy of a dense
            Rademacher projection at O(num_params) cost), ``"kronecker"`` (per layer, LoGra: never forms per-example
            gradients, fastest, but much noisier at the same k), ``"dense"`` (one chunked Rademacher / Gaussian
            matrix, as TRAK) or ``"auto"``: sketch while a batch of 64 per-example gradients fits ``max_memory_mb``,
            else kronecker (when the layer route covers the parameters).
        proj_type: ``"rademacher"`` or ``"gaussian"`` entries.
        route: ``"layers"``, ``"func"`` (``torch.func.vmap``) or ``"auto"`` (layers when they cover the parameters).
        seed: projection seed.
        max_memory_mb: a dense projection matrix up to this size is generated once and kept; larger ones are
            regenerated block by block on every call.
    """

    def __init__(
        self,
        module: nn.Module,
        parameters: Sequence[str] | None = None,
        module_types: Sequence[str] | None = None,
        last_layer: bool | str = False,
        output: Union[str, OutputFn] = "cross_entropy",
        proj_dim: int | None = None,
        projection: str = "auto",
        proj_type: str = "rademacher",
        route: str = "auto",
        seed: int = 0,
        max_memory_mb: float = 1024.0,
    ) -> None:
        if projection not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {projection!r}.")
        if route not in ROUTES:
            raise ValueError(f"`route` must be one of {ROUTES}, got {route!r}.")
        if proj_dim is not None and proj_dim < 0:
            raise ValueError(f"`proj_dim` must be None, 0 (off) or a positive size, got {proj_dim}.")
        if last_layer:
            if parameters is not None:
                raise ValueError("`last_layer` selects the classifier's parameters; do not pass `parameters` too.")
            parameters = [f"{last_layer if isinstance(last_layer, str) else last_linear(module)}.*"]
        self.last_layer = bool(last_layer)
        self.module, self.output_fn = module, get_output_fn(output)
        self.params = select_parameters(module, parameters, module_types)
        self.layers = plan_layers(module, self.params) if route != "func" else None
        if route == "layers" and self.layers is None:
            raise ValueError("`route='layers'` needs every selected parameter in a Linear, Conv2d (groups=1), "
                             "BatchNorm (running stats) or LayerNorm layer; use route='auto' or 'func'.")
        self.proj_dim = proj_dim or None
        if projection == "kronecker" and self.layers is None and self.proj_dim:
            raise ValueError("`projection='kronecker'` needs the layer route (Linear / Conv2d / norm layers only).")
        self.num_params = num_params = sum(p.numel() for p in self.params.values())
        if self.proj_dim and self.proj_dim >= num_params:  # projecting up only adds noise: keep exact gradients
            rank_zero_warn(f"`proj_dim`={self.proj_dim} >= the {num_params} selected parameters: the projection is "
                           "off and features are the exact gradients.")
            self.proj_dim = None
        if projection == "auto":
            big = num_params * 64 * 4 > max_memory_mb * 2**20
            projection = "kronecker" if big and self.layers is not None else "sketch"
            if projection == "kronecker" and self.proj_dim:
                rank_zero_warn(f"`projection='auto'` picked 'kronecker' (LoGra): 64 per-example gradients of the "
                               f"{num_params} selected parameters exceed `max_memory_mb`={max_memory_mb}. It is fast but "
                               "noisier than 'sketch' at the same `proj_dim`; raise `max_memory_mb` to keep 'sketch'.")
        elif projection == "dense" and self.proj_dim and num_params * self.proj_dim * 4 > max_memory_mb * 2**20:
            rank_zero_warn(f"the dense {num_params} x {self.proj_dim} projection exceeds `max_memory_mb`="
                           f"{max_memory_mb}: it is regenerated block by block for every batch (slow); raise "
                           "`max_memory_mb` or use projection='sketch'.")
        self.projection = projection
        self.proj_type, self.seed, self.max_memory_mb = proj_type, seed, max_memory_mb
        self.scales: dict[str, float] = {}
        self._plan_key: tuple | None = None
        self._plan: dict = {}

    # ----------------------------------------------------------------------------------------------------- helpers
    def set_scales(self, scales: dict[str, float] | None) -> None:
        """Per-parameter multipliers ``s_p`` of the gradients (missing names: 1)."""
        self.scales = dict(scales or {})

    def _scale(self, name: str | None) -> float:
        return float(self.scales.get(name, 1.0)) if name else 1.0

    @contextlib.contextmanager
    def _grads_on(self) -> Iterator[None]:
        """Grad on for the selected parameters, off for all others (autograd then records only what it needs:
        nothing below the classifier for ``last_layer``); the flags are restored afterwards."""
        selected = {id(p) for p in self.params.values()}
        flags = {p: p.requires_grad for p in self.module.parameters()}
        for p in flags:
            p.requires_grad_(id(p) in selected)
        try:
            yield
        finally:
            for p, f in flags.items():
                p.requires_grad_(f)

    def _taps(self, x: Tensor, y: Tensor, output_fn: OutputFn | None = None) -> contextlib.AbstractContextManager:
        """``layer_taps`` over the selected layers with grads on the selected parameters only."""
        stack = contextlib.ExitStack()
        stack.enter_context(self._grads_on())
        stack.enter_context(layer_taps(self.module, self.layers, x, y, output_fn or self.output_fn))
        return stack

    def taps(self, x: Tensor, y: Tensor, output_fn: OutputFn | None = None) -> contextlib.AbstractContextManager:
        """Inside: each selected layer's ``calls`` hold ``(input, output gradient)`` of ``output_fn(module(x), y)``
        (default: the featurizer's output), per example (layer route only)."""
        if self.layers is None:
            raise ValueError("layer taps need every selected parameter in a Linear, Conv2d or norm layer.")
        return self._taps(x, y, output_fn)

    def layer_factors(self) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """``{layer: [(a (B, T, I'), g (B, T, O)) per call]}`` of the factored layers, from the current taps."""
        return {layer.name: self._factors(layer) for layer in self.layers if layer.factored and layer.calls}

    # --------------------------------------------------------------------------------------------- exact gradients
    def per_example_grads(self, x: Tensor, y: Tensor, bounds: Tensor | None = None) -> dict[str, Tensor]:
        """Exact gradients ``{name: (R, *shape)}`` (scaled by ``s_p``) per example (R = B), or, with segment
        ``bounds`` (R + 1,), of each segment's summed output (a group gradient; no per-example gradients formed)."""
        bounds = None if bounds is None else check_bounds(bounds, x.shape[0])
        if self.layers is None:
            with self._grads_on():
                grads = func_grads(self.module, self.params, x, y, self.output_fn)[0] if bounds is None else \
                    func_group_grads(self.module, self.params, x, y, self.output_fn, bounds)
            return {n: g * self._scale(n) for n, g in grads.items()}
        with self._taps(x, y):
            return self._grads_of_taps(x.shape[0], bounds)

    def _grads_of_taps(self, b: int, bounds: Tensor | None = None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            for n, g in self._layer_grads(layer, b, bounds).items():
                out[n] = out[n] + g if n in out else g
        return {n: out[n] for n in self.params}

    def _factors(self, layer: Layer) -> list[tuple[Tensor, Tensor]]:
        sw, sb = self._scale(layer.weight), self._scale(layer.bias)
        return [linear_factors(layer, a, g, sw, sb) for a, g in layer.calls]

    def _kronecker(self, layer: Layer, proj: KroneckerProjector, a: Tensor, g: Tensor, bounds: Tensor | None
                   ) -> Tensor:
        """One layer call's Kronecker-projected gradient (R, k_out * k_in); inputs are projected through the layer's
        own op, so neither unfolded patches nor per-example gradients are formed."""
        pg = output_grads(layer, g) @ proj.p_out.cached(g.device)
        pa = project_inputs(layer, a, proj.p_in.cached(a.device), pg.shape[1], self._scale(layer.weight),
                            self._scale(layer.bias))
        return contract(pa, pg, bounds).flatten(1)

    def _layer_grads(self, layer: Layer, b: int, bounds: Tensor | None = None) -> dict[str, Tensor]:
        rows = b if bounds is None else len(bounds) - 1
        if not layer.calls:  # the layer did not run in this forward: zero gradients
            return {n: self.params[n].new_zeros(rows, *self.params[n].shape) for n in (layer.weight, layer.bias) if n}
        if layer.factored:
            parts = [factor_grads(layer, a, g, bounds) for a, g in self._factors(layer)]
        else:
            parts = [{n: segment_sum(t * self._scale(n), bounds) for n, t in norm_grads(layer, a, g).items()}
                     for a, g in layer.calls]
        return parts[0] if len(parts) == 1 else {n: sum(p[n] for p in parts) for n in parts[0]}  # no copy for one call

    def flat_grads(self, x: Tensor, y: Tensor, bounds: Tensor | None = None) -> Tensor:
        """Exact gradients flattened in parameter order: (B, num_params) per example, (R, num_params) per segment."""
        grads = self.per_example_grads(x, y, bounds)
        return _check_finite(torch.cat([g.reshape(g.shape[0], -1).float() for g in grads.values()], 1), "gradients")

    def factors(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Last-layer factors ``(a (B, I'), g (B, O))`` with per-example gradient ``g a^T``: exact, O(I + O) each.

        Needs a single Linear layer called once on one position per example (the ``last_layer=True`` set-up).
        """
        if not self.layers or len(self.layers) != 1 or not isinstance(self.layers[0].module, nn.Linear):
            raise ValueError("factored gradients need exactly one selected Linear layer (use `last_layer=True`).")
        with self._taps(x, y):
            return self.factors_of_taps()

    def factors_of_taps(self) -> tuple[Tensor, Tensor]:
        """``factors`` from the inputs / output gradients the selected layer recorded (``Layer.calls``)."""
        (a, g), *rest = self._factors(self.layers[0])
        if rest or a.shape[1] != 1:
            raise ValueError(f"layer {self.layers[0].name!r} sees several positions or calls per example; "
                             "factored gradients need one (B, I) input per example.")
        return _check_finite(a[:, 0].float(), "layer inputs"), _check_finite(g[:, 0].float(), "output gradients")

    def sq_norms(self, x: Tensor, y: Tensor) -> Tensor:
        """Exact squared norms (B,) of the per-example gradients; for factored layers from Gram matrices
        ``sum_st (a_s.a_t)(g_s.g_t)`` when that is cheaper than forming ``O x I`` per example."""
        if self.layers is None:
            return self.flat_grads(x, y).pow(2).sum(1)
        with self._taps(x, y):
            return self.sq_norms_of_taps(x.shape[0])

    def sq_norms_of_taps(self, b: int) -> Tensor:
        """``sq_norms`` (b,) from the inputs / output gradients the selected layers recorded (``Layer.calls``)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer.module, nn.Linear) and len(layer.calls) == 1 and layer.calls[0][0].dim() == 2:
                total = total + self._linear_sq_norms(layer, *layer.calls[0])  # one position: no factor is formed
                continue
            facs = self._factors(layer) if layer.factored else []
            s = sum(a.shape[1] for a, _ in facs) if facs else 0
            if facs and s * (layer.in_dim + layer.out_dim) <= layer.in_dim * layer.out_dim:
                a = torch.cat([f[0] for f in facs], 1).float()
                g = torch.cat([f[1] for f in facs], 1).float()
                total += ((a @ a.transpose(1, 2)) * (g @ g.transpose(1, 2))).sum((1, 2))
            else:
                total += sum(t.flatten(1).float().pow(2).sum(1) for t in self._layer_grads(layer, b).values())
        return _check_finite(total.unsqueeze(1), "gradient norms")[:, 0]

    def _linear_sq_norms(self, layer: Layer, a: Tensor, g: Tensor) -> Tensor:
        """``||g a^T||^2 s_w^2 + ||g||^2 s_b^2`` (B,) of a Linear call on (B, I) inputs."""
        g, a = g.float(), a.float()
        sw2 = self._scale(layer.weight) ** 2 if layer.weight else 0.0
        sb2 = self._scale(layer.bias) ** 2 if layer.bias else 0.0
        return (g * g).sum(1) * ((a * a).sum(1) * sw2 + sb2)

    # ------------------------------------------------------------------------------------------------- projection
    @property
    def feature_dim(self) -> int:
        """Length k of the features ``__call__`` returns."""
        if not self.proj_dim:
            return self.num_params
        return sum(p["dim"] for p in self._build_plan((0,)).values())

    def _build_plan(self, key: tuple) -> dict:
        if key == self._plan_key:
            return self._plan
        k, seed, kind, plan = self.proj_dim, self.seed, self.proj_type, {}
        if self.projection == "sketch":
            plan["flat"] = dict(dim=k, proj=CountSketch(self.num_params, k, seed, key + (3,)))
        elif self.projection == "dense":
            plan["flat"] = dict(dim=k, proj=RandomProjector(self.num_params, k, seed, kind, key + (0,),
                                                            cache_mb=self.max_memory_mb))
        else:
            rest = 0
            for i, layer in enumerate(self.layers):
                if not layer.factored:
                    rest += sum(self.params[n].numel() for n in (layer.weight, layer.bias) if n)
                    continue
                size = layer.in_dim * layer.out_dim
                budget = max(1, round(k * size / self.num_params))
                if budget >= size:
                    plan[layer.name] = dict(dim=size, proj=None)
                else:
                    k_in, k_out = KroneckerProjector.split(budget, layer.in_dim, layer.out_dim)
                    proj = KroneckerProjector(layer.in_dim, layer.out_dim, k_in, k_out, seed, kind, key + (1, i))
                    plan[layer.name] = dict(dim=k_in * k_out, proj=proj)
            if rest:
                budget = max(1, round(k * rest / self.num_params))
                proj = RandomProjector(rest, budget, seed, kind, key + (2,)) if budget < rest else None
                plan["rest"] = dict(dim=budget if proj else rest, proj=proj)
        self._plan_key, self._plan = key, plan
        return plan

    def __call__(self, x: Tensor, y: Tensor, key: tuple[int, ...] = (0,), bounds: Tensor | None = None) -> Tensor:
        """Features (B, k) of the examples ``x`` (B, ...) with targets ``y`` (B,); with segment ``bounds`` (R + 1,),
        features (R, k) of each segment's summed output (GGDA group features: the sum of its members' features,
        computed from one batched backward without per-example gradients)."""
        bounds = None if bounds is None else check_bounds(bounds, x.shape[0])
        if not self.proj_dim:
            return self.flat_grads(x, y, bounds)
        plan = self._build_plan(tuple(key))
        if self.projection in ("dense", "sketch"):
            return _check_finite(plan["flat"]["proj"](self.flat_grads(x, y, bounds)), "projected gradients")
        with self._taps(x, y):
            return self._kronecker_of_taps(x.shape[0], plan, bounds)

    def project(self, flat: Tensor, key: tuple[int, ...] = (0,)) -> Tensor:
        """Flat gradients (m, num_params) in parameter order -> features (m, k) as ``__call__`` makes them: the same
        sketch / dense projection of checkpoint ``key``, or unchanged without projection."""
        if not self.proj_dim:
            return flat
        if self.projection not in ("dense", "sketch"):
            raise ValueError(f"`projection`={self.projection!r} acts on layer factors, not on flat gradients; use "
                             "'sketch' or 'dense' (or proj_dim=None).")
        return _check_finite(self._build_plan(tuple(key))["flat"]["proj"](flat), "projected gradients")

    def features_of_taps(self, b: int, key: tuple[int, ...] = (0,)) -> Tensor:
        """``__call__`` per example (b, k) from the inputs / output gradients the selected layers recorded
        (``Layer.calls``, e.g. during a training step), without a forward or backward of its own (layer route)."""
        if not self.proj_dim or self.projection in ("dense", "sketch"):
            flat = torch.cat([g.reshape(b, -1).float() for g in self._grads_of_taps(b).values()], 1)
            flat = _check_finite(flat, "gradients")
            return flat if not self.proj_dim else self._build_plan(tuple(key))["flat"]["proj"](flat)
        return self._kronecker_of_taps(b, self._build_plan(tuple(key)), None)

    def _kronecker_of_taps(self, b: int, plan: dict, bounds: Tensor | None) -> Tensor:
        rows = b if bounds is None else len(bounds) - 1
        parts, rest = [], []
        for layer in self.layers:
            if not layer.factored:
                rest += [t.flatten(1).float() for t in self._layer_grads(layer, b, bounds).values()]
                continue
            proj = plan[layer.name]["proj"]
            if not layer.calls:
                parts.append(torch.zeros(rows, plan[layer.name]["dim"], device=layer.module.weight.device))
            elif proj is None:
                parts.append(sum(contract(a, g, bounds) for a, g in self._factors(layer)).flatten(1).float())
            else:
                parts.append(sum(self._kronecker(layer, proj, a, g, bounds) for a, g in layer.calls))
        if rest:
            flat = torch.cat(rest, 1)
            proj = plan["rest"]["proj"]
            parts.append(proj(flat) if proj is not None else flat)
        return _check_finite(torch.cat(parts, 1), "projected gradients")
