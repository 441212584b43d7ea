"""TracIn(in_step=True) against a brute-force loop over the training steps it saw; DDP; resume; untouched training."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from influence_models import brute_force_grads
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr.callbacks import InStepTracIn, TracIn
from lightning_attr.data import IndexedDataset, UnpaddedDistributedSampler
from lightning_attr.influence import cross_entropy


def data(n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


class MLP(L.LightningModule):
    """Linear + Tanh + Linear; SGD with the learning rate halved every epoch; mean- or sum-reduced cross-entropy."""

    def __init__(self, n=13, batch_size=4, reduction="mean", lr=0.3):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.n, self.batch_size, self.reduction, self.lr = n, batch_size, reduction, lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return nn.functional.cross_entropy(self(x), y, reduction=self.reduction)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def train_dataloader(self):
        dataset = IndexedDataset(TensorDataset(*data(self.n)))
        world = self.trainer.world_size  # in order under DDP too: rank r reads r, r + world, ...
        sampler = UnpaddedDistributedSampler(dataset, world, self.trainer.global_rank) if world > 1 else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler)


class StepRecorder(L.Callback):
    """Weights, learning rate and example indices at the start of every micro-batch."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.batches.append((trainer.global_step, copy.deepcopy(module.state_dict()), lr, batch[2].clone()))


def brute_force(recorder, query, names):
    """sum over optimizer steps of lr * per-example gradients at the weights before the step (first micro-batch)."""
    x, y = data()
    xq, yq = query
    n = len(x)
    self_ref, scores_ref = torch.zeros(n, dtype=torch.float64), torch.zeros(n, len(xq), dtype=torch.float64)
    weights_of_step = {}
    for step, weights, lr, idx in recorder.batches:
        weights_of_step.setdefault(step, weights)
        model = MLP()
        model.load_state_dict(weights_of_step[step])
        g = brute_force_grads(model, names, x[idx], y[idx], cross_entropy).double()
        gq = brute_force_grads(model, names, xq, yq, cross_entropy).double()
        self_ref[idx] += lr * g.pow(2).sum(1)
        scores_ref[idx] += lr * g @ gq.T
    return self_ref, scores_ref


def fit(tmp_path, model, callbacks, epochs=2, ckpt_path=None, **kw):
    base = dict(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer = L.Trainer(callbacks=callbacks, **{**base, **kw})
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer


QUERY = data(3, seed=7)


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("selection", [dict(last_layer=True), dict(module_types=["Linear"], proj_dim=None)])
def test_in_step_tracin_equals_a_brute_force_loop_over_the_steps(tmp_path, accumulate, reduction, selection):
    query = IndexedDataset(TensorDataset(*QUERY))
    cb = TracIn(in_step=True, loss_reduction=reduction, query_data=query, num_queries=3, **selection)
    assert isinstance(cb, InStepTracIn)
    rec = StepRecorder()
    fit(tmp_path, MLP(reduction=reduction), [rec, cb], accumulate_grad_batches=accumulate)
    steps = sorted({s for s, *_ in rec.batches})
    assert len(steps) == (4 if accumulate == 1 else 2) * 2  # 4 micro-batches per epoch (4 + 4 + 4 + 1), 2 epochs
    names = ["net.2.weight", "net.2.bias"] if selection.get("last_layer") else [n for n, _ in MLP().named_parameters()]
    self_ref, scores_ref = brute_force(rec, QUERY, names)
    torch.testing.assert_close(cb.self_influence.double(), self_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(cb.scores().double(), scores_ref, rtol=1e-4, atol=1e-7)
    top = cb.topk(k=2)
    torch.testing.assert_close(top.proponents.indices, scores_ref.T.topk(2).indices)
    with pytest.raises(ValueError, match="tracked during training"):
        cb.scores(query)


def test_training_is_bit_identical_with_in_step_tracin(tmp_path):
    runs = []
    for callbacks in ([], [TracIn(in_step=True, module_types=["Linear"], proj_dim=8, num_queries=0)]):
        L.seed_everything(0)
        model = MLP()
        fit(tmp_path, model, callbacks, accumulate_grad_batches=2)
        runs.append((model.state_dict(), torch.rand(3)))
    for k, v in runs[0][0].items():
        assert torch.equal(v, runs[1][0][k]), k
    assert torch.equal(runs[0][1], runs[1][1])


def test_in_step_two_ddp_processes_equal_one_fed_the_same_global_batches(tmp_path):
    """12 examples: one process in batches of 4 and two processes in batches of 2 (rank r gets r, r + 2, ...) see
    the same global batches and take the same steps; each rank's contributions reach every rank."""
    results = []
    for devices, batch_size in ((1, 4), (2, 2)):
        folder = tmp_path / f"d{devices}"
        kw = dict(strategy="ddp_fork") if devices == 2 else {}
        cb = TracIn(in_step=True, last_layer=True, dirpath=str(folder), num_queries=2,
                    query_data=IndexedDataset(TensorDataset(*QUERY)))
        fit(tmp_path, MLP(n=12, batch_size=batch_size), [cb], devices=devices, use_distributed_sampler=False, **kw)
        loaded = TracIn.load(str(folder), MLP())
        results.append((loaded.self_influence(), loaded.tracked_scores()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-7)
    assert bool((results[0][0] > 0).all())  # every example was seen


def test_resumed_in_step_fit_ends_with_the_uninterrupted_results(tmp_path):
    whole = TracIn(in_step=True, last_layer=True, num_queries=0)
    fit(tmp_path / "w", MLP(), [whole], epochs=3)
    first = TracIn(in_step=True, last_layer=True, num_queries=0)
    trainer = fit(tmp_path / "r", MLP(), [first], epochs=1)
    ckpt = str(tmp_path / "r.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = TracIn(in_step=True, last_layer=True, num_queries=0)
    fit(tmp_path / "r", MLP(), [resumed], epochs=3, ckpt_path=ckpt)
    torch.testing.assert_close(resumed.self_influence, whole.self_influence, rtol=1e-5, atol=1e-8)


class WithNorm(MLP):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))


def test_in_step_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="every_n_steps"):
        TracIn(in_step=True, every_n_steps=2)
    with pytest.raises(ValueError, match="group_by"):
        TracIn(in_step=True, group_by="class")
    with pytest.raises(ValueError, match="loss_reduction"):
        TracIn(in_step=True, loss_reduction="none")
    with pytest.raises(ValueError, match="Linear / Conv2d"):  # all trainable parameters include the LayerNorm's
        fit(tmp_path, WithNorm(), [TracIn(in_step=True, num_queries=0)], epochs=1)


def test_in_step_under_bf16_mixed_precision_is_close_to_the_float32_loop(tmp_path):
    """Autocast runs the Linear layers in bf16, so taps are bf16: ~3 significant digits."""
    cb = TracIn(in_step=True, module_types=["Linear"], proj_dim=None, num_queries=0)
    rec = StepRecorder()
    fit(tmp_path, MLP(), [rec, cb], precision="bf16-mixed")
    self_ref, _ = brute_force(rec, QUERY, [n for n, _ in MLP().named_parameters()])
    torch.testing.assert_close(cb.self_influence.double(), self_ref, rtol=5e-2, atol=1e-3)
