"""d-TDA seed ensembles and the aggregator: seeds, resumable per-seed runs of the real CLI (tiny digits classifier,
fresh processes), failure reports, and distributional influence stacked from per-seed result files."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lightning_attr.cli import main
from lightning_attr.distributional import (
    DistributionalInfluence,
    SeedEnsemble,
    mean_influence,
    parse_seeds,
    quantile_influence,
    variance_influence,
    wasserstein_influence,
)
from lightning_attr.distributional.ensemble import write_done
from lightning_attr.distributional.results import RunResult, write_run_result
from lightning_attr.io import CorruptArtifactError, sha256_file

TINY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                "enable_progress_bar": False, "enable_model_summary": False, "logger": False},
    "model": {"class_path": "lightning_attr.Classifier",
              "init_args": {"model_name": "resnet18", "num_classes": 10, "image_size": 16, "patch_size": 8,
                            "model_kwargs": {"channels": [8, 8, 8, 8], "layers": [1, 1, 1, 1], "stem_width": 8}}},
    "data": {"class_path": "lightning_attr.ImageDataModule",
             "init_args": {"dataset": "digits", "image_size": 16, "batch_size": 8}},
}
# per seed: its own exported weights; batch size = the seed, so seed 0 fails (batch_size must be >= 1) and the others run
EXTRA = ["--model.init_args.export_path={seed_dir}/weights.safetensors", "--data.init_args.batch_size={seed}"]


def write_config(folder) -> str:
    path = os.path.join(folder, "tiny.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(TINY_CONFIG, f)
    return path


def text(path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------------------------- seeds and input
def test_parse_seeds():
    assert parse_seeds("0-15") == list(range(16))
    assert parse_seeds("0,3,5") == [0, 3, 5]
    assert parse_seeds("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_seeds(" 7 ") == [7] and parse_seeds("2 - 4, 9") == [2, 3, 4, 9]
    for bad in ["", "a", "1,,2", "-1", "3-", "1.5"]:
        with pytest.raises(ValueError, match="not a seed or a range"):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="runs backwards; write 3-5"):
        parse_seeds("5-3")
    with pytest.raises(ValueError, match=r"seeds that collide: \[2, 3\]"):
        parse_seeds("0-3,2,3")


def test_seed_ensemble_refuses_bad_input(tmp_path):
    config, root = write_config(tmp_path), str(tmp_path / "root")
    with pytest.raises(ValueError, match=r"seeds that collide: \[1\]"):
        SeedEnsemble(config, [1, 2, 1], root)
    with pytest.raises(ValueError, match="seeds that collide"):
        SeedEnsemble(config, "0-2,1", root)
    for seeds in ([], [-1], [1.5], [True], [2**32]):
        with pytest.raises(ValueError, match="`seeds`"):
            SeedEnsemble(config, seeds, root)
    with pytest.raises(ValueError, match="`backend` must be one of"):
        SeedEnsemble(config, [0, 1], root, backend="slurm")
    with pytest.raises(ValueError, match="needs backend='processes' or 'ray'"):
        SeedEnsemble(config, [0, 1], root, max_parallel=2)
    with pytest.raises(ValueError, match="`max_parallel` must be an integer >= 1"):
        SeedEnsemble(config, [0, 1], root, backend="processes", max_parallel=0)
    with pytest.raises(ValueError, match="the ensemble sets"):
        SeedEnsemble(config, [0, 1], root, extra_args=["--seed_everything=3"])
    with pytest.raises(ValueError, match="the ensemble sets"):
        SeedEnsemble(config, [0, 1], root, extra_args=["--trainer.default_root_dir", "x"])
    with pytest.raises(ValueError, match="split it"):
        SeedEnsemble(config, [0, 1], root, extra_args="--trainer.max_epochs=2")
    with pytest.raises(FileNotFoundError, match="no_such.yaml"):
        SeedEnsemble(str(tmp_path / "no_such.yaml"), [0, 1], root)
    assert not os.path.exists(root)  # nothing is created before run()


def test_ray_backend_without_ray_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(ImportError, match=r"pip install ray.*backend='processes'"):
        SeedEnsemble(write_config(tmp_path), [0, 1], str(tmp_path / "root"), backend="ray")


def test_args_fill_placeholders_per_seed(tmp_path):
    config = write_config(tmp_path)
    ens = SeedEnsemble([config, config], [3, 12], str(tmp_path / "r"), extra_args=EXTRA)
    folder = str(tmp_path / "r" / "seed_0012")
    assert ens.folder(12) == folder
    assert ens.args(12) == ["--config", config, "--config", config, "--seed_everything", "12",
                            "--trainer.default_root_dir", folder,
                            f"--model.init_args.export_path={folder}/weights.safetensors",
                            "--data.init_args.batch_size=12"]


# ----------------------------------------------------------------------------------------------- the aggregator
def synthetic_runs(root, seeds=(11, 3, 7, 0, 5), examples=(40, 2, 17, 9, 31, 5), prefix="unrolled",
                   method="unrolled-forward", measurements=("loss/q0", "loss/q1")):
    """Per-seed result files of S=len(seeds) seeds; returns the folders and the (x, g) they hold (rows in seed order
    of ``seeds``, examples sorted as write_run_result stores them)."""
    gen = torch.Generator().manual_seed(0)
    s, k, q = len(seeds), len(examples), len(measurements)
    x = torch.randn(s, q, generator=gen, dtype=torch.float64)
    g = torch.randn(s, k, q, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 2, k).view(1, k, 1).double()
    folders = []
    for i, seed in enumerate(seeds):
        folder = os.path.join(root, f"seed_{seed:04d}")
        write_run_result(os.path.join(folder, prefix), RunResult(torch.tensor(examples), x[i], g[i], method, seed,
                                                                 measurements))
        folders.append(folder)
    order = torch.tensor(examples).argsort()
    return folders, x, g[:, order]


def test_aggregate_matches_the_statistics(tmp_path):
    folders, x, g = synthetic_runs(str(tmp_path))
    inf = DistributionalInfluence.from_runs(folders, prefix="unrolled")
    assert inf.seeds == [11, 3, 7, 0, 5] and inf.measurements == ("loss/q0", "loss/q1")
    assert inf.examples.tolist() == [2, 5, 9, 17, 31, 40] and inf.method == "unrolled-forward"
    torch.testing.assert_close(inf.mean_influence(), mean_influence(x, g))
    torch.testing.assert_close(inf.variance_influence(), variance_influence(x, g))
    torch.testing.assert_close(inf.variance_influence(unbiased=False), variance_influence(x, g, unbiased=False))
    torch.testing.assert_close(inf.wasserstein_influence(), wasserstein_influence(x, g))
    torch.testing.assert_close(inf.quantile_influence(0.9), quantile_influence(x, g, 0.9))
    torch.testing.assert_close(inf.quantile_influence([0.1, 0.5]), quantile_influence(x, g, [0.1, 0.5]))
    # the mean by hand: mean over seeds of the predicted change
    torch.testing.assert_close(inf.mean_influence()[3, 1], g[:, 3, 1].mean())
    # folders without a prefix: the result files themselves
    direct = DistributionalInfluence.from_runs([os.path.join(f, "unrolled") for f in folders])
    torch.testing.assert_close(direct.g, inf.g)


def test_the_aggregate_is_logged_to_an_offline_wandb_run(tmp_path, monkeypatch):
    """The per-example table (one row per example, mean / variance / W2 per measurement) and the plot land in an
    offline W&B run."""
    pytest.importorskip("wandb")
    from lightning_attr.distributional.reporting import log_to_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folders, _, _ = synthetic_runs(str(tmp_path))
    inf = DistributionalInfluence.from_runs(folders, prefix="unrolled")
    log_to_wandb(inf, "lightning-attr-test", "ens", save_dir=str(tmp_path))
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    (table,) = list(run.glob("files/media/table/dtda/influence*.table.json"))
    content = json.loads(table.read_text())
    assert content["columns"] == list(inf.table()[0]) and len(content["data"]) == inf.num_examples
    assert content["data"][0] == pytest.approx(list(inf.table()[0].values()))
    assert len(list(run.glob("files/media/images/dtda/distribution*.png"))) == 1


def test_top_k_and_table(tmp_path):
    folders, x, g = synthetic_runs(str(tmp_path))
    inf = DistributionalInfluence.from_runs(folders, prefix="unrolled")
    for statistic in ("mean", "variance", "wasserstein", "quantile"):
        values = inf.statistic(statistic, q=0.25)[:, 1]
        key = values if statistic == "wasserstein" else values.abs()
        expected = sorted(range(6), key=lambda j: -float(key[j]))[:3]
        examples, top = inf.top_k(statistic, 3, measurement="loss/q1", q=0.25)
        assert examples.tolist() == [inf.examples.tolist()[j] for j in expected]
        torch.testing.assert_close(top, values[expected])
    assert inf.top_k("mean", 6)[0].numel() == 6
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 6\]"):
        inf.top_k("mean", 7)
    with pytest.raises(ValueError, match="`statistic` must be one of"):
        inf.top_k("median", 2)
    with pytest.raises(ValueError, match="`measurement` must be"):
        inf.top_k("mean", 2, measurement="loss/q9")
    rows = inf.table()
    assert len(rows) == 6 and list(rows[0]) == ["example", "mean/loss/q0", "variance/loss/q0", "wasserstein/loss/q0",
                                                "mean/loss/q1", "variance/loss/q1", "wasserstein/loss/q1"]
    assert rows[2]["example"] == 9
    assert rows[2]["variance/loss/q1"] == pytest.approx(float(variance_influence(x, g)[2, 1]))
    pytest.importorskip("wandb")
    table = inf.wandb_table()
    assert table.columns == list(rows[0]) and len(table.data) == 6


def test_runs_that_disagree_are_refused(tmp_path):
    folders, _, _ = synthetic_runs(str(tmp_path / "a"))
    other, _, _ = synthetic_runs(str(tmp_path / "b"), seeds=(99, 98), examples=(40, 2, 17, 9, 31, 6))
    with pytest.raises(ValueError, match="other examples or measurements"):
        DistributionalInfluence.from_runs(folders + other[:1], prefix="unrolled")
    renamed, _, _ = synthetic_runs(str(tmp_path / "c"), seeds=(99,), measurements=("loss/q0", "acc"))
    with pytest.raises(ValueError, match="other examples or measurements"):
        DistributionalInfluence.from_runs(folders + renamed, prefix="unrolled")
    mixed, _, _ = synthetic_runs(str(tmp_path / "d"), seeds=(99,), method="influence-function")
    with pytest.raises(ValueError, match="mix methods"):
        DistributionalInfluence.from_runs(folders + mixed, prefix="unrolled")
    same_seed, _, _ = synthetic_runs(str(tmp_path / "e"), seeds=(11,))
    with pytest.raises(ValueError, match=r"share seeds \[11\]"):
        DistributionalInfluence.from_runs(folders + same_seed, prefix="unrolled")
    with pytest.raises(ValueError, match="at least two seeds"):
        DistributionalInfluence.from_runs(folders[:1], prefix="unrolled")
    with pytest.raises(CorruptArtifactError, match="missing"):
        DistributionalInfluence.from_runs(folders, prefix="influence_function")


def test_plot_save_and_load(tmp_path):
    folders, x, g = synthetic_runs(str(tmp_path))
    inf = DistributionalInfluence.from_runs(folders, prefix="unrolled")
    retrained = {17: x[:, 0] + g[:, 3, 0] + 0.01}
    path = inf.plot([17, 2, 40], measurement=0, path=str(tmp_path / "fig" / "dtda.png"), actual=retrained)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in (tmp_path / "fig").iterdir()] == ["dtda.png"]  # no temporary file left behind
    with pytest.raises(ValueError, match=r"not attributed: \[3\]"):
        inf.plot([17, 3], path=str(tmp_path / "bad.png"))
    with pytest.raises(ValueError, match="one retrained value per seed"):
        inf.plot([17], path=str(tmp_path / "bad.png"), actual=torch.zeros(1, 4))
    paths = inf.save(str(tmp_path / "aggregate"))
    back = DistributionalInfluence.load(str(tmp_path / "aggregate"))
    torch.testing.assert_close(back.g, inf.g)
    assert back.seeds == inf.seeds and back.measurements == inf.measurements and back.method == inf.method
    summary = json.loads(text(paths["summary"]))
    top = inf.top_k("variance", 6, "loss/q1")
    assert [r["example"] for r in summary["top"]["loss/q1"]["variance"]] == top[0].tolist()


def test_result_folders_follow_the_done_records(tmp_path):
    config, root = write_config(tmp_path), str(tmp_path / "root")
    ens = SeedEnsemble(config, [3, 0, 7], root)
    run = "lightning_attr_runs/version_0"
    folders, x, _ = synthetic_runs(root, seeds=(3, 0), prefix=f"{run}/unrolled")
    for seed, folder in zip((3, 0), folders):
        with open(os.path.join(folder, run, "config.yaml"), "w") as f:
            f.write(f"seed_everything: {seed}\n")
        write_done(folder, seed, ["fit"], ens.recipe, 1.0)
    assert ens.finished() == [3, 0]
    assert ens.record(0)["run_dir"] == run
    found = ens.result_folders()
    assert found == [os.path.join(f, run, "unrolled") for f in folders]
    assert ens.result_folders(prefix="unrolled") == found
    torch.testing.assert_close(DistributionalInfluence.from_runs(found).x, x)
    with pytest.raises(ValueError, match="wrote 0 distributional.safetensors files in a 'tracin' folder"):
        ens.result_folders(prefix="tracin")
    changed = os.path.join(found[1], "distributional.safetensors")
    with open(changed, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CorruptArtifactError, match="changed since seed 0 finished"):
        ens.result_folders()
    with pytest.raises(ValueError, match=r"seeds \[3, 0\] .* finished with other configs or extra args"):
        SeedEnsemble(config, [3, 0, 7], root, extra_args=["--trainer.max_epochs=2"]).run()


def test_dtda_command_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dtda", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--seeds" in out and "--backend {sequential,processes,ray}" in out and "{seed_dir}" in out


# ----------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module", autouse=True)
def one_thread_per_seed():
    """The same thread count for every backend (the ensemble passes OMP_NUM_THREADS on when set): float reductions
    over other thread counts round differently, and training amplifies that, so equal runs need equal threads."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """Seeds 4, 0, 8 of the tiny config, one after the other: 4 and 8 train, 0 fails (batch size 0)."""
    tmp = tmp_path_factory.mktemp("ensemble")
    ens = SeedEnsemble(write_config(tmp), [4, 0, 8], str(tmp / "seq"), extra_args=EXTRA)
    return ens, ens.run()


def test_sequential_seeds_write_done_and_a_failed_seed_is_reported(sequential):
    ens, report = sequential
    assert report.finished == [4, 8] and report.skipped == [] and not report.ok
    (failed,) = report.failed
    assert failed.seed == 0 and "batch_size" in failed.error and failed.log == os.path.join(ens.folder(0), "log.txt")
    assert failed.log in str(report) and os.path.isfile(failed.log)
    with pytest.raises(RuntimeError, match="seed 0: FAILED"):
        report.raise_for_failures()
    assert not os.path.exists(os.path.join(ens.folder(0), "DONE"))
    weights = {}
    for seed in (4, 8):
        folder, record = ens.folder(seed), ens.record(seed)
        assert record["seed"] == seed and record["wall_s"] > 0
        assert record["command"][-len(ens.args(seed)):] == ens.args(seed)
        assert record["command"][1:4] == ["-m", "lightning_attr.cli", "fit"]
        assert record["run_dir"] == "lightning_attr_runs/version_0"  # logger=False: the run folder in the seed's
        saved = yaml.safe_load(text(os.path.join(folder, record["run_dir"], "config.yaml")))
        assert saved["seed_everything"] == seed and saved["data"]["init_args"]["batch_size"] == seed
        assert "weights.safetensors" in record["files"] and any(f.startswith("checkpoints/") for f in record["files"])
        assert all(sha256_file(os.path.join(folder, f)) == h for f, h in record["files"].items())
        log = text(os.path.join(folder, "log.txt"))
        assert log.count("=== attempt") == 1 and "=== exit code 0" in log
        weights[seed] = load_file(os.path.join(folder, "weights.safetensors"))
    assert any(not torch.equal(weights[4][k], weights[8][k]) for k in weights[4])  # the seed changes the run


def test_finished_seeds_are_never_rerun(sequential):
    ens, _ = sequential
    before = {s: (os.stat(os.path.join(ens.folder(s), "DONE")).st_mtime_ns,
                  text(os.path.join(ens.folder(s), "log.txt"))) for s in (4, 8)}
    report = SeedEnsemble(ens.configs, [4, 0, 8], ens.root, extra_args=EXTRA).run()
    assert report.skipped == [4, 8] and [o.seed for o in report.failed] == [0]
    for s in (4, 8):
        assert (os.stat(os.path.join(ens.folder(s), "DONE")).st_mtime_ns,
                text(os.path.join(ens.folder(s), "log.txt"))) == before[s]
    assert text(os.path.join(ens.folder(0), "log.txt")).count("=== attempt") >= 2  # the failed seed retried


def test_dtda_command_with_parallel_processes(sequential, tmp_path, capsys):
    """`lightning-attr dtda` with two seeds at once: same weights per seed as the sequential runs; without a d-TDA
    callback in the config, nothing to aggregate is an error that says what to attach."""
    ens, _ = sequential
    root = tmp_path / "par"
    with pytest.raises(SystemExit) as exit_info:
        main(["dtda", "--config", ens.configs[0], "--seeds", "4,8", "--root", str(root), "--backend", "processes",
              "--max_parallel", "2", *EXTRA])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "attach a d-TDA callback" in captured.err
    assert "[dtda] seed 4: done" in captured.out and "[dtda] seed 8: done" in captured.out
    for seed in (4, 8):
        assert (root / f"seed_{seed:04d}" / "DONE").is_file()
        par = load_file(str(root / f"seed_{seed:04d}" / "weights.safetensors"))
        seq = load_file(os.path.join(ens.folder(seed), "weights.safetensors"))
        for key in seq:
            torch.testing.assert_close(par[key], seq[key])


def test_ray_backend(sequential, tmp_path):
    """The same seed on a local Ray (ray.remote of the same run_seed) trains the same weights as in sequence."""
    ray = pytest.importorskip("ray")
    ens, _ = sequential
    try:
        report = SeedEnsemble(ens.configs, [4], str(tmp_path / "ray"), backend="ray", max_parallel=1,
                              extra_args=EXTRA).run()
    finally:
        ray.shutdown()
    assert report.finished == [4] and report.ok
    record = json.loads(text(tmp_path / "ray" / "seed_0004" / "DONE"))
    assert record["run_dir"] == "lightning_attr_runs/version_0"
    ray_weights = load_file(str(tmp_path / "ray" / "seed_0004" / "weights.safetensors"))
    seq = load_file(os.path.join(ens.folder(4), "weights.safetensors"))
    for key in seq:
        torch.testing.assert_close(ray_weights[key], seq[key])
