"""AmortizedExplainer: shapes, zero-initialized start, efficiency, checkpoints and 2-process DDP equality."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from conftest import TINY_RESNET, explainer_kwargs

from lightning_attr import AmortizedExplainer, ImageDataModule, OracleDataModule, create_timm_model
from lightning_attr.io import load_tensors
from lightning_attr.modules import save_timm_weights


def test_starts_at_the_uniform_split_of_the_total(vit_weights):
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0])).eval()
    x = torch.randn(3, 3, 16, 16)
    phi = model(x)
    assert phi.shape == (3, 4, 10)
    v_all = model.game(x, torch.ones(3, 1, 4, dtype=torch.bool))[:, 0]
    v_empty = model.game(x, torch.zeros(3, 1, 4, dtype=torch.bool))[:, 0]
    torch.testing.assert_close(phi, ((v_all - v_empty) / 4).unsqueeze(1).expand(-1, 4, -1))
    plain = AmortizedExplainer(**explainer_kwargs(vit_weights[0], efficiency=False)).eval()
    assert torch.count_nonzero(plain(x)) == 0


@pytest.mark.parametrize("head", ["transformer", "mlp"])
def test_efficiency_normalization_is_exact(vit_weights, head):
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0], head=head)).eval()
    torch.nn.init.normal_(model.head.out.weight)  # leave the zero start
    x = torch.randn(4, 3, 16, 16)
    phi, total = model._explain(x)
    assert phi.abs().sum() > 0
    torch.testing.assert_close(phi.sum(1), total, atol=1e-6 * float(phi.abs().max()) * phi.shape[1], rtol=1e-5)


def test_resnet_backbone_explains_a_vit(tmp_path, vit_weights):
    torch.manual_seed(0)
    resnet = create_timm_model("resnet18", num_classes=10, **TINY_RESNET)
    path = str(tmp_path / "resnet.safetensors")
    save_timm_weights(resnet, path)
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0], backbone="resnet18", backbone_weights=path,
                                                  backbone_kwargs=TINY_RESNET))
    assert model.features.dim == 8 and model(torch.randn(2, 3, 16, 16)).shape == (2, 4, 10)


def test_fit_keeps_the_frozen_resnets_statistics_without_eval_mode_warnings(tmp_path):
    """Frozen classifier and backbone (BatchNorm ResNets) follow the explainer's train mode, so Lightning finds no
    module in eval mode; their running statistics still never change."""
    torch.manual_seed(0)
    path = str(tmp_path / "resnet.safetensors")
    save_timm_weights(create_timm_model("resnet18", num_classes=10, **TINY_RESNET), path)
    model = AmortizedExplainer(**explainer_kwargs(path, classifier="resnet18", classifier_kwargs=TINY_RESNET))
    def frozen_state():
        parts = {"game": model.game.model, "features": model.features.model}
        return {f"{part}.{k}": v.clone() for part, module in parts.items() for k, v in module.state_dict().items()}

    frozen = frozen_state()
    assert any("running_mean" in k for k in frozen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(model, datamodule(tmp_path))
    assert not [str(w.message) for w in caught if "eval mode" in str(w.message)]
    after = frozen_state()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert model.global_step == 2


def test_bad_head_and_backbone_are_named(vit_weights):
    with pytest.raises(ValueError, match="head"):
        AmortizedExplainer(**explainer_kwargs(vit_weights[0], head="lstm"))
    with pytest.raises(ValueError, match="backbone.*nope"):
        AmortizedExplainer(**explainer_kwargs(vit_weights[0], backbone="nope_net"))
    with pytest.raises(FileNotFoundError, match="classifier"):
        AmortizedExplainer(**explainer_kwargs("/nonexistent/weights.safetensors"))


def datamodule(tmp_path, test_size=7, batch_size=3):
    images = ImageDataModule("digits", image_size=16, batch_size=batch_size, val_fraction=0.02, test_fraction=0.01)
    return OracleDataModule(images, estimator="permutation_shapley", num_samples=8, test_size=test_size,
                            cache_dir=str(tmp_path / "cache"))


def trainer(tmp_path, **kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    base.update(kw)
    return L.Trainer(**base)


def test_checkpoint_round_trip_keeps_outputs_and_target_scale(tmp_path, vit_weights):
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0]))
    t = trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1)
    t.fit(model, datamodule(tmp_path))
    assert model.scale > 0
    path = str(tmp_path / "explainer.ckpt")
    t.save_checkpoint(path)
    loaded = AmortizedExplainer.load_from_checkpoint(path, map_location="cpu").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    torch.testing.assert_close(loaded.scale, model.scale)


def test_ddp_two_processes_give_the_single_process_test_metrics(tmp_path, vit_weights):
    """7 test examples over 2 ranks (4 + 3, no padding duplicates) reduce to the 1-process metrics."""
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0]))
    torch.nn.init.normal_(model.head.out.weight, std=0.1)
    twin = copy.deepcopy(model)
    single = trainer(tmp_path).test(model, datamodule(tmp_path), verbose=False)[0]
    ddp = trainer(tmp_path, devices=2, strategy="ddp_fork").test(twin, datamodule(tmp_path), verbose=False)[0]
    assert set(single) == set(ddp) and "test/mse" in single
    for key in single:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key


def test_ddp_fit_labels_every_example_once_across_ranks(tmp_path, vit_weights):
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0]))
    dm = datamodule(tmp_path, batch_size=16)
    trainer(tmp_path, devices=2, strategy="ddp_fork", max_epochs=1, limit_train_batches=4, limit_val_batches=0).fit(model, dm)
    files = sorted((tmp_path / "cache").glob("train-*-rank*.safetensors"))
    assert [f.name.rsplit("-", 1)[1] for f in files] == ["rank0.safetensors", "rank1.safetensors"]
    parts = [load_tensors(str(f))[0]["index"] for f in files]
    assert len(parts[0]) == len(parts[1]) == 64 and not set(parts[0].tolist()) & set(parts[1].tolist())
