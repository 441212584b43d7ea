"""An attribution run's results and the queries they answer: the front object of the engine.

Built, as trak builds its front object, from injected pieces: an :class:`AttributionMethod` (the math), a
:class:`GradientFeaturizer` of the module (the gradients), a :class:`Grouping` (the rows: the identity for single
examples) and a :class:`ResultsStore` (the files). Passes hand it their rows, checkpoint by checkpoint; it answers
``self_influence``, ``scores`` and ``topk`` with one row per group, for the callbacks and for :meth:`load`.

Sizes: ``normalize="mean"`` (default) scores a group by its mean gradient (scores / size, self-influence / size^2),
``"sum"`` by its summed gradient; for single examples both are the same.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_attr.influence.features import GradientFeaturizer
from lightning_attr.influence.grouping_pass import GroupSpec
from lightning_attr.influence.groups import Grouping
from lightning_attr.influence.isolation import isolated
from lightning_attr.influence.method import AttributionMethod, accumulate, build_method
from lightning_attr.influence.outputs import check_logits
from lightning_attr.influence.parameters import last_linear
from lightning_attr.influence.runner import (
    AttributionData,
    Comm,
    LocalComm,
    PassRunner,
    check_ordered,
    data_total,
    to_module,
)
from lightning_attr.influence.scores import Features
from lightning_attr.influence.store import CHECKPOINT_INDEX, RUN_INDEX, ResultsStore
from lightning_attr.influence.topk import TopK, topk_blockwise

__all__ = ["Attribution", "Normalize", "inputs_labels"]

Normalize = Literal["mean", "sum"]


def inputs_labels(batch: Any, keys: dict[str, str]) -> tuple[Tensor, Tensor]:
    """``(inputs, labels)`` of a dict batch (by ``input_key`` / ``label_key``) or a tuple batch ``(x, y, ...)``."""
    if isinstance(batch, dict):
        return batch[keys.get("input_key", "image")], torch.as_tensor(batch[keys.get("label_key", "label")])
    return batch[0], torch.as_tensor(batch[1])


class Attribution:
    """Results of one attribution run (see the module docstring).

    Args:
        method: the attribution method. module: the model whose gradients are attributed (its forward gives logits).
        gradients: :class:`GradientFeaturizer` settings (``parameters``, ``last_layer``, ``proj_dim``, ...).
        store: where the run's files go. normalize: ``"mean"`` or ``"sum"`` (see the module docstring).
        keys: ``input_key`` / ``label_key`` of dict query batches.
    """

    def __init__(self, method: AttributionMethod, module: nn.Module, gradients: dict[str, Any], store: ResultsStore,
                 normalize: Normalize = "mean", keys: dict[str, str] | None = None) -> None:
        if normalize not in ("mean", "sum"):
            raise ValueError(f"`normalize` must be 'mean' or 'sum', got {normalize!r}.")
        self.method, self.module, self.gradients, self.store = method, module, dict(gradients), store
        self.normalize, self.keys = normalize, dict(keys or {})
        self.run_id = uuid.uuid4().hex
        self.featurizer: GradientFeaturizer | None = None
        self.grouping: Grouping | None = None
        self.n_train: int | None = None
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Tensor] = {}
        self.tracked: Tensor | None = None  # (num_rows, m): block sums of the queries tracked during training
        self.data_total: Callable[..., dict[str, Tensor]] | None = None  # sums over the training data, for queries

    # ---------------------------------------------------------------------------------------------------- set-up
    def bind(self, example: Tensor) -> GradientFeaturizer:
        """Check that ``module(example)`` (B, ...) gives logits (B, K), find the classifier layer in the forward graph
        (``last_layer=True``), and build the featurizer (once)."""
        if self.featurizer is None:
            with isolated(self.module):
                with torch.no_grad():
                    check_logits(self.module(example), len(example), type(self.module).__name__)
                if self.gradients.get("last_layer") is True:
                    self.gradients["last_layer"] = last_linear(self.module, example)
            self.featurizer = GradientFeaturizer(self.module, output=self.method.output, **self.gradients)
        return self.featurizer

    def set_rows(self, grouping: Grouping) -> None:
        """The rows of the run (fixed at its first pass)."""
        if self.grouping is not None and not torch.equal(grouping.assignment, self.grouping.assignment):
            raise ValueError("the rows of an attribution run cannot change between passes (the training set changed?).")
        self.grouping, self.n_train = grouping, len(grouping.assignment)

    @property
    def num_rows(self) -> int:
        if self.grouping is None:
            raise RuntimeError("no attribution pass has run yet; fit with the callback first.")
        return self.grouping.num_groups

    @property
    def num_checkpoints(self) -> int:
        return len(self.records)

    def _sizes(self) -> Tensor | None:
        return None if self.grouping.is_identity else self.grouping.sizes

    # -------------------------------------------------------------------------------------------------- recording
    def add_checkpoint(self, rows: dict[str, Tensor], meta: dict[str, Any], weights: dict[str, Tensor], comm: Comm,
                       state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Store one checkpoint's pass rows, weights and method state (rank zero writes; every rank keeps the same
        records); returns the stored tensors."""
        stored = self.method.finish(rows, self._sizes())
        accumulate(self.summary, self.method.summary_terms(stored))
        c = len(self.records)
        files = None
        if comm.rank == 0:
            self.store.claim(self.run_id)
            files = {"rows": self.store.write(f"{self.method.name}-{c:03d}.safetensors", stored),
                     "weights": self.store.write(f"weights-{c:03d}.safetensors", weights)}
            if state:
                files["state"] = self.store.write(f"state-{c:03d}.safetensors", state)
        self.records.append({**meta, "file": f"{self.method.name}-{c:03d}", "files": comm.broadcast(files)})
        return stored

    def add_pass(self, runner: PassRunner, data: AttributionData, comm: Comm, groups: GroupSpec, meta: dict[str, Any],
                 rates: Callable[[list[str]], dict[str, float]] | None = None,
                 queries: tuple[Tensor, Tensor] | None = None, progress: Callable[[str], Any] | None = None) -> None:
        """One checkpoint at the module's current weights (every rank): bind the featurizer, fix the rows (first pass),
        scale gradients by ``sqrt(rates(names))`` when the method uses learning rates, fit the method's state, run
        the pass, store it, and add the block of the tracked ``queries`` ``(x, y)``. Call it inside ``isolated``."""
        bar = progress or (lambda desc: None)
        featurizer = self.bind(data.example(self.module, runner.keys))
        if self.grouping is None:
            self.set_rows(groups.rows(runner, data, self.module, comm, bar("grouping")))
        elif len(data.dataset) != self.n_train:
            raise ValueError(f"the training set changed size between passes: {self.n_train} -> {len(data.dataset)}.")
        lrs = rates(list(featurizer.params)) if self.method.uses_lr and rates is not None else None
        featurizer.set_scales({k: v**0.5 for k, v in lrs.items()} if lrs else None)
        c, method, seed = self.num_checkpoints, self.method, self.gradients.get("seed", 0)
        try:
            total = data_total(runner, data, self.module, comm, method.fit_samples, seed, bar(f"fit {c}"))
            state = method.fit_state(featurizer, total)
            rows = runner.run(data, self.grouping, lambda x, y, b, _: method.featurize(featurizer, x, y, (c,), b, state),
                              self.module, comm, method.mean_keys, bar(f"pass {c}"))
            weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            stored = self.add_checkpoint(rows, {**meta, "lrs": lrs}, weights, comm, state)
            self.data_total = data_total(runner, data, self.module, LocalComm(), method.fit_samples, seed)
            if queries is not None:  # queries after fit are solved in this process alone (`data_total` above)
                qx, qy = to_module(queries, self.module)
                self.track(stored, method.query_features(featurizer, qx, qy, (c,), {**state, "total": total}))
        finally:
            featurizer.set_scales(None)

    def track(self, stored: dict[str, Tensor], query: Features) -> None:
        """Add one checkpoint's block for the tracked queries (features at that checkpoint)."""
        block = self.method.block(stored, query)
        self.tracked = block if self.tracked is None else self.tracked + block

    def save(self, comm: Comm) -> None:
        """Write the summary, the grouping and both indexes (rank zero)."""
        if comm.rank != 0:
            return
        tensors = dict(self.summary) | ({} if self.tracked is None else {"tracked": self.tracked})
        if getattr(self, "_groups_entry", (None,))[0] is not self.grouping:  # the rows never change: written once
            entry = self.store.write("groups.safetensors", {"assignment": self.grouping.assignment})
            self._groups_entry = (self.grouping, {**entry, "method": self.grouping.method})
        index = {"format": 1, "run": self.run_id, "method": self.method.name, "method_config": self.method.config(),
                 "gradients": self.gradients, "n_train": self.n_train, "normalize": self.normalize,
                 "summary": self.store.write("summary.safetensors", tensors), "grouping": self._groups_entry[1]}
        self.store.write_json(RUN_INDEX, index)
        self.store.write_json(CHECKPOINT_INDEX, self.records)

    # ---------------------------------------------------------------------------------------------------- answers
    def _normalized(self, t: Tensor, rows: slice, power: int, normalize: Normalize | None) -> Tensor:
        if (normalize or self.normalize) == "sum" or self.grouping.is_identity:
            return t
        if (normalize or self.normalize) != "mean":
            raise ValueError(f"`normalize` must be 'mean' or 'sum', got {normalize!r}.")
        sizes = self.grouping.sizes[rows].to(t).pow(power)
        return t / sizes.view(-1, *[1] * (t.dim() - 1))

    def self_influence(self, normalize: Normalize | None = None) -> Tensor:
        """Self-influence (num_rows,) in row order (dataset order for single examples)."""
        if self.grouping is None or not (self.summary or self.records):
            raise RuntimeError("no attribution pass has run yet; fit with the callback first.")
        s = self.method.self_influence(self.summary, self.num_checkpoints)
        return self._normalized(s, slice(None), 2, normalize)

    def tracked_scores(self, normalize: Normalize | None = None) -> Tensor:
        """Scores (num_rows, m) of the queries tracked during training."""
        if self.tracked is None:
            raise RuntimeError("no queries were tracked during training (`num_queries` / `query_data`).")
        scores = self.method.combine(self.tracked, self.summary, self.num_checkpoints)
        return self._normalized(scores, slice(None), 1, normalize)

    def query_features(self, query: Dataset | DataLoader, batch_size: int = 256) -> list[Features]:
        """Features of the query examples at every stored checkpoint (weights reloaded, then restored)."""
        if not self.records:
            raise RuntimeError("no attribution pass has run yet; fit with the callback first.")
        if isinstance(query, DataLoader):
            check_ordered(query, "query")
        loader = query if isinstance(query, DataLoader) else DataLoader(query, batch_size=batch_size)
        current = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        feats: list[Features] = []
        try:
            with isolated(self.module):
                for c, record in enumerate(self.records):
                    weights = self.store.read(record["files"]["weights"])
                    self.module.load_state_dict({k: v.to(current[k].device) for k, v in weights.items()})
                    feats.append(self._features_at(loader, c, record))
        finally:
            self.module.load_state_dict(current)
            self.featurizer.set_scales(None)
        return feats

    def _features_at(self, loader: DataLoader, c: int, record: dict[str, Any]) -> Features:
        lrs = record["lrs"]
        self.featurizer.set_scales({k: v**0.5 for k, v in lrs.items()} if lrs else None)
        state = self.store.read(record["files"]["state"]) if "state" in record["files"] else {}
        state = {**state, "total": self.data_total}
        parts = []
        for batch in loader:
            x, y = inputs_labels(to_module(batch, self.module), self.keys)
            f = self.method.query_features(self.featurizer, x, y.to(x.device), (c,), state)
            parts.append(f.cpu() if isinstance(f, Tensor) else tuple(t.cpu() for t in f))
        return torch.cat(parts) if isinstance(parts[0], Tensor) else tuple(torch.cat(p) for p in zip(*parts))

    def _block(self, queries: list[Features], start: int, stop: int, normalize: Normalize | None) -> Tensor:
        rows, total = slice(start, stop), 0
        for record, q in zip(self.records, queries):
            total = total + self.method.block(self.store.read(record["files"]["rows"]), q, rows)
        return self._normalized(self.method.combine(total, self.summary, self.num_checkpoints, rows), rows, 1, normalize)

    def scores(self, query: Dataset | DataLoader, normalize: Normalize | None = None, batch_size: int = 256,
               block: int = 4096) -> Tensor:
        """Scores (num_rows, n_query) of every row for every query example (dataset order on both sides), over row
        blocks of ``block``; ``query`` yields batches like the training data (inputs, labels[, index])."""
        queries = self.query_features(query, batch_size)
        n = self.num_rows
        return torch.cat([self._block(queries, s, min(n, s + block), normalize) for s in range(0, n, block)])

    def topk(self, query: Dataset | DataLoader, k: int = 10, normalize: Normalize | None = None, batch_size: int = 256,
             block: int = 4096) -> TopK:
        """Top-k proponents / opponents (rows: train indices, or group ids) of every query, without the full matrix."""
        queries = self.query_features(query, batch_size)
        return topk_blockwise(lambda a, b: self._block(queries, a, b, normalize), self.num_rows, k, block)

    # ------------------------------------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        grouping = None if self.grouping is None else (self.grouping.assignment, self.grouping.method)
        return dict(run=self.run_id, records=list(self.records), summary=dict(self.summary), tracked=self.tracked,
                    grouping=grouping, gradients=dict(self.gradients), directory=self.store.directory)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id, self.records, self.summary = state["run"], list(state["records"]), dict(state["summary"])
        self.tracked, self.gradients = state["tracked"], dict(state["gradients"])
        if state["grouping"] is not None:
            self.set_rows(Grouping(*state["grouping"]))

    def adopt(self, source: str) -> int:
        """Copy the stored checkpoints of ``source`` (a run resumed with another ``dirpath``) into this store."""
        for record in self.records:
            for entry in record["files"].values():
                self.store.adopt(entry, source)
        return len(self.records)

    @classmethod
    def load(cls, dirpath: str, module: nn.Module, normalize: Normalize | None = None,
             keys: dict[str, str] | None = None, method: str | None = None,
             train_data: Dataset | DataLoader | None = None) -> "Attribution":
        """The results an attribution run stored in ``dirpath`` (any process, any world size), ready to score queries
        with ``module`` (the same architecture; its weights are swapped per checkpoint and restored). Every file is
        checked against the checksum recorded when it was written. ``train_data``: the training set, for methods that
        read it to score queries (influence functions with ``cg`` / ``lissa``)."""
        store = ResultsStore(dirpath)
        index = store.read_json(RUN_INDEX)
        if method is not None and index["method"] != method:
            raise ValueError(f"{store.path(RUN_INDEX)} holds {index['method']!r} results, not {method!r}.")
        out = cls(build_method(index["method"], index["method_config"]), module, index["gradients"], store,
                  normalize or index["normalize"], keys)
        out.run_id, out.records = index["run"], store.read_json(CHECKPOINT_INDEX)
        tensors = store.read(index["summary"])
        out.tracked = tensors.pop("tracked", None)
        out.summary = tensors
        out.set_rows(Grouping(store.read(index["grouping"])["assignment"], index["grouping"]["method"]))
        out.featurizer = GradientFeaturizer(module, output=out.method.output, **out.gradients)
        if train_data is not None:
            data = AttributionData.of(train_data, None, "train_data")
            out.data_total = data_total(PassRunner(out.keys), data, module, LocalComm(), out.method.fit_samples,
                                        out.method.config().get("seed", 0))
        return out
