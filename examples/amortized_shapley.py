"""Amortized Shapley values from plain Python: train a classifier, export it, amortize its Shapley values.

    python examples/amortized_shapley.py --out artifacts/example

The explainer's backbone is the classifier itself, loaded back frozen from the exported safetensors file through
timm's pretrained-weights path (the same call that would load hub weights). Patches are removed by dropping their
tokens (the classifier is trained that way), the explainer learns from 5,000 images (the real digits, then augmented
copies) and computes each image's frozen features once.
"""

from __future__ import annotations

import argparse

import lightning as L

from lightning_attr import AmortizedExplainer, AugmentedImageDataModule, Classifier, ImageDataModule, OracleDataModule

VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)


def main(out: str, epochs: int) -> None:
    L.seed_everything(0)
    weights = f"{out}/classifier.safetensors"
    classifier = Classifier("vit_tiny_patch16_224", num_classes=10, model_kwargs=VIT, export_path=weights, lr=2e-3,
                            removal="drop")
    L.Trainer(max_epochs=epochs, default_root_dir=f"{out}/classifier").fit(classifier, ImageDataModule("digits"))

    explainer = AmortizedExplainer("vit_tiny_patch16_224", classifier_weights=weights, classifier_kwargs=VIT,
                                   removal="drop", head_dim=128, head_depth=3, lr=2e-3, feature_cache="memory")
    images = AugmentedImageDataModule(train_size=5_000, dataset="digits", batch_size=128)
    data = OracleDataModule(images, estimator="permutation_shapley", num_samples=32, label_mode="fixed", test_size=16,
                            cache_dir=f"{out}/oracle_cache")
    trainer = L.Trainer(max_epochs=12, default_root_dir=f"{out}/explainer",
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(monitor="val/loss", filename="best")])
    trainer.fit(explainer, data)
    print(trainer.test(explainer, data, ckpt_path="best")[0])  # error against exact Shapley values


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="artifacts/example")
    parser.add_argument("--epochs", type=int, default=40, help="classifier epochs")
    args = parser.parse_args()
    main(args.out, args.epochs)
