"""TracIn and TRAK in your own Lightning training: add the callbacks, nothing else changes.

    python examples/tracin_callback.py --out artifacts/tracin_example

A plain LightningModule on scikit-learn digits with tuple batches; 10% of the training labels are flipped. The
dataset is wrapped in ``IndexedDataset`` so batches carry a stable example index, which is all the callbacks need.
Results go to the run's own folder (``{out}/lightning_logs/version_N/{prefix}``); ``TRAK.load`` reads them back.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import TRAK, TracIn
from lightning_attr.data import IndexedDataset


class DigitsCNN(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch  # (inputs, labels, index)
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def noisy_digits(fraction: float = 0.1, seed: int = 0) -> tuple[TensorDataset, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(len(y), generator=g)[: int(fraction * len(y))]
    y[flipped] = (y[flipped] + torch.randint(1, 10, (len(flipped),), generator=g)) % 10
    return TensorDataset(x, y), flipped


def main(out: str, epochs: int) -> None:
    L.seed_everything(0)
    data, flipped = noisy_digits()
    train = IndexedDataset(data)                                          # 1. batches carry their example index
    tracin = TracIn(last_layer=True, noisy_labels=flipped)               # 2. the callbacks: a pass every epoch,
    in_step = TracIn(in_step=True, last_layer=True, noisy_labels=flipped)  # from the training steps themselves,
    trak = TRAK(proj_dim=512, noisy_labels=flipped, query_data=train)    # and TRAK
    trainer = L.Trainer(max_epochs=epochs, callbacks=[tracin, in_step, trak], default_root_dir=out)  # 3. your Trainer
    trainer.fit(DigitsCNN(), DataLoader(train, batch_size=64, shuffle=True))

    print({k: round(v, 4) for k, v in {**tracin.metrics, **in_step.metrics, **trak.metrics}.items()})
    top = tracin.self_influence.topk(10).indices
    print("10 most self-influential training examples:", top.tolist(),
          f"({int(torch.isin(top, flipped).sum())} of them have flipped labels)")
    scores = trak.scores(torch.utils.data.Subset(data, range(5)))       # (n_train, 5) TRAK scores for 5 queries
    print("TRAK scores", tuple(scores.shape), "- results stored under", trak.directory)
    again = TRAK.load(trak.directory, DigitsCNN())                       # any later process: the same answers
    print("reloaded from disk:", bool(torch.allclose(again.scores(torch.utils.data.Subset(data, range(5))), scores)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="artifacts/tracin_example")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    main(args.out, args.epochs)
