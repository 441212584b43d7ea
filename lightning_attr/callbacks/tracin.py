"""TracIn-CP as a Lightning callback: checkpoint-summed, learning-rate-weighted gradient similarity."""

from __future__ import annotations

from torch import Tensor

from lightning_attr.callbacks.influence import InfluenceCallback
from lightning_attr.influence.scores import Features, self_inner

__all__ = ["TracIn"]


class TracIn(InfluenceCallback):
    """TracIn-CP during training: ``score(z, z') = sum_c eta_c <grad l_c(z), grad l_c(z')>``.

    Every ``every_n_epochs`` epochs / ``every_n_steps`` steps (and / or ``at_fit_end``) the callback runs an
    attribution pass in eval mode over the unshuffled training set (sharded by index under DDP), with the
    learning rate ``eta_c`` of each parameter read from the optimizer, and restores train mode and RNG states, so
    training is bit-identical with and without it. Sanity checks and ``fast_dev_run`` are skipped.

    Args:
        dirpath: where results go (default ``{log_dir}/{prefix}``): per-checkpoint features and weights
            (safetensors), ``summary.safetensors``, ``checkpoints.json``, ``topk-NNN.json``; all written atomically.
        every_n_epochs / every_n_steps / at_fit_end: when passes run.
        parameters / module_types: which parameters (``fnmatch`` name patterns / layer types; default all trainable).
        last_layer: exact fast path on the classifier layer only (``<a, a'><g, g'>``; no projection needed).
        proj_dim: projection size (default 2048; None = exact gradients). ``projection``: ``"sketch"`` (count
            sketch of the per-example gradient), ``"kronecker"`` (per layer, LoGra: fastest, noisier), ``"dense"``
            or ``"auto"`` (sketch while 64 per-example gradients fit ``max_memory_mb``, else kronecker);
            ``proj_type``: rademacher / gaussian entries of dense and Kronecker projections; ``seed``.
        batch_size / attribution_data: the pass's batch size and data (default: the datamodule's train split or
            the train loader's dataset; it must be unaugmented; a shuffled DataLoader is rejected).
        query_data / num_queries / top_k: top-k proponents and opponents of the first ``num_queries`` query examples
            (default: the validation split) are logged each pass (a W&B table with images under a ``WandbLogger``).
        noisy_labels: which training labels are known to be corrupted (bool mask, index list, or the name of a
            datamodule attribute such as ``"noisy_mask"``); the noisy-label AUC of the self-influence is logged.
        max_memory_mb: cap of a kept dense projection matrix / the ``auto`` projection's per-batch gradients.
        cache_inputs_mb: the pass's input batches are kept in memory after the first pass while they fit (the
            attribution data is unaugmented, so every pass reads the same batches); 0 turns this off.
        input_key / label_key / index_key: keys of dict batches (tuple batches are ``(inputs, labels, ..., index)``).
        progress_bar: show a bar during passes (rank zero, when the trainer has one).
        prefix: metric / table key prefix (default ``tracin`` or ``tracin_last_layer``).

        group_by / num_groups / group_size / group_column / group_seed: attribute to groups (GGDA) instead of
            single examples: ``"class"``, ``"random"``, ``"embedding_kmeans"`` (penultimate features),
            ``"gradient_kmeans"`` (last-layer gradients, within each class), or ``"column"`` (the batch key
            ``group_column``). The grouping is made once, at the first pass, and saved (``groups.safetensors``).
            Each group's gradient is that of its summed loss, from ordinary batched backward passes.

    After fit: ``self_influence`` (n_train,), ``scores(query)`` (n_train, n_query), ``topk(query, k)``; grouped:
    ``group_self_influence`` (n_groups,), ``group_scores(query)`` (n_groups, n_query), ``groups.assignment``.
    """

    method = "tracin"
    output = "cross_entropy"
    uses_lr = True

    def _featurize(self, x: Tensor, y: Tensor, key: tuple[int, ...], bounds: Tensor | None = None
                   ) -> dict[str, Tensor]:
        if self.featurizer_kwargs["last_layer"]:
            if self.group_by:  # a group's last-layer gradient is a full O x I matrix: exact and small
                return {"features": self.featurizer.flat_grads(x, y, bounds)}
            a, g = self.featurizer.factors(x, y)
            return {"a": a, "g": g}
        return {"features": self.featurizer(x, y, key, bounds)}

    def _query_features(self, x: Tensor, y: Tensor, key: tuple[int, ...]) -> Features:
        if self.featurizer_kwargs["last_layer"] and self.group_by:
            return self.featurizer.flat_grads(x, y)
        f = self._featurize(x, y, key)
        return f["features"] if "features" in f else (f["a"], f["g"])

    def _finish(self, data: dict[str, Tensor]) -> dict[str, Tensor]:
        s = self_inner(self._train_side_of(data))
        self.sums["self"] = self.sums["self"] + s if "self" in self.sums else s
        return {**data, "self_influence": s}

    def _train_side_of(self, stored: dict[str, Tensor]) -> Features:
        return stored["features"] if "features" in stored else (stored["a"], stored["g"])

    def _combine(self, total: Tensor, start: int, stop: int) -> Tensor:
        return total

    def _rows_self_influence(self) -> Tensor:
        """TracIn-CP self-influence ``sum_c eta_c ||grad l_c(z)||^2`` per row (example or group)."""
        if "self" not in self.sums:
            raise RuntimeError("no attribution pass has run yet; fit with the callback first.")
        return self.sums["self"]
