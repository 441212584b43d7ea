"""Data attribution without Lightning: one call runs the engine once on a module's current weights."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lightning_attr.influence.attribution import Attribution, Normalize
from lightning_attr.influence.grouping_pass import GroupSpec
from lightning_attr.influence.isolation import isolated
from lightning_attr.influence.method import AttributionMethod
from lightning_attr.influence.runner import AttributionData, LocalComm, PassRunner
from lightning_attr.influence.store import ResultsStore

__all__ = ["attribute"]


def attribute(method: AttributionMethod, module: nn.Module, train: Dataset | DataLoader, directory: str,
              gradients: dict[str, Any] | None = None, groups: GroupSpec | None = None, batch_size: int = 64,
              keys: dict[str, str] | None = None, normalize: Normalize = "mean", progress: bool = True) -> Attribution:
    """One checkpoint of ``method`` (e.g. ``InfluenceFunctionMethod("ekfac")``, ``TRAKMethod()``) at ``module``'s current
    weights over ``train`` (items ``(x, y, index)`` or dicts, ``index`` = the item's position; a Dataset or an unshuffled
    DataLoader), stored in ``directory``. ``gradients``: :class:`GradientFeaturizer` settings (default: every trainable
    parameter, exact gradients); ``groups``: a :class:`GroupSpec` for GGDA rows. Returns the :class:`Attribution`
    (``self_influence()``, ``scores(query)``, ``topk(query, k)``); TracIn runs with a learning rate of 1."""
    data = AttributionData.of(train, batch_size, "train")
    att = Attribution(method, module, dict(gradients or {}), ResultsStore(directory), normalize, keys)
    runner, comm = PassRunner(keys), LocalComm()

    def bar(desc: str) -> Any:
        return lambda it, total: tqdm(it, desc=f"{method.name} {desc}", total=total, disable=not progress, leave=False)

    with isolated(module):
        att.add_pass(runner, data, comm, groups or GroupSpec(), dict(epoch=None, step=0), progress=bar)
    att.save(comm)
    return att
