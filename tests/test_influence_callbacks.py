"""TracIn / TRAK callbacks: brute-force equality at the stored checkpoints, untouched training, DDP, resume, W&B."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from influence_models import brute_force_grads
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import TRAK, TracIn
from lightning_attr.data import IndexedDataset
from lightning_attr.influence import cross_entropy

N_TRAIN = 13  # odd: 2 ranks get 7 + 6 examples


def tensors(n=N_TRAIN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


class Tiny(L.LightningModule):
    """Conv + BatchNorm + Dropout + Linear on (B, 1, 6, 6); SGD with the learning rate halved every epoch."""

    def __init__(self, lr: float = 0.2, frozen: bool = False, dropout: float = 0.0, shuffle: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Flatten(), nn.Linear(108, 3))
        self.lr, self.frozen, self.shuffle = lr, frozen, shuffle
        if frozen:  # zero loss and frozen BatchNorm statistics: the weights never change
            self.net[1].momentum = 0.0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss * 0 if self.frozen else loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def train_dataloader(self):
        return DataLoader(IndexedDataset(TensorDataset(*tensors())), batch_size=4, shuffle=self.shuffle)


def fit(tmp_path, model, callbacks, epochs=2, **kw):
    base = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    base.update(kw)
    trainer = L.Trainer(callbacks=callbacks, **base)
    trainer.fit(model)
    return trainer


def checkpoint_weights(folder, c):
    model = Tiny()
    model.load_state_dict(load_file(str(folder / f"weights-{c:03d}.safetensors")))
    return model.eval()


def test_tracin_callback_equals_brute_force_at_the_stored_checkpoints(tmp_path):
    cb = TracIn(dirpath=str(tmp_path / "tracin"), proj_dim=None, num_queries=0)
    fit(tmp_path, Tiny(), [cb])
    records = json.loads((tmp_path / "tracin" / "checkpoints.json").read_text())
    lrs = [next(iter(r["lrs"].values())) for r in records]
    assert lrs == pytest.approx([0.2, 0.1])  # the rate in effect during each epoch, read from the optimizer
    x, y = tensors()
    xq, yq = tensors(4, seed=9)
    self_ref, scores_ref = 0, 0
    for c, lr in enumerate(lrs):
        model = checkpoint_weights(tmp_path / "tracin", c)
        names = [n for n, _ in model.named_parameters()]
        g, gq = (brute_force_grads(model, names, a, b, cross_entropy) for a, b in ((x, y), (xq, yq)))
        self_ref, scores_ref = self_ref + lr * g.pow(2).sum(1), scores_ref + lr * g @ gq.T
    torch.testing.assert_close(cb.self_influence, self_ref, rtol=1e-4, atol=1e-6)
    query = TensorDataset(xq, yq)
    torch.testing.assert_close(cb.scores(query, batch_size=3), scores_ref, rtol=1e-4, atol=1e-6)
    top = cb.topk(query, k=3, block=5)
    torch.testing.assert_close(top["proponents"][1], scores_ref.T.topk(3).indices)


def test_last_layer_fast_path_equals_last_layer_tracin(tmp_path):
    fast = TracIn(dirpath=str(tmp_path / "fast"), last_layer=True, num_queries=0)
    full = TracIn(dirpath=str(tmp_path / "full"), parameters=["net.5.*"], proj_dim=None, num_queries=0)
    fit(tmp_path, Tiny(), [fast, full])
    torch.testing.assert_close(fast.self_influence, full.self_influence, rtol=1e-4, atol=1e-7)
    query = TensorDataset(*tensors(3, seed=4))
    torch.testing.assert_close(fast.scores(query), full.scores(query), rtol=1e-4, atol=1e-7)


def test_training_is_bit_identical_with_and_without_the_callbacks(tmp_path):
    runs = []
    for callbacks in ([], [TracIn(dirpath=str(tmp_path / "a"), num_queries=0, every_n_steps=2),
                           TRAK(dirpath=str(tmp_path / "b"), proj_dim=16, num_queries=0)]):
        L.seed_everything(0)
        model = Tiny(dropout=0.3)
        fit(tmp_path, model, callbacks)
        runs.append((model.state_dict(), torch.rand(3)))
    for k, v in runs[0][0].items():
        assert torch.equal(v, runs[1][0][k]), k
    assert torch.equal(runs[0][1], runs[1][1])  # the global RNG continues identically


def test_fast_dev_run_skips_the_pass(tmp_path):
    cb = TracIn(dirpath=str(tmp_path / "t"), num_queries=0)
    fit(tmp_path, Tiny(), [cb], fast_dev_run=True)
    assert cb.records == [] and not (tmp_path / "t").exists()


@pytest.mark.parametrize("cls", [TracIn, TRAK])
def test_two_ddp_processes_equal_one(tmp_path, cls):
    """Frozen weights (zero loss) so both runs see the same checkpoints; the pass is sharded 7 + 6 and gathered."""
    results = []
    for devices in (1, 2):
        folder = tmp_path / f"d{devices}"
        kw = dict(strategy="ddp_fork") if devices == 2 else {}
        fit(tmp_path, Tiny(frozen=True), [cls(dirpath=str(folder), proj_dim=24, num_queries=0)], devices=devices,
            **kw)
        results.append({f.name: load_file(str(f)) for f in sorted(folder.glob(f"{cls.method_class.name}-*.safetensors"))}
                       | {"summary": load_file(str(folder / "summary.safetensors"))})
    assert sorted(results[0]) == sorted(results[1]) and len(results[0]) == 3
    for name, tensors_1 in results[0].items():
        for k, v in tensors_1.items():
            # the TRAK kernel solves a damped 24 x 24 system from 13 rows: float noise grows by its condition number
            tol = 2e-4 if k in ("kernel", "leverage") else 1e-6
            torch.testing.assert_close(results[1][name][k], v, rtol=1e-5, atol=tol * float(v.abs().max()))


def test_resumed_fit_ends_with_the_uninterrupted_results(tmp_path):
    def callback(name):
        return TracIn(dirpath=str(tmp_path / name), proj_dim=32, num_queries=0)

    whole = callback("whole")
    fit(tmp_path / "w", Tiny(shuffle=False), [whole], epochs=3)
    first = callback("resumed")
    trainer = fit(tmp_path / "r", Tiny(shuffle=False), [first], epochs=1)
    ckpt = str(tmp_path / "r.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = callback("resumed")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed])
    trainer.fit(Tiny(shuffle=False), ckpt_path=ckpt)
    assert [r["epoch"] for r in resumed.records] == [0, 1, 2]
    torch.testing.assert_close(resumed.self_influence, whole.self_influence, rtol=1e-5, atol=1e-7)
    query = TensorDataset(*tensors(3, seed=5))
    torch.testing.assert_close(resumed.scores(query), whole.scores(query), rtol=1e-5, atol=1e-7)


def test_noisy_label_auc_and_topk_are_logged_to_an_offline_wandb_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="lightning-attr-test", save_dir=str(tmp_path), offline=True)
    query = TensorDataset(*tensors(2, seed=3))
    cb = TracIn(dirpath=str(tmp_path / "t"), query_data=IndexedDataset(query), top_k=2, noisy_labels=[0, 5, 7])
    fit(tmp_path, Tiny(), [cb], logger=logger)
    logger.experiment.finish()
    noisy = torch.zeros(N_TRAIN, dtype=torch.bool)
    noisy[[0, 5, 7]] = True
    s = cb.self_influence
    pairs = (s[noisy].unsqueeze(1) > s[~noisy]).double() + 0.5 * (s[noisy].unsqueeze(1) == s[~noisy]).double()
    assert cb.metrics["tracin/noisy_label_auc"] == pytest.approx(float(pairs.mean()))
    rows = json.loads((tmp_path / "t" / "topk-001.json").read_text())
    assert len(rows) == 4 and {"proponent", "opponent", "proponent_score"} <= set(rows[0])
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/tracin/top_k*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["query", "query_label", "rank"] and len(table["data"]) == 4


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs"):
        TracIn(every_n_epochs=0)
    with pytest.raises(ValueError, match="no attribution pass"):
        TracIn(every_n_epochs=None)
    with pytest.raises(ValueError, match="matches no parameter"):
        fit(tmp_path, Tiny(), [TracIn(parameters=["head.*"], num_queries=0)])

    class NoIndex(Tiny):
        def train_dataloader(self):
            return DataLoader(TensorDataset(*tensors()), batch_size=4)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

    with pytest.raises(ValueError, match="no example index"):
        fit(tmp_path, NoIndex(), [TracIn(num_queries=0)])
    shuffled = DataLoader(IndexedDataset(TensorDataset(*tensors())), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffled"):
        fit(tmp_path, Tiny(), [TracIn(attribution_data=shuffled, num_queries=0)])
    with pytest.raises(ValueError, match="noisy_labels.*nope"):
        fit(tmp_path, Tiny(), [TracIn(noisy_labels="nope", num_queries=0)])


def test_pass_at_fit_end_only_and_without_the_input_cache(tmp_path):
    cached = TracIn(dirpath=str(tmp_path / "a"), every_n_epochs=None, at_fit_end=True, num_queries=0, proj_dim=None)
    uncached = TracIn(dirpath=str(tmp_path / "b"), every_n_epochs=1, cache_inputs_mb=0, num_queries=0, proj_dim=None)
    fit(tmp_path, Tiny(shuffle=False), [cached, uncached])
    assert [r["step"] for r in cached.records] == [8] and len(uncached.records) == 2
    assert cached.runner.cache and not uncached.runner.cache
    last = load_file(str(tmp_path / "b" / "tracin-001.safetensors"))["self_influence"]
    torch.testing.assert_close(cached.self_influence, last)  # same weights, same rates: the same pass


def test_indexed_dataset_wraps_items():
    ds = IndexedDataset(TensorDataset(torch.arange(3.0), torch.arange(3)))
    assert ds[2] == (torch.tensor(2.0), torch.tensor(2), 2) and len(ds) == 3
    assert IndexedDataset([{"a": 1}])[0] == {"a": 1, "index": 0}
    assert IndexedDataset([5])[0] == (5, 0)
