"""Distributional influence of a seed ensemble (d-TDA, arXiv 2506.12965): the per-seed results of
:mod:`lightning_attr.distributional.results`, stacked and summarised.

Seed ``s`` measured ``X_s = m(theta_s)`` (Q measurements) and predicted the change ``G_{s,k}`` of each when example
``k`` is removed from its run; ``Y_{s,k} = X_s + G_{s,k}`` is the coupled sample without ``k``. The statistics are
those of :mod:`lightning_attr.distributional.statistics` (sign: after minus before the removal; the Wasserstein-2
distance has none), each (K, Q): one row per example, one column per measurement.

Files written by :meth:`DistributionalInfluence.save` (atomically) in ``folder``:

- ``dtda_aggregate.safetensors``: ``x`` (S, Q), ``g`` (S, K, Q), ``examples`` (K,), ``seeds`` (S,), ``mean``,
  ``variance``, ``wasserstein`` (K, Q); metadata ``measurements`` (comma-separated) and ``method``;
- ``dtda_summary.json``: seeds, measurements, method and the top examples of each statistic per measurement.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_attr.distributional import statistics
from lightning_attr.distributional.results import read_run_result, stack_results
from lightning_attr.io import load_tensors, save_json, save_tensors
from lightning_attr.plots import save_figure

__all__ = ["AGGREGATE", "SUMMARY", "DistributionalInfluence"]

AGGREGATE, SUMMARY = "dtda_aggregate.safetensors", "dtda_summary.json"
STATISTICS = ("mean", "variance", "wasserstein", "quantile")


class DistributionalInfluence:
    """Distributional influence of removing each of ``examples`` (K,) on ``measurements`` (Q names), from
    ``x`` (S, Q) measured per seed and ``g`` (S, K, Q) predicted changes per seed (coupled: same seed, same row).

    ``seeds`` (S,) name the rows; ``method`` the estimator that predicted ``g`` (e.g. ``"unrolled-forward"``).
    """

    def __init__(self, x: Tensor, g: Tensor, examples: Tensor, seeds: Sequence[int], measurements: Sequence[str],
                 method: str = "") -> None:
        x, g, examples = torch.as_tensor(x).double(), torch.as_tensor(g).double(), torch.as_tensor(examples).long()
        seeds, measurements = [int(s) for s in seeds], tuple(str(m) for m in measurements)
        if x.dim() != 2 or examples.dim() != 1 or tuple(g.shape) != (x.shape[0], examples.numel(), x.shape[1]):
            raise ValueError(f"need `x` (S, Q), `g` (S, K, Q) and `examples` (K,); got {tuple(x.shape)}, "
                             f"{tuple(g.shape)} and {tuple(examples.shape)}.")
        if x.shape[0] < 2:
            raise ValueError(f"d-TDA needs at least two seeds, got S={x.shape[0]}.")
        if len(seeds) != x.shape[0] or len(set(seeds)) != len(seeds):
            raise ValueError(f"`seeds` must name each of the S={x.shape[0]} rows once, got {seeds}.")
        if len(measurements) != x.shape[1]:
            raise ValueError(f"`measurements` must name each of the Q={x.shape[1]} columns, got {list(measurements)}.")
        self.x, self.g, self.examples, self.seeds = x, g, examples, seeds
        self.measurements, self.method = measurements, method

    @classmethod
    def from_runs(cls, folders: Sequence[str], prefix: str | None = None) -> DistributionalInfluence:
        """Stack the ``distributional.safetensors`` of each run folder (or of ``{folder}/{prefix}``), one per seed;
        the seeds must be distinct and agree on examples, measurements and method."""
        folders = [os.fspath(f) for f in folders]
        if len(folders) < 2:
            raise ValueError(f"d-TDA needs the runs of at least two seeds, got {len(folders)} folder(s): {folders}.")
        results = [read_run_result(os.path.join(f, prefix) if prefix else f) for f in folders]
        methods = sorted({r.method for r in results})
        if len(methods) > 1:
            raise ValueError(f"the runs mix methods {methods} ({dict(zip(folders, (r.method for r in results)))}); "
                             "aggregate one method's results at a time (choose them with `prefix`).")
        x, g = stack_results(results)
        first = results[0]
        return cls(x, g, first.examples, [r.seed for r in results], first.measurements, first.method)

    @classmethod
    def load(cls, folder: str) -> DistributionalInfluence:
        """What :meth:`save` wrote in ``folder``."""
        tensors, meta = load_tensors(os.path.join(folder, AGGREGATE), fix="aggregate the seeds' runs again")
        measurements = tuple(meta["measurements"].split(",")) if meta.get("measurements") else ()
        return cls(tensors["x"], tensors["g"], tensors["examples"], tensors["seeds"].tolist(), measurements,
                   meta.get("method", ""))

    @property
    def num_seeds(self) -> int:
        return self.x.shape[0]

    @property
    def num_examples(self) -> int:
        return self.examples.numel()

    # ------------------------------------------------------------------------------------------------ statistics
    def mean_influence(self) -> Tensor:
        """Change of the mean over seeds (K, Q)."""
        return statistics.mean_influence(self.x, self.g)

    def variance_influence(self, unbiased: bool = True) -> Tensor:
        """Change of the variance over seeds (K, Q)."""
        return statistics.variance_influence(self.x, self.g, unbiased=unbiased)

    def wasserstein_influence(self) -> Tensor:
        """1-D Wasserstein-2 distance between the distributions over seeds with and without each example (K, Q)."""
        return statistics.wasserstein_influence(self.x, self.g)

    def quantile_influence(self, q: float | Sequence[float] | Tensor) -> Tensor:
        """Shift of the ``q``-quantile over seeds (K, Q), with a leading (len(q),) for several ``q``."""
        return statistics.quantile_influence(self.x, self.g, q)

    def statistic(self, name: str, q: float = 0.5) -> Tensor:
        """The (K, Q) statistic ``name`` (one of ``STATISTICS``; ``q`` for ``"quantile"``)."""
        if name == "quantile":
            if torch.as_tensor(q).dim() != 0:
                raise ValueError(f"`q` must be one probability here, got {q}; use quantile_influence for several.")
            return self.quantile_influence(q)
        compute = {"mean": self.mean_influence, "variance": self.variance_influence,
                   "wasserstein": self.wasserstein_influence}
        if name not in compute:
            raise ValueError(f"`statistic` must be one of {list(STATISTICS)}, got {name!r}.")
        return compute[name]()

    def measurement_index(self, measurement: int | str) -> int:
        """The column of ``measurement`` (its index or its name)."""
        if isinstance(measurement, str) and measurement in self.measurements:
            return self.measurements.index(measurement)
        if isinstance(measurement, int) and not isinstance(measurement, bool) and \
                -len(self.measurements) <= measurement < len(self.measurements):
            return measurement % len(self.measurements)
        raise ValueError(f"`measurement` must be an index below {len(self.measurements)} or one of "
                         f"{list(self.measurements)}, got {measurement!r}.")

    def top_k(self, statistic: str, k: int, measurement: int | str = 0, q: float = 0.5) -> tuple[Tensor, Tensor]:
        """The ``k`` examples (dataset indices (k,)) that move ``statistic`` of ``measurement`` most, and the values
        (k,): by absolute value (by value for ``"wasserstein"``, which is >= 0); ties keep the order of ``examples``."""
        values = self.statistic(statistic, q)[:, self.measurement_index(measurement)]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_examples:
            raise ValueError(f"`k` must be an integer in [1, {self.num_examples}] (the examples), got {k!r}.")
        key = values if statistic == "wasserstein" else values.abs()
        order = torch.sort(key, descending=True, stable=True).indices[:k]
        return self.examples[order], values[order]

    # ------------------------------------------------------------------------------------------------ reporting
    def table(self) -> list[dict[str, float | int]]:
        """One row per example: ``example`` (dataset index), then ``mean/{m}``, ``variance/{m}``, ``wasserstein/{m}``
        for each measurement ``m``."""
        stats = {name: self.statistic(name) for name in STATISTICS[:3]}
        rows = []
        for j, example in enumerate(self.examples.tolist()):
            row: dict[str, float | int] = {"example": example}
            for m, name in enumerate(self.measurements):
                row.update({f"{stat}/{name}": float(values[j, m]) for stat, values in stats.items()})
            rows.append(row)
        return rows

    def wandb_table(self):
        """:meth:`table` as a ``wandb.Table`` (``run.log({"dtda": influence.wandb_table()})``)."""
        import wandb

        rows = self.table()
        return wandb.Table(columns=list(rows[0]), data=[list(row.values()) for row in rows])

    def summary(self, top: int = 10) -> dict[str, Any]:
        """Seeds, measurements, method and the ``top`` examples of each statistic per measurement (JSON-ready)."""
        k = min(top, self.num_examples)
        best: dict[str, dict[str, list[dict[str, float]]]] = {}
        for m, name in enumerate(self.measurements):
            best[name] = {}
            for stat in STATISTICS[:3]:
                examples, values = self.top_k(stat, k, m)
                best[name][stat] = [{"example": int(e), "value": float(v)} for e, v in zip(examples, values)]
        return {"method": self.method, "seeds": self.seeds, "measurements": list(self.measurements),
                "num_examples": self.num_examples, "top": best}

    def save(self, folder: str) -> dict[str, str]:
        """Write ``dtda_aggregate.safetensors`` and ``dtda_summary.json`` in ``folder`` (atomically); their paths."""
        tensors = {"x": self.x, "g": self.g, "examples": self.examples, "seeds": torch.tensor(self.seeds),
                   **{name: self.statistic(name) for name in STATISTICS[:3]}}
        tensors_path = os.path.join(folder, AGGREGATE)
        save_tensors(tensors_path, tensors, {"measurements": ",".join(self.measurements), "method": self.method})
        return {"tensors": tensors_path, "summary": save_json(self.summary(), os.path.join(folder, SUMMARY), indent=2)}

    def plot(self, examples: Sequence[int], measurement: int | str = 0, path: str | None = None,
             actual: Tensor | Mapping[int, Tensor] | None = None):
        """The distribution over seeds of ``measurement`` with each of ``examples`` (dataset indices) and without it
        (predicted: ``X + G``; and ``actual`` retrained values when given: (len(examples), S) or
        {example: (S,)}, seeds in the order of ``seeds``): one panel per example, empirical CDFs with the seeds as
        strips below. Saves a PNG at ``path`` (atomically; returns the path), else returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns, m = self.positions(examples), self.measurement_index(measurement)
        retrained = self.retrained_values(actual, examples)
        ncols = min(len(columns), 4)
        nrows = math.ceil(len(columns) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.7 * nrows), squeeze=False)
        stats = {name: self.statistic(name)[:, m] for name in STATISTICS[:3]}
        for ax, j, measured in zip(axes.flat, columns, retrained):
            series = {"with (trained)": self.x[:, m], "without (predicted)": self.x[:, m] + self.g[:, j, m]}
            if measured is not None:
                series["without (retrained)"] = measured
            ecdf_panel(ax, series)
            ax.set_title(f"example {int(self.examples[j])}: mean {stats['mean'][j]:+.3g}\n"
                         f"var {stats['variance'][j]:+.3g}, W2 {stats['wasserstein'][j]:.3g}", fontsize=8)
            ax.set_xlabel(self.measurements[m], fontsize=8)
        for ax in list(axes.flat)[len(columns):]:
            ax.axis("off")
        axes[0, 0].set_ylabel(f"fraction of {self.num_seeds} seeds", fontsize=8)
        axes[0, 0].legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        return fig if path is None else save_figure(fig, path)

    def positions(self, examples: Sequence[int]) -> list[int]:
        """Columns of ``examples`` (dataset indices) in ``self.examples``."""
        where = {int(e): j for j, e in enumerate(self.examples.tolist())}
        wanted = [int(e) for e in examples]
        missing = [e for e in wanted if e not in where]
        if not wanted or missing:
            raise ValueError(f"`examples` must be a non-empty list of attributed examples (dataset indices among "
                             f"{sorted(where)[:20]}{' ...' if len(where) > 20 else ''}); not attributed: {missing}.")
        return [where[e] for e in wanted]

    def retrained_values(self, actual: Tensor | Mapping[int, Tensor] | None, examples: Sequence[int]) -> list:
        """``actual`` as one (S,) tensor (or None) per example of ``examples``, checked."""
        if actual is None:
            return [None] * len(examples)
        if isinstance(actual, Mapping):
            rows = [actual.get(int(e)) for e in examples]
        else:
            rows = list(torch.as_tensor(actual))
            if len(rows) != len(examples):
                raise ValueError(f"`actual` needs one row per example ({len(examples)}), got {len(rows)}.")
        rows = [None if r is None else torch.as_tensor(r).double().flatten() for r in rows]
        bad = [int(e) for e, r in zip(examples, rows) if r is not None and r.numel() != self.num_seeds]
        if bad:
            raise ValueError(f"`actual` for examples {bad}: give one retrained value per seed (S={self.num_seeds}, "
                             f"in the order of `seeds` {self.seeds}).")
        return rows


def ecdf_panel(ax, series: Mapping[str, Tensor]) -> None:
    """Empirical CDFs of each named sample on ``ax``, and the samples as strips of ticks below the curves."""
    for i, (label, values) in enumerate(series.items()):
        v = values.double().sort().values.cpu().numpy()
        steps = torch.arange(len(v) + 1, dtype=torch.float64).numpy() / len(v)
        line = ax.step([v[0], *v], steps, where="post", label=label, lw=1.3)[0]
        ax.plot(v, [-0.07 * (i + 1)] * len(v), "|", color=line.get_color(), ms=7)
    ax.set_ylim(-0.07 * (len(series) + 1), 1.05)
    ax.tick_params(labelsize=7)
