"""The ``lightning-attr`` console script: LightningCLI in subclass mode (``fit / validate / test / predict``)."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

from lightning_attr.io import atomic_write
from lightning_attr.runs import run_directory

__all__ = ["AttrCLI", "RunConfigCallback", "build_cli", "main"]


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


def main(args: ArgsType = None) -> None:
    """Console-script entry point."""
    build_cli(args)


if __name__ == "__main__":
    main()
