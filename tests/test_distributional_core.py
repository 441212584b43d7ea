"""d-TDA functional core: forward-mode unrolled differentiation against coupled retraining with torch.optim.SGD
(finite differences), against the exact influence function on a GLM, distributional statistics against brute-force
loops, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from lightning_attr.data import IndexedDataset
from lightning_attr.distributional import (
    ForwardResponse,
    MicroBatch,
    SGDHyperparameters,
    forward_step,
    hyperparameters_by_name,
    mean_influence,
    measurement_jacobian,
    predict_change,
    quantile_influence,
    sgd_hyperparameters,
    variance_influence,
    wasserstein_influence,
)
from lightning_attr.influence import GradientFeaturizer
from lightning_attr.influence.curvature import make_curvature
from lightning_attr.influence.runner import AttributionData, LocalComm, PassRunner, data_total

N, D = 12, 3
TRACKED = [0, 4, 7]  # 4 is in the first step: checks the momentum buffer's first-step rule
F64 = torch.float64


def sq_loss(out, y):
    """Per-example squared error (B,), as the influence module's ``mse``."""
    return (out - y).pow(2).flatten(1).sum(1)


def regression_data(n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    return x, torch.sin(2 * x[:, :1]) + 0.3 * torch.randn(n, 1, generator=g, dtype=F64)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def schedule(steps, batch, accumulate, replacement=False, seed=1):
    """Per step, the dataset indices of its micro-batches: shuffled epochs cut into micro-batches (or rows drawn with
    ``replacement``: an example may sit in a batch twice), ``accumulate`` micro-batches a step."""
    g, micro = torch.Generator().manual_seed(seed), []
    while len(micro) < steps * accumulate:
        draw = [torch.randint(N, (batch,), generator=g)] if replacement else torch.randperm(N, generator=g).split(batch)
        micro += list(draw)
    return [micro[i * accumulate:(i + 1) * accumulate] for i in range(steps)]


def train(settings, steps=20, batch=4, accumulate=1, replacement=False, removed=-1, eps=0.0, track=None):
    """SGD training with torch.optim.SGD, example ``removed``'s loss weighted ``1 - eps`` in every step; with ``track``
    the responses are stepped along (at theta_t, before each optimizer step). Returns (model, responses)."""
    model, (x, y) = mlp(), regression_data()
    groups = settings.pop("groups", None)
    params = ([{"params": model[0].parameters(), **groups}, {"params": model[2].parameters()}] if groups
              else model.parameters())
    opt = torch.optim.SGD(params, **settings)
    state = ForwardResponse.zeros(track, dict(model.named_parameters())) if track is not None else None
    for micro in schedule(steps, batch, accumulate, replacement):
        batches = [MicroBatch(x[i], y[i], torch.full((len(i),), 1 / (len(i) * accumulate), dtype=F64), i)
                   for i in micro]
        if state is not None:
            named = dict(model.named_parameters())
            state = forward_step(model, named, state, batches, sq_loss, hyperparameters_by_name(opt, named))
        opt.zero_grad()
        for b in batches:
            w = b.weights * (1 - eps * (b.indices == removed).to(F64))
            (w * sq_loss(model(b.inputs), b.targets)).sum().backward()
        opt.step()
    return model, state


def measure_fn(model):
    queries = regression_data(3, seed=5)[0]
    return lambda params: functional_call(model, params, (queries,)).reshape(-1)  # Q = 3 outputs


CASES = {
    "sgd": dict(lr=0.2),
    "momentum_weight_decay_groups": dict(lr=0.05, momentum=0.9, dampening=0.2, weight_decay=0.03,
                                         groups=dict(lr=0.1, weight_decay=0.0, momentum=0.5)),
    "nesterov_weight_decay": dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
}


@pytest.mark.parametrize("case, accumulate, batch, replacement", [
    ("sgd", 1, 4, False), ("momentum_weight_decay_groups", 1, 4, False), ("nesterov_weight_decay", 1, 4, False),
    ("sgd", 2, 3, False), ("sgd", 1, 5, True)])
def test_forward_mode_equals_finite_differences_of_coupled_retrains(case, accumulate, batch, replacement):
    run = dict(batch=batch, accumulate=accumulate, replacement=replacement)
    model, state = train(dict(CASES[case]), track=TRACKED, **run)
    assert state.steps == 20
    measure = measure_fn(model)
    jac = measurement_jacobian(measure, dict(model.named_parameters()))
    predicted = predict_change(jac, state)  # (K, Q)
    h, fd = 1e-4, []
    for k in TRACKED:
        plus, minus = (train(dict(CASES[case]), removed=k, eps=e, **run)[0] for e in (h, -h))
        fd.append((measure(dict(plus.named_parameters())) - measure(dict(minus.named_parameters()))).detach() / (2 * h))
    fd = torch.stack(fd)
    error = float((predicted - fd).norm() / fd.norm())
    print(f"{case} {run}: relative error {error:.2e}, |dm/deps| {float(fd.norm()):.3g}")
    assert error < 1e-4
    flat_jac = torch.cat([j.flatten(1) for j in jac.values()], 1)
    torch.testing.assert_close(predict_change(flat_jac, state.flat()), predicted, rtol=1e-12, atol=1e-14)


def exact_influence(model, x, y):
    """``H^-1 grad l_k / N`` (N, P) with H the Hessian of the mean loss, from ``torch.func.hessian``."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def losses(v):
        parts = torch.split(v, [s.numel() for s in shapes])
        return sq_loss(functional_call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (x,)), y)

    hessian = torch.func.hessian(lambda v: losses(v).mean())(flat)
    grads = torch.func.jacrev(losses)(flat)  # (N, P)
    return torch.linalg.solve(hessian, grads.T).T / len(x)


def package_influence(model, x, y):
    """The same through :mod:`lightning_attr.influence` (exact Hessian, no damping; its gradients are float32)."""
    feat = GradientFeaturizer(model, output="mse")
    total = data_total(PassRunner(), AttributionData(IndexedDataset(TensorDataset(x, y)), 7), model, LocalComm())
    curvature = make_curvature("exact", damping=0.0, relative_damping=False, curvature="hessian", fisher="empirical")
    return curvature.solve(feat, feat.flat_grads(x, y), curvature.fit(feat, total)).double() / len(x)


def test_glm_full_batch_descent_converges_to_the_exact_influence_function():
    n = 20
    x, y = regression_data(n, seed=3)
    torch.manual_seed(0)
    model = nn.Linear(D, 1).double()
    design = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1)
    eig = torch.linalg.eigvalsh(2 * design.T @ design / n)
    lr = float(2 / (eig.max() + eig.min()))  # contraction (kappa - 1) / (kappa + 1) per step
    rho = float((eig.max() - eig.min()) / (eig.max() + eig.min()))
    steps = math.ceil(math.log(1e-14) / math.log(rho))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    state = ForwardResponse.zeros(range(n), dict(model.named_parameters()))
    batch = MicroBatch(x, y, torch.full((n,), 1 / n, dtype=F64), torch.arange(n))
    for _ in range(steps):
        state = forward_step(model, dict(model.named_parameters()), state, batch, sq_loss, sgd_hyperparameters(opt)[0])
        opt.zero_grad()
        sq_loss(model(x), y).mean().backward()
        opt.step()
    exact = exact_influence(model, x, y)
    error = float((state.flat() - exact).norm() / exact.norm())
    package = float((state.flat() - package_influence(model, x, y)).norm() / exact.norm())
    print(f"GLM ({steps} steps): relative error of r_T vs H^-1 grad l_k / N {error:.2e}, vs lightning_attr.influence "
          f"{package:.2e}")
    assert error < 1e-6
    assert package < 1e-5


# ------------------------------------------------------------------------------------------------ statistics
def samples(s=7, k=4, q=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    tail = () if q is None else (q,)
    return torch.randn(s, *tail, generator=g, dtype=F64), torch.randn(s, k, *tail, generator=g, dtype=F64)


def brute_force(x, g, probs):
    """Every statistic by python loops over examples and measurements (numpy for var / quantile, sorted for W2)."""
    x2, g3 = (x[:, None], g[..., None]) if x.dim() == 1 else (x, g)
    out = {name: np.zeros(g3.shape[1:]) for name in ("mean", "var", "var0", "w2", *probs)}
    for k in range(g3.shape[1]):
        for j in range(g3.shape[2]):
            xs = x2[:, j].tolist()
            ys = [a + b for a, b in zip(xs, g3[:, k, j].tolist())]
            out["mean"][k, j] = sum(ys) / len(ys) - sum(xs) / len(xs)
            out["var"][k, j] = np.var(ys, ddof=1) - np.var(xs, ddof=1)
            out["var0"][k, j] = np.var(ys) - np.var(xs)
            out["w2"][k, j] = math.sqrt(sum((a - b) ** 2 for a, b in zip(sorted(xs), sorted(ys))) / len(xs))
            for p in probs:
                out[p][k, j] = np.quantile(ys, p) - np.quantile(xs, p)
    return {name: torch.from_numpy(v.reshape(g.shape[1:])) for name, v in out.items()}


@pytest.mark.parametrize("q", [None, 3])
def test_statistics_match_brute_force_loops(q):
    x, g = samples(q=q)
    probs = (0.0, 0.1, 0.5, 0.93, 1.0)
    ref = brute_force(x, g, probs)
    torch.testing.assert_close(mean_influence(x, g), ref["mean"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance_influence(x, g), ref["var"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(variance_influence(x, g, unbiased=False), ref["var0"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wasserstein_influence(x, g), ref["w2"], rtol=1e-12, atol=1e-12)
    for p in probs:
        torch.testing.assert_close(quantile_influence(x, g, p), ref[p], rtol=1e-12, atol=1e-12)
    stacked = torch.stack([ref[p] for p in probs])
    torch.testing.assert_close(quantile_influence(x, g, list(probs)), stacked, rtol=1e-12, atol=1e-12)


def test_identical_distributions_and_shifts():
    x, _ = samples(s=9)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    g = torch.stack([x[perm] - x, torch.full_like(x, 0.7)], 1)  # (S, 2): Y a reordering of X; Y = X + 0.7
    assert float(g[:, 0].abs().max()) > 0.1  # nonzero per-seed changes ...
    zero = torch.zeros((), dtype=F64)
    torch.testing.assert_close(wasserstein_influence(x, g), torch.tensor([0.0, 0.7], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(mean_influence(x, g), torch.tensor([0.0, 0.7], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(variance_influence(x, g).abs().max(), zero, atol=1e-12, rtol=0)
    torch.testing.assert_close(quantile_influence(x, g, 0.3), torch.tensor([0.0, 0.7], dtype=F64), atol=1e-12, rtol=0)


def test_mean_influence_is_linear_in_the_changes():
    x, g1 = samples(seed=1)
    _, g2 = samples(seed=2)
    torch.testing.assert_close(mean_influence(x, 2.0 * g1 - 0.5 * g2),
                               2.0 * mean_influence(x, g1) - 0.5 * mean_influence(x, g2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, g_shape, q, match", [
    ((1,), (1, 3), 0.5, "S >= 2"),
    ((5,), (4, 3), 0.5, "`g` must be"),
    ((5, 2), (5, 3), 0.5, "`g` must be"),
    ((5, 2), (5, 3, 4), 0.5, "`g` must be"),
    ((5, 2, 1), (5, 3, 2, 1), 0.5, "`x` must be"),
    ((5,), (5, 3), 1.5, "`q` must be"),
    ((5,), (5, 3), -0.1, "`q` must be"),
    ((5,), (5, 3), [[0.5]], "`q` must be"),
])
def test_statistics_reject_bad_input(x_shape, g_shape, q, match):
    with pytest.raises(ValueError, match=match):
        quantile_influence(torch.zeros(x_shape), torch.zeros(g_shape), q)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("optimizer, name", [(torch.optim.Adam, "Adam"), (torch.optim.AdamW, "AdamW"),
                                             (torch.optim.RMSprop, "RMSprop")])
def test_unsupported_optimizers_are_refused(optimizer, name):
    opt = optimizer(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match=f"is {name}; .*supports torch.optim.SGD.*Adam"):
        sgd_hyperparameters(opt)


def test_sgd_settings_errors():
    model = mlp()
    with pytest.raises(ValueError, match="maximize=True"):
        sgd_hyperparameters(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are in no param group"):
        hyperparameters_by_name(opt, dict(model.named_parameters()))
    assert set(hyperparameters_by_name(opt, dict(model[2].named_parameters()))) == {"weight", "bias"}
    with pytest.raises(ValueError, match="`nesterov`=True needs `momentum` > 0"):
        SGDHyperparameters(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="`lr` must be a finite number >= 0, got -1"):
        SGDHyperparameters(lr=-1.0)


def test_forward_step_errors():
    model, (x, y) = mlp(), regression_data()
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="`examples` must be distinct"):
        ForwardResponse.zeros([1, 1], params)
    state = ForwardResponse.zeros([1], params)
    batch = MicroBatch(x[:4], y[:4], torch.full((4,), 0.25, dtype=F64), torch.arange(4))
    with pytest.raises(ValueError, match="one loss per row"):
        forward_step(model, params, state, batch, lambda o, t: sq_loss(o, t).mean(), SGDHyperparameters(lr=0.1))
    with pytest.raises(ValueError, match=r"no settings for parameters \['2.weight'"):
        forward_step(model, params, state, batch, sq_loss, {"0.weight": SGDHyperparameters(lr=0.1),
                                                            "0.bias": SGDHyperparameters(lr=0.1)})
    with pytest.raises(ValueError, match="`weights` and `indices`"):
        forward_step(model, params, state, batch._replace(indices=torch.arange(3)), sq_loss, SGDHyperparameters(0.1))
