"""Reverse-mode (adjoint) unrolled differentiation of SGD training (d-TDA, arXiv 2506.12965): the effect of
down-weighting EVERY training example on a few measurements, by one backward sweep over a recorded trajectory.

Convention: that of :mod:`lightning_attr.distributional.unrolled`. Step ``t`` (``t = 0 .. T-1``, at weights
``theta_t``) minimizes ``L_t(theta) = sum_i w_i l_i(theta)`` over the rows ``i`` of its micro-batches (their gradients
add at ``theta_t``); down-weighting example ``k`` by ``epsilon`` multiplies each of its ``w_i`` by ``1 - epsilon``, so
the step's gradient moves by ``-s_{t,k}``, ``s_{t,k} = sum_{rows i of k in B_t} w_i grad l_k(theta_t)``. The response
is ``r = d theta / d epsilon`` at ``epsilon = 0`` and the predicted change of a measurement when ``k`` is removed
(``epsilon = 1``) is ``grad m(theta_T)^T r_T``, exactly the quantity forward mode computes one example at a time.

Plain SGD, ``theta_{t+1} = theta_t - eta_t (g_t(theta_t) + wd theta_t)``: with ``A_t = I - eta_t (H_t + wd I)`` the
response obeys ``r_{t+1} = A_t r_t + eta_t s_{t,k}``, so ``grad m^T r_T = sum_t eta_t lambda_{t+1}^T s_{t,k}`` with the
adjoint ``lambda_T = grad m(theta_T)``, ``lambda_t = A_t^T lambda_{t+1}`` (``H_t`` symmetric). One sweep from ``T`` down
to 0 gives the influence of every example:

    influence[k] = sum_t eta_t sum_{rows i of k in B_t} w_i lambda_{t+1}^T grad l_k(theta_t).

Momentum (torch.optim.SGD: ``d_t = g_t + wd theta_t``; buffer ``b_t = d_t`` at a parameter's first momentum step, else
``b_t = mu b_{t-1} + (1 - tau) d_t``; ``theta_{t+1} = theta_t - eta_t u_t`` with ``u_t = b_t``, or ``d_t + mu b_t``
for nesterov). The state is ``(theta_t, b_{t-1})`` and so is the adjoint: ``lambda`` for the weights and ``nu`` for
the buffer, ``lambda_T = grad m``, ``nu_T = 0``. Linearizing one step (``dd = (H + wd) r - s``,
``db = mu rho + a dd`` with ``a = 1`` at the first step, else ``1 - tau``; ``dr' = r - eta du``, ``rho' = db``) and
asking ``lambda_{t+1}^T r_{t+1} + nu_{t+1}^T rho_{t+1} = lambda_t^T r_t + nu_t^T rho_t + (source)`` gives, with
``lambda = lambda_{t+1}``, ``nu = nu_{t+1}``:

    c = nu - eta lambda                      (nesterov: c = nu - eta mu lambda)     the adjoint of the buffer b_t
    e = a c                                  (nesterov: e = a c - eta lambda)       the adjoint of the direction d_t
    lambda_t = lambda + (H_t + wd I) e,      nu_t = mu c  (0 at the first step: no earlier buffer)
    influence[k] += -e^T s_{t,k} = -sum_{rows i of k} w_i e^T grad l_k(theta_t).

Without momentum ``e = -eta lambda`` (the plain recursion above), and a parameter whose momentum is 0 at step ``t``
keeps its buffer untouched (as PyTorch does), so ``nu`` passes through. Learning rate, momentum, dampening, nesterov
and weight decay may differ per parameter and per step. A trajectory that starts from a checkpoint holding momentum
buffers (a resumed run) attributes the recorded steps only: those buffers do not depend on ``epsilon``.

Cost per step and micro-batch: the gradient ``g = grad_params L`` with its graph, then per measurement ONE backward of
``g . e`` in ``(params, w)`` (``w`` the row weights, ``g = sum_i w_i grad l_i``), which gives both ``H e`` and every row's
``e^T grad l_i``.
The weights ``theta_t`` are needed in reverse order: they are recomputed forward from the nearest stored checkpoint
with :func:`~lightning_attr.distributional.optimizers.sgd_step` (exactly torch.optim.SGD's update), one segment of
``every`` steps at a time (memory: one segment's weights and micro-batches, the (N, Q) result, 2Q parameter vectors;
never an (N, P) matrix). So a sweep costs about one gradient (replay) plus one gradient with its graph and Q double
backwards per step.

Replay is exact only if the model's forward is deterministic given its parameters (no dropout draws; eval-mode batch
norm or fixed statistics), ``data(indices)`` returns the same rows as in training, and every trained parameter gets a
gradient at every step (PyTorch skips parameters whose ``.grad`` is None, weight decay included). Given the trained
weights (``final_params``), :func:`reverse_sweep` checks the last replayed segment against them and refuses a replay
that strays (:func:`replay_divergence`), at the cost of one more gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, pairwise
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad

from lightning_attr.distributional.optimizers import SGDHyperparameters, sgd_step
from lightning_attr.distributional.unrolled import LossFn, MicroBatch, _check_batch, _per_parameter, _step_loss

__all__ = ["Checkpoint", "DataFn", "RecordedBatch", "RecordedStep", "ReplayState", "Trajectory", "adjoint_step",
           "replay", "replay_divergence", "reverse_sweep"]

DataFn = Callable[[Tensor], tuple[Any, Tensor]]  # dataset indices (B,) -> (inputs or tuple of model args, targets)
Hyper = SGDHyperparameters | Mapping[str, SGDHyperparameters]


class RecordedBatch(NamedTuple):
    """One micro-batch of a recorded step: ``indices`` (B,) dataset indices (int64, CPU) and ``weights`` (B,) each
    row's coefficient in the step's loss (see :class:`~lightning_attr.distributional.unrolled.MicroBatch`)."""

    indices: Tensor
    weights: Tensor


class RecordedStep(NamedTuple):
    """One optimizer step: its micro-batches and its SGD settings (one for all parameters, or per parameter name)."""

    batches: tuple[RecordedBatch, ...]
    hyper: Hyper


class Checkpoint(NamedTuple):
    """Stored state before a step: the trained ``params`` and the SGD ``momentum`` buffers that exist then."""

    params: dict[str, Tensor]
    momentum: dict[str, Tensor]


class ReplayState(NamedTuple):
    """The recomputed state before step ``step``: ``params`` (theta_step), ``momentum`` buffers, and the step's
    micro-batches as fetched from ``data`` (empty at the end of the trajectory)."""

    step: int
    params: dict[str, Tensor]
    momentum: dict[str, Tensor]
    batches: list[MicroBatch]


def _recorded(batch: MicroBatch | RecordedBatch) -> RecordedBatch:
    if not isinstance(batch, (MicroBatch, RecordedBatch)):
        raise TypeError(f"each micro-batch of `batches` must be a MicroBatch or a RecordedBatch, got "
                        f"{type(batch).__name__}.")
    idx, w = batch.indices, batch.weights
    if idx.dim() != 1 or w.shape != idx.shape or idx.is_floating_point() or idx.is_complex():
        raise ValueError(f"a micro-batch needs integer `indices` (B,) and `weights` (B,) of the same shape; got "
                         f"{tuple(idx.shape)} ({idx.dtype}) and {tuple(w.shape)}.")
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"`indices` must be dataset indices >= 0; got {int(idx.min())}.")
    return RecordedBatch(idx.detach().to("cpu", torch.long, copy=True), w.detach().clone())


@dataclass
class Trajectory:
    """What a reverse sweep needs from a training run: per optimizer step its micro-batches (dataset indices and row
    weights; the inputs come back from a ``data`` function) and SGD settings, and checkpoints of the weights (and
    momentum buffers) before every ``every``-th step, kept on ``storage`` (None: where they are).

    Record in training order: ``checkpoint(t, ...)`` with the weights before step ``t`` when :meth:`due`, then
    ``record_step(...)`` for step ``t``. A checkpoint at step 0 is required."""

    every: int = 1
    storage: torch.device | str | None = None
    steps: list[RecordedStep] = field(default_factory=list)
    checkpoints: dict[int, Checkpoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"`every` must be an int >= 1 (store the weights every that many steps), got "
                             f"{self.every!r}.")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def due(self, step: int) -> bool:
        """Whether the weights before ``step`` are to be stored (every ``every`` steps, from 0)."""
        return step % self.every == 0

    def record_step(self, batches: MicroBatch | RecordedBatch | Sequence[MicroBatch | RecordedBatch],
                    hyper: Hyper) -> None:
        """Append the next optimizer step: its micro-batch(es) (only ``indices`` and ``weights`` are kept) and the
        SGD settings it ran with (``hyper`` as in :func:`~lightning_attr.distributional.unrolled.forward_step`)."""
        items = [batches] if isinstance(batches, (MicroBatch, RecordedBatch)) else list(batches)
        if not items:
            raise ValueError("`batches` is empty: an optimizer step needs at least one micro-batch.")
        if isinstance(hyper, Mapping):
            bad = [n for n, h in hyper.items() if not isinstance(h, SGDHyperparameters)]
            hyper = dict(hyper)
        else:
            bad = [] if isinstance(hyper, SGDHyperparameters) else ["(all)"]
        if bad:
            raise TypeError(f"`hyper` must be an SGDHyperparameters or a mapping name -> SGDHyperparameters; "
                            f"not for {bad[:5]}.")
        self.steps.append(RecordedStep(tuple(_recorded(b) for b in items), hyper))

    def checkpoint(self, step: int, params: Mapping[str, Tensor],
                   momentum_buffers: Mapping[str, Tensor] | None = None) -> None:
        """Store the trained ``params`` (name -> tensor) and the optimizer's ``momentum_buffers`` (name -> tensor,
        those that exist) as they are BEFORE optimizer step ``step`` (0 <= step <= num_steps)."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.num_steps:
            raise ValueError(f"`step` must be an int in [0, {self.num_steps}] (the steps recorded so far), got "
                             f"{step!r}.")
        buffers = dict(momentum_buffers or {})
        if not params:
            raise ValueError("`params` is empty: give the trained parameters (name -> tensor).")
        stray = [n for n in buffers if n not in params or buffers[n].shape != params[n].shape]
        if stray:
            raise ValueError(f"`momentum_buffers` {stray[:5]} match no parameter of `params` by name and shape.")
        if self.checkpoints:
            ref = next(iter(self.checkpoints.values())).params
            if {n: t.shape for n, t in ref.items()} != {n: t.shape for n, t in params.items()}:
                raise ValueError("`params` differ from the stored checkpoints' names or shapes: "
                                 f"{sorted(set(ref) ^ set(params))[:5] or 'same names, other shapes'}.")
        keep = {n: t.detach().to(self.storage or t.device, copy=True) for n, t in params.items()}
        self.checkpoints[step] = Checkpoint(keep, {n: t.detach().to(self.storage or t.device, copy=True)
                                                   for n, t in buffers.items()})

    def max_index(self) -> int:
        """The largest dataset index recorded (-1 when no row is)."""
        return max((int(b.indices.max()) for s in self.steps for b in s.batches if b.indices.numel()), default=-1)

    def state_dict(self) -> dict[str, Any]:
        """Plain containers of tensors and numbers (loads with ``torch.load(..., weights_only=True)``)."""
        def hyper_state(h: Hyper) -> dict[str, Any]:
            if isinstance(h, SGDHyperparameters):
                return {"all": dataclasses.asdict(h)}
            return {"by_name": {n: dataclasses.asdict(v) for n, v in h.items()}}

        steps = [{"indices": [b.indices for b in s.batches], "weights": [b.weights for b in s.batches],
                  "hyper": hyper_state(s.hyper)} for s in self.steps]
        checkpoints = {t: {"params": c.params, "momentum": c.momentum} for t, c in self.checkpoints.items()}
        return {"every": self.every, "steps": steps, "checkpoints": checkpoints}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], storage: torch.device | str | None = None) -> Trajectory:
        """The trajectory :meth:`state_dict` described."""
        out = cls(every=int(state["every"]), storage=storage)
        for s in state["steps"]:
            h = s["hyper"]
            hyper = (SGDHyperparameters(**h["all"]) if "all" in h else
                     {n: SGDHyperparameters(**v) for n, v in h["by_name"].items()})
            out.record_step([RecordedBatch(i, w) for i, w in zip(s["indices"], s["weights"])], hyper)
        for t, c in sorted(state["checkpoints"].items()):
            out.checkpoint(int(t), c["params"], c["momentum"])
        return out


def _fetch(step: RecordedStep, data: DataFn, like: Tensor) -> list[MicroBatch]:
    """The step's micro-batches with inputs and targets from ``data``; weights in ``like``'s dtype and device."""
    out = []
    for b in step.batches:
        got = data(b.indices)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ValueError(f"`data(indices)` must return (inputs, targets); got {type(got).__name__}"
                             f"{f' of length {len(got)}' if isinstance(got, (tuple, list)) else ''}.")
        batch = MicroBatch(got[0], got[1], b.weights.to(like.device, like.dtype), b.indices.to(like.device))
        _check_batch(batch)
        out.append(batch)
    return out


def _step_gradient_sum(model: nn.Module, params: dict[str, Tensor], batches: Sequence[MicroBatch],
                       loss_fn: LossFn) -> dict[str, Tensor]:
    """``grad L_t(theta_t)``: the micro-batches' gradients added in order (as ``.grad`` accumulates)."""
    total: dict[str, Tensor] = {}
    for batch in batches:
        part = grad(_step_loss(model, batch, loss_fn))(params, batch.weights)
        total = part if not total else {n: total[n] + part[n] for n in total}
    return total


def _to_model(model: nn.Module, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    own = dict(model.named_parameters())
    missing = [n for n in tensors if n not in own]
    if missing:
        raise ValueError(f"checkpointed parameters {missing[:5]} are not parameters of `model` (its names: "
                         f"{list(own)[:5]}...); record the names of `model.named_parameters()`.")
    return {n: t.detach().to(own[n].device) for n, t in tensors.items()}


def replay(model: nn.Module, trajectory: Trajectory, data: DataFn, loss_fn: LossFn, start: int = 0
           ) -> Iterator[ReplayState]:
    """Recompute the training run from the checkpoint at ``start``: yields the state before each step ``t = start ..
    T`` (the last one the final weights), lazily: step ``t`` is applied only when the next state is asked for, with
    :func:`~lightning_attr.distributional.optimizers.sgd_step` on ``grad L_t`` (micro-batches from ``data``)."""
    if start not in trajectory.checkpoints:
        raise ValueError(f"`start`={start} is no checkpoint of `trajectory` (stored: "
                         f"{sorted(trajectory.checkpoints)[:10]}).")
    ckpt = trajectory.checkpoints[start]
    params, momentum = _to_model(model, ckpt.params), _to_model(model, ckpt.momentum)
    names = list(params)
    like = next(iter(params.values()))
    for t in range(start, trajectory.num_steps):
        step = trajectory.steps[t]
        batches = _fetch(step, data, like)
        yield ReplayState(t, params, momentum, batches)
        grads = _step_gradient_sum(model, params, batches, loss_fn)
        params, momentum = sgd_step(params, momentum, grads, _per_parameter(step.hyper, names))
    yield ReplayState(trajectory.num_steps, params, momentum, [])


def _curvature_and_rows(model: nn.Module, params: dict[str, Tensor], batch: MicroBatch, loss_fn: LossFn,
                        e: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """``(H_B e (Q, *shape) per parameter, e^T grad l_i (Q, B))`` for Q directions ``e``, by double backward: the
    gradient ``g = grad_params L_B`` with its graph, then per direction ``grad (g . e_q)`` in ``(params, w)``: ``H_B e_q``
    and, since ``g = sum_i w_i grad l_i``, each row's ``e_q^T grad l_i``. (Plain autograd: on small models a
    ``vmap``-ed forward-over-reverse JVP costs about twice as much in overhead.)"""
    names = list(params)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    w = batch.weights.detach().clone().requires_grad_(True)
    inputs = [leaves[n] for n in names] + [w]
    q = e[names[0]].shape[0]
    he: dict[str, list[Tensor]] = {n: [] for n in names}
    rows = []
    with torch.enable_grad():
        g = torch.autograd.grad(_step_loss(model, batch, loss_fn)(leaves, w), inputs[:-1], create_graph=True)
        for k in range(q):
            dot = sum((gi * e[n][k]).sum() for gi, n in zip(g, names))
            out = torch.autograd.grad(dot, inputs, retain_graph=k < q - 1, allow_unused=True)
            for n, o, leaf in zip(names, out, inputs):
                he[n].append(torch.zeros_like(leaf) if o is None else o.detach())
            rows.append(torch.zeros_like(w) if out[-1] is None else out[-1].detach())
    return {n: torch.stack(v) for n, v in he.items()}, torch.stack(rows)


def adjoint_step(model: nn.Module, state: ReplayState, hyper: Mapping[str, SGDHyperparameters], loss_fn: LossFn,
                 adjoint: tuple[dict[str, Tensor], dict[str, Tensor]], influence: Tensor,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One step of the sweep: the adjoint ``(lambda_{t+1}, nu_{t+1})`` ({name: (Q, *shape)} each) after step
    ``state.step`` -> ``(lambda_t, nu_t)`` before it; adds the step's term ``-sum_i w_i e^T grad l_i`` to
    ``influence`` (N, Q) in place at each row's dataset index (see the module docstring)."""
    lam, nu = adjoint
    e, nu_before = {}, {}
    for n, h in hyper.items():
        if not h.momentum:  # the buffer, if any, is untouched by this step
            e[n], nu_before[n] = -h.lr * lam[n], nu[n]
            continue
        first = n not in state.momentum
        c = nu[n] - (h.lr * h.momentum if h.nesterov else h.lr) * lam[n]
        e[n] = c if first else (1 - h.dampening) * c
        if h.nesterov:
            e[n] = e[n] - h.lr * lam[n]
        nu_before[n] = torch.zeros_like(c) if first else h.momentum * c
    he: dict[str, Tensor] = {}
    for batch in state.batches:
        part, rows = _curvature_and_rows(model, state.params, batch, loss_fn, e)
        he = part if not he else {n: he[n] + part[n] for n in he}
        influence.index_add_(0, batch.indices.to(influence.device), -(batch.weights.unsqueeze(1) * rows.T))
    lam_before = {n: lam[n] + he[n] + h.weight_decay * e[n] if h.weight_decay else lam[n] + he[n]
                  for n, h in hyper.items()}
    return lam_before, nu_before


def _check_measurements(params: Mapping[str, Tensor], measurement_grad: Mapping[str, Tensor]) -> int:
    """Q, after checking ``measurement_grad`` is ``{name: (Q, *param.shape)}`` over exactly ``params``."""
    if set(measurement_grad) != set(params):
        raise ValueError(f"`measurement_grad` must cover exactly the checkpointed parameters; differing names: "
                         f"{sorted(set(measurement_grad) ^ set(params))[:5]}.")
    qs = {n: g.shape[0] if g.dim() else None for n, g in measurement_grad.items()}
    bad = [n for n, g in measurement_grad.items() if g.dim() == 0 or tuple(g.shape[1:]) != tuple(params[n].shape)]
    if bad or len(set(qs.values())) != 1 or not next(iter(qs.values())):
        n = (bad or list(params))[0]
        raise ValueError(f"`measurement_grad` must be {{name: (Q, *param.shape)}} with one Q >= 1 for all; got "
                         f"{tuple(measurement_grad[n].shape)} for {n!r} of shape {tuple(params[n].shape)} "
                         f"(Q per name: {dict(list(qs.items())[:5])}).")
    return int(next(iter(qs.values())))


def _check_sweep(trajectory: Trajectory, measurement_grad: Mapping[str, Tensor], num_examples: int) -> int:
    if trajectory.num_steps == 0:
        raise ValueError("`trajectory` records no optimizer step: nothing to attribute.")
    if 0 not in trajectory.checkpoints:
        raise ValueError(f"`trajectory` has no checkpoint at step 0 (stored: {sorted(trajectory.checkpoints)[:5]}): "
                         "call trajectory.checkpoint(0, params, momentum_buffers) before the first optimizer step; "
                         "the sweep recomputes the weights forward from the checkpoints.")
    q = _check_measurements(trajectory.checkpoints[0].params, measurement_grad)
    for step in trajectory.steps:
        _per_parameter(step.hyper, list(measurement_grad))  # every step has settings for every parameter
    seen = trajectory.max_index()
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= seen or num_examples < 1:
        raise ValueError(f"`num_examples` must be an int > every recorded dataset index (the largest is {seen}) and "
                         f">= 1, got {num_examples!r}.")
    return q


def replay_divergence(start: Mapping[str, Tensor], replayed: Mapping[str, Tensor], trained: Mapping[str, Tensor]
                      ) -> float:
    """How far a replay strays from training over a segment: ``||replayed - trained|| / ||trained - start||`` (all
    parameters together), 0 for an exact replay, of order 1 when the replayed updates are not training's (dropout
    drawn in ``forward``, random augmentation, other rows from ``data``); 0 when neither moved."""
    names = list(trained)
    diff = sum(float((replayed[n].double() - trained[n].double().to(replayed[n].device)).pow(2).sum()) for n in names)
    moved = sum(float((trained[n].double() - start[n].double().to(trained[n].device)).pow(2).sum()) for n in names)
    return 0.0 if diff == 0 else (diff / moved) ** 0.5 if moved > 0 else float("inf")


def _default_tolerance(like: Tensor) -> float:
    return 1e-6 if like.dtype == torch.float64 else 2e-2


def _segment(model: nn.Module, trajectory: Trajectory, data: DataFn, loss_fn: LossFn, bounds: tuple[int, int],
             final_params: Mapping[str, Tensor] | None, tolerance: float | None) -> list[ReplayState]:
    """The replayed states before steps ``start .. stop - 1``; with ``final_params`` (the last segment only) the
    replay goes one step further and its end is checked against them (see :func:`replay_divergence`)."""
    start, stop = bounds
    states = replay(model, trajectory, data, loss_fn, start)
    # keep the weights and micro-batches; of the buffers only which exist matters (their values are not needed)
    segment = [s._replace(momentum=dict.fromkeys(s.momentum)) for s in islice(states, stop - start)]
    if final_params is not None:
        end = next(states).params
        allowed = tolerance if tolerance is not None else _default_tolerance(next(iter(end.values())))
        stray = replay_divergence(segment[0].params, end, {n: final_params[n] for n in end})
        if not stray <= allowed:
            raise ValueError(f"the replay of the recorded run does not reproduce training: its final weights differ "
                             f"from `final_params` by {stray:.3g} of the last {stop - start} step(s)' update (allowed "
                             f"{allowed:g}). The training forward must be a function of the weights (no dropout or "
                             "other randomness drawn in forward) and `data(indices)` must return exactly the training "
                             "rows (no random augmentation, no random labels or batch hooks).")
    return segment


def reverse_sweep(model: nn.Module, trajectory: Trajectory, data: DataFn, loss_fn: LossFn,
                  measurement_grad: Mapping[str, Tensor], num_examples: int,
                  final_params: Mapping[str, Tensor] | None = None, tolerance: float | None = None,
                  on_step: Callable[[int], None] | None = None) -> Tensor:
    """Predicted change of each of Q measurements when each training example is removed, ``grad m^T r_T`` (first
    order, ``epsilon = 1``), for all examples at once: (num_examples, Q), 0 for examples in no recorded step.

    Args:
        model: the module; ``functional_call(model, params, inputs)`` gives its outputs.
        trajectory: the recorded run (a checkpoint at step 0 required).
        data: ``indices (B,) -> (inputs, targets)``, the training rows as in training (the callback passes its
            training dataset).
        loss_fn: ``(outputs, targets) -> (B,)`` per-example losses, as trained.
        measurement_grad: ``{name: (Q, *param.shape)}`` the gradients of the Q measurements at the final weights
            ``theta_T`` (e.g. :func:`~lightning_attr.distributional.unrolled.measurement_jacobian`).
        num_examples: N, the training set size (> every recorded index).
        final_params: optional, the trained weights ``theta_T`` (name -> tensor): the replay of the last segment is
            then carried one step further and must reach them (a ``ValueError`` otherwise; costs one gradient).
        tolerance: allowed :func:`replay_divergence` for that check (default 1e-6 in float64, 2e-2 otherwise).
        on_step: called with each step's index once its adjoint step is done (``T - 1`` down to 0), e.g. a progress
            bar's update.
    """
    q = _check_sweep(trajectory, measurement_grad, num_examples)
    ref = _to_model(model, trajectory.checkpoints[0].params)
    names = list(ref)
    lam = {n: measurement_grad[n].detach().to(ref[n].device, ref[n].dtype) for n in names}
    adjoint = (lam, {n: torch.zeros_like(g) for n, g in lam.items()})
    like = next(iter(ref.values()))
    influence = torch.zeros(num_examples, q, dtype=like.dtype, device=like.device)
    bounds = sorted(t for t in trajectory.checkpoints if t < trajectory.num_steps) + [trajectory.num_steps]
    for start, stop in reversed(list(pairwise(bounds))):
        final = final_params if stop == trajectory.num_steps else None
        segment = _segment(model, trajectory, data, loss_fn, (start, stop), final, tolerance)
        for state in reversed(segment):
            hyper = _per_parameter(trajectory.steps[state.step].hyper, names)
            adjoint = adjoint_step(model, state, hyper, loss_fn, adjoint, influence)
            if on_step is not None:
                on_step(state.step)
        del segment
    return influence
