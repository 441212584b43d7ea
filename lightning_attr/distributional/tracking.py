"""Forward-mode responses tracked inside a training loop, Lightning-free: the trained parameters of an optimizer, the
loss weight of each row of a step (a step spread over data-parallel processes: ``forward_step(..., all_reduce_sum=)``),
the checks that the training forward is a function of the parameters, and the responses file.

Weights (the convention of :mod:`lightning_attr.distributional.unrolled`): a row's loss enters the step's loss with
coefficient ``1 / (B * A * W)`` for a mean-reduced micro-batch loss of ``B`` rows, ``A`` accumulated micro-batches and
``W`` data-parallel processes whose gradients are averaged (``1 / (A * W)`` for a sum-reduced loss). Each process
computes the response of its own micro-batches' gradient and the responses are summed over processes, as the
gradients are; every process then holds the same responses.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from lightning_attr.distributional.unrolled import ForwardResponse, MicroBatch
from lightning_attr.io import load_tensors, save_tensors

__all__ = ["RESPONSES_FILE", "batch_statistics", "check_deterministic", "load_responses", "micro_batch",
           "save_responses", "trained_parameters"]

RESPONSES_FILE = "responses.safetensors"
DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def trained_parameters(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """``{name: parameter}`` of ``module``'s parameters that ``optimizer`` updates (in the module's order)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    params = {n: p for n, p in module.named_parameters() if id(p) in held and p.requires_grad}
    if not params:
        raise ValueError(f"the optimizer ({type(optimizer).__name__}) updates none of the module's parameters: nothing "
                         "to differentiate.")
    return params


def check_deterministic(module: nn.Module) -> None:
    """Refuse a training forward that is not a function of the parameters: dropout with ``p > 0`` in training mode
    (it draws random masks), and ``SyncBatchNorm`` in training mode (its statistics span processes)."""
    dropout = [f"{n or 'module'} ({type(m).__name__}, p={m.p})" for n, m in module.named_modules()
               if isinstance(m, DROPOUT) and m.training and m.p > 0]
    if dropout:
        raise ValueError(f"unrolled differentiation re-runs the training forward, which must be a function of the "
                         f"weights; these Dropout layers draw random masks: {dropout[:5]}. Set their p=0 (or put them "
                         "in eval mode) for the tracked run.")
    sync = [n for n, m in module.named_modules() if isinstance(m, nn.SyncBatchNorm) and m.training]
    if sync:
        raise ValueError(f"SyncBatchNorm layers {sync[:5]} normalize over all processes, which unrolled "
                         "differentiation does not follow; use BatchNorm (per-process statistics).")


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """Batch norm layers in training mode use the batch's statistics (as in training) while the block runs, without
    updating their running statistics (restored untouched afterwards); layers in eval mode keep theirs."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean, m.running_var, m.num_batches_tracked = None, None, None
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count
            m.track_running_stats = True


def micro_batch(inputs: Tensor | tuple[Tensor, ...], targets: Tensor, indices: Tensor, accumulate: int = 1,
                world_size: int = 1, reduction: str = "mean") -> MicroBatch:
    """A micro-batch with each row's loss weight: ``1 / (B * accumulate * world_size)`` (``reduction="mean"``) or
    ``1 / (accumulate * world_size)`` (``"sum"``)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"`loss_reduction`={reduction!r} is not 'mean' or 'sum' (how the training step reduces the "
                         "per-example losses of a batch).")
    b = len(indices)
    scale = (b if reduction == "mean" else 1) * accumulate * world_size
    weights = torch.full((b,), 1.0 / scale, dtype=torch.float64, device=indices.device)
    return MicroBatch(inputs, targets, weights, indices)


def save_responses(folder: str, response: ForwardResponse, metadata: Mapping[str, str] | None = None) -> str:
    """``{folder}/responses.safetensors``: ``examples`` (K,) and ``responses`` (K, P) (parameters in the order of
    ``response.r``, their names and shapes in the metadata, with ``steps`` and ``metadata``); atomic."""
    layout = [[n, list(t.shape[1:])] for n, t in response.r.items()]
    meta = {**(metadata or {}), "parameters": json.dumps(layout), "steps": str(response.steps)}
    path = os.path.join(folder, RESPONSES_FILE)
    save_tensors(path, {"examples": response.examples.long(), "responses": response.flat()}, meta)
    return path


def load_responses(folder: str) -> tuple[ForwardResponse, dict[str, str]]:
    """The responses stored by :func:`save_responses` (checked) and the file's metadata."""
    tensors, meta = load_tensors(os.path.join(folder, RESPONSES_FILE), fix="rerun the tracked training run")
    layout = json.loads(meta["parameters"])
    flat, k = tensors["responses"], len(tensors["examples"])
    sizes = [int(torch.Size(shape).numel()) for _, shape in layout]
    r = {n: part.reshape(k, *shape) for (n, shape), part in zip(layout, flat.split(sizes, dim=1))}
    return ForwardResponse(tensors["examples"], r, steps=int(meta["steps"])), meta
