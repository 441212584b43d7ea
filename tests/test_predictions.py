"""AttributionWriter: a predict run saves the explainer's attributions of every example, in index order, once."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import explainer_kwargs

from lightning_attr import AmortizedExplainer, ImageDataModule, OracleDataModule
from lightning_attr.callbacks import AttributionWriter
from lightning_attr.io import load_tensors


@pytest.mark.parametrize("devices", [1, 2])
def test_writer_saves_every_predicted_example_in_index_order(tmp_path, vit_weights, devices):
    """7 test images in batches of 3 (over 2 ranks: 4 + 3, gathered): the file holds the explainer's outputs."""
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0]))
    torch.nn.init.normal_(model.head.out.weight, std=0.1)  # leave the zero start: outputs differ per patch
    images = ImageDataModule("digits", image_size=16, batch_size=3, val_fraction=0.02, test_fraction=0.01)
    dm = OracleDataModule(images, estimator="permutation_shapley", num_samples=8, test_size=7, cache_dir=None)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), callbacks=[AttributionWriter()])
    trainer.predict(model, dm, return_predictions=False)
    tensors, _ = load_tensors(str(tmp_path / "lightning_attr_runs" / "version_0" / "predictions.safetensors"))
    images.setup()
    x = torch.stack([images.splits["test"][i]["image"] for i in range(7)])
    assert tensors["index"].tolist() == list(range(7))
    torch.testing.assert_close(tensors["attributions"], model.eval()(x))


def test_predict_step_returns_index_and_attributions(vit_weights):
    model = AmortizedExplainer(**explainer_kwargs(vit_weights[0])).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model.predict_step({"image": x, "index": torch.tensor([5, 3])}, 0)
    assert out["index"].tolist() == [5, 3] and out["attributions"].shape == (2, 4, 10)
    assert set(model.predict_step(x, 0)) == {"attributions"}


def test_bad_filename_is_named():
    with pytest.raises(ValueError, match="filename.*safetensors"):
        AttributionWriter(filename="predictions.pt")
