"""Amortized data valuation from plain Python: distributional Data Shapley of a tabular data set with 20% of its
labels flipped, learned from 5 noisy samples per point, then the points most likely mislabeled.

    python examples/data_valuation.py --out artifacts/example_valuation --points 5000

Any ``datasets.Dataset`` with numeric feature columns and a label column works the same way through
``DatasetSource(path, feature_columns, label_column)``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch

from lightning_attr import ValuationDataModule, ValuationModel
from lightning_attr.valuation import SyntheticSource


def main(out: str, points: int) -> None:
    L.seed_everything(0)
    data = ValuationDataModule(SyntheticSource(num_points=points, flip_fraction=0.2), num_samples=5,
                               estimator_options={"cardinality": [0, 30]}, test_num_samples=200,
                               cache_dir=f"{out}/valuation_cache")
    trainer = L.Trainer(max_epochs=30, default_root_dir=out,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(monitor="val/loss", filename="best")])
    model = ValuationModel()
    trainer.fit(model, data)
    spent = data.evaluations  # labels for training and model selection (the test ground truth comes next)
    print(trainer.test(model, data, ckpt_path="best")[0])  # against 200-sample values of 250 points
    best = ValuationModel.load_from_checkpoint(trainer.checkpoint_callback.best_model_path).eval()
    with torch.no_grad():
        values = best.value(data.data.inputs, data.data.y_train)
    lowest = values.argsort()[: points // 10]
    print(f"{points} points valued with {spent} utility evaluations; "
          f"{data.data.flipped[lowest].float().mean():.0%} of the lowest-valued 10% have flipped labels (20% overall).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="artifacts/example_valuation")
    parser.add_argument("--points", type=int, default=5000)
    args = parser.parse_args()
    main(args.out, args.points)
