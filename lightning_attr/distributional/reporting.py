"""The d-TDA aggregate in W&B: one run next to the seeds' runs (same group), with the per-example table, the top
examples per statistic and the distribution plot of the most variance-moving examples."""

from __future__ import annotations

import os
import tempfile

from lightning_attr.distributional.aggregate import DistributionalInfluence

__all__ = ["log_to_wandb"]


def log_to_wandb(influence: DistributionalInfluence, project: str, group: str, name: str = "aggregate",
                 measurement: int | str = 0, plot_examples: int = 3, save_dir: str | None = None) -> str:
    """Log ``influence`` to a new W&B run ``name`` of ``project`` in ``group`` (the seeds' ``WANDB_RUN_GROUP``):
    ``dtda/influence`` (a table: one row per example, mean / variance / Wasserstein-2 change per measurement),
    ``dtda/summary`` (seeds, method, top examples) in the run summary and ``dtda/distribution`` (the ECDFs over seeds
    with and without the ``plot_examples`` examples that move the variance of ``measurement`` most). Honours
    ``WANDB_MODE`` (``offline`` writes ``{save_dir}/wandb/offline-run-*``). Returns the run's folder."""
    import wandb

    run = wandb.init(project=project, group=group, name=name, job_type="dtda-aggregate", dir=save_dir,
                     config={"seeds": influence.seeds, "method": influence.method,
                             "measurements": list(influence.measurements)})
    try:
        top, _ = influence.top_k("variance", min(plot_examples, influence.num_examples), measurement)
        with tempfile.TemporaryDirectory() as tmp:
            png = influence.plot(top.tolist(), measurement, path=os.path.join(tmp, "distribution.png"))
            run.log({"dtda/influence": influence.wandb_table(), "dtda/distribution": wandb.Image(png)})
        run.summary["dtda/summary"] = influence.summary(top=5)
        return run.dir
    finally:
        run.finish()
