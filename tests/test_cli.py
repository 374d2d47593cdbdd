"""The deepzero-task command: help, one-line exit-2 errors, end-to-end runs, Hydra features, resume."""

import json
import subprocess
import sys

import pytest
import torch

from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.cli import main

TINY = ["data.train_limit=96", "data.test_limit=60", "batch_size=32", "epochs=1", "progress=false"]


def run(tmp_path, *overrides):
    return main(["classify", f"hydra.run.dir={tmp_path}", *TINY, *overrides])


def test_help_lists_applications(capsys):
    assert main(["--help"]) == 0
    assert "classify" in capsys.readouterr().out


def test_console_script_unknown_application_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "deepzero_apps.cli", "clasify"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "deepzero-task: error: unknown application 'clasify'; choose from: " + ", ".join(
        __import__("deepzero_apps.cli", fromlist=["APPS"]).APPS
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("epochz=3", "epochz"),
        ("epochs=three", "epochs"),
        ("model=resnet21", "resnet21"),
        ("sparsity.sparsity=1.5", "sparsity.sparsity=1.5"),
        ("data=imagefolder", "data.root"),
        ("data=imagefolder data.root=/no/such/dir", "/no/such/dir"),
        ("estimator.mu=-1", "mu must be > 0, got -1"),
        ("model.name=vgg", "unknown model 'vgg'"),
        ("mode=so", "mode='so'"),
        ("optimizer.lr=abc", "optimizer:"),
        ("data=0", "Got int"),
    ],
)
def test_bad_configuration_is_one_line_exit_2(tmp_path, capsys, override, needle):
    assert run(tmp_path, *override.split()) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_multirun_under_torchrun_is_one_line_exit_2(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["classify", "-m", "seed=1,2", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "launch one torchrun per run" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("mode", ["zo", "fo"])
def test_classify_end_to_end(tmp_path, capsys, mode):
    assert run(tmp_path, f"mode={mode}") == 0
    out = capsys.readouterr().out
    assert "classify done: test_acc=" in out
    for name in ("metrics.jsonl", "checkpoint.pt", "learning_curve.png", "summary.json"):
        assert (tmp_path / name).exists(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = 96 // 32
    queries_per_step = 3376 + 1 if mode == "zo" else 1  # small CNN on digits: d coordinates + the base query
    assert summary["queries"] == steps * queries_per_step


def test_query_budget_stops_cleanly(tmp_path, capsys):
    assert run(tmp_path, "query_budget=4000") == 0  # 3,377 queries a step: a second step would exceed it
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == "query budget" and summary["steps"] == 1 and summary["queries"] <= 4000


def test_cfg_job_prints_config(capsys):
    assert main(["classify", "--cfg", "job", "model.depth=3"]) == 0
    assert "depth: 3" in capsys.readouterr().out


def test_multirun_sweeps(tmp_path, capsys):
    assert main(["classify", "-m", f"hydra.sweep.dir={tmp_path}", *TINY, "mode=fo", "seed=1,2"]) == 0
    assert (tmp_path / "0" / "summary.json").exists() and (tmp_path / "1" / "summary.json").exists()


def test_existing_checkpoint_is_not_overwritten_without_resume(tmp_path, capsys):
    assert run(tmp_path, "mode=fo") == 0
    before = (tmp_path / "checkpoint.pt").read_bytes()
    assert run(tmp_path, "mode=fo") == 2
    assert "resume=true" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_resume_continues_to_identical_parameters(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["sparsity=random", "sparsity.sparsity=0.9", "sparsity.mask_interval=1", "estimator=rge", "estimator.q=4"]
    assert run(straight, *common, "epochs=2") == 0
    assert run(split, *common, "epochs=2", "query_budget=8") == 0  # stops inside epoch 1
    assert run(split, *common, "epochs=2", "resume=true") == 0
    a = load_checkpoint(straight / "checkpoint.pt")["model"]
    b = load_checkpoint(split / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zo_grasp_scoring_queries_count_in_the_run(tmp_path):
    """The 2 (q + 1) scoring queries of ZO-GraSP are part of the run's query count, once."""
    assert run(tmp_path, "sparsity=zo_grasp", "sparsity.q=3", "sparsity.samples_per_class=2") == 0
    (epoch,) = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    assert epoch["queries"] == 2 * (3 + 1) + epoch["step"] * epoch["queries_per_step"]
