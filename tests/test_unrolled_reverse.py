"""UnrolledDifferentiation in reverse mode (``measurements=`` without ``examples=``) inside a Lightning Trainer: equal
to forward mode tracking every example in the same fit (SGD with momentum, weight decay and a scheduler, weights
stored every 1 / 2 / 5 steps, gradient accumulation, BatchNorm), two DDP processes equal to one and agreeing with each
other, resume equal to uninterrupted, the recording's gather and measurement shares, and bad input."""

from __future__ import annotations

import math
import threading

import lightning as L
import pytest
import torch
from test_unrolled_callback import QUERY, N, Weighted, fit, train_mode_losses
from torch.func import functional_call
from torch.nn import functional as F

from lightning_attr.callbacks import UnrolledDifferentiation
from lightning_attr.distributional import FunctionMeasurement, QueryLogits, QueryLosses, RecordedBatch
from lightning_attr.distributional.recording import gather_step, measurement_shares, sweep_in_shares
from lightning_attr.distributional.results import read_run_result

F64 = torch.float64
CASES = {  # 13 examples in micro-batches of 4 (5 with BatchNorm), 3 epochs, the learning rate halved every epoch
    "every_1": dict(every=1),
    "every_5": dict(every=5),
    "accumulate_2_every_5": dict(every=5, accumulate=2),
    "batch_norm_accumulate_2_every_2": dict(every=2, accumulate=2, norm=True),
}


def worst_relative_error(got, want):
    """The largest per-example relative error of (N, Q) predictions (every example is seen, so no row is 0)."""
    return float(((got - want).norm(dim=1) / want.norm(dim=1)).max())


@pytest.mark.parametrize("case", list(CASES))
def test_reverse_mode_equals_forward_mode_tracking_every_example(tmp_path, case):
    kw = CASES[case]
    norm = kw.get("norm", False)
    measurement = (FunctionMeasurement(train_mode_losses, names=[f"q{i}" for i in range(4)]) if norm
                   else [QueryLosses(*QUERY), QueryLogits(QUERY[0], 1)])
    forward = UnrolledDifferentiation(examples=list(range(N)), measurements=measurement, seed=5, prefix="forward",
                                      dirpath=str(tmp_path / "forward"))
    reverse = UnrolledDifferentiation(measurements=measurement, checkpoint_every=kw["every"], seed=5, prefix="reverse",
                                      dirpath=str(tmp_path / "reverse"))
    model = Weighted(norm=norm, batch_size=5 if norm else 4)
    fit(tmp_path, model, [forward, reverse], accumulate_grad_batches=kw.get("accumulate", 1))
    trajectory = reverse.reverse.trajectory
    steps = 3 * math.ceil((3 if norm else 4) / kw.get("accumulate", 1))  # 3 epochs of 4 (3) micro-batches
    assert trajectory.num_steps == steps and sorted(trajectory.checkpoints) == list(range(0, steps, kw["every"]))
    assert reverse.changes.shape == forward.changes.shape == (N, 4 if norm else 8)
    error = worst_relative_error(reverse.changes, forward.changes)
    print(f"{case}: reverse vs forward worst per-example relative error {error:.1e}")
    assert error < 1e-6
    stored = read_run_result(str(tmp_path / "reverse"))
    assert stored.method == "unrolled-reverse" and stored.seed == 5 and stored.examples.tolist() == list(range(N))
    assert stored.measurements == forward.result.measurements
    torch.testing.assert_close(stored.change, reverse.changes, rtol=0, atol=0)
    torch.testing.assert_close(stored.value, forward.result.value, rtol=1e-12, atol=1e-14)


def test_recording_and_sweep_leave_training_untouched(tmp_path):
    """Weights, BatchNorm running statistics and the RNG stream are bit-identical with and without the callback."""
    runs = []
    for callbacks in ([], [UnrolledDifferentiation(measurements=QueryLosses(*QUERY), seed=0, checkpoint_every=4,
                                                   dirpath=str(tmp_path / "r"))]):
        torch.manual_seed(0)
        model = Weighted(norm=True, batch_size=5)
        fit(tmp_path, model, callbacks, accumulate_grad_batches=2)
        runs.append((model.state_dict(), torch.rand(3)))
    for name, value in runs[0][0].items():
        assert torch.equal(value, runs[1][0][name]), name
    assert torch.equal(runs[0][1], runs[1][1])


class SaveChanges(L.Callback):
    """Each process saves what the reverse callbacks hold after fit (they run first)."""

    def __init__(self, sources, folder):
        self.sources, self.folder = sources, folder

    def on_train_end(self, trainer, pl_module):
        torch.save([cb.changes for cb in self.sources], self.folder / f"rank{trainer.global_rank}.pt")


def test_two_ddp_processes_equal_one_fed_the_same_global_batches(tmp_path):
    """12 examples, accumulation 2: one process in batches of 4, two in batches of 2 (rank r reads r, r + 2, ...)
    record the same global steps. 4 measurements are shared 2 + 2 over the ranks, 1 measurement is swept by both;
    both ranks hold the same result and rank zero's file equals the one-process file."""
    results = []
    for devices, batch_size in ((1, 4), (2, 2)):
        folder = tmp_path / f"d{devices}"
        folder.mkdir()
        callbacks = [UnrolledDifferentiation(measurements=m, checkpoint_every=4, seed=3, prefix=name,
                                             dirpath=str(folder / name))
                     for name, m in (("q4", QueryLosses(*QUERY)), ("q1", QueryLogits(QUERY[0][:1], 2)))]
        kw = dict(strategy="ddp_fork") if devices == 2 else {}
        model = Weighted(n=12, batch_size=batch_size, shuffle=False)
        fit(tmp_path, model, [*callbacks, SaveChanges(callbacks, folder)], devices=devices,
            use_distributed_sampler=False, accumulate_grad_batches=2, **kw)
        results.append([read_run_result(str(folder / name)) for name in ("q4", "q1")])
        held = [torch.load(folder / f"rank{r}.pt") for r in range(devices)]
        for other in held[1:]:  # every rank holds rank zero's result, bit for bit
            assert all(torch.equal(a, b) for a, b in zip(other, held[0]))
        for stored, kept in zip(results[-1], held[0]):
            torch.testing.assert_close(stored.change, kept, rtol=0, atol=0)
    for one, two in zip(*results):
        assert one.change.shape == (12, one.value.numel()) and float(one.change.norm()) > 0
        torch.testing.assert_close(two.value, one.value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(two.change, one.change, rtol=1e-9, atol=1e-12)


def test_resumed_fit_equals_uninterrupted(tmp_path):
    """Interrupted after epoch 1 (step 4, inside the segment 3..5 of checkpoint_every=3) and resumed to epoch 3."""
    def callback(name):
        return UnrolledDifferentiation(measurements=QueryLosses(*QUERY), checkpoint_every=3, seed=1,
                                       dirpath=str(tmp_path / name))

    whole = callback("whole")
    fit(tmp_path / "w", Weighted(shuffle=False), [whole], epochs=3)
    first = callback("resumed")
    trainer = fit(tmp_path / "r", Weighted(shuffle=False), [first], epochs=1)
    assert first.reverse.trajectory.num_steps == 4
    ckpt = str(tmp_path / "r.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = callback("resumed")
    fit(tmp_path / "r", Weighted(shuffle=False), [resumed], epochs=3, ckpt_path=ckpt)
    trajectory = resumed.reverse.trajectory
    assert trajectory.num_steps == 12 and sorted(trajectory.checkpoints) == [0, 3, 6, 9]
    error = float((resumed.changes - whole.changes).abs().max() / whole.changes.abs().max())
    print(f"resumed vs uninterrupted: max relative difference {error:.1e}")
    assert error < 1e-12
    torch.testing.assert_close(read_run_result(str(tmp_path / "resumed")).change, whole.changes, rtol=1e-12,
                               atol=1e-15)


# ------------------------------------------------------------------------------------------- recording, Lightning-free
class ThreadGroup:
    """``world`` threads acting as processes: ``all_gather(rank)`` stacks every rank's tensor, in rank order."""

    def __init__(self, world):
        self.barrier, self.slots, self.world = threading.Barrier(world), [None] * world, world

    def all_gather(self, rank):
        def gather(t):
            self.slots[rank] = t
            self.barrier.wait()
            out = torch.stack(self.slots)
            self.barrier.wait()
            return out
        return gather

    def run(self, fn):
        out = [None] * self.world
        threads = [threading.Thread(target=lambda r=r: out.__setitem__(r, fn(r, self.all_gather(r))))
                   for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


def test_gather_step_keeps_every_micro_batch_of_every_rank_in_rank_order():
    def batch(indices, weight):
        return RecordedBatch(torch.tensor(indices), torch.full((len(indices),), weight, dtype=F64))

    local = [[batch([5, 2, 7], 1 / 12), batch([9], 1 / 4)], [batch([0, 11], 1 / 8)], [batch([3, 4], 1 / 8)] * 2]
    gathered = ThreadGroup(3).run(lambda r, gather: gather_step(local[r], gather))
    want = [b for rank in local for b in rank]
    for got in gathered:
        assert [b.indices.tolist() for b in got] == [b.indices.tolist() for b in want]
        assert all(torch.equal(g.weights, w.weights) and g.indices.dtype == torch.long for g, w in zip(got, want))
    assert [b.indices.tolist() for b in gather_step(local[0])] == [[5, 2, 7], [9]]  # one process
    with pytest.raises(ValueError, match="`batches` is empty"):
        gather_step([])


@pytest.mark.parametrize("q, world", [(5, 2), (1, 3), (2, 2)])
def test_measurements_are_shared_out_and_put_back_in_order(q, world):
    shares = measurement_shares(q, world)
    assert sorted(c for r, s in enumerate(shares) for c in s if c % world == r) == list(range(q))
    assert all(shares)  # no rank idles while the others sweep

    def sweep(columns):  # column c of the (N, Q) result is c + 100 * row
        return torch.tensor(columns, dtype=F64) + 100 * torch.arange(4, dtype=F64).unsqueeze(1)

    want = sweep(list(range(q)))
    for got in ThreadGroup(world).run(lambda r, gather: sweep_in_shares(sweep, q, r, world, gather)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="at least one measurement"):
        measurement_shares(0, 2)


# ------------------------------------------------------------------------------------------------------ bad input
class OutputDropout(Weighted):
    """Dropout drawn in ``forward`` with ``F.dropout``: invisible to the module check, caught by the replay check."""

    def forward(self, x):
        return F.dropout(self.net(x), p=0.3, training=self.training)


def test_bad_input_is_named(tmp_path):
    def reverse(**kw):
        return UnrolledDifferentiation(measurements=QueryLosses(*QUERY), seed=0, dirpath=str(tmp_path / "r"), **kw)

    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"`checkpoint_every` must be an int >= 1 .*got {bad!r}"):
            reverse(checkpoint_every=bad)
    with pytest.raises(ValueError, match="`checkpoint_every`=3 is for reverse mode"):
        UnrolledDifferentiation(examples=[0], checkpoint_every=3)
    with pytest.raises(ValueError, match="give `examples=`"):
        UnrolledDifferentiation()
    cb = reverse()
    with pytest.raises(RuntimeError, match="no result yet"):
        cb.changes
    with pytest.raises(RuntimeError, match="reverse mode keeps no responses"):
        cb.response
    with pytest.raises(ValueError, match="is Adam; .*supports torch.optim.SGD"):
        fit(tmp_path, Weighted(optimizer="adam"), [reverse()])
    with pytest.raises(ValueError, match=r"Dropout.*net.2 \(Dropout, p=0.2\)"):
        fit(tmp_path, Weighted(dropout=0.2), [reverse()])
    model = Weighted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    logits = FunctionMeasurement(lambda module, params: functional_call(module, params, (QUERY[0],)))
    with pytest.raises(ValueError, match=r"one number per query.*\(4, 3\)"):
        fit(tmp_path, model, [UnrolledDifferentiation(measurements=logits, seed=0, dirpath=str(tmp_path / "r"))])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before training
    with pytest.raises(ValueError, match="does not reproduce training"):
        fit(tmp_path, OutputDropout(), [reverse(checkpoint_every=5)], epochs=1)
