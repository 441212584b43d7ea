"""The ``lightning-attr`` console script: LightningCLI in subclass mode (``fit / validate / test / predict``), and
``lightning-attr dtda`` for seed ensembles (distributional TDA; see :func:`run_dtda`)."""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

from lightning_attr.io import atomic_write
from lightning_attr.runs import run_directory

__all__ = ["AttrCLI", "RunConfigCallback", "build_cli", "dtda_parser", "main", "run_dtda"]


class RunConfigCallback(SaveConfigCallback):
    """Saves the parsed config as ``config.yaml`` in the run's own folder
    (:func:`~lightning_attr.runs.run_directory`: the logger's versioned folder, or a new
    ``{default_root_dir}/lightning_attr_runs/version_N`` with ``logger=False``) instead of ``trainer.log_dir``, which
    is the working directory under a ``WandbLogger`` or without a logger, so every run keeps its own config.
    Written once per run on rank zero, atomically; the other ranks learn that through a broadcast.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        folder = run_directory(trainer)  # on every rank: it broadcasts rank zero's folder
        path = os.path.join(folder, self.config_filename)
        exists = trainer.strategy.broadcast(os.path.isfile(path) if trainer.is_global_zero else False)
        if exists and not self.overwrite:
            raise RuntimeError(f"{path} exists and `overwrite` is False; delete it, or set "
                               "`save_config_kwargs={'overwrite': True}`, or `save_config_callback=None`.")
        if trainer.is_global_zero:
            if self.save_to_log_dir:
                self._write(path)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def _write(self, path: str) -> None:
        if self.multifile:  # several files next to ``path``: no single atomic rename
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=True)
        else:
            atomic_write(path, lambda tmp: self.parser.save(self.config, tmp, skip_none=False, overwrite=True))


class AttrCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``class_path`` + ``init_args`` in configs)."""


def build_cli(args: ArgsType = None, run: bool = True) -> AttrCLI:
    """Parse ``args`` (a list, or ``sys.argv`` when None) and, with ``run``, execute the subcommand."""
    # jsonargparse resolves short class names (``--trainer.callbacks+=TracIn``, ``--data=OracleDataModule``) among
    # the *imported* subclasses of the expected type: import every module that defines one before parsing.
    import lightning_attr  # noqa: F401
    import lightning_attr.callbacks  # noqa: F401

    return AttrCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=RunConfigCallback,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def dtda_parser() -> argparse.ArgumentParser:
    """``lightning-attr dtda``: the arguments of a seed ensemble; any other argument goes to every seed's ``fit``."""
    from lightning_attr.distributional.ensemble import BACKENDS

    parser = argparse.ArgumentParser(
        prog="lightning-attr dtda", allow_abbrev=False,
        description="Distributional TDA over training seeds: run `lightning-attr fit` once per seed (each in "
                    "{root}/seed_XXXX, resumable: a seed with DONE is never rerun), then aggregate the per-seed "
                    "distributional.safetensors of the finished seeds into {out}.",
        epilog="Any other argument goes to every seed's `fit` after the configs (e.g. --trainer.max_epochs=5); "
               "{seed} and {seed_dir} in them are filled per seed.")
    parser.add_argument("--config", action="append", required=True, help="config file (repeat for several)")
    parser.add_argument("--seeds", required=True, help="e.g. 0-15, 0,3,5 or 0-3,8")
    parser.add_argument("--root", required=True, help="folder of the seed folders")
    parser.add_argument("--backend", choices=BACKENDS, default="sequential")
    parser.add_argument("--max_parallel", type=int, default=None, help="seeds at once (processes, ray)")
    parser.add_argument("--prefix", default=None,
                        help="folder of the d-TDA result inside each run folder, when a run wrote several")
    parser.add_argument("--top_k", type=int, default=10, help="examples printed per statistic")
    parser.add_argument("--measurement", default="0", help="measurement (index or name) of the printed top examples")
    parser.add_argument("--out", default=None, help="aggregate folder (default {root}/aggregate)")
    parser.add_argument("--wandb_project", default=None,
                        help="also log the aggregate (table, top examples, plot) as a W&B run in the seeds' group")
    return parser


def run_dtda(argv: list[str]) -> None:
    """``lightning-attr dtda ...``: run the seed ensemble, print the top examples per statistic and save the aggregate
    of the finished seeds; exits with 1 when a seed failed (after aggregating the others), 2 on bad input."""
    from lightning_attr.distributional.aggregate import DistributionalInfluence
    from lightning_attr.distributional.ensemble import SeedEnsemble

    parser = dtda_parser()
    opts, fit_args = parser.parse_known_args(argv)
    try:
        ensemble = SeedEnsemble(opts.config, opts.seeds, opts.root, opts.backend, opts.max_parallel, fit_args)
        report = ensemble.run()
    except (ValueError, OSError, ImportError) as err:
        parser.error(str(err))
    if len(report.finished) < 2:
        parser.exit(1, f"{report}\nd-TDA needs at least two finished seeds: nothing aggregated.\n")
    try:
        influence = DistributionalInfluence.from_runs(ensemble.result_folders(opts.prefix))
        measurement = int(opts.measurement) if opts.measurement.lstrip("-").isdigit() else opts.measurement
        print_top_examples(influence, opts.top_k, measurement)
    except (ValueError, OSError) as err:
        parser.exit(2, f"lightning-attr dtda: {err}\n")
    paths = influence.save(opts.out or os.path.join(ensemble.root, "aggregate"))
    print(f"[dtda] aggregate of seeds {influence.seeds}: {paths['tensors']}, {paths['summary']}", flush=True)
    if opts.wandb_project:
        from lightning_attr.distributional.reporting import log_to_wandb

        group = os.environ.get("WANDB_RUN_GROUP", os.path.basename(ensemble.root))
        folder = log_to_wandb(influence, opts.wandb_project, group, measurement=measurement, save_dir=ensemble.root)
        print(f"[dtda] W&B run of the aggregate (group {group}): {folder}", flush=True)
    if not report.ok:
        parser.exit(1, f"{report}\n")


def print_top_examples(influence, k: int, measurement: int | str) -> None:
    """The ``k`` examples with the largest mean, variance and Wasserstein-2 influence on ``measurement``."""
    k, name = min(k, influence.num_examples), influence.measurements[influence.measurement_index(measurement)]
    for statistic in ("mean", "variance", "wasserstein"):
        examples, values = influence.top_k(statistic, k, measurement)
        listed = ", ".join(f"{int(e)} ({float(v):+.4g})" for e, v in zip(examples, values))
        print(f"[dtda] top {k} examples by {statistic} influence on {name}: {listed}", flush=True)


def main(args: ArgsType = None) -> None:
    """Console-script entry point: ``lightning-attr dtda ...`` runs a seed ensemble (:func:`run_dtda`); anything
    else goes to LightningCLI unchanged."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "dtda":
        run_dtda(list(argv[1:]))
        return
    build_cli(args)


if __name__ == "__main__":
    main()
