"""TracIn as a Lightning callback: checkpoint passes (TracIn-CP), or the training steps themselves (``in_step``)."""

from __future__ import annotations

from typing import Any

from typing_extensions import override

from lightning_attr.callbacks.influence import InfluenceCallback
from lightning_attr.influence.tracin import TracInMethod

__all__ = ["TracIn"]


class TracIn(InfluenceCallback):
    """TracIn-CP during training: ``score(z, z') = sum_c eta_c <grad l_c(z), grad l_c(z')>`` (a score > 0: ``z`` is a
    proponent of ``z'``, its gradient steps lowered the loss of ``z'``).

    Every ``every_n_epochs`` epochs / ``every_n_steps`` optimizer steps (and / or ``at_fit_end``; at most one pass per
    optimizer step) the callback runs an attribution pass in eval mode over the unshuffled training set (sharded by
    index under DDP) with the learning rate ``eta_c`` of each parameter read from the optimizer, then restores train
    mode and RNG states, so training is bit-identical with and without it. Sanity checks and ``fast_dev_run`` are
    skipped.

    Args:
        dirpath: where results go (default ``{run folder}/{prefix}``, the run folder being the logger's versioned folder,
            or a new ``lightning_attr_runs/version_N`` without one): per-checkpoint rows and weights (safetensors),
            ``summary.safetensors``, ``run.json`` and ``checkpoints.json`` (every file with its SHA-256), ``topk-NNN.json``.
        every_n_epochs / every_n_steps / at_fit_end: when passes run.
        parameters / module_types: which parameters (``fnmatch`` name patterns / layer types; default all trainable).
        last_layer: exact fast path on the classifier layer only (found from the forward graph; ``<a, a'><g, g'>``).
        proj_dim: projection size (default 2048; None = exact gradients). ``projection``: ``"sketch"`` (count sketch),
            ``"kronecker"`` (per layer, LoGra: fastest, noisier), ``"dense"`` or ``"auto"`` (sketch while 64
            per-example gradients fit ``max_memory_mb``, else kronecker); ``proj_type``: rademacher / gaussian; ``seed``.
        batch_size / attribution_data: the pass's batch size and data (default: the datamodule's train split or the
            train loader's dataset; unaugmented; items carry their position as ``index``; a shuffled loader is refused).
        query_data / num_queries / top_k: top-k proponents and opponents of the first ``num_queries`` query examples
            (default: the validation split) are logged each pass (a W&B table with images under a ``WandbLogger``).
        noisy_labels: which training labels are known to be corrupted (bool mask, index list, or the name of a
            datamodule attribute such as ``"noisy_mask"``); the noisy-label AUC of the self-influence is logged.
        max_memory_mb: cap of a kept dense projection matrix / the ``auto`` projection's per-batch gradients.
        cache_inputs_mb: the pass's input batches are kept in memory between passes while they fit (0: off).
        input_key / label_key / index_key: keys of dict batches (tuple batches are ``(inputs, labels, ..., index)``).
        progress_bar: show a bar during passes (rank zero, when the trainer has one).
        prefix: metric keys and results folder (default ``tracin``, ``tracin_last_layer``, ``tracin_grouped``). Two
            attribution callbacks of one Trainer need distinct prefixes (Lightning refuses two of one class that share
            a prefix as "more than one stateful callback").
        group_by / num_groups / group_size / group_column / group_seed: attribute to groups (GGDA): ``"class"``,
            ``"random"``, ``"embedding_kmeans"``, ``"gradient_kmeans"`` (last-layer gradients within each class) or
            ``"column"`` (the batch key ``group_column``). Made once, at the first pass, and saved. A group's row is the
            gradient of its summed loss (one batched backward), so its score is the sum of its members' scores.
        normalize: ``"mean"`` (default) scores a group by its mean gradient (scores / size, self-influence / size^2),
            ``"sum"`` by its summed gradient; the same for single examples.
        in_step: original TracIn from the training steps themselves instead of passes (see below).
        loss_reduction: with ``in_step``, how the training loss reduces over the batch: ``"mean"`` or ``"sum"``.

    ``in_step=True`` accumulates ``sum_t eta_t ||grad l(theta_t, z)||^2`` over the optimizer steps ``t`` whose batch
    held ``z`` (at the weights before the step) from the forward and backward training already runs: layer input and
    output-gradient hooks on the selected Linear / Conv2d layers, exact, per-example gradients never formed for the
    self-influence. Scores are kept for the tracked queries (``query_data`` / ``num_queries``), from their gradients at
    every step. No passes run: ``every_n_epochs`` sets how often results are saved and logged; ``every_n_steps``,
    ``at_fit_end`` and ``group_by`` are refused. Handles gradient accumulation and AMP; training stays bit-identical.

    After fit: ``self_influence`` (num_rows,), ``scores(query)`` (num_rows, n_query), ``topk(query, k)``, ``groups``;
    ``TracIn.load(dirpath, module)`` gives the same answers from the stored files in any process.
    """

    method_class = TracInMethod

    @classmethod
    @override
    def variant(cls, in_step: bool = False, **kwargs: Any) -> type[InfluenceCallback]:
        if in_step and cls is TracIn:
            from lightning_attr.callbacks.in_step import InStepTracIn

            return InStepTracIn
        return cls

    def __init__(self, *args: Any, in_step: bool = False, loss_reduction: str = "mean", **kwargs: Any) -> None:
        if in_step or loss_reduction != "mean":
            raise ValueError("`in_step` / `loss_reduction` need TracIn(in_step=True) (or InStepTracIn).")
        super().__init__(*args, **kwargs)
