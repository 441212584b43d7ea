"""Influence functions: curvature strategies against brute-force definitions, the callback against brute force, groups,
DDP, resume and bad input."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from influence_models import brute_force_grads
from safetensors.torch import load_file
from test_influence_callbacks import Tiny, fit, tensors
from torch import nn
from torch.utils.data import TensorDataset

from lightning_attr.callbacks import InfluenceFunction
from lightning_attr.data import IndexedDataset
from lightning_attr.influence import GradientFeaturizer, cross_entropy
from lightning_attr.influence.curvature import make_curvature, sampled_labels
from lightning_attr.influence.runner import AttributionData, LocalComm, PassRunner, data_total

N = 24


def mlp(seed=0, d=4, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 3), nn.Tanh(), nn.Linear(3, k)).eval()


def dataset(n=N, d=4, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


def total_of(model, x, y, batch_size=7):
    data = AttributionData(IndexedDataset(TensorDataset(x, y)), batch_size)
    return data_total(PassRunner(), data, model, LocalComm())


def names(model):
    return [n for n, _ in model.named_parameters()]


def ggn(model, x, y, fisher="true"):
    """(1/n) sum_i sum_y p_y g_y g_y^T (true) or (1/n) sum_i g_i g_i^T (empirical), float64, by brute force."""
    h = 0
    for i in range(len(x)):
        if fisher == "empirical":
            g = brute_force_grads(model, names(model), x[i : i + 1], y[i : i + 1], cross_entropy).double()
            h = h + g.T @ g
            continue
        p = model(x[i : i + 1]).softmax(-1).detach()[0]
        for c in range(p.numel()):
            g = brute_force_grads(model, names(model), x[i : i + 1], torch.tensor([c]), cross_entropy).double()
            h = h + p[c] * g.T @ g
    return h / len(x)


def hessian(model, x, y):
    """Hessian of the mean loss w.r.t. all parameters, float64, by torch.autograd.functional."""
    model64 = mlp().double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    shapes = [p.shape for p in model64.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model64.parameters()])

    def loss(v):
        parts = torch.split(v, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names(model64), parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(model64, params, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, flat)


@pytest.mark.parametrize("curvature, fisher, damping", [("ggn", "true", 0.1), ("ggn", "empirical", 0.1),
                                                         ("hessian", "true", 10.0)])  # indefinite Hessian: min eigenvalue -6x the mean
def test_exact_equals_a_hand_built_fp64_damped_inverse(curvature, fisher, damping):
    model, (x, y) = mlp(), dataset()
    feat = GradientFeaturizer(model)
    exact = make_curvature("exact", damping=damping, curvature=curvature, fisher=fisher)
    state = exact.fit(feat, total_of(model, x, y))
    h = hessian(model, x, y) if curvature == "hessian" else ggn(model, x, y, fisher)
    lam = damping * float(ggn(model, x, y, fisher).diagonal().mean())  # relative to the GGN / Fisher's mean eigenvalue
    assert float(state["damping"]) == pytest.approx(lam, rel=1e-5)
    v = torch.randn(5, h.shape[0], generator=torch.Generator().manual_seed(3))
    expected = torch.linalg.solve(h + lam * torch.eye(h.shape[0], dtype=h.dtype), v.double().T).T
    torch.testing.assert_close(exact.solve(feat, v, state).double(), expected, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("strategy, curvature, damping, tol", [("cg", "ggn", 0.1, 1e-3), ("cg", "hessian", 10.0, 1e-3),
                                                               ("lissa", "ggn", 0.5, 1e-2)])
def test_iterative_solvers_converge_to_exact(strategy, curvature, damping, tol):
    model, (x, y) = mlp(), dataset()
    feat, total = GradientFeaturizer(model), total_of(model, x, y)
    exact = make_curvature("exact", damping=damping, curvature=curvature)
    solver = make_curvature(strategy, damping=damping, curvature=curvature, cg_tol=1e-10, lissa_depth=1500)
    v = torch.randn(3, feat.num_params, generator=torch.Generator().manual_seed(4))
    ref = exact.solve(feat, v, exact.fit(feat, total)).double()
    got = solver.solve(feat, v, solver.fit(feat, total), total).double()
    assert float((got - ref).norm() / ref.norm()) < tol


def unfold(conv, x):
    return F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_kfac_factors_and_ekfac_eigenvalues_equal_their_definitions(layer):
    """One selected layer (the data's labels: empirical Fisher): A = E[(1/T) sum_s a a^T], S = E[sum_s g g^T] and the
    EK-FAC eigenvalues E[(Q_S^T G Q_A)^2] from brute-force per-example inputs, output gradients and gradients."""
    torch.manual_seed(0)
    if layer == "linear":
        model, x = nn.Sequential(nn.Linear(4, 3)).eval(), torch.randn(N, 4)
    else:
        model, x = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 3)).eval(), torch.randn(N, 1, 4, 4)
    y = torch.randint(0, 3, (N,))
    feat = GradientFeaturizer(model, parameters=["0.*"])
    state = make_curvature("ekfac", damping=0.0, fisher="empirical").fit(feat, total_of(model, x, y))
    first = model[0]
    out = first(x) if layer == "linear" else first(x)
    a = (x.unsqueeze(1) if layer == "linear" else unfold(first, x)).double()
    a = torch.cat([a, torch.ones_like(a[..., :1])], -1)  # (N, T, I + 1)
    logits_fn = (lambda o: o) if layer == "linear" else (lambda o: model[2](model[1](o)))
    o = out.detach().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(logits_fn(o), y, reduction="sum"), o)[0].double()
    g = g.unsqueeze(1) if layer == "linear" else g.flatten(2).transpose(1, 2)  # (N, T, O)
    big_a = torch.einsum("nsi,nsj->ij", a, a) / a.shape[1] / N
    big_s = torch.einsum("nso,nsp->op", g, g) / N
    q_a, q_s = state["0.q_a"], state["0.q_s"]
    torch.testing.assert_close(q_a @ torch.diag(torch.linalg.eigvalsh(big_a).clamp(min=0)) @ q_a.T, big_a, atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(q_s @ torch.diag(torch.linalg.eigvalsh(big_s).clamp(min=0)) @ q_s.T, big_s, atol=1e-6,
                               rtol=1e-5)
    grads = torch.einsum("nso,nsi->noi", g, a)  # per-example gradients G_n (N, O, I + 1)
    corrected = (q_s.T @ grads @ q_a).pow(2).mean(0)
    torch.testing.assert_close(state["0.eigenvalues"], corrected, atol=1e-6, rtol=1e-5)


def test_sampled_labels_depend_on_the_example_not_the_batch():
    logits = torch.randn(10, 4)
    index = torch.arange(10)
    whole = sampled_labels(logits, index, seed=3)
    halves = torch.cat([sampled_labels(logits[:4], index[:4], 3), sampled_labels(logits[4:], index[4:], 3)])
    assert torch.equal(whole, halves)
    draws = torch.stack([sampled_labels(logits[:1], torch.tensor([i]), 0) for i in range(3000)])  # unbiased draws
    freq = torch.bincount(draws.flatten(), minlength=4).double() / 3000
    torch.testing.assert_close(freq, logits[:1].softmax(-1)[0].double(), atol=4 * (0.25 / 3000) ** 0.5, rtol=0)


# ------------------------------------------------------------------------------------------------------- callback
def query_grads(model, c_names):
    xq, yq = tensors(4, seed=9)
    return brute_force_grads(model, c_names, xq, yq, cross_entropy).double()


def test_exact_callback_equals_brute_force_influence(tmp_path):
    cb = InfluenceFunction(strategy="exact", damping=0.05, proj_dim=None, num_queries=0, module_types=["Linear"])
    fit(tmp_path, Tiny(), [cb])
    model = Tiny()
    model.load_state_dict(load_file(f"{cb.directory}/weights-000.safetensors"))
    model.eval()
    x, y = tensors()
    sel = ["net.5.weight", "net.5.bias"]
    g = brute_force_grads(model, sel, x, y, cross_entropy).double()
    h = 0
    for i in range(len(x)):
        p = model(x[i : i + 1]).softmax(-1).detach()[0]
        for c in range(3):
            gc = brute_force_grads(model, sel, x[i : i + 1], torch.tensor([c]), cross_entropy).double()
            h = h + p[c] * gc.T @ gc
    h = h / len(x)
    inv = torch.linalg.inv(h + 0.05 * float(h.diagonal().mean()) * torch.eye(h.shape[0], dtype=h.dtype))
    expected = g @ inv @ query_grads(model, sel).T
    torch.testing.assert_close(cb.scores(TensorDataset(*tensors(4, seed=9))).double(), expected, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(cb.self_influence.double(), ((g @ inv) * g).sum(1), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("strategy", ["ekfac", "exact"])
def test_grouped_influence_equals_the_sum_of_member_scores(tmp_path, strategy):
    # damping 0.1: preconditioned queries stay moderate, so float32 rows add up to 1e-4 (the identity is exact)
    kw = dict(strategy=strategy, num_queries=0, module_types=["Linear"], proj_dim=None, damping=0.1)
    single = InfluenceFunction(prefix="single", **kw)
    grouped = InfluenceFunction(prefix="grouped", group_by="random", group_size=3, **kw)
    fit(tmp_path, Tiny(), [single, grouped])
    query = TensorDataset(*tensors(4, seed=9))
    expected = grouped.groups.one_hot().double() @ single.scores(query)
    torch.testing.assert_close(grouped.scores(query, normalize="sum"), expected, rtol=1e-4,
                               atol=1e-6 * float(expected.abs().max()))


def test_two_ddp_processes_equal_one_factors_and_scores(tmp_path):
    results = []
    for devices in (1, 2):
        folder = tmp_path / f"d{devices}"
        kw = dict(strategy="ddp_fork") if devices == 2 else {}
        cb = InfluenceFunction(dirpath=str(folder), proj_dim=24, num_queries=0, module_types=["Linear", "Conv2d"])
        fit(tmp_path, Tiny(frozen=True), [cb], devices=devices, **kw)
        results.append({name: load_file(str(folder / name)) for name in
                        ("state-000.safetensors", "influence_function-000.safetensors", "summary.safetensors")})
    for name in ("influence_function-000.safetensors", "summary.safetensors"):  # rows, self-influence
        for k, v in results[0][name].items():
            torch.testing.assert_close(results[1][name][k], v, rtol=1e-4, atol=1e-5 * float(v.abs().max()))
    # factors: eigenvectors are defined up to sign (and rotation within repeated eigenvalues), the operator is not
    feat = GradientFeaturizer(Tiny(), module_types=["Linear", "Conv2d"])
    v = torch.randn(3, feat.num_params, generator=torch.Generator().manual_seed(0))
    solved = [make_curvature("ekfac").solve(feat, v, r["state-000.safetensors"]) for r in results]
    torch.testing.assert_close(solved[1], solved[0], rtol=1e-4, atol=1e-5 * float(solved[0].abs().max()))


def test_resumed_fit_ends_with_the_uninterrupted_results(tmp_path):
    def callback():
        return InfluenceFunction(every_n_epochs=1, at_fit_end=False, proj_dim=32, num_queries=0,
                                 module_types=["Linear", "Conv2d"])

    whole = callback()
    fit(tmp_path / "w", Tiny(shuffle=False), [whole], epochs=3)
    first = callback()
    trainer = fit(tmp_path / "r", Tiny(shuffle=False), [first], epochs=1)
    trainer.save_checkpoint(str(tmp_path / "r.ckpt"))
    resumed = callback()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed],
                        default_root_dir=str(tmp_path / "r"))
    trainer.fit(Tiny(shuffle=False), ckpt_path=str(tmp_path / "r.ckpt"))
    query = TensorDataset(*tensors(3, seed=5))
    torch.testing.assert_close(resumed.self_influence, whole.self_influence, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(resumed.scores(query), whole.scores(query), rtol=1e-5, atol=1e-7)


def test_cg_scores_need_no_self_influence_and_load_with_the_training_data(tmp_path):
    cb = InfluenceFunction(strategy="cg", damping=0.1, proj_dim=None, num_queries=0, parameters=["net.5.*"])
    exact = InfluenceFunction(strategy="exact", damping=0.1, proj_dim=None, num_queries=0, parameters=["net.5.*"],
                              prefix="exact")
    fit(tmp_path, Tiny(), [cb, exact])
    query = TensorDataset(*tensors(4, seed=9))
    torch.testing.assert_close(cb.scores(query), exact.scores(query), rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="self-influence needs a solve per training example"):
        cb.self_influence
    with pytest.raises(ValueError, match="train_data"):
        InfluenceFunction.load(cb.directory, Tiny()).scores(query)
    train = IndexedDataset(TensorDataset(*tensors()))
    loaded = InfluenceFunction.load(cb.directory, Tiny(), train_data=train)  # other batches: CG to its tolerance
    torch.testing.assert_close(loaded.scores(query), cb.scores(query), rtol=1e-3, atol=1e-6)


def test_bad_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="strategy.*'newton'"):
        InfluenceFunction(strategy="newton")
    with pytest.raises(ValueError, match="damping"):
        InfluenceFunction(damping=-1.0)
    with pytest.raises(ValueError, match="curvature.*'hessian'.*kfac"):
        InfluenceFunction(strategy="kfac", curvature="hessian")
    with pytest.raises(ValueError, match="Linear and Conv2d layers only.*net.1"):  # BatchNorm selected
        fit(tmp_path, Tiny(), [InfluenceFunction(num_queries=0)], epochs=1)

    class Nan(Tiny):
        def forward(self, x):
            return self.net(x) * float("nan")

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    for strategy in ("exact", "ekfac"):
        with pytest.raises(FloatingPointError, match="non-finite"):
            fit(tmp_path, Nan(), [InfluenceFunction(strategy=strategy, num_queries=0, module_types=["Linear"])],
                epochs=1)
    with pytest.raises(ValueError, match="Linear and Conv2d layers only"):  # only a norm layer selected
        fit(tmp_path, Tiny(), [InfluenceFunction(num_queries=0, module_types=["BatchNorm2d"])], epochs=1)


def test_attribute_without_lightning_equals_the_callback(tmp_path):
    from lightning_attr.influence import InfluenceFunctionMethod, attribute

    cb = InfluenceFunction(strategy="ekfac", proj_dim=None, num_queries=0, module_types=["Linear"], damping=0.1)
    fit(tmp_path, Tiny(), [cb])
    model = Tiny()
    model.load_state_dict(load_file(f"{cb.directory}/weights-000.safetensors"))
    train = IndexedDataset(TensorDataset(*tensors()))
    att = attribute(InfluenceFunctionMethod("ekfac", damping=0.1), model, train, str(tmp_path / "plain"),
                    gradients=dict(module_types=["Linear"]), batch_size=4, progress=False)
    query = TensorDataset(*tensors(4, seed=9))
    torch.testing.assert_close(att.scores(query), cb.scores(query), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(att.self_influence(), cb.self_influence, rtol=1e-4, atol=1e-7)


def test_a_layer_without_curvature_gets_the_models_damping_not_nan():
    """A zero-initialized last layer leaves the first layer without output gradients (S = 0): its damping falls back
    to the model's mean eigenvalue and its preconditioned gradients are 0, never 0 / 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).eval()
    nn.init.zeros_(model[2].weight)
    x, y = dataset()
    feat = GradientFeaturizer(model)
    kfac = make_curvature("ekfac", damping=0.1)
    state = kfac.fit(feat, total_of(model, x, y))
    assert float(state["0.eigenvalues"].abs().max()) == 0 and float(state["0.damping"]) > 0
    pre = kfac.solve(feat, feat.flat_grads(x, y), state)
    assert bool(torch.isfinite(pre).all()) and float(pre[:, :15].abs().max()) == 0  # layer 0's 15 parameters


@pytest.mark.parametrize("positions", [1, 40])  # few positions: the factors are rotated; many: G_n is formed
def test_rotated_square_sums_and_the_quadratic_form_equal_their_definitions(positions, monkeypatch):
    """``sum_n (Q_S^T G_n Q_A)^2`` with ``G_n`` summed over two calls and all positions, either route; and K-FAC /
    EK-FAC's quadratic form (self-influence) equals ``v^T solve(v)``."""
    from lightning_attr.influence.kfac import eigenbasis, rotated_sq_sums

    g = torch.Generator().manual_seed(positions)
    calls = [(torch.randn(5, positions, 7, generator=g), torch.randn(5, positions, 3, generator=g)) for _ in range(2)]
    q_a = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))[0]
    q_s = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    grads = sum(torch.einsum("bso,bsi->boi", gr.double(), a.double()) for a, gr in calls)
    expected = torch.stack([(q_s.T @ gn @ q_a) ** 2 for gn in grads]).sum(0)
    torch.testing.assert_close(rotated_sq_sums(calls, q_a, q_s), expected, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).eval()
    x, y = dataset()
    feat = GradientFeaturizer(model)
    v = feat.flat_grads(x, y)
    for strategy in ("kfac", "ekfac"):
        curvature = make_curvature(strategy, damping=0.1)
        state = curvature.fit(feat, total_of(model, x, y))
        direct = (v.double() * curvature.solve(feat, v, state).double()).sum(1)
        torch.testing.assert_close(curvature.quadratic(feat, v, state), direct, rtol=1e-4, atol=1e-7)

    sym = torch.randn(6, 6, generator=g, dtype=torch.float64)
    sym = sym @ sym.T

    def failing(_):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", failing)  # LAPACK's eigh can fail on many repeated eigenvalues: SVD
    values, vectors = eigenbasis(sym)
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, sym)
