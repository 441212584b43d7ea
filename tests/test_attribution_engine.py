"""The attribution engine: callbacks and functional formulas are one code path; one checkpoint per optimizer step;
runs kept apart; stored files verified; outputs, loaders and precisions the callbacks must understand or refuse."""

from __future__ import annotations

import json
import warnings

import lightning as L
import pytest
import torch
from influence_models import brute_force_grads
from safetensors.torch import load_file
from test_influence_callbacks import N_TRAIN, Tiny, fit, tensors
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import TRAK, TracIn
from lightning_attr.data import IndexedDataset
from lightning_attr.influence import GradientFeaturizer, cross_entropy, tracin_scores, trak_scores
from lightning_attr.io import CorruptArtifactError

QUERY = TensorDataset(*tensors(4, seed=9))


def stored(cb, c):
    return load_file(f"{cb.directory}/{cb.method.name}-{c:03d}.safetensors")


def model_at(cb, c):
    model = Tiny()
    model.load_state_dict(load_file(f"{cb.directory}/weights-{c:03d}.safetensors"))
    return model.eval()


def query_features(cb, c, output):
    """Query features at checkpoint c from a featurizer built here (scaled by sqrt(lr) for TracIn)."""
    feat = GradientFeaturizer(model_at(cb, c), output=output, **cb.attribution.gradients)
    lrs = cb.records[c]["lrs"]
    feat.set_scales({k: v**0.5 for k, v in lrs.items()} if lrs else None)
    x, y = tensors(4, seed=9)
    return feat.factors(x, y) if feat.last_layer else feat(x, y, (c,))


@pytest.mark.parametrize("group_by", [None, "random"])
@pytest.mark.parametrize("kw", [dict(proj_dim=40), dict(last_layer=True)])
def test_tracin_callback_scores_equal_tracin_scores_on_the_stored_checkpoints(tmp_path, group_by, kw):
    cb = TracIn(num_queries=0, group_by=group_by, group_size=3 if group_by else None, **kw)
    fit(tmp_path, Tiny(), [cb])
    train = [stored(cb, c) for c in range(2)]
    train = [t["features"] if "features" in t else (t["a"], t["g"]) for t in train]
    expected = tracin_scores(train, [query_features(cb, c, "cross_entropy") for c in range(2)])
    torch.testing.assert_close(cb.scores(QUERY, normalize="sum"), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("group_by", [None, "class"])
def test_trak_callback_scores_equal_trak_scores_on_the_stored_checkpoints(tmp_path, group_by):
    cb = TRAK(num_queries=0, proj_dim=16, damping=0.1, group_by=group_by)
    fit(tmp_path, Tiny(), [cb])
    kernels = [stored(cb, c)["kernel"] for c in range(2)]
    q = [stored(cb, c)["q"] for c in range(2)]
    expected = trak_scores(kernels, [query_features(cb, c, "margin") for c in range(2)], q)
    torch.testing.assert_close(cb.scores(QUERY, normalize="sum"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [TracIn, TRAK])
def test_load_gives_the_answers_of_the_callback_in_another_process(tmp_path, cls):
    cb = cls(num_queries=0, proj_dim=24)
    fit(tmp_path, Tiny(), [cb])
    loaded = cls.load(cb.directory, Tiny())
    torch.testing.assert_close(loaded.self_influence(), cb.self_influence)
    torch.testing.assert_close(loaded.scores(QUERY), cb.scores(QUERY))
    with pytest.raises(ValueError, match="holds 'tracin' results|holds 'trak' results"):
        (TRAK if cls is TracIn else TracIn).load(cb.directory, Tiny())


# ---------------------------------------------------------------------------------------------- one pass per step
@pytest.mark.parametrize("kw, expected", [
    (dict(every_n_epochs=None, every_n_steps=2, accumulate_grad_batches=2), [2, 4]),
    (dict(every_n_epochs=1, every_n_steps=4), [4, 8]),
    (dict(every_n_epochs=1, every_n_steps=3, at_fit_end=True), [3, 4, 6, 8]),
])
def test_each_optimizer_step_gives_at_most_one_checkpoint(tmp_path, kw, expected):
    accumulate = kw.pop("accumulate_grad_batches", 1)  # 13 examples in batches of 4: 4 micro-batches per epoch
    cb = TracIn(num_queries=0, proj_dim=8, **kw)
    fit(tmp_path, Tiny(), [cb], accumulate_grad_batches=accumulate)
    assert [r["step"] for r in cb.records] == expected


# ------------------------------------------------------------------------------------------------ runs kept apart
def test_a_second_run_in_the_same_folder_leaves_the_first_runs_results_alone(tmp_path):
    first = TracIn(num_queries=0, proj_dim=8)
    fit(tmp_path, Tiny(), [first])
    before = first.scores(QUERY)
    second = TracIn(num_queries=0, proj_dim=8)
    fit(tmp_path, Tiny(lr=0.05), [second], epochs=1)
    assert first.directory != second.directory
    torch.testing.assert_close(first.scores(QUERY), before, rtol=0, atol=0)
    assert len(json.loads(open(f"{first.directory}/checkpoints.json").read())) == 2
    with pytest.raises(ValueError, match="another run"):
        fit(tmp_path, Tiny(), [TracIn(num_queries=0, proj_dim=8, dirpath=first.directory)], epochs=1)


# ---------------------------------------------------------------------------------------- stored files verified
def flip_middle_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("name", ["tracin-001.safetensors", "weights-000.safetensors"])
def test_a_damaged_stored_file_is_an_error_naming_it(tmp_path, damage, name):
    cb = TracIn(num_queries=0, proj_dim=8)
    fit(tmp_path, Tiny(), [cb])
    path = f"{cb.directory}/{name}"
    if damage == "flip":
        flip_middle_byte(path)
    else:
        open(path, "r+b").truncate(100)
    with pytest.raises(CorruptArtifactError, match=name + ".*delete the folder"):
        cb.scores(QUERY)
    with pytest.raises(CorruptArtifactError, match=name):
        TracIn.load(cb.directory, Tiny()).scores(QUERY)


def test_a_damaged_summary_is_an_error_naming_it(tmp_path):
    cb = TracIn(num_queries=0, proj_dim=8)
    fit(tmp_path, Tiny(), [cb])
    flip_middle_byte(f"{cb.directory}/summary.safetensors")
    with pytest.raises(CorruptArtifactError, match="summary.safetensors"):
        TracIn.load(cb.directory, Tiny())


def test_loaders_out_of_dataset_order_are_refused(tmp_path):
    cb = TracIn(num_queries=0, proj_dim=8)
    fit(tmp_path, Tiny(), [cb], epochs=1)
    with pytest.raises(ValueError, match="`query`.*shuffled"):
        cb.scores(DataLoader(QUERY, batch_size=2, shuffle=True))
    reversed_order = DataLoader(IndexedDataset(TensorDataset(*tensors())), batch_size=4,
                                sampler=list(reversed(range(N_TRAIN))))
    with pytest.raises(ValueError, match="`attribution_data`"):
        fit(tmp_path, Tiny(), [TracIn(num_queries=0, attribution_data=reversed_order)], epochs=1)

    class Renumbered(torch.utils.data.Dataset):  # items whose `index` is not their position
        def __len__(self):
            return N_TRAIN

        def __getitem__(self, i):
            x, y = tensors()
            return x[i], y[i], (i + 1) % N_TRAIN

    with pytest.raises(ValueError, match="position 0 .* index 1"):
        fit(tmp_path, Tiny(), [TracIn(num_queries=0, attribution_data=Renumbered())], epochs=1)


# ------------------------------------------------------------------------------------------ outputs understood
class TupleOut(Tiny):
    def forward(self, x):
        return self.net(x), x.mean()

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])


class AttributionsOut(TupleOut):
    def forward(self, x):
        return self.net(x).unsqueeze(1).expand(-1, 4, -1)  # (B, d, K), like an explainer


@pytest.mark.parametrize("model, what", [(TupleOut(), "a tuple of 2 items"), (AttributionsOut(), r"shape \(1, 4, 3\)")])
def test_a_module_without_logits_is_refused_clearly(tmp_path, model, what):
    with pytest.raises(ValueError, match=f"class logits.*{what}"):
        fit(tmp_path, model, [TracIn(num_queries=0)], epochs=1)


class UnusedHead(Tiny):
    """A Linear registered after the classifier that the forward never calls."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Linear(3, 7)


def test_last_layer_is_found_from_the_forward_graph(tmp_path):
    fast = TracIn(last_layer=True, num_queries=0, prefix="fast")
    full = TracIn(parameters=["net.5.*"], proj_dim=None, num_queries=0, prefix="full")
    fit(tmp_path, UnusedHead(), [fast, full])
    assert fast.attribution.gradients["last_layer"] == "net.5"
    torch.testing.assert_close(fast.self_influence, full.self_influence, rtol=1e-4, atol=1e-7)


def test_bf16_true_weights_get_bf16_inputs(tmp_path):
    cb = TracIn(last_layer=True, num_queries=0)
    fit(tmp_path, Tiny(), [cb], epochs=1, precision="bf16-true")
    model = model_at(cb, 0).float()
    x, y = tensors()
    ref = brute_force_grads(model, ["net.5.weight", "net.5.bias"], x, y, cross_entropy).pow(2).sum(1) * 0.2
    assert torch.isfinite(cb.self_influence).all()
    torch.testing.assert_close(cb.self_influence.float(), ref, rtol=0.1, atol=1e-3)  # bf16: ~3 significant digits


# ---------------------------------------------------------------------------------------------- callbacks apart
def test_two_callbacks_writing_to_one_folder_are_told_to_set_prefix(tmp_path):
    with pytest.raises(ValueError, match="own `prefix=`"):
        fit(tmp_path, Tiny(), [TracIn(prefix="same", num_queries=0), TRAK(prefix="same", num_queries=0)], epochs=1)
    with pytest.raises(ValueError, match="own `prefix=`"):
        fit(tmp_path, Tiny(), [TracIn(num_queries=0), TracIn(num_queries=0, proj_dim=8)], epochs=1)
    with pytest.raises(RuntimeError, match="more than one stateful callback"):  # identical: Lightning's check
        fit(tmp_path, Tiny(), [TracIn(num_queries=0), TracIn(num_queries=0)], epochs=1)


def test_resuming_into_another_dirpath_copies_the_stored_checkpoints_and_warns(tmp_path):
    whole = TracIn(num_queries=0, proj_dim=16)
    fit(tmp_path / "w", Tiny(shuffle=False), [whole], epochs=3)
    first = TracIn(num_queries=0, proj_dim=16, dirpath=str(tmp_path / "a"))
    trainer = fit(tmp_path / "r", Tiny(shuffle=False), [first], epochs=1)
    trainer.save_checkpoint(str(tmp_path / "r.ckpt"))
    resumed = TracIn(num_queries=0, proj_dim=16, dirpath=str(tmp_path / "b"))
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Tiny(shuffle=False), ckpt_path=str(tmp_path / "r.ckpt"))
    assert any("copied" in str(w.message) and str(tmp_path / "a") in str(w.message) for w in caught)
    assert (tmp_path / "b" / "tracin-000.safetensors").is_file()
    torch.testing.assert_close(resumed.scores(QUERY), whole.scores(QUERY), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(TracIn.load(str(tmp_path / "b"), Tiny()).scores(QUERY), whole.scores(QUERY),
                               rtol=1e-5, atol=1e-7)


def test_ddp_results_are_scored_from_disk_by_another_process(tmp_path):
    folder = tmp_path / "ddp"
    fit(tmp_path, Tiny(frozen=True), [TracIn(dirpath=str(folder), proj_dim=24, num_queries=0)], devices=2,
        strategy="ddp_fork")
    single = TracIn(proj_dim=24, num_queries=0)
    fit(tmp_path, Tiny(frozen=True), [single])
    loaded = TracIn.load(str(folder), Tiny())
    torch.testing.assert_close(loaded.scores(QUERY), single.scores(QUERY), rtol=1e-5, atol=1e-6)


def test_trak_load_state_dict_restores_what_state_dict_saves(tmp_path):
    cb = TRAK(num_queries=0, proj_dim=16, damping=0.1)
    fit(tmp_path, Tiny(), [cb], epochs=1)
    other = TRAK(num_queries=0, proj_dim=16, damping=0.5)
    fit(tmp_path / "o", Tiny(), [other], epochs=1)
    other.load_state_dict(cb.state_dict())
    assert other.method.damping == 0.1 and other.attribution.method.damping == 0.1
    assert other.records == cb.records and other.attribution.run_id == cb.attribution.run_id
    torch.testing.assert_close(other.self_influence, cb.self_influence)


def test_silent_fallbacks_warn(tmp_path):
    with pytest.warns(UserWarning, match="projection is off"):
        GradientFeaturizer(Tiny(), proj_dim=10_000)
    with pytest.warns(UserWarning, match="picked 'kronecker'"):
        GradientFeaturizer(Tiny(), proj_dim=8, max_memory_mb=0.001)
    with pytest.warns(UserWarning, match="regenerated block by block"):
        GradientFeaturizer(Tiny(), proj_dim=300, projection="dense", max_memory_mb=0.001)
    from lightning_attr.influence import make_grouping

    clustered = torch.cat([torch.zeros(40, 2), torch.ones(2, 2)]) + 1e-3 * torch.randn(42, 2)
    with pytest.warns(UserWarning, match="k-means made groups of"):
        make_grouping("embedding_kmeans", 42, group_size=21, features=clustered)
