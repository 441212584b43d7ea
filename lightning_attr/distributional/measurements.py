"""Measurements ``m(theta)`` whose change d-TDA predicts: Q numbers computed from a model at given weights.

A measurement is called as ``m(module, params) -> (Q,)``: ``params`` maps parameter names to tensors (some or all of
``module``'s parameters; the rest, and the buffers, are the module's own, as in ``torch.func.functional_call``), and
``m.names`` names the Q columns (the ``measurements`` of a :class:`~lightning_attr.distributional.results.RunResult`).
Because a measurement is a function of ``params``, its gradient ``grad m`` is taken with ``torch.func`` and the predicted
change of removing each tracked example is ``grad m(theta_T)^T r_T`` (:func:`measure_change`, sign: after minus
before the removal, per unit of down-weighting; see :mod:`lightning_attr.distributional.unrolled`).

- :class:`QueryLosses` ``(x, y, loss)``: the loss of each of Q query examples;
- :class:`QueryLogits` ``(x, classes)``: the logit of a given class for each of Q queries;
- :class:`SplitLosses` / :class:`SplitLogits` ``(split, indices, num)``: the same for items of a named data split
  (default the first ``num`` of ``"val"``), taken when :meth:`Measurement.bind` hands them the datasets (the
  callbacks bind them to the datamodule's ``splits`` when training starts): config-friendly, and the same queries
  for every seed of an ensemble, so the seeds are coupled on the same measurements;
- :class:`FunctionMeasurement` (or any callable given to :func:`as_measurement`): ``fn(module, params) -> (Q,)``;
- a list of them: their columns one after another (:class:`Measurements`).

The module runs in whatever train / eval mode it is in: call with it in eval mode for test-time measurements (the
callbacks do). Floating query inputs are cast to the parameters' dtype and moved to their device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import Dataset

from lightning_attr.data.indexed import items_at
from lightning_attr.distributional.unrolled import ForwardResponse, LossFn, measurement_jacobian, predict_change
from lightning_attr.influence.outputs import cross_entropy

__all__ = ["LOSSES", "FunctionMeasurement", "Measurement", "Measurements", "QueryLogits", "QueryLosses",
           "SplitLogits", "SplitLosses", "SplitQueries", "as_measurement", "measure_change", "measure_value",
           "per_example_loss", "value_and_jacobian"]

Params = Mapping[str, Tensor]


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets.reshape(outputs.shape)).pow(2).flatten(1).mean(1)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": _mse}
"""Per-example losses ``(outputs, targets) -> (B,)`` by name: ``cross_entropy`` (``F.cross_entropy`` of logits and
class indices) and ``mse`` (the squared error averaged over each example's outputs: their mean over the batch is
``F.mse_loss(outputs, targets)``)."""


def per_example_loss(loss: str | LossFn) -> LossFn:
    """A per-example loss by name (see :data:`LOSSES`) or a callable ``(outputs, targets) -> (B,)``."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"`loss`={loss!r} is not one of {sorted(LOSSES)} or a callable (outputs, targets) -> (B,) "
                         "per-example losses.")
    return LOSSES[loss]


def _on_params(t: Tensor, params: Params) -> Tensor:
    p = next(iter(params.values()))
    return t.to(p.device, p.dtype) if t.is_floating_point() else t.to(p.device)


def _names(names: Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    out = tuple(default if names is None else names)
    if len(out) != len(default) or any("," in n for n in out):
        raise ValueError(f"`names` must give one name (without commas) per measurement, {len(default)} here; got "
                         f"{list(out)}.")
    return out


class Measurement:
    """Base class: ``m(module, params) -> (Q,)`` and ``names`` (Q,); ``splits`` names the data splits whose items
    :meth:`bind` must hand it before the first call (none: the measurement holds its queries)."""

    names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()

    def __call__(self, module: nn.Module, params: Params) -> Tensor:
        raise NotImplementedError

    def bind(self, datasets: Mapping[str, Dataset], input_key: str = "image", label_key: str = "label") -> None:
        """Take the queries from ``datasets`` ({split name: dataset} holding at least ``splits``; items unpacked by
        ``input_key`` / ``label_key`` as in :func:`~lightning_attr.data.indexed.unpack_batch`). Nothing to do here."""


class QueryLosses(Measurement):
    """The loss of each query: ``loss(module(x_q), y_q)`` for ``inputs`` (Q, ...) and ``targets`` (Q, ...).

    ``loss``: ``"cross_entropy"`` (default), ``"mse"`` or a callable ``(outputs, targets) -> (Q,)``; ``names``
    default ``loss_0, loss_1, ...``."""

    def __init__(self, inputs: Tensor, targets: Tensor, loss: str | LossFn = "cross_entropy",
                 names: Sequence[str] | None = None) -> None:
        if len(inputs) != len(targets) or len(inputs) == 0:
            raise ValueError(f"`inputs` and `targets` must hold the same number (>= 1) of queries, got {len(inputs)} "
                             f"and {len(targets)}.")
        self.inputs, self.targets, self.loss = inputs, torch.as_tensor(targets), per_example_loss(loss)
        self.names = _names(names, [f"loss_{i}" for i in range(len(inputs))])

    def __call__(self, module: nn.Module, params: Params) -> Tensor:
        outputs = functional_call(module, dict(params), (_on_params(self.inputs, params),))
        return self.loss(outputs, _on_params(self.targets, params))


class QueryLogits(Measurement):
    """The logit of class ``classes[q]`` (an int: the same class for all) for each query of ``inputs`` (Q, ...);
    ``names`` default ``logit_0_c3, ...`` (query 0, class 3)."""

    def __init__(self, inputs: Tensor, classes: int | Sequence[int] | Tensor, names: Sequence[str] | None = None
                 ) -> None:
        q = len(inputs)
        c = torch.as_tensor(classes, dtype=torch.long).flatten()
        c = c.expand(q).clone() if c.numel() == 1 else c
        if q == 0 or c.numel() != q or bool((c < 0).any()):
            raise ValueError(f"`classes` must be one class index >= 0, or one per query ({q}); got {classes!r}.")
        self.inputs, self.classes = inputs, c
        self.names = _names(names, [f"logit_{i}_c{int(k)}" for i, k in enumerate(c)])

    def __call__(self, module: nn.Module, params: Params) -> Tensor:
        logits = functional_call(module, dict(params), (_on_params(self.inputs, params),))
        classes = self.classes.to(logits.device)
        if logits.dim() != 2 or int(classes.max()) >= logits.shape[1]:
            raise ValueError(f"QueryLogits needs logits (Q, C) with every class in `classes` < C; got logits of shape "
                             f"{tuple(logits.shape)} and classes up to {int(classes.max())}.")
        return logits.gather(1, classes.unsqueeze(1)).squeeze(1)


class FunctionMeasurement(Measurement):
    """Any ``fn(module, params) -> (Q,)`` with ``names`` (Q); without names the columns are named ``{fn name}_i``
    once the function has been evaluated."""

    def __init__(self, fn: Callable[[nn.Module, Params], Tensor], names: Sequence[str] | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"a measurement must be callable as fn(module, params) -> (Q,), got {type(fn).__name__}.")
        self.fn, self.names = fn, tuple(names) if names is not None else ()
        self._named = names is not None
        label = getattr(fn, "__name__", "m")
        self._label = label if label.isidentifier() else "m"

    def __call__(self, module: nn.Module, params: Params) -> Tensor:
        out = self.fn(module, params)
        if isinstance(out, Tensor) and not self._named and out.dim() <= 1:
            self.names = tuple(f"{self._label}_{i}" for i in range(out.numel()))
        return out


class Measurements(Measurement):
    """Several measurements as one: their columns one after another (names must be distinct)."""

    def __init__(self, parts: Sequence[Measurement]) -> None:
        if not parts:
            raise ValueError("`measurements` is an empty list: give at least one measurement.")
        self.parts = list(parts)

    @property
    def names(self) -> tuple[str, ...]:  # type: ignore[override]
        names = tuple(n for m in self.parts for n in m.names)
        if len(set(names)) != len(names):
            raise ValueError(f"measurement names repeat: {names}; give each measurement its own `names=`.")
        return names

    @property
    def splits(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(s for m in self.parts for s in m.splits))

    def bind(self, datasets: Mapping[str, Dataset], input_key: str = "image", label_key: str = "label") -> None:
        for m in self.parts:
            m.bind(datasets, input_key, label_key)

    def __call__(self, module: nn.Module, params: Params) -> Tensor:
        return torch.cat([_checked(m, m(module, params)) for m in self.parts])


def _split_indices(indices: Sequence[int] | None, num: int) -> tuple[int, ...]:
    """The query positions: ``indices`` (distinct ints >= 0) or, when None, the first ``num``."""
    if indices is None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"`num` must be an int >= 1 (the first `num` items of the split are the queries), got "
                             f"{num!r}.")
        return tuple(range(num))
    try:
        t = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.dtype == torch.bool or \
            bool((t < 0).any()):
        raise ValueError(f"`indices` must be a non-empty list of item positions >= 0 in the split (or None: the first "
                         f"`num`), got {indices!r}.")
    out = tuple(int(i) for i in t.tolist())
    repeated = sorted({i for i in out if out.count(i) > 1})
    if repeated:
        raise ValueError(f"`indices` repeat {repeated[:5]}: give each query once.")
    return out


class SplitQueries(Measurement):
    """Base of the measurements on items of a named data split: the items at ``indices`` of ``split`` (default the
    first ``num``), the same for every seed, taken by :meth:`bind` (``inputs`` and ``labels`` afterwards). Columns are
    named ``{split}[{index}]/{kind}``, e.g. ``val[3]/loss``; a subclass builds the measurement on the queries
    (:meth:`on_queries`)."""

    kind = "query"

    def __init__(self, split: str = "val", indices: Sequence[int] | None = None, num: int = 8) -> None:
        if not isinstance(split, str) or not split or "," in split:
            raise ValueError(f"`split` must be the name of a data split (e.g. 'val'), got {split!r}.")
        self.split, self.indices = split, _split_indices(indices, num)
        self.names = tuple(f"{split}[{i}]/{self.kind}" for i in self.indices)
        self.inputs: Tensor | None = None
        self.labels: Tensor | None = None
        self.measurement: Measurement | None = None

    @property
    def splits(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.split,)

    def bind(self, datasets: Mapping[str, Dataset], input_key: str = "image", label_key: str = "label") -> None:
        """Take the items at ``indices`` of ``datasets[split]`` as the queries (again on every call)."""
        if self.split not in datasets:
            raise ValueError(f"{type(self).__name__} takes its queries from the split {self.split!r}, but the data "
                             f"has the splits {sorted(datasets)}; set `split` to one of them.")
        dataset = datasets[self.split]
        n = len(dataset)
        outside = [i for i in self.indices if i >= n]
        if outside:
            raise ValueError(f"`indices` {outside[:5]} of {type(self).__name__} are out of range: the split "
                             f"{self.split!r} has {n} items (positions 0..{n - 1}).")
        self.inputs, self.labels = items_at(dataset, self.indices, input_key, label_key)
        self.measurement = self.on_queries(self.inputs, self.labels)

    def on_queries(self, inputs: Tensor, labels: Tensor) -> Measurement:
        """The measurement on the bound queries (named ``names``)."""
        raise NotImplementedError

    def __call__(self, module: nn.Module, params: Params) -> Tensor:
        if self.measurement is None:
            raise RuntimeError(f"{type(self).__name__}(split={self.split!r}) has no queries yet: call "
                               f"`.bind({{{self.split!r}: dataset}})` first (UnrolledDifferentiation binds it to the "
                               "datamodule's splits when training starts).")
        return self.measurement(module, params)


class SplitLosses(SplitQueries):
    """The loss of each query, for the items at ``indices`` of the data split ``split`` (default the first ``num``):
    :class:`QueryLosses` on them once bound; columns ``val[0]/loss, val[1]/loss, ...``. ``loss``: ``"cross_entropy"``
    (default), ``"mse"`` or a callable ``(outputs, targets) -> (Q,)``."""

    kind = "loss"

    def __init__(self, split: str = "val", indices: list[int] | None = None, num: int = 8,
                 loss: str | LossFn = "cross_entropy") -> None:
        super().__init__(split, indices, num)
        self.loss = per_example_loss(loss)

    def on_queries(self, inputs: Tensor, labels: Tensor) -> Measurement:
        return QueryLosses(inputs, labels, self.loss, names=self.names)


class SplitLogits(SplitQueries):
    """The logit of each query's OWN LABEL (not of the predicted class, which differs between seeds and would make
    each seed measure something else), for the items at ``indices`` of the data split ``split`` (default the first
    ``num``): :class:`QueryLogits` with ``classes`` = the labels once bound; columns ``val[0]/logit, ...``."""

    kind = "logit"

    def __init__(self, split: str = "val", indices: list[int] | None = None, num: int = 8) -> None:
        super().__init__(split, indices, num)

    def on_queries(self, inputs: Tensor, labels: Tensor) -> Measurement:
        return QueryLogits(inputs, labels, names=self.names)


def as_measurement(m: Measurement | Callable | Sequence, names: Sequence[str] | None = None) -> Measurement:
    """``m`` as a :class:`Measurement`: itself, a list of measurements combined, or a callable wrapped."""
    if isinstance(m, Measurement):
        return m
    if isinstance(m, (list, tuple)):
        return Measurements([as_measurement(part) for part in m])
    return FunctionMeasurement(m, names)


def _checked(m: Measurement, value: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() > 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"a measurement must return one number per query, a (Q,) tensor (or a scalar); "
                         f"{type(m).__name__} returned {shape}.")
    return value.reshape(-1)


def measure_value(measurement: Measurement | Callable | Sequence, module: nn.Module, params: Params) -> Tensor:
    """``m(params)`` (Q,) without gradients, checked: one number per query (a ``ValueError`` naming the shape
    otherwise) and one name per number."""
    m = as_measurement(measurement)
    with torch.no_grad():
        value = _checked(m, m(module, params))
    if len(m.names) != value.numel():
        raise ValueError(f"the measurement returned {value.numel()} values but names {len(m.names)} of them "
                         f"({list(m.names)[:5]}); give one name per value.")
    return value


def value_and_jacobian(measurement: Measurement | Callable | Sequence, module: nn.Module, params: Params
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """``(m(params) (Q,), grad m(params) {name: (Q, *shape)})`` over the parameters in ``params``."""
    m = as_measurement(measurement)
    primal = {n: p.detach() for n, p in params.items()}
    value = measure_value(m, module, primal)
    return value, measurement_jacobian(lambda p: _checked(m, m(module, p)), primal)


def measure_change(measurement: Measurement | Callable | Sequence, module: nn.Module, params: Params,
                   response: ForwardResponse) -> tuple[Tensor, Tensor]:
    """``(value (Q,), change (K, Q))`` at ``params`` (the final weights ``theta_T``): ``value = m(theta_T)`` and
    ``change = grad m(theta_T)^T r_T``, the predicted change of each measurement when each of ``response``'s examples
    is removed (first order; rows in the order of ``response.examples``)."""
    value, jacobian = value_and_jacobian(measurement, module, {n: params[n] for n in response.r})
    return value, predict_change(jacobian, response)
