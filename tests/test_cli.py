"""The shipped configs run through the ``lightning-attr`` LightningCLI (shrunk to tiny models and few steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RESNET, TINY_VIT

from lightning_attr.cli import build_cli
from lightning_attr.io import load_tensors

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CALLBACKS = Path(__file__).resolve().parents[1] / "callbacks"
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def small_data(prefix: str) -> list[str]:
    return [f"--data.{prefix}image_size", "16", f"--data.{prefix}batch_size", "8"]


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "lightning_attr.cli", "--help"], capture_output=True, text=True, check=True)
    assert "fit" in out.stdout and "test" in out.stdout and "predict" in out.stdout


@pytest.mark.parametrize(
    "classifier, explainer, kwargs",
    [("digits_classifier_vit.yaml", "digits_shapley_vit.yaml", TINY_VIT),
     ("digits_classifier_resnet.yaml", "digits_banzhaf_resnet.yaml", TINY_RESNET)],
)
def test_two_stage_configs_fit_and_test(tmp_path, classifier, explainer, kwargs):
    weights = str(tmp_path / "classifier.safetensors")
    build_cli(["fit", "--config", str(CONFIGS / classifier), *FAST, *small_data("init_args."),
               "--model.init_args.image_size", "16", "--model.init_args.model_kwargs", json.dumps(kwargs),
               "--model.init_args.export_path", weights, "--trainer.default_root_dir", str(tmp_path / "c")])
    assert os.path.isfile(weights)
    common = ["--config", str(CONFIGS / explainer), *small_data("init_args.datamodule.init_args."),
              "--model.init_args.image_size", "16", "--model.init_args.classifier_kwargs", json.dumps(kwargs),
              "--model.init_args.classifier_weights", weights, "--model.init_args.head_dim", "16",
              "--data.init_args.test_size", "3", "--data.init_args.cache_dir", str(tmp_path / "cache"),
              "--trainer.default_root_dir", str(tmp_path / "e")]
    cli = build_cli(["fit", *common, *FAST, "--trainer.callbacks+=" + str(CALLBACKS / "heatmaps.yaml"),
                     "--trainer.callbacks.every_n_epochs=1"])
    assert cli.model.scale > 0
    assert os.path.isfile(cli.trainer.checkpoint_callback.best_model_path)
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert {"test/mse", "test/pearson", "test/spearman", "test/sign_agreement"} <= set(metrics)
    heatmaps = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "AttributionHeatmaps"]
    assert heatmaps and os.path.isfile(heatmaps[0].paths[-1])
    # `predict` with the config's AttributionWriter saves the explainer's attributions of the 3 test images.
    best = cli.trainer.checkpoint_callback.best_model_path
    pred = build_cli(["predict", *common, *FAST, "--ckpt_path", best])
    runs = sorted((tmp_path / "e" / "lightning_attr_runs").iterdir())
    tensors, _ = load_tensors(str(runs[-1] / "predictions.safetensors"))
    test = pred.datamodule.datamodule.splits["test"]
    x = torch.stack([test[i]["image"] for i in range(3)])
    assert tensors["index"].tolist() == [0, 1, 2]
    torch.testing.assert_close(tensors["attributions"], pred.model.eval()(x))


def test_every_run_keeps_its_own_config(tmp_path):
    """Without a logger, two fits in one root save two configs (each run's own folder), not one overwritten file."""
    for seed in (1, 2):
        build_cli(["fit", "--config", str(CONFIGS / "digits_classifier_resnet.yaml"), *FAST, *small_data("init_args."),
                   "--model.init_args.image_size", "16", "--model.init_args.model_kwargs", json.dumps(TINY_RESNET),
                   "--model.init_args.export_path", str(tmp_path / "w.safetensors"), "--seed_everything", str(seed),
                   "--trainer.default_root_dir", str(tmp_path)])
    configs = sorted(tmp_path.glob("lightning_attr_runs/version_*/config.yaml"))
    assert [c.parent.name for c in configs] == ["version_0", "version_1"]
    assert [yaml.safe_load(c.read_text())["seed_everything"] for c in configs] == [1, 2]
    assert not (tmp_path / "config.yaml").exists()


def test_package_callbacks_have_short_names():
    """`--trainer.callbacks+=TracIn` and `--trainer.callbacks.help TracIn` work like Lightning's own short names, in a
    fresh process where nothing but the console script imported the package."""
    script = (
        "from lightning_attr.cli import build_cli, main\n"
        f"cli = build_cli(['--config', {str(CONFIGS / 'digits_classifier_resnet.yaml')!r},"
        " '--trainer.callbacks+=TracIn', '--trainer.callbacks+=AttributionWriter'], run=False)\n"
        "print('built', sorted(type(cb).__name__ for cb in cli.trainer.callbacks))\n"
        "main(['fit', '--trainer.callbacks.help', 'TracIn'])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'AttributionWriter'" in out.stdout and "'TracIn'" in out.stdout
    assert "--trainer.callbacks.every_n_epochs" in out.stdout


def test_lime_config_parses_and_builds(tmp_path):
    from lightning_attr import create_timm_model
    from lightning_attr.modules import save_timm_weights

    weights = str(tmp_path / "vit.safetensors")
    save_timm_weights(create_timm_model("vit_tiny_patch16_224", num_classes=10, **TINY_VIT), weights)
    cli = build_cli(["--config", str(CONFIGS / "digits_lime_vit.yaml"), "--model.init_args.image_size", "16",
                     "--model.init_args.classifier_kwargs", json.dumps(TINY_VIT),
                     "--model.init_args.classifier_weights", weights], run=False)
    assert cli.datamodule.estimator.name == "lime" and not cli.model.hparams.efficiency
    assert cli.model(torch.randn(2, 3, 16, 16)).shape == (2, 4, 10)


def test_noisy_label_config_with_the_tracin_and_trak_specs(tmp_path):
    cli = build_cli(["fit", "--config", str(CONFIGS / "digits_noisy_resnet.yaml"), *FAST, *small_data("init_args."),
                     "--model.init_args.image_size", "16", "--model.init_args.model_kwargs", json.dumps(TINY_RESNET),
                     "--trainer.callbacks+=" + str(CALLBACKS / "trak.yaml"), "--trainer.callbacks.proj_dim=64",
                     "--trainer.callbacks.noisy_labels=noisy_mask", "--data.init_args.val_fraction", "0.8",
                     "--trainer.default_root_dir", str(tmp_path)])
    assert float(cli.datamodule.noisy_mask.float().mean()) == pytest.approx(0.1, abs=0.01)
    found = {cb.prefix: cb for cb in cli.trainer.callbacks if hasattr(cb, "self_influence")}
    assert set(found) == {"tracin", "tracin_last_layer", "tracin_in_step", "influence_function", "trak"}
    for prefix, cb in found.items():
        assert cb.self_influence.shape == (len(cli.datamodule.splits["train"]),)
        assert 0 <= cb.metrics[f"{prefix}/noisy_label_auc"] <= 1
    # without a logger the results go to a fresh per-run folder (issue 8), never straight into default_root_dir
    assert found["tracin"].directory == str(tmp_path / "lightning_attr_runs" / "version_0" / "tracin")
    assert (Path(found["tracin"].directory) / "checkpoints.json").is_file()


def test_tracin_spec_parses():
    cli = build_cli(["--config", str(CONFIGS / "digits_classifier_resnet.yaml"),
                     "--trainer.callbacks+=" + str(CALLBACKS / "tracin.yaml"), "--trainer.callbacks.last_layer=true"],
                    run=False)
    tracin = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "TracIn"]
    assert len(tracin) == 1 and tracin[0].gradients["last_layer"]


def test_ggda_config_runs(tmp_path):
    cli = build_cli(["fit", "--config", str(CONFIGS / "digits_ggda_noisy.yaml"), *FAST, *small_data("init_args."),
                     "--model.init_args.image_size", "16", "--model.init_args.model_kwargs", json.dumps(TINY_RESNET),
                     "--data.init_args.val_fraction", "0.8", "--trainer.default_root_dir", str(tmp_path)])
    found = {cb.prefix: cb for cb in cli.trainer.callbacks if hasattr(cb, "group_self_influence")}
    assert set(found) == {"tracin_grouped", "trak_grouped"}
    for prefix, cb in found.items():
        assert cb.groups.assignment.shape == (len(cli.datamodule.splits["train"]),)
        assert cb.group_self_influence.shape == (cb.groups.num_groups,)
        assert 0 <= cb.metrics[f"{prefix}/noisy_recall_at_10pct"] <= 1


def test_influence_function_spec_parses():
    cli = build_cli(["--config", str(CONFIGS / "digits_classifier_resnet.yaml"),
                     "--trainer.callbacks+=" + str(CALLBACKS / "influence_function.yaml")], run=False)
    found = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InfluenceFunction"]
    assert len(found) == 1 and found[0].method.settings["strategy"] == "ekfac"
    assert found[0].gradients["module_types"] == ["Linear", "Conv2d"] and found[0].schedule.at_fit_end


def test_dtda_config_and_the_reverse_mode_spec_parse():
    """configs/digits_dtda.yaml builds reverse-mode UnrolledDifferentiation on SplitLosses(num=8) over an SGD
    Classifier; callbacks/unrolled.yaml switched to reverse mode from the command line parses to the same."""
    from lightning_attr.distributional import SplitLosses

    cli = build_cli(["--config", str(CONFIGS / "digits_dtda.yaml")], run=False)
    (ud,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "UnrolledDifferentiation"]
    assert ud.reverse is not None and ud.reverse.every == 32 and ud.examples is None
    assert isinstance(ud.measurement, SplitLosses) and ud.measurement.split == "val"
    assert ud.measurement.indices == tuple(range(8))
    assert cli.model.hparams.optimizer == "sgd" and cli.model.hparams.mask_prob == 0
    assert cli.trainer.precision == "32-true" and cli.config["seed_everything"] == 0
    spec = build_cli(["--config", str(CONFIGS / "digits_classifier_resnet.yaml"), "--model.init_args.optimizer=sgd",
                      "--trainer.callbacks+=" + str(CALLBACKS / "unrolled.yaml"), "--trainer.callbacks.examples=null",
                      "--trainer.callbacks.measurements={class_path: lightning_attr.distributional.SplitLosses, "
                      "init_args: {num: 8}}"], run=False)
    (ud,) = [cb for cb in spec.trainer.callbacks if type(cb).__name__ == "UnrolledDifferentiation"]
    assert ud.reverse is not None and isinstance(ud.measurement, SplitLosses) and len(ud.measurement.names) == 8
    forward = build_cli(["--config", str(CONFIGS / "digits_classifier_resnet.yaml"),
                         "--trainer.callbacks+=" + str(CALLBACKS / "unrolled.yaml")], run=False)
    (ud,) = [cb for cb in forward.trainer.callbacks if type(cb).__name__ == "UnrolledDifferentiation"]
    assert ud.examples == tuple(range(8)) and ud.reverse is None


@pytest.mark.parametrize("config, options", [
    ("digits_distributional_shapley.yaml", ["--data.init_args.estimator_options", '{"cardinality": [0, 5]}']),
    ("digits_data_shapley.yaml", []),
    ("digits_data_banzhaf.yaml", ["--data.init_args.num_samples", "8"]),
])
def test_valuation_configs_fit_test_and_predict(tmp_path, config, options):
    """Each valuation config trains on its labels, tests against its ground truth and writes every point's values."""
    common = ["--config", str(CONFIGS / config), "--data.init_args.source.init_args.num_train", "40",
              "--data.init_args.test_size", "4", "--data.init_args.test_num_samples", "2",
              "--data.init_args.val_size", "8", "--data.init_args.cache_dir", str(tmp_path / "cache"),
              "--trainer.default_root_dir", str(tmp_path / "v"), *options]
    cli = build_cli(["fit", *common, *FAST])
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert {"test/mse", "test/pearson", "test/spearman", "test/sign_agreement"} <= set(metrics)
    build_cli(["predict", *common, *FAST, "--ckpt_path", cli.trainer.checkpoint_callback.best_model_path])
    runs = sorted((tmp_path / "v" / "lightning_attr_runs").iterdir())
    tensors, _ = load_tensors(str(runs[-1] / "predictions.safetensors"))
    assert tensors["index"].tolist() == list(range(40)) and tensors["all_values"].shape == (40, 10)
