"""What the benchmarks share: progress lines, timing (one call, best of N, interleaved rounds), result files (JSON and
markdown, written atomically), the small digits CNN with its SGD training and checkpoints, the digits splits as
tensors, a LightningModule around any classifier network (``LitClassifier``) with the training recipe of
``lightning_attr.evaluation.SubsetRetrainer`` (``fit_like_retrainer``), and the metrics ``max_rel_err``, ``pearson``,
``spearman`` and ``per_query_spearman``.

The scripts import it as ``common`` (a script's own folder is first on ``sys.path``); importing it also puts the
repository root on ``sys.path``, so the scripts run from a checkout without installing the package.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_attr import ImageDataModule  # noqa: E402
from lightning_attr.evaluation import SubsetRetrainer  # noqa: E402
from lightning_attr.io import atomic_write  # noqa: E402

__all__ = ["ROOT", "NUM_CLASSES", "progress", "load_now", "quiet", "timed", "best_of", "Timed", "run_rounds",
           "jsonable", "write_json", "write_text", "DigitsCNN", "num_params", "DigitsData", "CNNTraining",
           "Checkpoint", "batches", "predict", "accuracy", "train_cnn", "load_cnn", "LitClassifier",
           "fit_like_retrainer", "max_rel_err", "pearson", "spearman", "per_query_spearman"]

NUM_CLASSES = 10

# ------------------------------------------------------------------------------------------ progress and environment
_START = time.perf_counter()


def progress(tag: str) -> Callable[[str], None]:
    """``log(message)``: a progress line ``[tag  elapsed s load L] message`` on stderr (1-minute load average)."""

    def log(message: str) -> None:
        print(f"[{tag} {time.perf_counter() - _START:6.0f}s load {os.getloadavg()[0]:.1f}] {message}",
              file=sys.stderr, flush=True)

    return log


def load_now(cores: bool = False) -> str:
    """``uptime``-style load averages (1, 5, 15 min), with the number of cores if ``cores``."""
    text = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return f"{text} (cores: {os.cpu_count()})" if cores else text


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries' warnings and loggers inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


# ------------------------------------------------------------------------------------------------------------ timing
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds it took)``."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def best_of(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of ``repeats`` (at least 1) calls of ``fn`` in a row; ``min`` of them is the least disturbed run."""
    return [timed(fn)[1] for _ in range(max(1, repeats))]


@dataclass(kw_only=True)
class Timed:
    """The seconds of a workload's timed runs: the best (fastest) run is the least disturbed by other load. (A
    keyword-only field, so dataclass subclasses may add positional fields.)"""

    seconds: list[float] = field(default_factory=list)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


class Job(Protocol):
    def time_once(self) -> Any: ...  # one timed run, recorded by the job


def run_rounds(jobs: Sequence[Job], rounds: int, log: Callable[[str], None] | None = None, what: str = "") -> None:
    """``rounds`` (at least 1) interleaved rounds: every job's ``time_once()`` once per round. Interleaving spreads
    slow phases of a shared machine evenly over the jobs; each job keeps its runs (and its best)."""
    for r in range(max(1, rounds)):
        for job in jobs:
            job.time_once()
        if log is not None:
            log(f"{what}round {r + 1}/{max(1, rounds)} of {len(jobs)} jobs done")


# ------------------------------------------------------------------------------------------------------ result files
def jsonable(obj: Any, drop: Sequence[str] = (), nonfinite: Callable[[float], Any] = str) -> Any:
    """``obj`` as JSON-ready data: keys as strings, tuples as lists, tensors as lists, non-finite floats through
    ``nonfinite`` (default: their string); dict entries named in ``drop`` are left out."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, drop, nonfinite) for k, v in obj.items() if k not in drop}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, drop, nonfinite) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return nonfinite(obj)
    return obj


def write_json(path: str | Path, results: Any, indent: int = 2, drop: Sequence[str] = (),
               nonfinite: Callable[[float], Any] = str) -> str:
    """Write ``jsonable(results)`` to ``path`` atomically; returns the path."""
    text = json.dumps(jsonable(results, drop, nonfinite), indent=indent, default=float)
    return write_text(path, text)


def verdict(target: str, value: float | None, threshold: float, higher: bool = True, note: str = "") -> dict:
    """One row of a benchmark's targets: ``met`` is None when ``value`` is missing or NaN."""
    met = None if value is None or math.isnan(value) else (value >= threshold if higher else value <= threshold)
    return dict(target=target, value=value, threshold=threshold, higher_is_better=higher, met=met, note=note)


def targets_table(verdicts: Sequence[dict]) -> list[str]:
    """The ``## Targets`` markdown section of :func:`verdict` rows."""
    lines = ["", "## Targets", "", "| target | value | threshold | met | note |", "|---|---|---|---|---|"]
    for v in verdicts:
        met = {True: "yes", False: "NO", None: "n/a"}[v["met"]]
        lines.append(f"| {v['target']} | {fmt(v['value'])} | {'>=' if v['higher_is_better'] else '<='} "
                     f"{v['threshold']} | {met} | {v['note']} |")
    return lines


def begin(out: str, threads: int, **fields: Any) -> tuple[Path, float, dict]:
    """Open a benchmark run: warnings off, ``threads`` torch threads, the output folder made; returns ``(out folder,
    start time, results dict)`` holding the machine, torch version, load and ``fields``."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    r = dict(threads=threads, torch=torch.__version__, machine=machine, load_start=load_now(), **fields)
    return folder, time.perf_counter(), r


def finish(r: dict, start: float, out: Path, markdown: Callable[[dict], str], log: Callable[[str], None],
           drop: Sequence[str] = ()) -> dict:
    """Close a benchmark run: wall time and load into ``r``, then ``{out}/results.json`` (non-finite numbers as null,
    ``drop`` keys left out) and ``{out}/results.md``, printed; returns ``r``."""
    r["wall_seconds"] = time.perf_counter() - start
    r["load_end"] = load_now()
    md = markdown(r)
    write_json(out / "results.json", r, indent=1, drop=drop, nonfinite=lambda _: None)
    write_text(out / "results.md", md)
    print(md)
    log(f"done in {r['wall_seconds']:.0f}s; wrote {out}/results.json and results.md")
    return r


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: ``digits`` decimals, general format for very small or large numbers, blank for None."""
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.{digits}f}"
    return str(v)


def write_text(path: str | Path, text: str) -> str:
    """Write ``text`` (e.g. a markdown report) to ``path`` atomically; returns the path."""
    atomic_write(str(path), lambda tmp: Path(tmp).write_text(text))
    return str(path)


# ------------------------------------------------------------------------------------------ the small digits CNN
def save_plot(fig: Any, ax: Any, path: str | Path, dpi: int = 130) -> str:
    """Grid and legend on ``ax``, then ``fig`` written to ``path`` as PNG atomically and closed; returns the path."""
    import matplotlib.pyplot as plt

    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
    return str(path)


class DigitsCNN(nn.Module):
    """Conv(C->16, 3x3) - ReLU - MaxPool - Conv(16->32, 3x3) - ReLU - MaxPool - Linear(32*(S/4)^2, 64) - ReLU -
    Linear(64, 10)."""

    def __init__(self, image_size: int = 32, channels: int = 1, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * (image_size // 4) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class DigitsData:
    """The digits splits as tensors: images (N, C, S, S) normalized to [-1, 1], labels (N,); ``noisy`` flags the
    flipped train labels (all False without label noise)."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    noisy: Tensor

    @classmethod
    def load(cls, image_size: int, channels: int = 1, label_noise: float = 0.0) -> DigitsData:
        dm = ImageDataModule("digits", image_size=image_size, channels=channels, label_noise=label_noise)
        dm.setup()

        def stack(split: str) -> tuple[Tensor, Tensor]:
            ds = dm.splits[split]
            items = [ds[i] for i in range(len(ds))]
            assert [int(it["index"]) for it in items] == list(range(len(ds)))
            return torch.stack([it["image"] for it in items]), torch.tensor([int(it["label"]) for it in items])

        return cls(*stack("train"), *stack("val"), dm.noisy_mask.clone())

    def truncated(self, n: int | None) -> DigitsData:
        """The first ``n`` training examples (all for None); the validation split unchanged."""
        if n is None:
            return self
        return DigitsData(self.x_train[:n], self.y_train[:n], self.x_val, self.y_val, self.noisy[:n])


@dataclass
class CNNTraining:
    """How the CNN is trained: plain torch SGD (momentum 0.9), lr ``lr * lr_decay**(epoch // checkpoint_every)``."""

    image_size: int = 32
    epochs: int = 6
    checkpoint_every: int = 2  # epochs between checkpoints (and learning-rate decays)
    lr: float = 0.1
    lr_decay: float = 0.5
    batch_size: int = 64


@dataclass
class Checkpoint:
    """The weights and the learning rate of the epochs just finished; ``path`` where they were saved (if they were)."""

    epoch: int
    lr: float
    state: dict[str, Tensor]
    train_acc: float
    val_acc: float
    path: str | None = None

    def info(self) -> dict[str, Any]:
        return dict(epoch=self.epoch, lr=self.lr, train_acc=self.train_acc, val_acc=self.val_acc)


def batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, x.shape[0], size)]


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, bs: int = 512) -> Tensor:
    """Eval-mode outputs (N, K), in batches of ``bs``."""
    model.eval()
    return torch.cat([model(x[i : i + bs]) for i in range(0, x.shape[0], bs)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float(predict(model, x).argmax(1).eq(y).float().mean())


def train_cnn(x: Tensor, y: Tensor, s: CNNTraining, epochs: int | None = None, seed: int = 0,
              checkpoints: bool = False, val: tuple[Tensor, Tensor] | None = None,
              log: Callable[[str], None] | None = None) -> tuple[DigitsCNN, list[Checkpoint]]:
    """A ``DigitsCNN`` trained on ``x`` (N, C, S, S), ``y`` for ``epochs`` (default ``s.epochs``) as ``s`` says, seeded
    init and order; with ``checkpoints``, a :class:`Checkpoint` every ``s.checkpoint_every`` epochs (accuracies on the
    training data and ``val``). Returns the model in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(x.shape[-1], x.shape[1])
    opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    ckpts = []
    for epoch in range(s.epochs if epochs is None else epochs):
        lr = s.lr * s.lr_decay ** (epoch // s.checkpoint_every)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        order = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, order.numel(), s.batch_size):
            idx = order[i : i + s.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if checkpoints and (epoch + 1) % s.checkpoint_every == 0:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            va = accuracy(model, *val) if val else float("nan")
            ckpts.append(Checkpoint(epoch, lr, state, accuracy(model, x, y), va))
            if log is not None:
                log(f"checkpoint epoch {epoch}: lr {lr:g}, train acc {ckpts[-1].train_acc:.3f}, val acc {va:.3f}")
    return model.eval(), ckpts


def load_cnn(ck: Checkpoint, image_size: int, channels: int = 1) -> DigitsCNN:
    """A ``DigitsCNN`` with the weights of ``ck``, in eval mode."""
    model = DigitsCNN(image_size, channels)
    model.load_state_dict(ck.state)
    return model.eval()


# ------------------------------------------------------------------------------- a LightningModule around a network
class LitClassifier(L.LightningModule):
    """``net`` (any module giving logits) trained on batches ``(x, y, ...)`` with the mean cross-entropy, SGD (momentum
    0.9, ``weight_decay``) and the learning rate multiplied by ``gamma`` every ``step_epochs`` epochs."""

    def __init__(self, net: nn.Module, lr: float = 0.1, weight_decay: float = 5e-4, step_epochs: int = 2,
                 gamma: float = 0.5) -> None:
        super().__init__()
        self.net, self.lr, self.weight_decay, self.step_epochs, self.gamma = net, lr, weight_decay, step_epochs, gamma

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, self.step_epochs, self.gamma)]


def fit_like_retrainer(retrainer: SubsetRetrainer, seed: int = 0) -> L.LightningModule:
    """The full model of an LDS: ``retrainer.fit`` on ALL of its training set, quietly, in eval mode."""
    with quiet():
        return retrainer.fit(torch.arange(len(retrainer.train)), seed).eval()


# ---------------------------------------------------------------------------------------------------------- metrics
def max_rel_err(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|``: the largest deviation relative to the largest score."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equally shaped tensors (flattened, float64)."""
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (flattened)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def per_query_spearman(a: Tensor, b: Tensor) -> float:
    """Mean over query columns of the Spearman correlation of the train scores, (n_train, n_query) inputs."""
    return float(sum(spearman(a[:, j], b[:, j]) for j in range(a.shape[1])) / a.shape[1])
