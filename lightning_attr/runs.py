"""One folder per training run, shared by everything the package writes during that run (attribution results,
heatmaps, predictions, the CLI's saved config), so two runs never write into, or read from, each other's files."""

from __future__ import annotations

import os
import weakref

import lightning as L

__all__ = ["run_directory"]

_RUN_DIRS: "weakref.WeakKeyDictionary[L.Trainer, str]" = weakref.WeakKeyDictionary()


def _new_version(root: str) -> str:
    """``{root}/version_N`` for the smallest free N, created here (``os.mkdir`` is atomic: two runs never share)."""
    os.makedirs(root, exist_ok=True)
    taken = [int(d.split("_", 1)[1]) for d in os.listdir(root) if d.startswith("version_") and d[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        path = os.path.join(root, f"version_{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            n += 1


def run_directory(trainer: L.Trainer) -> str:
    """The folder of this trainer's run (the same on every rank; call it on all ranks).

    - TensorBoard / CSV logger: its versioned ``log_dir`` (``.../lightning_logs/version_N``).
    - Any other logger with a version (``WandbLogger``: the run id): ``{save_dir}/{name}/{version}``, where Lightning's
      ``ModelCheckpoint`` puts that run's checkpoints too.
    - No logger (``logger=False``): a new ``{default_root_dir}/lightning_attr_runs/version_N``.
    """
    if trainer in _RUN_DIRS:
        return _RUN_DIRS[trainer]
    path = None
    if trainer.is_global_zero:
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is not None and type(logger).__name__ in ("TensorBoardLogger", "CSVLogger"):
            path = logger.log_dir
        elif logger is not None and logger.version is not None:
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            path = os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version)
        else:
            path = _new_version(os.path.join(trainer.default_root_dir, "lightning_attr_runs"))
    if trainer.world_size > 1:
        path = trainer.strategy.broadcast(path)
    _RUN_DIRS[trainer] = path
    return path
