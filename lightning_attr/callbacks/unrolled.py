"""``UnrolledDifferentiation``: d-TDA's unrolled differentiation inside the user's own ``Trainer.fit``.

Forward mode (``examples=``): the response ``r_t = d theta_t / d epsilon`` of down-weighting each tracked training
example is stepped along with training (math, sign and the ``1 / N``: :mod:`lightning_attr.distributional.unrolled`).
The shell collects each optimizer step's micro-batches (``on_train_batch_start``), and in ``on_before_optimizer_step``
(the gradients are ready, the weights are still ``theta_t``) advances the responses with the learning rate, momentum
and weight decay the optimizer holds at that step; the functional core does the rest
(:mod:`lightning_attr.distributional.tracking`).

Reverse mode (``measurements=`` without ``examples=``): the run is recorded during training and swept backward at fit
end for every training example at once (:mod:`lightning_attr.callbacks.unrolled_reverse`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_attr.callbacks.context import StrategyComm, bind_splits, train_data
from lightning_attr.callbacks.unrolled_reverse import DEFAULT_EVERY, ReverseRecorder
from lightning_attr.data.indexed import unpack_batch
from lightning_attr.distributional.measurements import (
    Measurement,
    as_measurement,
    measure_change,
    measure_value,
    per_example_loss,
)
from lightning_attr.distributional.optimizers import hyperparameters_by_name, sgd_hyperparameters
from lightning_attr.distributional.results import RunResult, result_seed, write_run_result
from lightning_attr.distributional.tracking import (
    batch_statistics,
    check_deterministic,
    micro_batch,
    save_responses,
    trained_parameters,
)
from lightning_attr.distributional.unrolled import ForwardResponse, LossFn, forward_step
from lightning_attr.influence.isolation import isolated
from lightning_attr.runs import run_directory

__all__ = ["UnrolledDifferentiation"]

METHOD = "unrolled-forward"
PRECISIONS = ("32-true", "64-true")


def _examples(examples: Any) -> tuple[int, ...]:
    """``examples`` as distinct dataset indices >= 0, or an error naming what is wrong."""
    try:
        t = torch.as_tensor(examples)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`examples` must be a list of training dataset indices, got {examples!r}.") from err
    if t.dim() == 0 and not t.is_floating_point():
        raise ValueError(f"`examples`={examples!r}: an int (the top-k training examples by self-influence) is not "
                         "supported yet; give a list of training dataset indices.")
    if t.numel() == 0:
        raise ValueError("`examples` is empty: give at least one training dataset index to track.")
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1:
        raise ValueError(f"`examples` must be a flat list of integer training dataset indices, got {examples!r}.")
    out = tuple(int(i) for i in t.tolist())
    bad = [i for i in out if i < 0]
    repeated = sorted({i for i in out if out.count(i) > 1})
    if bad or repeated:
        why = f"negative: {bad[:5]}" if bad else f"repeated: {repeated[:5]}"
        raise ValueError(f"`examples` must be distinct training dataset indices >= 0; got "
                         f"{list(out)[:10]} ({why}).")
    return out


class UnrolledDifferentiation(L.Callback):
    """Unrolled differentiation (d-TDA, arXiv 2506.12965) of your own SGD training: how the final weights, and any
    measurement of them, change when a training example is removed.

    **Forward mode** (give ``examples``): for each of the K tracked training examples, the response ``r_t`` of the
    weights to down-weighting its loss is advanced at every optimizer step, at the weights before the step, through
    torch.optim.SGD's update (learning rate, momentum, dampening, nesterov, weight decay read from the optimizer at
    each step, so learning-rate schedulers are followed), with gradient accumulation and DDP (each row's loss weight
    is ``1 / (B * accumulate_grad_batches * world_size)`` for a mean-reduced loss; the per-process responses are summed
    like gradients). At the end of fit ``m(theta_without_k) - m(theta_T) ~ grad m(theta_T)^T r_T``: call
    :meth:`predict` with any measurement, or give ``measurements`` to have the run's result written.

    Cost: about two gradient evaluations per tracked example per optimizer step (one vmapped forward-over-reverse
    Jacobian-vector product each; ``chunk_size`` examples at a time bounds the memory), plus K parameter vectors of
    memory (2K with momentum). Track tens of examples, not thousands.

    **Reverse mode** (give ``measurements``, no ``examples``): the predicted change (N, Q) of the Q measurements when
    EACH of the N training examples is removed, by one adjoint sweep at fit end over a run recorded during training
    (each global step's dataset indices, loss weights and SGD settings; the weights and momentum buffers every
    ``checkpoint_every`` steps, on CPU and in the callback's state, so a resumed fit equals an uninterrupted one). The
    sweep recomputes the weights between checkpoints from the training set (the train loader's dataset and
    ``collate_fn``) and costs about one gradient plus one Jacobian-vector product per measurement per step; under DDP
    the processes share the measurements and end with the same result. The replay must reproduce training (checked on
    the last segment: a ``ValueError`` if it strays): no dropout, no random augmentation, labels or batch hooks.
    Details: :mod:`lightning_attr.callbacks.unrolled_reverse`. The modes are one or the other: with ``examples`` the
    callback runs forward mode (``measurements`` are then evaluated on the tracked examples).

    Requirements (checked when training starts, with an error saying what to change): automatic optimization with one
    ``torch.optim.SGD`` (Adam, AdamW, RMSprop, ... are refused), no gradient clipping, precision ``32-true`` or
    ``64-true``, a single device or DDP, no Dropout with ``p > 0`` in training mode (the forward is re-run and must be
    a function of the weights; dropout written as ``F.dropout`` in ``forward`` cannot be detected: do not use it), no
    SyncBatchNorm. BatchNorm layers in training mode are re-run on the batch's statistics as in training, with their
    running statistics untouched; UD does not differentiate the running statistics, so a measurement taken in eval
    mode with BatchNorm ignores their change. Training batches must carry a stable example index: ``(x, y, index)``
    (see :class:`~lightning_attr.data.IndexedDataset`) or a dict with ``input_key`` / ``label_key`` / ``index_key``.

    Args:
        examples: forward mode: the training dataset indices to track (distinct, within the training set). An int
            (the top-k examples by self-influence) is not supported yet. None (with ``measurements``): reverse mode.
        measurements: optional: a :class:`~lightning_attr.distributional.measurements.Measurement`
            (``QueryLosses(x, y)``, ``QueryLogits(x, classes)``; in a config ``SplitLosses(split="val", num=8)`` /
            ``SplitLogits``, whose queries are items of the datamodule's ``splits[split]``, bound when training
            starts), a callable ``(module, params) -> (Q,)`` or a list of them. At fit end ``value = m(theta_T)``
            (Q,) and ``change`` (K, Q) are written to ``{directory}/distributional.safetensors``
            (:func:`~lightning_attr.distributional.results.write_run_result`, method ``"unrolled-forward"``; reverse
            mode: ``examples`` = all N, ``change`` (N, Q), method ``"unrolled-reverse"``). Measurements are taken with
            the module in eval mode; they are evaluated once when training starts, so one that does not return a
            number per query fails before training.
        loss: the per-example training loss ``(module(x), y) -> (B,)``: ``"cross_entropy"`` (default), ``"mse"``
            (the mean over each example's outputs) or a callable. It MUST be the loss your ``training_step`` computes
            from ``self(x)`` (before reduction): the callback differentiates this loss, not your code.
        loss_reduction: how ``training_step`` reduces the batch's losses: ``"mean"`` (default) or ``"sum"``.
        chunk_size: forward mode: tracked examples per vmapped JVP (None: all at once); reverse mode takes one
            measurement at a time.
        checkpoint_every: reverse mode only: store the weights every that many optimizer steps (default 32); memory
            ``T / checkpoint_every`` parameter vectors on CPU, the sweep recomputes the steps between (each once).
        dirpath: folder of the results (default ``{run folder}/{prefix}``, see :func:`~lightning_attr.runs.run_directory`).
        prefix: subfolder name and metric prefix (default ``"unrolled"``).
        seed: the run's seed written with the result (default: the seed ``lightning.seed_everything`` set, from
            ``PL_GLOBAL_SEED``); required with ``measurements``.
        input_key / label_key / index_key: keys of dict batches.

    Stored at fit end (rank zero): ``{directory}/responses.safetensors`` with ``examples`` (K,) and ``responses``
    (K, P) (:func:`~lightning_attr.distributional.tracking.load_responses` reads them back), and with ``measurements``
    also ``distributional.safetensors``. After fit: :attr:`response` and :meth:`predict`. Resuming from a checkpoint
    continues the responses (kept in the checkpoint: ``state_dict``), equal to an uninterrupted fit. Reverse mode
    stores ``distributional.safetensors`` only; after fit :attr:`result` and :attr:`changes` (N, Q) on every rank.
    """

    def __init__(self, examples: Sequence[int] | None = None,
                 measurements: Measurement | Callable | Sequence[Measurement | Callable] | None = None,
                 loss: str | LossFn = "cross_entropy", loss_reduction: str = "mean", chunk_size: int | None = None,
                 checkpoint_every: int | None = None, dirpath: str | None = None, prefix: str = "unrolled",
                 seed: int | None = None, input_key: str = "image", label_key: str = "label",
                 index_key: str = "index") -> None:
        if examples is None and measurements is None:
            raise ValueError("give `examples=` (forward mode: training dataset indices to track) or `measurements=` "
                             "without `examples` (reverse mode: the effect of every training example on them).")
        if examples is not None and checkpoint_every is not None:
            raise ValueError(f"`checkpoint_every`={checkpoint_every!r} is for reverse mode (`measurements=` without "
                             "`examples=`); forward mode stores no weights: leave it out.")
        self.examples = _examples(examples) if examples is not None else None
        self.loss_fn = per_example_loss(loss)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"`loss_reduction`={loss_reduction!r} is not 'mean' or 'sum'.")
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
            raise ValueError(f"`chunk_size` must be None or an int >= 1, got {chunk_size!r}.")
        if not prefix or os.sep in prefix:
            raise ValueError(f"`prefix` must be a non-empty folder name, got {prefix!r}.")
        self.measurement = as_measurement(measurements) if measurements is not None else None
        self.loss_reduction, self.chunk_size, self.dirpath, self.prefix = loss_reduction, chunk_size, dirpath, prefix
        self.seed = None if seed is None else int(seed)
        self.keys = dict(input_key=input_key, label_key=label_key, index_key=index_key)
        self.reverse = None if examples is not None else ReverseRecorder(
            DEFAULT_EVERY if checkpoint_every is None else checkpoint_every, self.loss_fn, loss_reduction, self.keys)
        self.directory: str | None = None
        self.result: RunResult | None = None
        self._state: ForwardResponse | None = None
        self._loaded: ForwardResponse | None = None
        self._micro: list[tuple[Any, Tensor, Tensor]] = []
        self._module: nn.Module | None = None

    @property
    @override
    def state_key(self) -> str:
        if self.reverse is not None:
            return self._generate_state_key(prefix=self.prefix, mode="reverse")
        digest = hashlib.sha1(str(self.examples).encode()).hexdigest()[:10]
        return self._generate_state_key(prefix=self.prefix, examples=digest)

    @property
    def changes(self) -> Tensor:
        """The run's predicted changes ``result.change``: (K, Q), rows in the order of ``examples`` (reverse mode:
        (N, Q), row k the removal of training example k), on every rank after fit with ``measurements``."""
        if self.result is None:
            raise RuntimeError("UnrolledDifferentiation has no result yet: fit a Trainer with this callback and "
                               "`measurements=` first.")
        return self.result.change

    @property
    def response(self) -> ForwardResponse:
        """The responses ``r`` of the tracked examples (after fit: ``r_T``; rows in the order of ``examples``)."""
        if self.reverse is not None:
            raise RuntimeError("reverse mode keeps no responses (and `predict` needs them): its measurements are fixed "
                               "when training starts; read `changes` after fit, or track `examples=` (forward mode).")
        if self._state is None:
            raise RuntimeError("UnrolledDifferentiation has no responses yet: fit a Trainer with this callback first.")
        return self._state

    def predict(self, measurement: Measurement | Callable | Sequence, module: nn.Module | None = None) -> Tensor:
        """Predicted change (K, Q) of ``measurement`` when each tracked example is removed, ``grad m^T r_T`` at the
        current weights of ``module`` (default: the fitted module), taken in eval mode."""
        module = module if module is not None else self._module
        if module is None:
            raise RuntimeError("UnrolledDifferentiation.predict needs a fitted module: fit first, or pass `module=`.")
        params = dict(module.named_parameters())
        with isolated(module):
            return measure_change(measurement, module, params, self.response)[1]

    # ------------------------------------------------------------------------------------------------------ checks
    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.directory = self.dirpath or os.path.join(run_directory(trainer), self.prefix)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError("UnrolledDifferentiation follows Lightning's automatic optimization (one optimizer step "
                             "per `accumulate_grad_batches` batches); it does not support manual optimization.")
        if trainer.precision not in PRECISIONS:
            raise ValueError(f"UnrolledDifferentiation needs precision in {PRECISIONS} (the responses are "
                             f"differentiated in the weights' dtype); got precision={trainer.precision!r}.")
        if trainer.gradient_clip_val:
            raise ValueError(f"`gradient_clip_val`={trainer.gradient_clip_val}: clipping changes the SGD update, which "
                             "unrolled differentiation does not follow; train without gradient clipping.")
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or strategy.handles_gradient_accumulation:
            raise ValueError(f"UnrolledDifferentiation runs on one device or under DDP, not with "
                             f"{type(strategy).__name__} (sharded weights).")
        if len(trainer.optimizers) != 1:
            raise ValueError(f"UnrolledDifferentiation needs exactly one optimizer, got {len(trainer.optimizers)}.")
        try:
            sgd_hyperparameters(trainer.optimizers[0])
        except ValueError as err:  # names the optimizer when it is not SGD
            raise ValueError(f"{err} With lightning_attr.Classifier, set `optimizer: sgd`.") from err
        if self.measurement is not None and result_seed(self.seed) is None:
            raise ValueError("`measurements` are written with the run's seed: call lightning.seed_everything(seed) "
                             "before fit or pass `seed=` to UnrolledDifferentiation.")
        if self.measurement is not None:  # SplitLosses / SplitLogits: take the queries
            bind_splits(self.measurement, trainer, self.keys["input_key"], self.keys["label_key"])
        self._module = pl_module

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_deterministic(pl_module)
        if self.measurement is not None:  # a measurement that is not one number per query fails before training
            with isolated(pl_module):
                measure_value(self.measurement, pl_module, dict(pl_module.named_parameters()))
        if self.reverse is not None:
            self.reverse.start(trainer, pl_module)
        else:
            self._start_forward(trainer, pl_module)

    def _start_forward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = len(train_data(trainer).dataset)
        outside = [i for i in self.examples if i >= n]
        if outside:
            raise ValueError(f"`examples` {outside[:5]} are out of range: the training set has {n} examples "
                             f"(indices 0..{n - 1}).")
        params = trained_parameters(pl_module, trainer.optimizers[0])
        if self._loaded is None and trainer.global_step > 0:
            rank_zero_warn(f"UnrolledDifferentiation starts tracking at step {trainer.global_step}: the checkpoint "
                           "holds no responses for these `examples` / `prefix`, so the steps before are not "
                           "differentiated (resume with the callback settings of the interrupted run).")
        self._state = self._initial_state(params)
        self._micro = []
        k, p = len(self.examples), sum(t.numel() for t in params.values())
        copies = 2 if any(h.momentum for h in sgd_hyperparameters(trainer.optimizers[0])) else 1
        mb = copies * k * p * next(iter(params.values())).element_size() / 2**20
        rank_zero_info(f"UnrolledDifferentiation (forward mode): tracking {k} examples over {p} parameters; each "
                       f"optimizer step costs about two gradient evaluations per tracked example ({2 * k} in all) "
                       f"and the responses hold {mb:.3g} MB.")

    def _initial_state(self, params: dict[str, Tensor]) -> ForwardResponse:
        zeros = ForwardResponse.zeros(self.examples, params)
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return zeros
        if loaded.examples.tolist() != list(self.examples) or set(loaded.r) != set(params):
            raise ValueError(f"the checkpoint's UnrolledDifferentiation state tracks examples "
                             f"{loaded.examples.tolist()[:10]} over other parameters or examples than this callback "
                             f"({list(self.examples)[:10]}); resume with the same `examples` and module.")

        def move(d: dict[str, Tensor]) -> dict[str, Tensor]:
            return {n: t.to(params[n].device, params[n].dtype) for n, t in d.items()}

        return ForwardResponse(zeros.examples, move(loaded.r), move(loaded.momentum), loaded.steps)

    # ------------------------------------------------------------------------------------------------------- steps
    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *args: Any) -> None:
        if self.reverse is not None:
            self.reverse.batch(trainer, batch)
        else:
            self._micro.append(unpack_batch(batch, **self.keys))

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        opt = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        if self.reverse is not None:
            self.reverse.step(trainer, pl_module, opt)
        if self._state is None:
            return
        micro, self._micro = self._micro, []
        if not micro:
            rank_zero_warn("UnrolledDifferentiation: an optimizer step without training batches (resumed in the "
                           "middle of gradient accumulation?) is not tracked.")
            return
        params = trained_parameters(pl_module, opt)
        hyper = hyperparameters_by_name(opt, params)
        comm = StrategyComm(trainer)
        batches = [micro_batch(x, y, idx, trainer.accumulate_grad_batches, comm.world_size, self.loss_reduction)
                   for x, y, idx in micro]
        reduce = comm.all_reduce_sum if comm.world_size > 1 else None
        with torch.enable_grad(), batch_statistics(pl_module):
            self._state = forward_step(pl_module, params, self._state, batches, self.loss_fn, hyper,
                                       self.chunk_size, reduce)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reverse is not None:
            self.reverse.log(trainer, self.prefix)
        if self._state is None or not trainer.is_global_zero:
            return
        norm = float(self._state.flat().norm(dim=1).mean())
        for logger in trainer.loggers:
            logger.log_metrics({f"{self.prefix}/steps_tracked": float(self._state.steps),
                                f"{self.prefix}/response_norm": norm}, step=trainer.global_step)

    # ------------------------------------------------------------------------------------------------------ fit end
    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reverse is not None and not trainer.fast_dev_run:
            self.result = self.reverse.finish(trainer, pl_module, self.measurement, result_seed(self.seed),
                                              self.directory)
        if self._state is None or trainer.fast_dev_run:
            return
        if trainer.is_global_zero:
            seed = result_seed(self.seed)
            meta = {"method": METHOD, "seed": "" if seed is None else str(seed)}
            save_responses(self.directory, self._state, meta)
            if self.measurement is not None:
                params = dict(pl_module.named_parameters())
                with isolated(pl_module):
                    value, change = measure_change(self.measurement, pl_module, params, self._state)
                self.result = RunResult(self._state.examples.cpu(), value.detach().cpu(), change.detach().cpu(),
                                        METHOD, int(seed), tuple(self.measurement.names))
                write_run_result(self.directory, self.result)
        if trainer.world_size > 1:
            trainer.strategy.barrier()

    # -------------------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.reverse is not None:
            return self.reverse.state_dict()
        if self._state is None:
            return {}
        s = self._state
        return dict(examples=s.examples.cpu(), steps=s.steps, r={n: t.detach().cpu() for n, t in s.r.items()},
                    momentum={n: t.detach().cpu() for n, t in s.momentum.items()})

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.reverse is not None:
            self.reverse.load_state_dict(state_dict)
        elif state_dict:
            self._loaded = ForwardResponse(state_dict["examples"], dict(state_dict["r"]),
                                           dict(state_dict["momentum"]), int(state_dict["steps"]))
