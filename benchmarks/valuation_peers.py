"""Utility-evaluation throughput of two data-valuation peers, opendataval 1.3 and pyDVL 0.10.

Both functions compute, for every index subset ``S``, the utility ``v(S)``: the validation accuracy of a scikit-learn
``LogisticRegression(C=C, max_iter=max_iter, fit_intercept=fit_intercept)`` (multinomial, lbfgs) fitted on ``x_train[S], y_train[S]``. Each goes
through the peer's own machinery, the way a user of that peer would set it up:

* opendataval: ``ClassifierSkLearnWrapper`` + ``Metrics.ACCURACY`` handed to a ``DataShapley`` evaluator whose
  ``input_data`` binds the per-coalition utility into its ``TMCSampler`` (``sampler.compute_utility``); that callable is
  what the marginal-contribution loop calls once per coalition (``ShapEvaluator._evaluate_model``: ``clone()``, ``fit``
  on ``torch.utils.data.Subset`` views, ``predict`` = ``predict_proba`` on the validation tensor, accuracy of argmaxes).
* pyDVL: ``ModelUtility(model, SupervisedScorer("accuracy", test_data, default=0.0))`` bound to the training
  ``Dataset`` with ``with_dataset`` and called on ``Sample`` objects; no cache backend (pyDVL's default).

The loop over the subsets is timed with ``time.perf_counter`` (set-up excluded), and each function returns
``(evaluations per second, utilities)``.

Environment notes (opendataval pins torch~=2.1 / numpy<1.26, so it and pyDVL were installed with ``--no-deps``; the
pure-python extras are ``pip install --no-deps more-itertools "geomloss~=0.2.6"``). Two imports cannot be satisfied
that way, so ``_stub_missing_modules`` puts minimal stand-ins into ``sys.modules`` when the real module is absent:

* ``transformers``: ``opendataval.model`` imports ``opendataval/model/bert.py``, which does
  ``from transformers import DistilBertModel, DistilBertTokenizerFast`` at import time. A huggingface_hub-2.x-compatible
  transformers (5.x) is a 13 MB package that also needs the compiled ``tokenizers`` (Rust) and ``regex`` (C) wheels at
  import, so it is not a small pure-python ``--no-deps`` install. The BERT model is never used here.
* ``cvxpy``: ``pydvl.valuation`` (imported by any ``pydvl.valuation.*`` submodule) imports all its methods, and
  ``gt_shapley`` / least-core import cvxpy at module level; cvxpy is a compiled package (plus compiled solvers). It is
  only used inside those solvers' functions, never by ``ModelUtility`` / ``SupervisedScorer``.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression

__all__ = ["opendataval_rate", "pydvl_rate", "sklearn_rate"]


def _stub_missing_modules() -> None:
    """Insert import-only stand-ins for ``transformers`` and ``cvxpy`` when they are not installed (see module doc)."""

    class _Unavailable:
        """Placeholder class that refuses to be instantiated."""

        def __init__(self, *args, **kwargs) -> None:
            raise ImportError("stand-in module: the real package is not installed in this environment")

    for name, attrs in {"transformers": ("DistilBertModel", "DistilBertTokenizerFast"), "cvxpy": ()}.items():
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        stub = types.ModuleType(name, "stand-in inserted by benchmarks/valuation_peers.py; see its docstring")
        for attr in attrs:
            setattr(stub, attr, type(attr, (_Unavailable,), {}))
        sys.modules[name] = stub


def _timed_loop(utility, items: Sequence) -> tuple[float, np.ndarray]:
    """Call ``utility`` on every item; return (calls per second, results as float array).

    One untimed warm-up call on the first item absorbs first-call costs (lazy imports, allocator warm-up).
    """
    if len(items):
        utility(items[0])
    start = time.perf_counter()
    values = [float(utility(item)) for item in items]
    elapsed = time.perf_counter() - start
    return len(values) / elapsed, np.asarray(values, dtype=float)


def opendataval_rate(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                     subsets: Sequence[np.ndarray], C: float = 1.0, max_iter: int = 200,
                     fit_intercept: bool = True) -> tuple[float, np.ndarray]:
    """Utilities and evaluations/s through opendataval's Data Shapley per-coalition utility.

    Data enter as opendataval's ``DataFetcher`` hands them to evaluators: feature tensors and one-hot float label
    tensors (the wrapper argmaxes labels and ``Metrics.ACCURACY`` compares argmaxes). Features keep the caller's dtype
    (the fetcher would cast to float32). Note the wrapper falls back to a most-frequent ``DummyClassifier`` when a
    subset lacks one of the ``num_classes`` labels, unlike plain scikit-learn.
    """
    import torch

    _stub_missing_modules()
    from opendataval.dataval.margcontrib import DataShapley, TMCSampler
    from opendataval.metrics import Metrics
    from opendataval.model import ClassifierSkLearnWrapper

    num_classes = int(max(y_train.max(), y_val.max())) + 1
    eye = torch.eye(num_classes)
    model = ClassifierSkLearnWrapper(LogisticRegression, num_classes, C=C, max_iter=max_iter,
                                     fit_intercept=fit_intercept)
    evaluator = DataShapley(sampler=TMCSampler(cache_name=None)).input_model_metric(model, Metrics.ACCURACY)
    evaluator.input_data(torch.as_tensor(x_train), eye[torch.as_tensor(y_train, dtype=torch.long)],
                         torch.as_tensor(x_val), eye[torch.as_tensor(y_val, dtype=torch.long)])
    utility = evaluator.sampler.compute_utility  # what TMCSampler's loop calls per coalition (list[int])
    return _timed_loop(lambda s: utility(s.tolist()), [np.asarray(s) for s in subsets])


def pydvl_rate(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
               subsets: Sequence[np.ndarray], C: float = 1.0, max_iter: int = 200,
                     fit_intercept: bool = True) -> tuple[float, np.ndarray]:
    """Utilities and evaluations/s through pyDVL's ``ModelUtility`` + ``SupervisedScorer`` on ``Sample`` objects.

    No cache backend is given (so none is used); warnings are silenced (``show_warnings=False``) as opendataval does.
    Each call clones the model (``clone_before_fit=True``, the default), fits on ``Dataset.data(subset)`` and scores.
    """
    import warnings

    _stub_missing_modules()
    with warnings.catch_warnings():  # pyDeprecate 0.14 emits FutureWarnings for pyDVL's old-style decorators
        warnings.simplefilter("ignore", FutureWarning)
        from pydvl.valuation.dataset import Dataset
        from pydvl.valuation.scorers import SupervisedScorer
        from pydvl.valuation.types import Sample
        from pydvl.valuation.utility import ModelUtility

    train, test = Dataset(x_train, y_train), Dataset(x_val, y_val)
    scorer = SupervisedScorer("accuracy", test_data=test, default=0.0, range=(0.0, 1.0))
    utility = ModelUtility(LogisticRegression(C=C, max_iter=max_iter, fit_intercept=fit_intercept), scorer, cache_backend=None,
                           show_warnings=False).with_dataset(train)
    return _timed_loop(lambda s: utility(Sample(None, s)), [np.asarray(s, dtype=np.int_) for s in subsets])


def sklearn_rate(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 subsets: Sequence[np.ndarray], C: float = 1.0, max_iter: int = 200,
                     fit_intercept: bool = True) -> tuple[float, np.ndarray]:
    """Reference: a direct scikit-learn fit/score loop (no valuation library)."""
    import warnings

    def utility(s: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LogisticRegression(C=C, max_iter=max_iter, fit_intercept=fit_intercept).fit(x_train[s], y_train[s]).score(x_val, y_val)

    return _timed_loop(utility, [np.asarray(s) for s in subsets])


def _digits_split(n_train: int = 1000, n_val: int = 300, seed: int = 0):
    """Standardized digits: (x_train, y_train, x_val, y_val), scaler fitted on the training part."""
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    tr, va = order[:n_train], order[n_train:n_train + n_val]
    scaler = StandardScaler().fit(x[tr])
    return scaler.transform(x[tr]), y[tr].astype(np.int64), scaler.transform(x[va]), y[va].astype(np.int64)


if __name__ == "__main__":
    x_tr, y_tr, x_va, y_va = _digits_split()
    rng = np.random.default_rng(1)
    subsets = [rng.choice(len(y_tr), size=100, replace=False) for _ in range(30)]
    print(f"subsets missing a class: {sum(len(np.unique(y_tr[s])) < 10 for s in subsets)} / {len(subsets)}")
    results = {name: fn(x_tr, y_tr, x_va, y_va, subsets) for name, fn in
               [("sklearn", sklearn_rate), ("opendataval", opendataval_rate), ("pydvl", pydvl_rate)]}
    for name, (rate, values) in results.items():
        print(f"{name:12s} {rate:8.1f} evals/s   mean accuracy {values.mean():.4f}")
    for a, b in [("opendataval", "pydvl"), ("opendataval", "sklearn"), ("pydvl", "sklearn")]:
        diff = np.abs(results[a][1] - results[b][1])
        print(f"{a} vs {b}: agree on {int((diff < 1e-6).sum())}/{len(diff)} subsets, max |diff| {diff.max():.4g}")
