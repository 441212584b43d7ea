"""Compare oracles for amortization in W&B: one run per estimator, grouped, same data and explainer.

    WANDB_MODE=offline python examples/wandb_compare.py --weights artifacts/demo/classifier_vit.safetensors
    wandb sync wandb/offline-run-*        # later, where a W&B server is reachable

Each run logs train/val loss, test error against exact Shapley values and heatmaps of the explainer, so the W&B
workspace shows which oracle (permutation sampling vs unbiased KernelSHAP) gives the better explainer per label budget.
"""

from __future__ import annotations

import argparse

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from lightning_attr import AmortizedExplainer, ImageDataModule, OracleDataModule
from lightning_attr.callbacks import AttributionHeatmaps

VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0)


def run(weights: str, estimator: str, budget: int, epochs: int, project: str, out: str) -> dict:
    L.seed_everything(0)
    explainer = AmortizedExplainer("vit_tiny_patch16_224", classifier_weights=weights, classifier_kwargs=VIT,
                                   dropout=0.1, weight_decay=0.05)
    data = OracleDataModule(ImageDataModule("digits", batch_size=32), estimator=estimator, num_samples=budget,
                            test_size=32, cache_dir=f"{out}/oracle_cache")
    logger = WandbLogger(project=project, group="oracle-comparison", name=f"{estimator}-{budget}", save_dir=out,
                         config={"estimator": estimator, "num_samples": budget})
    trainer = L.Trainer(max_epochs=epochs, logger=logger, default_root_dir=out,
                        callbacks=[AttributionHeatmaps(every_n_epochs=10),
                                   L.pytorch.callbacks.ModelCheckpoint(monitor="val/loss", filename="best")])
    trainer.fit(explainer, data)
    metrics = trainer.test(explainer, data, ckpt_path="best")[0]
    logger.experiment.finish()
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True, help="classifier weights exported by stage 1 / make demo")
    parser.add_argument("--budget", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--project", default="lightning-attr")
    parser.add_argument("--out", default="artifacts/wandb_compare")
    args = parser.parse_args()
    for name in ("permutation_shapley", "unbiased_kernel_shap"):
        print(name, run(args.weights, name, args.budget, args.epochs, args.project, args.out))
