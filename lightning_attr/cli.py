"""The ``lightning-attr`` console script: LightningCLI in subclass mode (``fit / validate / test / predict``)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import ArgsType, LightningCLI

__all__ = ["AttrCLI", "build_cli", "main"]


class AttrCLI(LightningCLI):
    """LightningCLI over any LightningModule / LightningDataModule (``class_path`` + ``init_args`` in configs)."""


def build_cli(args: ArgsType = None, run: bool = True) -> AttrCLI:
    """Parse ``args`` (a list, or ``sys.argv`` when None) and, with ``run``, execute the subcommand."""
    import lightning_attr  # noqa: F401  (registers the package's classes for short class paths)

    return AttrCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: ArgsType = None) -> None:
    """Console-script entry point."""
    build_cli(args)


if __name__ == "__main__":
    main()
