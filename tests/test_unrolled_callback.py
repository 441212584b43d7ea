"""UnrolledDifferentiation (forward mode) inside a Lightning Trainer: the predicted change of measurements against
coupled finite-difference retrains (SGD with momentum, weight decay, a scheduler, gradient accumulation, BatchNorm),
two DDP processes against one, resume against uninterrupted, untouched training, and bad input."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import UnrolledDifferentiation
from lightning_attr.data import IndexedDataset, UnpaddedDistributedSampler
from lightning_attr.distributional.measurements import FunctionMeasurement, QueryLogits, QueryLosses, as_measurement
from lightning_attr.distributional.results import read_run_result
from lightning_attr.distributional.tracking import batch_statistics, load_responses

N = 13  # 4 micro-batches per epoch: 4 + 4 + 4 + 1
F64 = torch.float64
TRACKED = [9, 0, 4]  # 0 and 4 sit in different batches; unsorted on purpose (files are sorted by example)


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


QUERY = data(4, seed=7)


class Weighted(L.LightningModule):
    """Tanh MLP in float64 (optionally with BatchNorm or Dropout); example i's loss weighted by ``weights[i]`` (1 by
    default) in a mean-reduced cross-entropy; SGD with momentum, dampening, weight decay and the learning rate halved
    every epoch; a shuffled but fixed batch order (in order, sharded by rank, under DDP)."""

    def __init__(self, weights=None, n=N, batch_size=4, shuffle=True, optimizer="sgd", dropout=0.0, norm=False):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Linear(3, 6), *([nn.BatchNorm1d(6)] if norm else []), nn.Tanh(),
                  *([nn.Dropout(dropout)] if dropout else []), nn.Linear(6, 3)]
        self.net = nn.Sequential(*layers).double()
        self.weights = torch.ones(n, dtype=F64) if weights is None else weights
        self.n, self.batch_size, self.shuffle, self.optimizer = n, batch_size, shuffle, optimizer

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        return (losses * self.weights.to(losses)[index.cpu()]).mean()

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.01)
        opt = torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.8, dampening=0.1, weight_decay=0.05)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def train_dataloader(self):
        dataset = IndexedDataset(TensorDataset(*data(self.n)))
        world = self.trainer.world_size
        if world > 1:  # rank r reads r, r + world, ...: the same global batches as one process in order
            sampler = UnpaddedDistributedSampler(dataset, world, self.trainer.global_rank)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
        generator = torch.Generator().manual_seed(1) if self.shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator)


def fit(tmp_path, model, callbacks=(), epochs=3, ckpt_path=None, **kw):
    base = dict(max_epochs=epochs, accelerator="cpu", devices=1, precision="64-true", logger=False,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path))
    trainer = L.Trainer(callbacks=list(callbacks), **{**base, **kw})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


def measure(measurement, model):
    with torch.no_grad():
        return as_measurement(measurement)(model.eval(), dict(model.named_parameters()))


def finite_differences(tmp_path, measurement, examples, h=1e-4, **kw):
    """Central differences ``(m(theta_T(h)) - m(theta_T(-h))) / 2h`` (K, Q) of coupled retrains (same initialization
    and batch order) with example k's loss weighted ``1 - eps``."""
    rows = []
    for k in examples:
        values = []
        for eps in (h, -h):
            weights = torch.ones(N, dtype=F64)
            weights[k] = 1 - eps
            model = Weighted(weights=weights, batch_size=kw.get("batch_size", 4), norm=kw.get("norm", False))
            fit(tmp_path, model, accumulate_grad_batches=kw.get("accumulate", 1))
            values.append(measure(measurement, model))
        rows.append((values[0] - values[1]) / (2 * h))
    return torch.stack(rows)


def relative_error(predicted, reference):
    return float((predicted - reference).norm() / reference.norm())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_predicted_change_equals_finite_differences_of_coupled_retrains(tmp_path, accumulate):
    measurements = [QueryLosses(*QUERY), QueryLogits(QUERY[0], 1)]
    folder = tmp_path / "ud"
    cb = UnrolledDifferentiation(examples=TRACKED, measurements=measurements, dirpath=str(folder), seed=5,
                                 chunk_size=None if accumulate == 1 else 2)  # 2 + 1 tracked examples per vmap
    model = Weighted()
    fit(tmp_path, model, [cb], accumulate_grad_batches=accumulate)
    assert cb.response.steps == 3 * (4 if accumulate == 1 else 2)
    predicted = cb.predict(measurements)  # (K, Q), rows in the order of TRACKED
    fd = finite_differences(tmp_path, measurements, TRACKED, accumulate=accumulate)
    error = relative_error(predicted, fd)
    print(f"accumulate={accumulate}: relative error {error:.2e}, |dm/deps| {float(fd.norm()):.3g}")
    assert error < 1e-4
    result = read_run_result(str(folder))  # what a seed ensemble reads
    order = torch.tensor(TRACKED).argsort()
    assert result.method == "unrolled-forward" and result.seed == 5
    assert result.measurements == ("loss_0", "loss_1", "loss_2", "loss_3", *(f"logit_{i}_c1" for i in range(4)))
    assert result.examples.tolist() == sorted(TRACKED)
    torch.testing.assert_close(result.change, predicted[order], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(result.value, measure(measurements, model), rtol=1e-12, atol=1e-14)
    stored, meta = load_responses(str(folder))
    assert stored.examples.tolist() == TRACKED and stored.steps == cb.response.steps and meta["seed"] == "5"
    torch.testing.assert_close(stored.flat(), cb.response.flat(), rtol=0, atol=0)


def train_mode_losses(module, params):
    """Query losses with batch norm on the query batch's statistics: a function of the weights only."""
    module.train()
    with batch_statistics(module):
        return F.cross_entropy(functional_call(module, dict(params), (QUERY[0],)), QUERY[1], reduction="none")


def test_batch_norm_training_is_untouched_and_differentiated(tmp_path, monkeypatch):
    """Bit-identical weights, running statistics and RNG stream with the callback; the BatchNorm layer's batch
    statistics are differentiated as training uses them."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # restored after the test
    runs, cb = [], UnrolledDifferentiation(examples=[0, 4], dirpath=str(tmp_path / "ud"))
    for callbacks in ([], [cb]):
        L.seed_everything(0)
        model = Weighted(norm=True, batch_size=5)  # micro-batches 5 + 5 + 3: batch statistics need 2 rows
        logger = CSVLogger(str(tmp_path), name="logs")
        fit(tmp_path, model, callbacks, accumulate_grad_batches=2, logger=logger, log_every_n_steps=1)
        runs.append((model.state_dict(), torch.rand(3)))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = [float(row["unrolled/steps_tracked"]) for row in csv.DictReader(f) if row["unrolled/steps_tracked"]]
    assert logged == [2.0, 4.0, 6.0]  # once per epoch
    for name, value in runs[0][0].items():
        assert torch.equal(value, runs[1][0][name]), name
    assert torch.equal(runs[0][1], runs[1][1])
    measurement = FunctionMeasurement(train_mode_losses, names=[f"q{i}" for i in range(4)])
    fd = finite_differences(tmp_path, measurement, [0, 4], accumulate=2, norm=True, batch_size=5)
    error = relative_error(cb.predict(measurement), fd)
    print(f"BatchNorm: relative error {error:.2e}")
    assert error < 1e-4
    assert load_responses(str(tmp_path / "ud"))[1]["seed"] == "0"  # from seed_everything


def test_two_ddp_processes_equal_one_fed_the_same_global_batches(tmp_path):
    """12 examples: one process in batches of 4 and two processes in batches of 2 (rank r gets r, r + 2, ...) take
    the same steps; with accumulation each row weighs 1 / (B * A * W) and the responses are summed over ranks."""
    results = []
    for devices, batch_size in ((1, 4), (2, 2)):
        folder = tmp_path / f"d{devices}"
        kw = dict(strategy="ddp_fork") if devices == 2 else {}
        cb = UnrolledDifferentiation(examples=TRACKED, measurements=QueryLosses(*QUERY), dirpath=str(folder), seed=3)
        fit(tmp_path, Weighted(n=12, batch_size=batch_size, shuffle=False), [cb], devices=devices,
            use_distributed_sampler=False, accumulate_grad_batches=2, **kw)
        results.append((load_responses(str(folder))[0], read_run_result(str(folder))))  # workers held the state
    (one, one_result), (two, two_result) = results
    assert one.steps == two.steps == 3 * 2  # 3 micro-batches per epoch: 2 + 1
    assert float(one.flat().norm()) > 0
    torch.testing.assert_close(two.flat(), one.flat(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two_result.value, one_result.value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(two_result.change, one_result.change, rtol=1e-9, atol=1e-12)


def test_resumed_fit_ends_with_the_uninterrupted_responses(tmp_path):
    def callback(name):
        return UnrolledDifferentiation(examples=TRACKED, dirpath=str(tmp_path / name))

    whole = callback("whole")
    fit(tmp_path / "w", Weighted(shuffle=False), [whole], epochs=3)
    first = callback("resumed")
    trainer = fit(tmp_path / "r", Weighted(shuffle=False), [first], epochs=1)
    assert first.response.steps == 4
    ckpt = str(tmp_path / "r.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = callback("resumed")
    fit(tmp_path / "r", Weighted(shuffle=False), [resumed], epochs=3, ckpt_path=ckpt)
    assert resumed.response.steps == whole.response.steps == 12
    for part in ("r", "momentum"):
        a, b = getattr(resumed.response, part), getattr(whole.response, part)
        assert set(a) == set(b) and len(a) == 4
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-12, atol=1e-15)
    stored = load_responses(str(tmp_path / "resumed"))[0]
    torch.testing.assert_close(stored.flat(), whole.response.flat(), rtol=1e-12, atol=1e-15)


def test_bad_input_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"`examples`=5: an int .* not supported yet"):
        UnrolledDifferentiation(examples=5)
    with pytest.raises(ValueError, match=r"distinct .*repeated: \[2\]"):
        UnrolledDifferentiation(examples=[1, 2, 2])
    with pytest.raises(ValueError, match="empty"):
        UnrolledDifferentiation(examples=[])
    with pytest.raises(ValueError, match="negative"):
        UnrolledDifferentiation(examples=[0, -1])
    with pytest.raises(ValueError, match="give `examples=`.* or `measurements=`"):
        UnrolledDifferentiation()
    with pytest.raises(ValueError, match="`loss`='hinge'"):
        UnrolledDifferentiation(examples=[0], loss="hinge")
    with pytest.raises(ValueError, match=r"`examples` \[13, 40\] are out of range: the training set has 13"):
        fit(tmp_path, Weighted(), [UnrolledDifferentiation(examples=[0, 13, 40])])
    with pytest.raises(ValueError, match="is Adam; .*supports torch.optim.SGD"):
        fit(tmp_path, Weighted(optimizer="adam"), [UnrolledDifferentiation(examples=[0])])
    with pytest.raises(ValueError, match=r"Dropout.*net.2 \(Dropout, p=0.2\)"):
        fit(tmp_path, Weighted(dropout=0.2), [UnrolledDifferentiation(examples=[0])])
    with pytest.raises(ValueError, match="precision"):
        fit(tmp_path, Weighted(), [UnrolledDifferentiation(examples=[0])], precision="bf16-mixed")
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    with pytest.raises(ValueError, match="seed_everything"):
        fit(tmp_path, Weighted(), [UnrolledDifferentiation(examples=[0], measurements=QueryLosses(*QUERY))])
    not_per_query = FunctionMeasurement(lambda module, params: functional_call(module, params, (QUERY[0],)))
    cb = UnrolledDifferentiation(examples=[0], dirpath=str(tmp_path / "ok"))
    fit(tmp_path, Weighted(), [cb], epochs=1)
    with pytest.raises(ValueError, match=r"one number per query.*\(4, 3\)"):
        cb.predict(not_per_query)
    with pytest.raises(ValueError, match="`classes`"):
        QueryLogits(QUERY[0], [0, 1])


def test_yaml_spec_builds_the_callback():
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "callbacks" / "unrolled.yaml").read_text())
    module, name = spec["class_path"].rsplit(".", 1)
    cb = getattr(importlib.import_module(module), name)(**spec["init_args"])
    assert isinstance(cb, UnrolledDifferentiation) and len(cb.examples) == 8
