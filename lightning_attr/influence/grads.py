"""Per-example gradients: the layer route (layer inputs x output gradients) and the ``torch.func`` route.

Layer route: one ordinary forward and one ``autograd.grad`` of the summed per-example outputs w.r.t. the outputs of
the selected layers give each layer's inputs ``a`` and output gradients ``g``; a Linear / Conv2d weight's
per-example gradient is ``sum_s g_s a_s^T`` (for Conv2d, ``a`` are the unfolded patches), a bias's is ``sum_s g_s``,
BatchNorm (eval) / LayerNorm affine gradients are ``sum_s g_s * x_hat_s``. Valid when examples do not interact
(eval mode). Any other module goes through ``torch.func.vmap(grad(...))``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_attr.influence.outputs import OutputFn

__all__ = ["Layer", "plan_layers", "layer_taps", "func_grads", "func_group_grads", "linear_factors", "norm_grads",
           "factor_grads", "contract", "segment_sum", "check_bounds", "project_inputs", "output_grads"]

FACTORED = (nn.Linear, nn.Conv2d)


@dataclass
class Layer:
    """A module whose selected parameters have a closed-form per-example gradient."""

    name: str
    module: nn.Module
    weight: str | None = None  # full parameter names, when selected
    bias: str | None = None
    calls: list = field(default_factory=list, repr=False)  # (input, output) per forward call

    @property
    def factored(self) -> bool:
        return isinstance(self.module, FACTORED)

    @property
    def in_dim(self) -> int:
        """Columns of the factor ``a``: the weight's fan-in (when selected) plus one for a selected bias."""
        w = self.module.weight
        return (w[0].numel() if self.weight else 0) + (1 if self.bias else 0)

    @property
    def out_dim(self) -> int:
        return self.module.weight.shape[0]


def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.running_mean is not None and m.affine
    return isinstance(m, (nn.Linear, nn.LayerNorm)) and getattr(m, "weight", None) is not None


def plan_layers(module: nn.Module, params: dict[str, nn.Parameter]) -> list[Layer] | None:
    """Layers covering every parameter in ``params`` with the layer route, or None when some parameter is not
    owned by a supported layer (Linear, Conv2d without groups, BatchNorm with running stats, LayerNorm)."""
    layers, covered = [], set()
    for m_name, m in module.named_modules():
        own = {p_name: f"{m_name}.{p_name}" if m_name else p_name for p_name, _ in m.named_parameters(recurse=False)}
        chosen = {k: v for k, v in own.items() if v in params}
        if not chosen:
            continue
        if not _supported(m) or set(chosen) - {"weight", "bias"}:
            return None
        layers.append(Layer(m_name, m, chosen.get("weight"), chosen.get("bias")))
        covered.update(chosen.values())
    return layers if covered == set(params) else None


@contextlib.contextmanager
def layer_taps(module: nn.Module, layers: list[Layer], x: Tensor, y: Tensor, output_fn: OutputFn) -> Iterator[Tensor]:
    """Run ``output_fn(module(x), y)`` (B,) and fill each layer's ``calls`` with ``(input, output_grad)`` pairs."""
    for layer in layers:
        layer.calls = []
    handles = [layer.module.register_forward_hook(lambda m, i, o, L=layer: L.calls.append((i[0].detach(), o)))
               for layer in layers]
    try:
        with torch.enable_grad():
            values = output_fn(module(x), y)
        outs = [o for layer in layers for _, o in layer.calls]
        grads = torch.autograd.grad(values.sum(), outs, allow_unused=True)
        it = iter(grads)
        for layer in layers:
            layer.calls = [(a, torch.zeros_like(o) if (g := next(it)) is None else g.detach()) for a, o in layer.calls]
        yield values.detach()
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.calls = []


def patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The patches ``(B, H' W', C kh kw)`` that ``conv`` (zero padding, one group) multiplies by its weight: the same
    as ``F.unfold(...).transpose(1, 2)``, from strided views of the padded input (``F.unfold`` is several times
    slower on CPU)."""
    (kh, kw), (dh, dw), (sh, sw), (ph, pw) = conv.kernel_size, conv.dilation, conv.stride, conv.padding
    x = F.pad(x, (pw, pw, ph, ph))
    x = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]  # (B, C, H', W', kh, kw)
    return x.permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], x.shape[2] * x.shape[3], -1)


def linear_factors(layer: Layer, a: Tensor, g: Tensor, scale_w: float = 1.0, scale_b: float = 1.0
                   ) -> tuple[Tensor, Tensor]:
    """Factors ``(a (B, S, I'), g (B, S, O))`` with per-example gradient ``sum_s g_s a_s^T`` of one layer call.

    ``I'`` = weight fan-in (if selected) + 1 (if the bias is selected, a column of ones). Columns are scaled by the
    parameters' ``scale_w`` / ``scale_b`` (e.g. sqrt of their learning rates).
    """
    m, b = layer.module, a.shape[0]
    if isinstance(m, nn.Conv2d):
        a = patches(a, m)
    else:
        a = a.reshape(b, -1, a.shape[-1])
    g = output_grads(layer, g)
    cols = []
    if layer.weight:
        cols.append(a * scale_w if scale_w != 1.0 else a)
    if layer.bias:
        cols.append(torch.full_like(a[..., :1], scale_b))
    return torch.cat(cols, -1) if len(cols) > 1 else cols[0], g


def project_inputs(layer: Layer, a: Tensor, p_in: Tensor, positions: int, scale_w: float = 1.0,
                   scale_b: float = 1.0) -> Tensor:
    """``linear_factors(layer, a)[0] @ p_in`` (B, S, k_in) without forming the factor: the weight rows of ``p_in``
    (I' x k_in) act through the layer's own op (``conv2d`` / ``linear``), the bias row is added as a bias.
    ``positions`` = S, the output positions of the call (what a bias-only factor of ones spans)."""
    m, b = layer.module, a.shape[0]
    w = p_in[: p_in.shape[0] - 1] if layer.bias else p_in
    bias = p_in[-1] * scale_b if layer.bias else None
    if not layer.weight:  # bias only: the factor is a column of ones
        return bias.expand(b, positions, -1)
    w = w.T * scale_w  # (k_in, I)
    if isinstance(m, nn.Conv2d):
        out = F.conv2d(a, w.reshape(-1, *m.weight.shape[1:]), bias, m.stride, m.padding, m.dilation)
        return out.flatten(2).transpose(1, 2)
    return F.linear(a.reshape(b, -1, a.shape[-1]), w, bias)


def output_grads(layer: Layer, g: Tensor) -> Tensor:
    """A layer call's output gradient as (B, S, O)."""
    if isinstance(layer.module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def check_bounds(bounds: Tensor, b: int) -> Tensor:
    """Segment boundaries (R + 1,) of consecutive rows of a batch of ``b``: ``0 = b_0 < b_1 < ... < b_R = b``."""
    bounds = torch.as_tensor(bounds).long().flatten().cpu()
    if bounds.numel() < 2 or int(bounds[0]) != 0 or int(bounds[-1]) != b or bool((bounds.diff() <= 0).any()):
        raise ValueError(f"segment bounds must rise strictly from 0 to the batch size {b}, got {bounds.tolist()}.")
    return bounds


def contract(a: Tensor, g: Tensor, bounds: Tensor | None = None) -> Tensor:
    """``sum_s g_s a_s^T`` per example (``bounds`` None) -> (B, O, I), or summed over each segment of consecutive
    examples ``bounds[r]:bounds[r + 1]`` -> (R, O, I): a group's gradient with one matmul, no per-example gradients."""
    if bounds is None:
        return torch.einsum("bso,bsi->boi", g, a)
    return torch.stack([g[s:e].flatten(0, 1).T @ a[s:e].flatten(0, 1) for s, e in zip(bounds[:-1].tolist(),
                                                                                    bounds[1:].tolist())])


def segment_sum(t: Tensor, bounds: Tensor | None = None) -> Tensor:
    """Rows of ``t`` (B, ...) summed over each segment (R, ...); unchanged when ``bounds`` is None."""
    if bounds is None:
        return t
    ids = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff()).to(t.device)
    return t.new_zeros(len(bounds) - 1, *t.shape[1:]).index_add_(0, ids, t)


def factor_grads(layer: Layer, a: Tensor, g: Tensor, bounds: Tensor | None = None) -> dict[str, Tensor]:
    """Per-example (or per-segment) gradients ``{name: (R, *param.shape)}`` from a layer's factors."""
    full = contract(a, g, bounds)
    out, w = {}, layer.module.weight
    if layer.weight:
        out[layer.weight] = full[..., : w[0].numel()].reshape(-1, *w.shape)
    if layer.bias:
        out[layer.bias] = full[..., -1]
    return out


def norm_grads(layer: Layer, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-example affine gradients of a BatchNorm (eval) / LayerNorm call: ``{name: (B, *param.shape)}``."""
    m, b = layer.module, a.shape[0]
    if isinstance(m, nn.LayerNorm):
        x_hat = F.layer_norm(a, m.normalized_shape, eps=m.eps)
        shape = (b, -1, *m.normalized_shape)
        gw, gb = (g * x_hat).reshape(shape).sum(1), g.reshape(shape).sum(1)
    else:
        view = (1, -1) + (1,) * (a.dim() - 2)
        x_hat = (a - m.running_mean.view(view)) * torch.rsqrt(m.running_var.view(view) + m.eps)
        dims = tuple(range(2, a.dim()))
        gw, gb = (g * x_hat).sum(dims) if dims else g * x_hat, g.sum(dims) if dims else g
    out = {}
    if layer.weight:
        out[layer.weight] = gw
    if layer.bias:
        out[layer.bias] = gb
    return out


def func_grads(module: nn.Module, params: dict[str, nn.Parameter], x: Tensor, y: Tensor, output_fn: OutputFn
               ) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients ``{name: (B, *shape)}`` and outputs (B,) via ``torch.func.vmap(grad(...))``."""
    from torch.func import functional_call, grad, vmap

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        value = output_fn(functional_call(module, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)).sum()
        return value, value

    detached = {n: p.detach() for n, p in params.items()}
    try:
        with torch.enable_grad():
            grads, values = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(detached, x, y)
    except Exception as err:  # functorch raises many types for unsupported ops
        raise ValueError(
            f"torch.func could not compute per-example gradients of {type(module).__name__} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Select parameters of Linear, "
            "Conv2d, BatchNorm or LayerNorm layers (`parameters=` / `module_types=`), which use the layer route, or "
            "make the forward pass vmap-compatible (no in-place ops on inputs, no .item(), no data-dependent flow)."
        ) from err
    return grads, values


def func_group_grads(module: nn.Module, params: dict[str, nn.Parameter], x: Tensor, y: Tensor, output_fn: OutputFn,
                     bounds: Tensor) -> dict[str, Tensor]:
    """Gradients ``{name: (R, *shape)}`` of each segment's summed output, by ordinary backward passes of one forward
    (one batched vector-Jacobian product with one-hot rows; a loop over segments when vmap cannot batch it)."""
    with torch.enable_grad():
        values = output_fn(module(x), y)
    rows = torch.repeat_interleave(torch.arange(len(bounds) - 1), bounds.diff()).to(values.device)
    onehot = (rows.unsqueeze(0) == torch.arange(len(bounds) - 1, device=values.device).unsqueeze(1)).to(values.dtype)
    names, tensors = list(params), list(params.values())
    try:
        grads = torch.autograd.grad(values, tensors, grad_outputs=onehot, is_grads_batched=True, allow_unused=True,
                                    retain_graph=True)
    except RuntimeError:
        per = [torch.autograd.grad((values * w).sum(), tensors, allow_unused=True, retain_graph=True) for w in onehot]
        grads = tuple(torch.stack([p[i] if p[i] is not None else torch.zeros_like(tensors[i]) for p in per])
                      for i in range(len(tensors)))
    return {n: g.detach() if g is not None else tensors[i].new_zeros(len(onehot), *tensors[i].shape)
            for i, (n, g) in enumerate(zip(names, grads))}
