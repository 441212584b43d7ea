"""Grouped (GGDA) TracIn / TRAK callbacks: additivity of TracIn, group gradients, DDP equality, bad requests."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_influence_callbacks import N_TRAIN, Tiny, fit, tensors
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import TRAK, TracIn


@pytest.mark.parametrize("kw", [dict(proj_dim=None), dict(proj_dim=40), dict(last_layer=True)])
def test_grouped_tracin_equals_the_sum_of_member_scores(tmp_path, kw):
    single = TracIn(dirpath=str(tmp_path / "single"), num_queries=0, **kw)
    grouped = TracIn(dirpath=str(tmp_path / "grouped"), num_queries=0, group_by="random", group_size=3, **kw)
    fit(tmp_path, Tiny(), [single, grouped])
    groups = grouped.groups
    assert groups.num_groups == 5 and int(groups.sizes.max()) == 3  # 13 examples in groups of 3
    query = TensorDataset(*tensors(4, seed=7))
    expected = groups.one_hot() @ single.scores(query)
    torch.testing.assert_close(grouped.group_scores(query), expected, rtol=1e-4, atol=1e-6)
    assert grouped.group_self_influence.shape == (5,)
    # groups are rows: scores / self_influence answer per group, by the mean gradient unless normalize="sum"
    sizes = groups.sizes.float()
    torch.testing.assert_close(grouped.scores(query), expected / sizes.unsqueeze(1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grouped.scores(query, normalize="sum"), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grouped.self_influence, grouped.group_self_influence / sizes**2)
    top = grouped.topk(query, k=2, normalize="sum")
    torch.testing.assert_close(top.proponents.indices, expected.T.topk(2).indices)


def test_grouped_trak_rows_are_group_gradients(tmp_path):
    cb = TRAK(dirpath=str(tmp_path / "g"), proj_dim=None, num_queries=0, group_by="class", damping=0.1)
    fit(tmp_path, Tiny(), [cb], epochs=1)
    stored = load_file(str(tmp_path / "g" / "trak-000.safetensors"))
    from lightning_attr.influence import GradientFeaturizer, out_to_loss

    model = Tiny()
    model.load_state_dict(load_file(str(tmp_path / "g" / "weights-000.safetensors")))
    model.eval()
    x, y = tensors()
    per_example = GradientFeaturizer(model, output="margin")(x, y)
    one_hot = cb.groups.one_hot()
    torch.testing.assert_close(stored["x"], one_hot @ per_example, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        q = out_to_loss(model(x), y)
    torch.testing.assert_close(stored["q"], one_hot @ q / one_hot.sum(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(load_file(str(tmp_path / "g" / "groups.safetensors"))["assignment"], cb.groups.assignment)
    from lightning_attr.influence import damped_inverse, xtx

    weighted = stored["x"] / cb.groups.sizes.float().sqrt().unsqueeze(1)  # X^T X of size-weighted group rows
    kernel = stored["x"] @ damped_inverse(xtx(weighted), 0.1)
    torch.testing.assert_close(stored["kernel"], kernel, rtol=1e-4, atol=1e-4 * float(kernel.abs().max()))
    torch.testing.assert_close(cb.group_mean_self_influence, cb.group_self_influence / cb.groups.sizes.float() ** 2)


@pytest.mark.parametrize("group_by", ["class", "gradient_kmeans"])
def test_grouped_ddp_equals_one_process(tmp_path, group_by):
    results = []
    for devices in (1, 2):
        folder = tmp_path / f"d{devices}"
        kw = dict(strategy="ddp_fork") if devices == 2 else {}
        size = None if group_by == "class" else 2
        cb = TracIn(dirpath=str(folder), proj_dim=24, num_queries=0, group_by=group_by, group_size=size)
        fit(tmp_path, Tiny(frozen=True), [cb], devices=devices, **kw)
        results.append({name: load_file(str(folder / name)) for name in
                        ("groups.safetensors", "tracin-000.safetensors", "tracin-001.safetensors")})
    for name, tensors_1 in results[0].items():
        for k, v in tensors_1.items():
            torch.testing.assert_close(results[1][name][k], v, rtol=1e-5, atol=1e-6 * float(v.abs().max()))


def test_invalid_grouping_requests_are_named(tmp_path):
    with pytest.raises(ValueError, match="group_by.*'spectral'"):
        TracIn(group_by="spectral")
    with pytest.raises(ValueError, match="exactly one of `num_groups` and `group_size`"):
        TracIn(group_by="random")
    with pytest.raises(ValueError, match="group_column"):
        TracIn(group_by="column")
    with pytest.raises(ValueError, match=r"num_groups.*\[1, 13\]"):
        fit(tmp_path, Tiny(), [TracIn(group_by="random", num_groups=20, num_queries=0)])
    with pytest.raises(ValueError, match="group_column.*'site'"):
        fit(tmp_path, Tiny(), [TracIn(group_by="column", group_column="site", num_queries=0)])


class Sites(torch.utils.data.Dataset):
    """Dict items with a user group column `site`."""

    def __init__(self, sites):
        self.x, self.y = tensors()
        self.sites = sites

    def __len__(self):
        return N_TRAIN

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i], "site": self.sites[i], "index": i}


def test_user_group_column(tmp_path):
    class DictTiny(Tiny):
        def train_dataloader(self):
            return DataLoader(Sites([i % 4 for i in range(N_TRAIN)]), batch_size=4)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch["image"]), batch["label"])

    cb = TracIn(dirpath=str(tmp_path / "c"), group_by="column", group_column="site", num_queries=0, proj_dim=None)
    fit(tmp_path, DictTiny(), [cb], epochs=1)
    assert cb.groups.assignment.tolist() == [i % 4 for i in range(N_TRAIN)]
    assert cb.group_self_influence.shape == (4,)
