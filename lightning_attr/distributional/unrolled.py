"""Forward-mode unrolled differentiation of SGD training (d-TDA, arXiv 2506.12965): how the final weights move when a
training example is down-weighted in every step it appears in.

Convention (one sign, one scale). Step ``t`` minimizes the step's loss ``L_t(theta) = sum_i w_i l_i(theta)`` over the
rows ``i`` of its batch, ``w_i`` the coefficient of ``l_i`` in it: ``1 / |B_t|`` for a mean-reduced batch loss,
``1 / (|B| * A)`` per row of ``A`` accumulated micro-batches of size ``|B|``. Down-weighting example ``k`` by
``epsilon`` multiplies each of its ``w_k`` by ``1 - epsilon``; ``epsilon = 1`` removes ``k``. The response
``r_t = d theta_t / d epsilon`` at ``epsilon = 0`` obeys, for plain SGD with step size ``eta_t``,

    r_{t+1} = r_t - eta_t H_t(theta_t) r_t + eta_t sum_{rows i of k in B_t} w_i grad l_k(theta_t),    r_0 = 0,

with ``H_t`` the Hessian of ``L_t`` (for a mean-reduced batch the source is ``eta_t [k in B_t] / |B_t| grad l_k``:
that ``1 / |B_t|`` is where the influence function's ``1 / N`` comes from). In general ``r_{t+1} = r_t - eta_t d_t``
with ``d_t`` the response of the update direction of torch.optim.SGD: the gradient's response
``dg_t = H_t r_t - sum_i w_i grad l_k + weight_decay * r_t``, through the momentum buffer's own response
``rb_1 = dg_1``, ``rb_{t+1} = momentum * rb_t + (1 - dampening) * dg_{t+1}``, and ``d_t = dg_t + momentum * rb_{t+1}``
(nesterov) or ``rb_{t+1}``. Removing ``k`` then changes a measurement by about

    m(theta_T without k) - m(theta_T) ~ grad m(theta_T)^T r_T        (first order in epsilon, at epsilon = 1).

Per step, ``H_t r_t - sum_i w_i grad l_k`` is ONE Jacobian-vector product of the step's gradient in the direction
(``r_t``, ``-w * [row is k]``) of (weights, loss coefficients), vmapped over the K tracked examples (``torch.func``):
about two gradient evaluations per tracked example; memory K parameter vectors (2K with momentum). As training
converges ``r_T`` tends to the influence function ``H^-1 grad l_k / N`` (exactly for GLMs, full-batch descent).

:func:`forward_step` must see the weights ``theta_t`` BEFORE the optimizer applies step ``t``, and the model's forward
must be deterministic given its parameters (no dropout draws; eval-mode batch norm or fixed statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from lightning_attr.distributional.optimizers import SGDHyperparameters

__all__ = ["ForwardResponse", "LossFn", "MicroBatch", "forward_step", "measurement_jacobian", "predict_change"]

LossFn = Callable[[Tensor, Tensor], Tensor]  # (outputs, targets) -> per-example losses (B,)
Params = Mapping[str, Tensor]


class MicroBatch(NamedTuple):
    """Rows of one optimizer step: ``inputs`` (B, ...) or a tuple of model arguments, ``targets`` for the loss,
    ``weights`` (B,) the coefficient of each row's loss in the step's loss, ``indices`` (B,) each row's dataset index
    (an example may appear in several rows: each row's weight counts)."""

    inputs: Tensor | tuple[Tensor, ...]
    targets: Tensor
    weights: Tensor
    indices: Tensor


@dataclass
class ForwardResponse:
    """Responses ``r = d theta / d epsilon`` of the K tracked ``examples`` (dataset indices (K,)): ``r[name]``
    (K, *param.shape), ``momentum[name]`` (K, *param.shape) the momentum buffer's response (absent before the first
    momentum step of that parameter), ``steps`` taken."""

    examples: Tensor
    r: dict[str, Tensor]
    momentum: dict[str, Tensor] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def zeros(cls, examples: Sequence[int] | Tensor, params: Params) -> ForwardResponse:
        """``r_0 = 0`` for the tracked ``examples`` (distinct dataset indices) over ``params`` (name -> tensor)."""
        ex = torch.as_tensor(examples, dtype=torch.long).flatten()
        if ex.numel() == 0 or ex.unique().numel() != ex.numel() or bool((ex < 0).any()):
            raise ValueError(f"`examples` must be distinct dataset indices >= 0, at least one; got {ex.tolist()}.")
        if not params:
            raise ValueError("`params` is empty: give the trained parameters (name -> tensor) to differentiate.")
        r = {n: torch.zeros((len(ex), *p.shape), dtype=p.dtype, device=p.device) for n, p in params.items()}
        return cls(ex.to(next(iter(params.values())).device), r)

    def flat(self) -> Tensor:
        """The responses as one matrix (K, P), parameters in the order of ``r``."""
        return _flatten(self.r)


def _flatten(tensors: Mapping[str, Tensor], order: Sequence[str] | None = None) -> Tensor:
    """``{name: (M, *shape)}`` -> (M, P), concatenated in ``order`` (default: the mapping's)."""
    return torch.cat([tensors[n].flatten(1) for n in (order or list(tensors))], dim=1)


def _step_loss(model: nn.Module, batch: MicroBatch, loss_fn: LossFn) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """``(params, weights) -> sum_i weights_i l_i(params)`` on ``batch`` (its gradient in ``weights`` is the losses)."""
    args = batch.inputs if isinstance(batch.inputs, tuple) else (batch.inputs,)

    def loss(params: dict[str, Tensor], weights: Tensor) -> Tensor:
        losses = loss_fn(functional_call(model, params, args), batch.targets)
        if losses.shape != weights.shape:
            raise ValueError(f"`loss_fn` must return one loss per row, shape {tuple(weights.shape)}; got "
                             f"{tuple(losses.shape)} (use reduction='none').")
        return (weights * losses).sum()

    return loss


def _step_gradient(model: nn.Module, batch: MicroBatch, loss_fn: LossFn
                   ) -> Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]]:
    """``(params, weights) -> grad_params sum_i weights_i l_i(params)`` on ``batch``."""
    return grad(_step_loss(model, batch, loss_fn))


def _check_batch(batch: MicroBatch) -> None:
    b = batch.weights.shape
    if batch.weights.dim() != 1 or batch.indices.shape != b:
        raise ValueError(f"`weights` and `indices` of a MicroBatch must both be (B,), got {tuple(b)} and "
                         f"{tuple(batch.indices.shape)}.")


def gradient_response(model: nn.Module, params: Params, state: ForwardResponse, batch: MicroBatch, loss_fn: LossFn,
                      chunk_size: int | None = None) -> dict[str, Tensor]:
    """``H_B r_k - sum_{rows i of k} w_i grad l_k`` (K, *shape) per parameter: the response of ``batch``'s gradient
    to ``epsilon``, one JVP per tracked example (vmapped, ``chunk_size`` of them at a time)."""
    _check_batch(batch)
    primal = {n: p.detach() for n, p in params.items()}
    weights = batch.weights.to(next(iter(primal.values())).dtype)
    member = batch.indices.to(state.examples.device).unsqueeze(0) == state.examples.unsqueeze(1)  # (K, B)
    coefficient = -weights.unsqueeze(0) * member  # d w_i / d epsilon for each tracked example
    step_grad = _step_gradient(model, batch, loss_fn)

    def tangent(r_k: dict[str, Tensor], c_k: Tensor) -> dict[str, Tensor]:
        return jvp(step_grad, (primal, weights), (r_k, c_k))[1]

    return vmap(tangent, chunk_size=chunk_size)({n: state.r[n] for n in primal}, coefficient)


def _per_parameter(hyper: SGDHyperparameters | Mapping[str, SGDHyperparameters], names: Sequence[str]
                   ) -> dict[str, SGDHyperparameters]:
    if isinstance(hyper, SGDHyperparameters):
        return {n: hyper for n in names}
    missing = [n for n in names if n not in hyper]
    if missing:
        raise ValueError(f"`hyper` has no settings for parameters {missing[:5]}; give an SGDHyperparameters for all, "
                         "or one per parameter name (see `hyperparameters_by_name`).")
    return {n: hyper[n] for n in names}


def sgd_response_update(state: ForwardResponse, dg: Mapping[str, Tensor],
                        hyper: Mapping[str, SGDHyperparameters]) -> ForwardResponse:
    """The next state from the gradient's response ``dg`` (without weight decay), following torch.optim.SGD."""
    r, momentum = {}, dict(state.momentum)
    for n, h in hyper.items():
        d = dg[n] + h.weight_decay * state.r[n] if h.weight_decay else dg[n]
        if h.momentum:
            buf = d if n not in state.momentum else h.momentum * state.momentum[n] + (1 - h.dampening) * d
            momentum[n] = buf
            d = d + h.momentum * buf if h.nesterov else buf
        r[n] = state.r[n] - h.lr * d
    return ForwardResponse(state.examples, r, momentum, state.steps + 1)


def forward_step(model: nn.Module, params: Params, state: ForwardResponse, batches: MicroBatch | Sequence[MicroBatch],
                 loss_fn: LossFn, hyper: SGDHyperparameters | Mapping[str, SGDHyperparameters],
                 chunk_size: int | None = None, all_reduce_sum: Callable[[Tensor], Tensor] | None = None
                 ) -> ForwardResponse:
    """One optimizer step of the responses: ``state`` at ``theta_t`` -> the state at ``theta_{t+1}``.

    Args:
        model: the module; ``functional_call(model, params, inputs)`` gives its outputs (other tensors: its own).
        params: the trained parameters at ``theta_t`` (name -> tensor), before the optimizer's step ``t``.
        state: the responses so far (:meth:`ForwardResponse.zeros` before the first step).
        batches: the step's micro-batch, or all micro-batches accumulated into the step (their gradients add up,
            each at ``theta_t``; ``weights`` say how each row's loss enters the step's loss).
        loss_fn: ``(outputs, targets) -> (B,)`` per-example losses.
        hyper: SGD settings of this step for all parameters, or per parameter name.
        chunk_size: tracked examples per vmapped JVP (None: all at once).
        all_reduce_sum: when the step's micro-batches are spread over data-parallel processes, each process passes its
            own ``batches`` and this sum over processes of a tensor (in place or returned): the gradient's response is
            summed before the SGD update, as the gradients are, so every process returns the same state.
    """
    batches = [batches] if isinstance(batches, MicroBatch) else list(batches)
    if not batches:
        raise ValueError("`batches` is empty: an optimizer step needs at least one micro-batch.")
    if set(params) != set(state.r):
        raise ValueError(f"`params` and `state` cover different parameters: {sorted(set(params) ^ set(state.r))[:5]}; "
                         "build the state with ForwardResponse.zeros over the same params.")
    settings = _per_parameter(hyper, list(params))
    dg: dict[str, Tensor] = {}
    for batch in batches:
        part = gradient_response(model, params, state, batch, loss_fn, chunk_size)
        dg = part if not dg else {n: dg[n] + part[n] for n in dg}
    if all_reduce_sum is not None:
        dg = _sum_over_processes(dg, all_reduce_sum)
    return sgd_response_update(state, dg, settings)


def _sum_over_processes(dg: dict[str, Tensor], all_reduce_sum: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """``dg`` summed over processes with one collective on the concatenated tensors."""
    names = list(dg)
    flat = all_reduce_sum(torch.cat([dg[n].flatten() for n in names]))
    parts = flat.split([dg[n].numel() for n in names])
    return {n: part.view_as(dg[n]) for n, part in zip(names, parts)}


def measurement_jacobian(measure: Callable[[dict[str, Tensor]], Tensor], params: Params) -> dict[str, Tensor]:
    """``grad m`` of Q measurements: ``measure(params) -> (Q,)`` (or a scalar, Q = 1) -> ``{name: (Q, *shape)}``."""
    primal = {n: p.detach() for n, p in params.items()}
    return jacrev(lambda p: measure(p).reshape(-1))(primal)


def predict_change(jacobian: Tensor | Mapping[str, Tensor], response: Tensor | Mapping[str, Tensor] | ForwardResponse
                   ) -> Tensor:
    """Predicted change of each measurement when each tracked example is removed: ``grad m^T r`` (K, Q).

    ``jacobian``: (Q, P) or ``{name: (Q, *shape)}``; ``response``: (K, P), ``{name: (K, *shape)}`` or a
    :class:`ForwardResponse`. Mappings are flattened in the response's parameter order."""
    r = response.r if isinstance(response, ForwardResponse) else response
    order = list(r) if isinstance(r, Mapping) else list(jacobian) if isinstance(jacobian, Mapping) else None
    if isinstance(r, Mapping) and isinstance(jacobian, Mapping) and set(r) != set(jacobian):
        raise ValueError(f"`jacobian` and `response` cover different parameters: {sorted(set(jacobian) ^ set(r))[:5]}.")
    j = _flatten(jacobian, order) if isinstance(jacobian, Mapping) else jacobian
    r = _flatten(r, order) if isinstance(r, Mapping) else r
    if j.dim() != 2 or r.dim() != 2 or j.shape[1] != r.shape[1]:
        raise ValueError(f"`jacobian` (Q, P) and `response` (K, P) must share P; got {tuple(j.shape)} and "
                         f"{tuple(r.shape)}.")
    return r @ j.T
