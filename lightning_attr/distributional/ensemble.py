"""Seed ensembles for d-TDA (arXiv 2506.12965): the same ``lightning-attr fit`` run once per training seed.

The seed (``--seed_everything s``) sets the initialization and the batch order; everything else comes from the user's
config(s). Every seed is an independent run in a fresh process (``python -m lightning_attr.cli fit ...``), started by
one function, :func:`run_seed`, which every backend calls:

- ``"sequential"``: one seed after the other;
- ``"processes"``: up to ``max_parallel`` seeds at once as local processes (the threads that start them only wait);
- ``"ray"``: ``ray.remote(run_seed)`` on a local Ray, or on the cluster that ``RAY_ADDRESS`` names (``root``, the
  configs and the working directory must then be on a file system the workers share, at the same paths). A local
  Ray that ``run()`` starts stays up in this process for later runs (``ray.shutdown()`` ends it); ``pip install
  ray`` or ``lightning-attr[dtda]``.

Each child gets ``OMP_NUM_THREADS`` = cores // seeds at once (at least 1) unless it is set already, and, for runs that
log to W&B, ``WANDB_RUN_GROUP`` = the name of ``root`` and ``WANDB_NAME`` = ``seed_XXXX`` unless those are set.

Layout of ``root``: one folder per seed, which is that run's ``--trainer.default_root_dir``::

    {root}/seed_{s:04d}/
        log.txt                    stdout and stderr of every attempt, each after a line ``=== attempt ...``
        DONE                       JSON, written atomically after the run exited with 0: seed, command, recipe
                                   (configs with their SHA-256, extra args), wall_s, finished (UTC), run_dir,
                                   files {path relative to the seed folder: SHA-256} of everything the run wrote
        lightning_attr_runs/version_0/   the run folder (lightning_attr.runs.run_directory) with ``logger=False``
        lightning_logs/version_0/        ... or with a TensorBoard / CSV logger (its checkpoints inside)
            config.yaml                  the parsed config (RunConfigCallback): how DONE's ``run_dir`` is found
            {prefix}/distributional.safetensors   a d-TDA callback's result (found by ``result_folders``)
        checkpoints/               ModelCheckpoint's folder with ``logger=False``

A seed with DONE is never rerun, and rerunning an ensemble with another recipe (other config contents or extra args)
into the same ``root`` is refused. A seed without DONE (never started, crashed, interrupted) starts afresh: what an
earlier attempt left in its folder (all but ``log.txt``) is removed first, so its run folder is ``version_0`` again.
A failed seed is reported (exit code, the last error line of its log, the log's path) and touches no other seed's
folder. Extra args may hold ``{seed}`` and ``{seed_dir}``, filled per seed: e.g.
``--model.init_args.export_path={seed_dir}/weights.safetensors``, or ``--trainer.logger.init_args.save_dir={seed_dir}``
for a WandbLogger (whose run folder is otherwise under the working directory, outside the seed's folder).
One ensemble at a time per ``root``.
"""

from __future__ import annotations

import json
import operator
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from lightning_attr.distributional.results import FILENAME
from lightning_attr.io import CorruptArtifactError, save_json, sha256_file

__all__ = ["BACKENDS", "EnsembleReport", "SeedEnsemble", "SeedOutcome", "parse_seeds", "run_seed"]

BACKENDS = ("sequential", "processes", "ray")
DONE, LOG = "DONE", "log.txt"
MAX_SEED = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything enforces
ERROR_LINE = re.compile(r"^([\w.]+(Error|Exception|Exit|Interrupt)\b|.*\berror:)", re.IGNORECASE)
RESERVED = ("--seed_everything", "--trainer.default_root_dir")  # set per seed by the ensemble


def parse_seeds(spec: str) -> list[int]:
    """``"0-15"`` (inclusive), ``"0,3,5"``, ``"0-3,8"`` -> the seeds in that order; seeds that collide are refused."""
    seeds: list[int] = []
    for part in str(spec).split(","):
        low, dash, high = (p.strip() for p in part.partition("-"))
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"`seeds`={spec!r}: {part.strip()!r} is not a seed or a range; write e.g. '0-15', "
                             "'0,3,5' or '0-3,8' (seeds are integers >= 0).")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"`seeds`={spec!r}: the range {part.strip()!r} runs backwards; write {last}-{first}.")
        seeds.extend(range(first, last + 1))
    return check_seeds(seeds)


def check_seeds(seeds: Sequence[int] | str) -> list[int]:
    """``seeds`` as a list of distinct integers in ``[0, 2**32 - 1]`` (a string goes through :func:`parse_seeds`)."""
    if isinstance(seeds, str):
        return parse_seeds(seeds)
    given = list(seeds)
    try:
        seeds = [operator.index(s) for s in given]
    except TypeError:
        seeds = None
    if seeds is None or any(isinstance(s, bool) for s in given) or any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"`seeds` must be integers in [0, {MAX_SEED}] (or a string like '0-15'), got {given!r}.")
    if not seeds:
        raise ValueError("`seeds` is empty: give at least one seed.")
    collide = sorted(s for s, n in Counter(seeds).items() if n > 1)
    if collide:
        raise ValueError(f"`seeds` has seeds that collide: {collide} appear more than once. The same seed trains the "
                         "same model again, not a new sample of the distribution: give each seed once.")
    return seeds


@dataclass(frozen=True)
class SeedOutcome:
    """How one seed ended: ``ok`` (its DONE was written now, or found: ``skipped``), its wall time, its log and, when
    it failed, ``error`` (the exit code and the last error line of the log, or the exception that stopped it)."""

    seed: int
    ok: bool
    log: str
    wall_s: float = 0.0
    error: str = ""
    skipped: bool = False

    def __str__(self) -> str:
        if self.skipped:
            return f"seed {self.seed}: finished earlier (DONE), not rerun"
        if self.ok:
            return f"seed {self.seed}: done in {self.wall_s:.1f}s"
        return f"seed {self.seed}: FAILED ({self.error}); log: {self.log}"


@dataclass(frozen=True)
class EnsembleReport:
    """The outcome of every seed of a :meth:`SeedEnsemble.run`, in the order of the ensemble's seeds."""

    outcomes: tuple[SeedOutcome, ...]

    @property
    def finished(self) -> list[int]:
        """Seeds with DONE: finished in this run or before (``skipped``)."""
        return [o.seed for o in self.outcomes if o.ok]

    @property
    def skipped(self) -> list[int]:
        return [o.seed for o in self.outcomes if o.skipped]

    @property
    def failed(self) -> list[SeedOutcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return not self.failed

    def raise_for_failures(self) -> None:
        """Raise ``RuntimeError`` naming every failed seed, its error and its log."""
        if self.failed:
            raise RuntimeError(str(self))

    def __str__(self) -> str:
        head = (f"{len(self.finished)} of {len(self.outcomes)} seeds finished ({len(self.skipped)} earlier), "
                f"{len(self.failed)} failed")
        return "\n  ".join([head, *(str(o) for o in self.failed)])


# --------------------------------------------------------------------------------------------- one seed, any backend
def run_seed(seed: int, args: Sequence[str], folder: str, recipe: Mapping[str, Any] | None = None,
             cwd: str | None = None, env: Mapping[str, str] | None = None) -> SeedOutcome:
    """Run ``python -m lightning_attr.cli fit *args`` for ``seed`` in a fresh process (this interpreter), its output
    appended to ``{folder}/log.txt``; on exit code 0 write ``{folder}/DONE`` (see the module docstring). A folder
    with DONE returns at once (``skipped``); leftovers of an unfinished attempt are removed first. ``env`` is laid
    over this process's environment; ``recipe`` is recorded in DONE. Every backend calls this one function.
    """
    log = os.path.join(folder, LOG)
    if os.path.isfile(os.path.join(folder, DONE)):
        return SeedOutcome(seed, True, log, skipped=True)
    clear_attempt(folder)
    command = [sys.executable, "-m", "lightning_attr.cli", "fit", *args]
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"=== attempt {utc_now()}: {shlex.join(command)}\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                              env={**os.environ, **(env or {})}).returncode
        wall_s = time.perf_counter() - start
        f.write(f"=== exit code {code} after {wall_s:.1f}s\n")
    if code != 0:
        return SeedOutcome(seed, False, log, wall_s, f"exit code {code}: {last_error(log)}")
    write_done(folder, seed, command, dict(recipe or {}), wall_s)
    return SeedOutcome(seed, True, log, wall_s)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def clear_attempt(folder: str) -> None:
    """Create ``folder``, or empty it of an unfinished attempt's files (``log.txt`` stays: it keeps every attempt)."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name == LOG:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def run_files(folder: str) -> list[str]:
    """Paths (relative, ``/``-separated, sorted) of the files a run wrote in its seed folder."""
    found = []
    for parent, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/")
            if rel not in (LOG, DONE) and not name.startswith(".tmp-"):
                found.append(rel)
    return sorted(found)


def write_done(folder: str, seed: int, command: list[str], recipe: dict, wall_s: float) -> str:
    """Write ``{folder}/DONE`` atomically: the record of a finished seed, with a checksum of every file it wrote."""
    files = {rel: sha256_file(os.path.join(folder, rel)) for rel in run_files(folder)}
    configs = [os.path.dirname(rel) or "." for rel in files if os.path.basename(rel) == "config.yaml"]
    record = dict(seed=seed, command=command, recipe=recipe, wall_s=round(wall_s, 3), finished=utc_now(),
                  run_dir=configs[0] if len(configs) == 1 else None, files=files)
    return save_json(record, os.path.join(folder, DONE), indent=2)


def last_error(log: str, tail: int = 1 << 16, limit: int = 500) -> str:
    """The failed run's error from ``log``: from its last exception line (``ValueError: ...``, ``... error: ...``) to
    the end, on one line (else its last three lines), for a failed seed's report."""
    with open(log, "rb") as f:
        f.seek(max(0, os.path.getsize(log) - tail))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("=== ")] or ["the run wrote no output"]
    starts = [i for i, ln in enumerate(lines) if ERROR_LINE.match(ln)]
    text = " ".join(lines[starts[-1] if starts else max(0, len(lines) - 3):])
    return text if len(text) <= limit else text[:limit] + " ..."


# ------------------------------------------------------------------------------------------------------ backends
def _crashed(job: Mapping[str, Any], err: BaseException) -> SeedOutcome:
    return SeedOutcome(job["seed"], False, os.path.join(job["folder"], LOG), error=f"{type(err).__name__}: {err}")


def _guarded(job: Mapping[str, Any]) -> SeedOutcome:
    try:
        return run_seed(**job)
    except Exception as err:  # an OSError starting the process: report it like a crash of the run
        return _crashed(job, err)


def _map_sequential(jobs: list[dict], parallel: int | None, options: dict) -> Iterator[SeedOutcome]:
    for job in jobs:
        yield _guarded(job)


def _map_processes(jobs: list[dict], parallel: int | None, options: dict) -> Iterator[SeedOutcome]:
    with ThreadPoolExecutor(max_workers=parallel or len(jobs)) as pool:
        for future in as_completed([pool.submit(_guarded, job) for job in jobs]):
            yield future.result()


def import_ray():
    """``ray``, or an ImportError that says how to get it or what to use instead."""
    try:
        import ray
    except ImportError as err:
        raise ImportError("backend='ray' needs Ray: `pip install ray` (or `pip install lightning-attr[dtda]`), or use "
                          "backend='processes' to run the seeds as local processes.") from err
    return ray


def _map_ray(jobs: list[dict], parallel: int | None, options: dict) -> Iterator[SeedOutcome]:
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(log_to_driver=False)  # joins the cluster of RAY_ADDRESS when set, else starts a local Ray
    task = ray.remote(run_seed).options(**options)
    queue, running = list(jobs), {}
    while queue or running:
        while queue and (parallel is None or len(running) < parallel):
            job = queue.pop(0)
            running[task.remote(**job)] = job
        ready, _ = ray.wait(list(running), num_returns=1)
        job = running.pop(ready[0])
        try:
            yield ray.get(ready[0])
        except Exception as err:  # RayTaskError, a lost worker: the seed failed, the others go on
            yield _crashed(job, err)


MAPPERS = {"sequential": _map_sequential, "processes": _map_processes, "ray": _map_ray}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------------ the ensemble
class SeedEnsemble:
    """``lightning-attr fit --config ... --seed_everything s`` once per seed, each in ``{root}/seed_{s:04d}/``
    (layout, resume and failure handling in the module docstring).

    Args:
        config: a config file, or several (applied in order, like repeated ``--config``).
        seeds: distinct integers, or a string such as ``"0-15"``, ``"0,3,5"``, ``"0-3,8"``.
        root: the folder of the seed folders.
        backend: ``"sequential"``, ``"processes"`` or ``"ray"``.
        max_parallel: seeds at once (``"processes"``: default min(seeds, cores); ``"ray"``: default as many as Ray
            places); not for ``"sequential"``.
        extra_args: more ``fit`` arguments for every seed, after the configs; ``{seed}`` and ``{seed_dir}`` are filled
            per seed. ``--seed_everything`` and ``--trainer.default_root_dir`` are the ensemble's.
        ray_options: ``.options(...)`` of the Ray task (e.g. ``{"num_gpus": 1}``); ``num_cpus`` defaults to the
            threads per seed.
        progress: print a line per finished seed.
    """

    def __init__(self, config: str | Sequence[str], seeds: Sequence[int] | str, root: str,
                 backend: str = "sequential", max_parallel: int | None = None, extra_args: Sequence[str] = (),
                 ray_options: Mapping[str, Any] | None = None, progress: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}.")
        if max_parallel is not None and (isinstance(max_parallel, bool) or not isinstance(max_parallel, int)
                                         or max_parallel < 1):
            raise ValueError(f"`max_parallel` must be an integer >= 1 or None, got {max_parallel!r}.")
        if backend == "sequential" and max_parallel not in (None, 1):
            raise ValueError(f"`max_parallel`={max_parallel} needs backend='processes' or 'ray'; 'sequential' runs "
                             "one seed at a time.")
        if backend == "ray":
            import_ray()
        self.configs = config_paths(config)
        self.seeds = check_seeds(seeds)
        self.extra_args = check_extra_args(extra_args)
        self.root, self.cwd = os.path.abspath(root), os.getcwd()
        self.backend, self.max_parallel, self.progress = backend, max_parallel, progress
        self.ray_options = dict(ray_options or {})
        self.recipe = {"configs": [{"path": p, "sha256": sha256_file(p)} for p in self.configs],
                       "extra_args": list(self.extra_args)}

    def folder(self, seed: int) -> str:
        return os.path.join(self.root, f"seed_{seed:04d}")

    def args(self, seed: int) -> list[str]:
        """The ``fit`` arguments of ``seed``: configs, seed, root dir, then the extra args with placeholders filled."""
        folder = self.folder(seed)
        extra = [a.replace("{seed_dir}", folder).replace("{seed}", str(seed)) for a in self.extra_args]
        configs = [item for path in self.configs for item in ("--config", path)]
        return [*configs, "--seed_everything", str(seed), "--trainer.default_root_dir", folder, *extra]

    def finished(self) -> list[int]:
        """The ensemble's seeds that have a DONE (in the order of ``seeds``)."""
        return [s for s in self.seeds if os.path.isfile(os.path.join(self.folder(s), DONE))]

    def record(self, seed: int) -> dict:
        """The DONE record of a finished ``seed``."""
        path = os.path.join(self.folder(seed), DONE)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as err:
            raise CorruptArtifactError(f"{path}: not a readable DONE record ({err}); delete {self.folder(seed)} to "
                                       "run the seed again.") from err

    def check_recipes(self) -> None:
        """Refuse a ``root`` whose finished seeds ran with other config contents or extra args."""
        mine = ([c["sha256"] for c in self.recipe["configs"]], self.recipe["extra_args"])
        other = [s for s in self.finished() if ([c["sha256"] for c in self.record(s)["recipe"].get("configs", [])],
                                                self.record(s)["recipe"].get("extra_args")) != mine]
        if other:
            raise ValueError(f"seeds {other} in {self.root} finished with other configs or extra args than this "
                             f"ensemble (see their DONE's `recipe`); mixing recipes mixes distributions. Use another "
                             f"`root`, or delete those seed folders to rerun them.")

    def run(self) -> EnsembleReport:
        """Run every seed without DONE on the backend; returns the report (failed seeds named there, and printed)."""
        self.check_recipes()
        done = set(self.finished())
        todo = [s for s in self.seeds if s not in done]
        outcomes = {s: SeedOutcome(s, True, os.path.join(self.folder(s), LOG), skipped=True) for s in done}
        if done:
            self._say(f"{len(done)} of {len(self.seeds)} seeds finished earlier (DONE): not rerun")
        if todo:
            parallel = self.parallelism(len(todo))
            threads = self.threads(parallel)
            jobs = [self.job(s, threads) for s in todo]
            options = {"num_cpus": threads, **self.ray_options}
            for n, outcome in enumerate(MAPPERS[self.backend](jobs, parallel, options), start=1):
                outcomes[outcome.seed] = outcome
                self._say(f"{outcome} [{n}/{len(todo)}]")
        return EnsembleReport(tuple(outcomes[s] for s in self.seeds))

    def parallelism(self, pending: int) -> int | None:
        if self.backend == "sequential":
            return 1
        if self.backend == "processes":
            return self.max_parallel or max(1, min(pending, available_cores()))
        return self.max_parallel

    def threads(self, parallel: int | None) -> int:
        """Threads per seed: ``num_cpus`` of a Ray task when given, else cores // seeds at once (at least 1)."""
        if self.backend == "ray" and "num_cpus" in self.ray_options:
            return max(1, int(self.ray_options["num_cpus"]))
        cores = available_cores()
        return max(1, cores // (parallel or cores))

    def job(self, seed: int, threads: int) -> dict:
        """The keyword arguments of :func:`run_seed` for ``seed`` (plain values: they travel to Ray workers)."""
        env = {"PYTHONUNBUFFERED": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
               "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", os.path.basename(self.root)),
               "WANDB_NAME": os.environ.get("WANDB_NAME", f"seed_{seed:04d}")}
        return dict(seed=seed, args=self.args(seed), folder=self.folder(seed), recipe=self.recipe, cwd=self.cwd,
                    env=env)

    def result_folders(self, prefix: str | None = None) -> list[str]:
        """The folder of each finished seed's ``distributional.safetensors`` (for
        :meth:`DistributionalInfluence.from_runs`), checked against the checksum in its DONE. ``prefix``: the
        result's folder inside the run folder (e.g. ``"unrolled"``), needed when a run wrote several."""
        folders = []
        for seed in self.finished():
            files = self.record(seed)["files"]
            found = [rel for rel in files if is_result(rel, prefix)]
            where = f" in a '{prefix}' folder" if prefix else ""
            if len(found) != 1:
                raise ValueError(
                    f"seed {seed}'s run wrote {len(found)} {FILENAME} files{where} under {self.folder(seed)} "
                    f"({found}); " + ("choose one with `prefix` (its folder name)." if found else
                                      "attach a d-TDA callback (e.g. UnrolledDifferentiation) and keep its results "
                                      "in the seed's folder (a WandbLogger needs save_dir={seed_dir})."))
            path = os.path.join(self.folder(seed), found[0])
            if sha256_file(path) != files[found[0]]:
                raise CorruptArtifactError(f"{path}: changed since seed {seed} finished (its DONE records another "
                                           f"checksum); delete {self.folder(seed)} to run the seed again.")
            folders.append(os.path.dirname(path))
        return folders

    def _say(self, line: str) -> None:
        if self.progress:
            print(f"[dtda] {line}", flush=True)


def is_result(rel: str, prefix: str | None) -> bool:
    """Whether the run file ``rel`` is a d-TDA result, in a folder ending with ``prefix`` when given."""
    parts = rel.split("/")
    want = [p for p in (prefix or "").replace(os.sep, "/").split("/") if p]
    return parts[-1] == FILENAME and (not want or parts[-1 - len(want):-1] == want)


def config_paths(config: str | Sequence[str]) -> list[str]:
    """Absolute paths of the existing config file(s)."""
    paths = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    if not paths:
        raise ValueError("`config` is empty: give the config file of the run (or several).")
    missing = [str(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"`config`: no such file(s) {missing} (relative to {os.getcwd()}).")
    return [os.path.abspath(p) for p in paths]


def check_extra_args(extra_args: Sequence[str]) -> list[str]:
    """``extra_args`` as strings, refusing the ones the ensemble sets per seed."""
    if isinstance(extra_args, str):
        raise ValueError(f"`extra_args` must be a list of arguments, got the string {extra_args!r}; split it "
                         "(shlex.split).")
    args = [str(a) for a in extra_args]
    taken = [a for a in args if a.split("=", 1)[0] in RESERVED]
    if taken:
        raise ValueError(f"`extra_args` {taken}: the ensemble sets {list(RESERVED)} per seed (the seed folder is "
                         "{root}/seed_XXXX); drop them.")
    return args
