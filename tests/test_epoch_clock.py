"""EpochClock: one duration per training epoch, and the steady training cost the compute accounting uses."""

from __future__ import annotations

import statistics

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import EpochClock


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_one_duration_per_epoch_and_steady_training_seconds(tmp_path):
    clock = EpochClock()
    data = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=4)
    L.Trainer(max_epochs=4, callbacks=[clock], default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(Tiny(), data)
    seconds = clock.epoch_seconds()
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert clock.training_seconds() == statistics.median(seconds[1:]) * 4
    assert EpochClock().training_seconds() == 0.0
