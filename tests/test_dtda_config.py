"""The d-TDA path from a config: ``Classifier(optimizer="sgd")`` (and AdamW unchanged), measurements on items of a
data split (``SplitLosses`` / ``SplitLogits``) bound to the right examples, and ``lightning-attr dtda`` end to end on a
tiny version of ``configs/digits_dtda.yaml`` (two seeds, per-seed results, the aggregate)."""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RESNET
from torch.utils.data import DataLoader, TensorDataset

from lightning_attr import Classifier, ImageDataModule, create_timm_model
from lightning_attr.callbacks import UnrolledDifferentiation
from lightning_attr.callbacks.context import split_datasets
from lightning_attr.cli import main
from lightning_attr.distributional import (
    DistributionalInfluence,
    QueryLogits,
    QueryLosses,
    SeedEnsemble,
    SplitLogits,
    SplitLosses,
    as_measurement,
)
from lightning_attr.distributional.results import read_run_result
from lightning_attr.io import load_tensors

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits_dtda.yaml"
STEPS, LR, WD, WARMUP = 20, 0.1, 0.01, 0.1


# --------------------------------------------------------------------------------------- Classifier's optimizer
def configured(**kw):
    """A tiny Classifier's ``configure_optimizers()`` under a stand-in trainer of ``STEPS`` optimizer steps."""
    model = Classifier("resnet18", model_kwargs=TINY_RESNET, image_size=16, mask_prob=0.0, lr=LR, weight_decay=WD,
                       warmup_fraction=WARMUP, **kw)
    model.trainer = SimpleNamespace(estimated_stepping_batches=STEPS)
    return model, model.configure_optimizers()


def learning_rates(config) -> list[float]:
    """The learning rate of each of ``STEPS`` optimizer steps (the scheduler stepped after each, as Lightning does)."""
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: nothing moves
        scheduler.step()
    return rates


def factor(step: int) -> float:
    """The schedule as written before the optimizer choice: linear warm-up over the first 10% of the steps (2 here),
    then a half cosine to 0 at the last step."""
    warmup = max(1, int(WARMUP * STEPS))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, STEPS - warmup))))


def expected_rates() -> list[float]:
    return [LR * factor(t) for t in range(STEPS)]


def test_sgd_classifier_builds_sgd_with_momentum_on_the_cosine_schedule():
    model, config = configured(optimizer="sgd")
    optimizer = config["optimizer"]
    assert type(optimizer) is torch.optim.SGD and config["lr_scheduler"]["interval"] == "step"
    (group,) = optimizer.param_groups
    assert (group["momentum"], group["weight_decay"], group["dampening"], group["nesterov"]) == (0.9, WD, 0, False)
    assert [id(p) for p in group["params"]] == [id(p) for p in model.model.parameters()]
    assert learning_rates(config) == pytest.approx(expected_rates(), rel=1e-12, abs=1e-15)
    _, half = configured(optimizer="sgd", momentum=0.5)
    assert half["optimizer"].param_groups[0]["momentum"] == 0.5


def test_adamw_stays_the_default_and_trains_bit_identically():
    """The default builds AdamW exactly as before (decoupled weight decay, torch's defaults otherwise), on the same
    schedule as SGD, and three steps with it equal three steps with the optimizer and schedule written out by hand."""
    model, config = configured()
    assert model.hparams.optimizer == "adamw"
    optimizer = config["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"], group["amsgrad"]) == \
        (pytest.approx(LR / 2), WD, (0.9, 0.999), 1e-8, False)  # lr: first warm-up step of 2
    assert learning_rates(config) == pytest.approx(expected_rates(), rel=1e-12, abs=1e-15)

    torch.manual_seed(0)
    model, config = configured()
    reference = copy.deepcopy(model)
    by_hand = torch.optim.AdamW(list(reference.model.parameters()), lr=LR, weight_decay=WD)
    schedule = torch.optim.lr_scheduler.LambdaLR(by_hand, factor)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    for m, opt, sched in ((model, config["optimizer"], config["lr_scheduler"]["scheduler"]),
                          (reference, by_hand, schedule)):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
            sched.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_bad_optimizer_or_momentum_is_refused():
    with pytest.raises(ValueError, match=r"`optimizer`='adam' is not one of \['adamw', 'sgd'\]"):
        Classifier("resnet18", model_kwargs=TINY_RESNET, optimizer="adam")
    with pytest.raises(ValueError, match=r"`momentum` must be a number in \[0, 1\)"):
        Classifier("resnet18", model_kwargs=TINY_RESNET, optimizer="sgd", momentum=1.5)


def test_unrolled_differentiation_refuses_the_adamw_classifier(tmp_path):
    items = [{"image": torch.randn(3, 16, 16), "label": i % 10, "index": i} for i in range(8)]
    model = Classifier("resnet18", model_kwargs=TINY_RESNET, image_size=16, mask_prob=0.0)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[UnrolledDifferentiation(examples=[0], seed=0, dirpath=str(tmp_path / "u"))])
    with pytest.raises(ValueError, match=r"is AdamW; .*supports torch.optim.SGD.*set `optimizer: sgd`"):
        trainer.fit(model, DataLoader(items, batch_size=4))


# --------------------------------------------------------------------------------------- split measurements
@pytest.fixture(scope="module")
def digits():
    dm = ImageDataModule("digits", image_size=16, batch_size=8)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = create_timm_model("resnet18", num_classes=10, **TINY_RESNET).eval()
    return model, {n: p.detach() for n, p in model.named_parameters()}


def stacked(dataset, indices):
    return (torch.stack([dataset[i]["image"] for i in indices]),
            torch.tensor([dataset[i]["label"] for i in indices]))


def test_split_losses_bind_the_split_items_and_equal_query_losses(digits, tiny_model):
    model, params = tiny_model
    val = digits.splits["val"]
    first = SplitLosses(num=3)
    assert first.names == ("val[0]/loss", "val[1]/loss", "val[2]/loss") and first.splits == ("val",)
    with pytest.raises(RuntimeError, match=r"no queries yet: call `.bind\(\{'val': dataset\}\)`"):
        first(model, params)
    first.bind(digits.splits)
    x, y = stacked(val, [0, 1, 2])
    assert torch.equal(first.inputs, x) and torch.equal(first.labels, y)

    chosen = SplitLosses(indices=[5, 2, 11])
    chosen.bind({"val": val})
    x, y = stacked(val, [5, 2, 11])
    assert torch.equal(chosen.inputs, x) and torch.equal(chosen.labels, y)
    assert chosen.names == ("val[5]/loss", "val[2]/loss", "val[11]/loss")
    with torch.no_grad():
        got = chosen(model, params)
        assert torch.equal(got, QueryLosses(x, y)(model, params))
        torch.testing.assert_close(got, F.cross_entropy(model(x), y, reduction="none"))


def test_split_logits_take_each_querys_own_label(digits, tiny_model):
    model, params = tiny_model
    logits = SplitLogits(split="test", indices=[4, 0])
    logits.bind(digits.splits)
    x, y = stacked(digits.splits["test"], [4, 0])
    with torch.no_grad():
        got = logits(model, params)
        assert torch.equal(got, QueryLogits(x, y)(model, params))
        torch.testing.assert_close(got, model(x)[torch.arange(2), y])
    assert logits.names == ("test[4]/logit", "test[0]/logit")


def test_a_list_binds_every_part_and_tuple_items_work(digits, tiny_model):
    model, params = tiny_model
    both = as_measurement([SplitLosses(num=2), SplitLogits(split="test", num=2)])
    assert both.splits == ("val", "test")
    both.bind(split_datasets(digits, both.splits))
    with torch.no_grad():
        assert both(model, params).shape == (4,)
    assert both.names == ("val[0]/loss", "val[1]/loss", "test[0]/logit", "test[1]/logit")
    x, y = torch.randn(5, 3, 16, 16), torch.arange(5)
    pairs = SplitLosses(split="mine", indices=[3, 1])
    pairs.bind({"mine": TensorDataset(x, y)})  # (x, y) items: unpacked by position
    assert torch.equal(pairs.inputs, x[[3, 1]]) and torch.equal(pairs.labels, y[[3, 1]])


def test_split_measurements_refuse_bad_input(digits):
    for kw, match in ((dict(num=0), "`num` must be an int >= 1"), (dict(indices=[-1]), "`indices` must be"),
                      (dict(indices=[]), "`indices` must be"), (dict(indices=[1.5]), "`indices` must be"),
                      (dict(indices=[2, 2]), r"`indices` repeat \[2\]"), (dict(split=""), "`split` must be"),
                      (dict(loss="hinge"), "`loss`='hinge' is not one of")):
        with pytest.raises(ValueError, match=match):
            SplitLosses(**kw)
    with pytest.raises(ValueError, match=r"takes its queries from the split 'dev', but the data has the splits "
                                         r"\['test', 'train', 'val'\]"):
        SplitLosses(split="dev").bind(digits.splits)
    n = len(digits.splits["val"])
    with pytest.raises(ValueError, match=rf"`indices` \[{n}\] .* out of range: the split 'val' has {n} items"):
        SplitLosses(indices=[0, n]).bind(digits.splits)
    with pytest.raises(ValueError, match=r"data split\(s\) \['dev'\], but the datamodule \(ImageDataModule\) has "
                                         r"\['test', 'train', 'val'\]"):
        split_datasets(digits, ["val", "dev"])


# --------------------------------------------------------------------------------------- `lightning-attr dtda`
TINY = ["--trainer.accelerator=cpu", "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--model.init_args.image_size=16", "--model.init_args.model_kwargs=" + json.dumps(TINY_RESNET),
        "--data.init_args.image_size=16", "--data.init_args.batch_size=8",
        "--model.init_args.export_path={seed_dir}/weights.safetensors"]


def test_dtda_command_runs_the_config_end_to_end(tmp_path, capsys, digits, monkeypatch):
    """Two seeds of the shipped config (shrunk: 3 steps of 8 examples), one after the other: each seed's result holds
    every training example x the 8 validation losses, its values are those losses at the seed's exported weights, at
    most the 24 examples it trained on have a change, and the saved aggregate equals the one built from the seed
    folders."""
    root = tmp_path / "dtda"
    start = time.perf_counter()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    main(["dtda", "--config", str(CONFIG), "--seeds", "0-1", "--root", str(root), "--wandb_project", "attr-test",
          *TINY])
    print(f"lightning-attr dtda, 2 tiny seeds: {time.perf_counter() - start:.1f}s")
    out = capsys.readouterr().out
    assert "[dtda] seed 0: done" in out and "[dtda] seed 1: done" in out and "aggregate of seeds [0, 1]" in out
    assert "W&B run of the aggregate (group dtda)" in out
    assert len(list(root.glob("wandb/offline-run-*/files/media/table/dtda/influence*.table.json"))) == 1
    folders = SeedEnsemble(str(CONFIG), [0, 1], str(root), extra_args=TINY, progress=False).result_folders("unrolled")
    n, names = len(digits.splits["train"]), tuple(f"val[{i}]/loss" for i in range(8))
    x, y = stacked(digits.splits["val"], range(8))
    for seed, folder in zip((0, 1), folders):
        result = read_run_result(folder)
        assert (result.method, result.seed, result.measurements) == ("unrolled-reverse", seed, names)
        assert torch.equal(result.examples, torch.arange(n)) and result.change.shape == (n, 8)
        assert 0 < int((result.change != 0).any(1).sum()) <= 3 * 8
        model = create_timm_model("resnet18", weights_file=str(root / f"seed_{seed:04d}" / "weights.safetensors"),
                                  num_classes=10, **TINY_RESNET).eval()
        with torch.no_grad():
            losses = F.cross_entropy(model(x), y, reduction="none")
        torch.testing.assert_close(result.value, losses.double(), rtol=1e-5, atol=1e-6)
    saved_tensors, _ = load_tensors(str(root / "aggregate" / "dtda_aggregate.safetensors"))
    saved = DistributionalInfluence.load(str(root / "aggregate"))
    fresh = DistributionalInfluence.from_runs(folders)
    assert (saved.seeds, saved.measurements, saved.method) == ([0, 1], names, "unrolled-reverse")
    assert not torch.equal(fresh.x[0], fresh.x[1])  # two seeds, two models, the same 8 queries
    for name, fn in (("mean", fresh.mean_influence), ("variance", fresh.variance_influence),
                     ("wasserstein", fresh.wasserstein_influence)):
        torch.testing.assert_close(saved_tensors[name], fn(), rtol=0, atol=0)
    for name in ("x", "g", "examples"):
        torch.testing.assert_close(getattr(saved, name), getattr(fresh, name), rtol=0, atol=0)
