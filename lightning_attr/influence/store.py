"""The files of one attribution run: per-checkpoint rows and weights, the running summary, the grouping, and two
JSON indexes (``run.json``: what the run is; ``checkpoints.json``: one record per checkpoint). Every tensor file is
written atomically and recorded with its SHA-256; a read verifies it and names the file and the fix on failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_attr.io import CorruptArtifactError, atomic_write, load_tensors, save_json, save_tensors, sha256_file

__all__ = ["ResultsStore", "RUN_INDEX", "CHECKPOINT_INDEX"]

RUN_INDEX, CHECKPOINT_INDEX = "run.json", "checkpoints.json"


class ResultsStore:
    """A results folder. Entries are ``{"file": name, "sha256": hex}`` relative to ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def claim(self, run_id: str) -> None:
        """Refuse a folder that holds another run's results (a callback never reads files another run wrote)."""
        path = self.path(RUN_INDEX)
        if os.path.isfile(path):
            other = self.read_json(RUN_INDEX).get("run")
            if other != run_id:
                raise ValueError(f"{self.directory} already holds the results of another run ({RUN_INDEX}: run "
                                 f"{other}); pass a new `dirpath` (the default is a fresh folder per run) or delete it.")

    def write(self, name: str, tensors: dict[str, Tensor]) -> dict[str, str]:
        return {"file": name, "sha256": save_tensors(self.path(name), tensors)}

    def read(self, entry: dict[str, str]) -> dict[str, Tensor]:
        fix = (f"the results in {self.directory} cannot be trusted: delete the folder and run the attribution again "
               "(or restore the file)")
        return load_tensors(self.path(entry["file"]), entry["sha256"], fix)[0]

    def adopt(self, entry: dict[str, str], source: str) -> None:
        """Copy a verified file of another folder (a run resumed with a new ``dirpath``) into this one."""
        ResultsStore(source).read(entry)
        os.makedirs(self.directory, exist_ok=True)
        atomic_write(self.path(entry["file"]), lambda tmp: shutil.copyfile(os.path.join(source, entry["file"]), tmp))
        if sha256_file(self.path(entry["file"])) != entry["sha256"]:
            raise CorruptArtifactError(f"copying {entry['file']} from {source} to {self.directory} changed it.")

    def write_json(self, name: str, obj: Any) -> None:
        save_json(obj, self.path(name))

    def read_json(self, name: str) -> Any:
        path = self.path(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: is {self.directory} the `dirpath` of an attribution run "
                                    f"(it holds {RUN_INDEX} and {CHECKPOINT_INDEX})?")
        try:
            return json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise CorruptArtifactError(f"{path} is not valid JSON ({err}); the results in {self.directory} cannot be "
                                       "trusted: delete the folder and run the attribution again.") from err
