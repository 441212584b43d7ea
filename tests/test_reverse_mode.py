"""d-TDA reverse mode: the adjoint sweep over a recorded torch.optim.SGD run equals forward mode (every example tracked)
for every example, its replay reproduces the recorded and final weights, unseen examples get exactly 0, repeated rows
count each time, and bad input is a clear error."""

from __future__ import annotations

import io

import pytest
import torch
from test_distributional_core import CASES, F64, N, measure_fn, mlp, regression_data, schedule, sq_loss

from lightning_attr.distributional import (
    ForwardResponse,
    MicroBatch,
    RecordedBatch,
    SGDHyperparameters,
    Trajectory,
    forward_step,
    hyperparameters_by_name,
    measurement_jacobian,
    momentum_buffers_by_name,
    predict_change,
    replay,
    replay_divergence,
    reverse_sweep,
)


def data_fn(x, y):
    return lambda idx: (x[idx], y[idx])


def record(settings, steps=20, batch=4, accumulate=1, replacement=False, every=1, decay=False, forward=True):
    """Train the tiny float64 MLP with torch.optim.SGD, recording a Trajectory (checkpoints when due) and, with
    ``forward``, stepping forward-mode responses of ALL N examples along. Returns (model, trajectory, state, data)."""
    model, (x, y) = mlp(), regression_data()
    settings = dict(settings)
    groups = settings.pop("groups", None)
    params = ([{"params": model[0].parameters(), **groups}, {"params": model[2].parameters()}] if groups
              else model.parameters())
    opt = torch.optim.SGD(params, **settings)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + 0.15 * t)) if decay else None
    named = dict(model.named_parameters())
    trajectory = Trajectory(every=every)
    state = ForwardResponse.zeros(range(N), named) if forward else None
    for t, micro in enumerate(schedule(steps, batch, accumulate, replacement)):
        batches = [MicroBatch(x[i], y[i], torch.full((len(i),), 1 / (len(i) * accumulate), dtype=F64), i)
                   for i in micro]
        hyper = hyperparameters_by_name(opt, named)
        if trajectory.due(t):
            trajectory.checkpoint(t, named, momentum_buffers_by_name(opt, named))
        trajectory.record_step(batches, hyper)
        if forward:
            state = forward_step(model, named, state, batches, sq_loss, hyper)
        opt.zero_grad()
        for b in batches:
            (b.weights * sq_loss(model(b.inputs), b.targets)).sum().backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model, trajectory, state, data_fn(x, y)


def relative_errors(got, want):
    """(overall, worst per example) relative errors of (N, Q) predictions."""
    per_example = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)  # an unseen example: both 0
    return float((got - want).norm() / want.norm()), float(per_example.max())


RUNS = {
    "sgd_every_1": (CASES["sgd"], dict(every=1)),
    "momentum_dampening_decay_groups_every_7": (CASES["momentum_weight_decay_groups"], dict(every=7)),
    "nesterov_decay_every_7": (CASES["nesterov_weight_decay"], dict(every=7)),
    "accumulation_momentum_every_1": (dict(lr=0.1, momentum=0.9, dampening=0.1), dict(accumulate=2, batch=3)),
    "lr_schedule_momentum_every_7": (dict(lr=0.3, momentum=0.5, weight_decay=0.01), dict(decay=True, every=7)),
    "repeated_rows_every_3": (CASES["sgd"], dict(replacement=True, batch=5, every=3)),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_reverse_mode_equals_forward_mode_for_every_example(run):
    settings, kw = RUNS[run]
    model, trajectory, state, data = record(settings, **kw)
    named = dict(model.named_parameters())
    jac = measurement_jacobian(measure_fn(model), named)  # Q = 3
    forward = predict_change(jac, state)  # (N, Q), every example tracked
    reverse = reverse_sweep(model, trajectory, data, sq_loss, jac, N)
    assert reverse.shape == (N, 3) and reverse.dtype == F64
    overall, worst = relative_errors(reverse, forward)
    print(f"{run}: reverse vs forward relative error {overall:.2e} overall, {worst:.2e} worst example")
    assert worst < 1e-6
    if kw.get("replacement"):
        assert any(len(b.indices.unique()) < len(b.indices) for s in trajectory.steps for b in s.batches)
    if kw.get("decay"):
        assert len({s.hyper["0.weight"].lr for s in trajectory.steps}) == len(trajectory.steps)


@pytest.mark.parametrize("run", list(RUNS))
def test_replay_reproduces_checkpoints_and_final_weights(run):
    settings, kw = RUNS[run]
    model, trajectory, _, data = record(settings, forward=False, **kw)
    assert sorted(trajectory.checkpoints) == list(range(0, 20, kw.get("every", 1)))
    states = list(replay(model, trajectory, data, sq_loss))
    assert [s.step for s in states] == list(range(21))
    worst = 0.0
    for s in states[1:]:
        if s.step in trajectory.checkpoints:
            stored = trajectory.checkpoints[s.step]
            assert set(s.momentum) == set(stored.momentum)
            for got, want in [(s.params, stored.params), (s.momentum, stored.momentum)]:
                worst = max([worst] + [float((got[n] - want[n]).abs().max()) for n in want])
    final = max(float((states[-1].params[n] - p.detach()).abs().max()) for n, p in model.named_parameters())
    print(f"{run}: replay vs recorded checkpoints {worst:.1e}, vs torch.optim.SGD's final weights {final:.1e}")
    assert worst < 1e-10 and final < 1e-10


def test_unseen_examples_get_exactly_zero():
    model, trajectory, state, data = record(CASES["momentum_weight_decay_groups"], steps=2, batch=4, every=1)
    seen = torch.cat([b.indices for s in trajectory.steps for b in s.batches]).unique()
    unseen = torch.tensor([k for k in range(N + 3) if k not in seen.tolist()])
    assert len(seen) == 8 and len(unseen) == 7  # 4 of the N training examples plus 3 beyond N
    jac = measurement_jacobian(measure_fn(model), dict(model.named_parameters()))
    reverse = reverse_sweep(model, trajectory, data, sq_loss, jac, N + 3)
    assert reverse.shape == (N + 3, 3)
    assert bool((reverse[unseen] == 0).all())
    assert bool((reverse[seen].norm(dim=1) > 0).all())
    torch.testing.assert_close(reverse[:N], predict_change(jac, state), rtol=1e-8, atol=1e-12)


def two_step_trajectory(first_step):
    """A hand-made 2-step run: step 0 is ``first_step`` (a list of RecordedBatch), step 1 a fixed batch without example 3."""
    model, (x, y) = mlp(), regression_data()
    trajectory = Trajectory()
    trajectory.checkpoint(0, dict(model.named_parameters()))
    hyper = SGDHyperparameters(lr=0.2, momentum=0.9, weight_decay=0.01)
    trajectory.record_step(first_step, hyper)
    trajectory.record_step(RecordedBatch(torch.tensor([1, 4, 8]), torch.full((3,), 1 / 3, dtype=F64)), hyper)
    return model, trajectory, data_fn(x, y)


def test_a_repeated_row_counts_each_time():
    w = torch.tensor([0.25, 0.25, 0.5], dtype=F64)
    twice = [RecordedBatch(torch.tensor([3, 3]), w[:2]), RecordedBatch(torch.tensor([5]), w[2:])]  # 2 micro-batches
    merged = [RecordedBatch(torch.tensor([3, 5]), torch.tensor([0.5, 0.5], dtype=F64))]  # the same training
    once = [RecordedBatch(torch.tensor([3, 5]), torch.tensor([0.25, 0.5], dtype=F64))]
    results = []
    for first in (twice, merged, once):
        model, trajectory, data = two_step_trajectory(first)
        jac = measurement_jacobian(measure_fn(model), dict(model.named_parameters()))  # any fixed direction will do
        results.append(reverse_sweep(model, trajectory, data, sq_loss, jac, N))
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-15)
    assert float((results[0][3] - results[2][3]).norm()) > 0.1 * float(results[0][3].norm())


def test_state_dict_round_trip_and_chunked_sweep():
    model, trajectory, _, data = record(CASES["nesterov_weight_decay"], steps=9, every=4, forward=False)
    buffer = io.BytesIO()
    torch.save(trajectory.state_dict(), buffer)
    buffer.seek(0)
    loaded = Trajectory.from_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.every == 4 and sorted(loaded.checkpoints) == [0, 4, 8] and loaded.num_steps == 9
    jac = measurement_jacobian(measure_fn(model), dict(model.named_parameters()))
    want = reverse_sweep(model, trajectory, data, sq_loss, jac, N)
    torch.testing.assert_close(reverse_sweep(model, loaded, data, sq_loss, jac, N), want, rtol=0, atol=0)


def test_sweep_reports_each_step_and_checks_the_replay_against_the_trained_weights():
    """``on_step`` sees T - 1 .. 0; ``final_params`` = the trained weights passes and changes nothing; other weights,
    or a ``data`` that returns other rows, stray from training and are refused."""
    model, trajectory, _, data = record(CASES["momentum_weight_decay_groups"], steps=9, every=4, forward=False)
    trained = {n: p.detach() for n, p in model.named_parameters()}
    jac = measurement_jacobian(measure_fn(model), trained)
    want = reverse_sweep(model, trajectory, data, sq_loss, jac, N)
    seen = []
    got = reverse_sweep(model, trajectory, data, sq_loss, jac, N, final_params=trained, on_step=seen.append)
    assert seen == list(range(8, -1, -1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    start = trajectory.checkpoints[8].params
    moved = {n: start[n] + 2 * (trained[n] - start[n]) for n in trained}  # twice the last step's update: strays by 1/2
    assert replay_divergence(start, trained, trained) == 0.0
    assert abs(replay_divergence(start, moved, trained) - 1.0) < 1e-12
    with pytest.raises(ValueError, match=r"does not reproduce training: .* differ from `final_params` by 0.5 of the "
                                         r"last 1 step"):
        reverse_sweep(model, trajectory, data, sq_loss, jac, N, final_params=moved)
    x, y = regression_data()
    with pytest.raises(ValueError, match="does not reproduce training"):
        reverse_sweep(model, trajectory, data_fn(x, y + 0.1), sq_loss, jac, N, final_params=trained)


# ------------------------------------------------------------------------------------------------ bad input
def test_sweep_errors():
    model, trajectory, _, data = record(CASES["sgd"], steps=3, forward=False)
    named = dict(model.named_parameters())
    jac = measurement_jacobian(measure_fn(model), named)
    late = Trajectory(steps=list(trajectory.steps))
    late.checkpoint(1, named)
    with pytest.raises(ValueError, match=r"no checkpoint at step 0 \(stored: \[1\]\).*trajectory.checkpoint\(0"):
        reverse_sweep(model, late, data, sq_loss, jac, N)
    with pytest.raises(ValueError, match="records no optimizer step"):
        reverse_sweep(model, Trajectory(), data, sq_loss, jac, N)
    bad = dict(jac, **{"0.weight": jac["0.weight"][:, :, :2]})
    with pytest.raises(ValueError, match=r"`measurement_grad` must be \{name: \(Q, \*param.shape\)\}.*\(3, 6, 2\) "
                                         r"for '0.weight' of shape \(6, 3\)"):
        reverse_sweep(model, trajectory, data, sq_loss, bad, N)
    with pytest.raises(ValueError, match="one Q >= 1"):
        reverse_sweep(model, trajectory, data, sq_loss, dict(jac, **{"2.bias": jac["2.bias"][:2]}), N)
    with pytest.raises(ValueError, match=r"differing names: \['2.bias'\]"):
        reverse_sweep(model, trajectory, data, sq_loss, {n: g for n, g in jac.items() if n != "2.bias"}, N)
    top = trajectory.max_index()
    with pytest.raises(ValueError, match=f"`num_examples` must be an int > every recorded dataset index \\(the "
                                         f"largest is {top}\\).*got {top}"):
        reverse_sweep(model, trajectory, data, sq_loss, jac, top)
    with pytest.raises(ValueError, match="must return \\(inputs, targets\\)"):
        reverse_sweep(model, trajectory, lambda idx: data(idx)[0], sq_loss, jac, N)
    with pytest.raises(ValueError, match="one loss per row"):
        reverse_sweep(model, trajectory, data, lambda o, t: sq_loss(o, t).mean(), jac, N)


def test_recording_errors():
    model = mlp()
    named = dict(model.named_parameters())
    with pytest.raises(ValueError, match="`every` must be an int >= 1"):
        Trajectory(every=0)
    trajectory = Trajectory()
    w = torch.full((3,), 1 / 3, dtype=F64)
    with pytest.raises(ValueError, match=r"`step` must be an int in \[0, 0\]"):
        trajectory.checkpoint(1, named)
    with pytest.raises(ValueError, match=r"`momentum_buffers` \['bogus'\] match no parameter"):
        trajectory.checkpoint(0, named, {"bogus": torch.zeros(2)})
    trajectory.checkpoint(0, named)
    with pytest.raises(ValueError, match="differ from the stored checkpoints"):
        trajectory.checkpoint(0, {n: p for n, p in named.items() if n != "2.bias"})
    with pytest.raises(ValueError, match="integer `indices` \\(B,\\) and `weights` \\(B,\\)"):
        trajectory.record_step(RecordedBatch(torch.tensor([0.0, 1.0, 2.0]), w), SGDHyperparameters(lr=0.1))
    with pytest.raises(ValueError, match="integer `indices` \\(B,\\) and `weights` \\(B,\\)"):
        trajectory.record_step(RecordedBatch(torch.tensor([0, 1]), w), SGDHyperparameters(lr=0.1))
    with pytest.raises(ValueError, match="dataset indices >= 0; got -1"):
        trajectory.record_step(RecordedBatch(torch.tensor([0, -1, 2]), w), SGDHyperparameters(lr=0.1))
    with pytest.raises(ValueError, match="`batches` is empty"):
        trajectory.record_step([], SGDHyperparameters(lr=0.1))
    with pytest.raises(TypeError, match="must be a MicroBatch or a RecordedBatch, got tuple"):
        trajectory.record_step([(torch.tensor([0, 1, 2]), w)], SGDHyperparameters(lr=0.1))
    with pytest.raises(TypeError, match="`hyper` must be an SGDHyperparameters"):
        trajectory.record_step(RecordedBatch(torch.tensor([0, 1, 2]), w), {"0.weight": 0.1})
    assert trajectory.num_steps == 0
    trajectory.record_step(RecordedBatch(torch.tensor([0, 1, 2]), w), {"0.weight": SGDHyperparameters(lr=0.1)})
    with pytest.raises(ValueError, match=r"`hyper` has no settings for parameters \['0.bias'"):
        reverse_sweep(model, trajectory, data_fn(*regression_data()), sq_loss,
                      measurement_jacobian(measure_fn(model), named), N)
