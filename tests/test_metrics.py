"""Tests for lightning_attr.metrics: brute-force references, accumulation, DDP sync."""

from __future__ import annotations

import multiprocessing
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats
from sklearn.metrics import r2_score

from lightning_attr.metrics import (
    AttributionExplainedVariance,
    AttributionMSE,
    AttributionPearson,
    AttributionSpearman,
    EfficiencyGap,
    SignAgreement,
    attribution_explained_variance,
    attribution_metrics,
    attribution_mse,
    attribution_pearson,
    attribution_spearman,
    efficiency_gap,
    sign_agreement,
)

PAIR_CLASSES = [AttributionMSE, AttributionExplainedVariance, AttributionPearson, AttributionSpearman, SignAgreement]
PAIR_FUNCS = [
    attribution_mse, attribution_explained_variance, attribution_pearson, attribution_spearman, sign_agreement
]


def _data(b: int = 12, d: int = 7, k: int = 3, seed: int = 0, ties: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, d, k, generator=g, dtype=torch.float64)
    preds = 0.7 * target + 0.5 * torch.randn(b, d, k, generator=g, dtype=torch.float64)
    if ties:  # coarse grid -> many ties and exact zeros
        preds, target = (preds * 2).round() / 2, (target * 2).round() / 2
    total = target.sum(1) + 0.3 * torch.randn(b, k, generator=g, dtype=torch.float64)
    return preds, target, total


# ----------------------------------------------------------------------------- brute-force references
def _ref_mse(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean((p - t) ** 2))


def _ref_ev(p: np.ndarray, t: np.ndarray) -> float:
    return float(r2_score(t.ravel(), p.ravel()))


def _ref_pearson(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean([stats.pearsonr(p[b].ravel(), t[b].ravel())[0] for b in range(len(p))]))


def _ref_spearman(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean([stats.spearmanr(p[b].ravel(), t[b].ravel())[0] for b in range(len(p))]))


def _ref_sign(p: np.ndarray, t: np.ndarray, atol: float = 1e-8) -> float:
    mask = np.abs(t) > atol
    return float(np.mean(np.sign(p[mask]) == np.sign(t[mask])))


def _ref_eff(p: np.ndarray, total: np.ndarray) -> float:
    return float(np.mean(np.abs(p.sum(1) - total)))


REFS = [_ref_mse, _ref_ev, _ref_pearson, _ref_spearman, _ref_sign]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape", [(12, 7, 3), (5, 10, 1), (4, 9)])
def test_functional_matches_brute_force(shape: tuple[int, ...], ties: bool) -> None:
    preds, target, total = _data(shape[0], shape[1], shape[2] if len(shape) == 3 else 1, ties=ties)
    preds, target = preds.reshape(shape), target.reshape(shape)
    p, t = preds.numpy(), target.numpy()
    for fn, ref in zip(PAIR_FUNCS, REFS):
        got = fn(preds, target)
        assert got.shape == () and got.dtype == torch.float64
        np.testing.assert_allclose(got.item(), ref(p, t), rtol=1e-10, atol=1e-12, err_msg=fn.__name__)
    if len(shape) == 3:
        np.testing.assert_allclose(efficiency_gap(preds, total).item(), _ref_eff(p, total.numpy()), rtol=1e-12)
    else:
        tot = total[:, 0]
        np.testing.assert_allclose(efficiency_gap(preds, tot).item(), _ref_eff(p, tot.numpy()), rtol=1e-12)


def test_known_values() -> None:
    target = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    preds = torch.tensor([[[2.0], [4.0], [6.0], [8.0]]])  # perfectly correlated, scaled by 2
    assert attribution_mse(preds, target).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    assert attribution_pearson(preds, target).item() == pytest.approx(1.0)
    assert attribution_spearman(preds, target).item() == pytest.approx(1.0)
    assert attribution_pearson(-preds, target).item() == pytest.approx(-1.0)
    assert attribution_spearman(preds.exp(), target).item() == pytest.approx(1.0)  # monotone transform
    # SST = 5, SSE = 30 -> 1 - 6 = -5
    assert attribution_explained_variance(preds, target).item() == pytest.approx(-5.0)
    assert sign_agreement(torch.tensor([[1.0, -1.0, 0.0, 2.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])).item() == (
        pytest.approx(1 / 3)  # last entry ignored (|target| <= atol), pred 0 counts as disagreement
    )
    assert efficiency_gap(preds, torch.tensor([[19.0]])).item() == pytest.approx(1.0)


def test_float32_and_half_inputs() -> None:
    preds, target, _ = _data()
    ref = [fn(preds, target).item() for fn in PAIR_FUNCS]
    for dt, tol in [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)]:
        p, t = preds.to(dt), target.to(dt)
        got = [fn(p, t).item() for fn in PAIR_FUNCS]
        # compare against float64 evaluated on the *rounded* inputs
        exp = [fn(p.double(), t.double()).item() for fn in PAIR_FUNCS]
        np.testing.assert_allclose(got, exp, rtol=tol, atol=tol)
    assert np.isfinite(ref).all()


def test_perfect_prediction() -> None:
    _, target, _ = _data(seed=3)
    for fn, expected in zip(PAIR_FUNCS, [0.0, 1.0, 1.0, 1.0, 1.0]):
        assert fn(target.clone(), target).item() == pytest.approx(expected, abs=1e-12), fn.__name__
    m = attribution_metrics("val/")
    m.update(target.float(), target.float())
    out = m.compute()
    assert set(out) == {"val/mse", "val/explained_variance", "val/pearson", "val/spearman", "val/sign_agreement"}
    assert out["val/mse"].item() == 0.0
    for key in ["val/explained_variance", "val/pearson", "val/spearman", "val/sign_agreement"]:
        assert out[key].item() == pytest.approx(1.0, abs=1e-6), key
    assert efficiency_gap(target, target.sum(1)).item() == pytest.approx(0.0, abs=1e-12)


def test_degenerate_cases() -> None:
    target = torch.randn(3, 5, 2)
    const = torch.full((3, 5, 2), 0.1)
    # a constant side makes the per-example correlation undefined -> counted as 0
    assert attribution_pearson(const, target).item() == 0.0
    assert attribution_spearman(const, target).item() == 0.0
    assert attribution_pearson(target, const).item() == 0.0
    # constant target: R^2 is 1 for exact prediction, else 0 (sklearn's force_finite)
    assert attribution_explained_variance(const, const).item() == 1.0
    assert attribution_explained_variance(target, torch.zeros_like(target)).item() == 0.0
    # empty / all-ignored -> NaN
    assert torch.isnan(sign_agreement(target, torch.zeros_like(target)))
    assert torch.isnan(attribution_pearson(torch.zeros(0, 5, 2), torch.zeros(0, 5, 2)))
    assert torch.isnan(attribution_mse(torch.zeros(0, 5, 2), torch.zeros(0, 5, 2)))


def test_sign_agreement_atol() -> None:
    target = torch.tensor([[1e-3, -1e-3, 1.0, -1.0]])
    preds = torch.tensor([[-1.0, 1.0, 1.0, 1.0]])
    assert sign_agreement(preds, target).item() == pytest.approx(0.25)  # default atol=1e-8 counts all four
    assert sign_agreement(preds, target, atol=1e-2).item() == pytest.approx(0.5)  # only the +-1 entries
    assert sign_agreement(preds, target, atol=0.0).item() == pytest.approx(0.25)
    m = SignAgreement(atol=1e-2)
    m.update(preds, target)
    assert m.compute().item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        SignAgreement(atol=-1.0)


def test_shape_validation() -> None:
    a, b = torch.zeros(4, 5, 3), torch.zeros(4, 5, 2)
    for fn in PAIR_FUNCS:
        with pytest.raises(ValueError, match=r"\(4, 5, 3\).*\(4, 5, 2\)"):
            fn(a, b)
    for cls in PAIR_CLASSES:
        with pytest.raises(ValueError, match=r"\(4, 5, 3\).*\(4, 5, 2\)"):
            cls().update(a, b)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\)"):
        attribution_mse(torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\(4, 5, 3\).*\(4, 2\)"):
        efficiency_gap(a, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"\(4, 5, 3\).*\(3, 3\)"):
        EfficiencyGap().update(a, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(4, 5, 3\).*\(4,\)"):
        efficiency_gap(a, torch.zeros(4))


def test_accumulation_equals_one_shot() -> None:
    preds, target, total = _data(b=17, ties=True, seed=5)
    preds, target, total = preds.float(), target.float(), total.float()
    splits = [0, 3, 4, 11, 17]  # uneven batches, including a single-example batch
    metrics = [cls() for cls in PAIR_CLASSES]
    eff = EfficiencyGap()
    for lo, hi in zip(splits[:-1], splits[1:]):
        for m in metrics:
            m.update(preds[lo:hi], target[lo:hi])
        eff.update(preds[lo:hi], total[lo:hi])
    for m, fn in zip(metrics, PAIR_FUNCS):
        np.testing.assert_allclose(m.compute().item(), fn(preds, target).item(), rtol=1e-6, err_msg=fn.__name__)
    np.testing.assert_allclose(eff.compute().item(), efficiency_gap(preds, total).item(), rtol=1e-6)
    # forward() returns the batch value and still accumulates
    m = AttributionPearson()
    batch_val = m(preds[:5], target[:5])
    np.testing.assert_allclose(batch_val.item(), attribution_pearson(preds[:5], target[:5]).item(), rtol=1e-6)
    m.update(preds[5:], target[5:])
    np.testing.assert_allclose(m.compute().item(), attribution_pearson(preds, target).item(), rtol=1e-6)
    # reset restores the empty state
    m.reset()
    m.update(preds[:2], target[:2])
    np.testing.assert_allclose(m.compute().item(), attribution_pearson(preds[:2], target[:2]).item(), rtol=1e-6)


def test_collection_keeps_pearson_and_spearman_apart() -> None:
    # perfect first batch makes Pearson and Spearman states identical; they must not be merged afterwards
    preds, target, _ = _data(seed=7)
    col = attribution_metrics()
    col.update(target[:4], target[:4])
    col.update(preds[4:], target[4:])
    out = col.compute()
    np.testing.assert_allclose(out["pearson"].item(), _ref_pearson(
        torch.cat([target[:4], preds[4:]]).numpy(), target.numpy()), rtol=1e-10)
    np.testing.assert_allclose(out["spearman"].item(), _ref_spearman(
        torch.cat([target[:4], preds[4:]]).numpy(), target.numpy()), rtol=1e-10)


# ----------------------------------------------------------------------------- DDP
_N_DDP = 10
# per-rank list of update batches (index ranges into the shared data)
_DDP_SPLITS = {
    "even": [[(0, 3), (3, 5)], [(5, 10)]],
    "uneven": [[(0, 2), (2, 7), (7, 8)], [(8, 10)]],
    "one_rank_empty": [[(0, 10)], []],
}


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # fork-safety: never enter the (inherited) OpenMP pool
    warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        preds, target, total = _data(b=_N_DDP, ties=True, seed=11)
        preds, target, total = preds.float(), target.float(), total.float()
        results = {}
        for name, per_rank in _DDP_SPLITS.items():
            metrics = [cls() for cls in PAIR_CLASSES]
            col = attribution_metrics("c/")
            eff = EfficiencyGap()
            for lo, hi in per_rank[rank]:
                for m in metrics:
                    m.update(preds[lo:hi], target[lo:hi])
                col.update(preds[lo:hi], target[lo:hi])
                eff.update(preds[lo:hi], total[lo:hi])
            vals = [m.compute().item() for m in metrics] + [eff.compute().item()]
            col_vals = {k: v.item() for k, v in col.compute().items()}
            results[name] = (vals, col_vals)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_matches_single_process(tmp_path) -> None:
    """Two gloo ranks each update with their share of the data; every rank's synced compute()
    must equal the single-process value on all data (even, uneven and one-empty-rank splits)."""
    world_size = 2
    # fork avoids re-importing torch/lightning_attr in each child (~0.3 s vs ~10 s with spawn)
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(
        _ddp_worker,
        args=(world_size, str(tmp_path / "init"), str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method=start_method,
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers did not finish within 120 s")

    preds, target, total = _data(b=_N_DDP, ties=True, seed=11)
    preds, target, total = preds.float(), target.float(), total.float()
    expected = [fn(preds, target).item() for fn in PAIR_FUNCS] + [efficiency_gap(preds, total).item()]
    keys = ["c/mse", "c/explained_variance", "c/pearson", "c/spearman", "c/sign_agreement"]

    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for name in _DDP_SPLITS:
        for r in range(world_size):
            vals, col_vals = per_rank[r][name]
            np.testing.assert_allclose(vals, expected, rtol=1e-6, err_msg=f"{name} rank {r}")
            np.testing.assert_allclose([col_vals[k] for k in keys], expected[:5], rtol=1e-6, err_msg=f"{name} col {r}")
