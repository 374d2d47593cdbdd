"""The deepzero-task command: help, one-line exit-2 errors, end-to-end runs, Hydra features, resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepzero_apps.apps import ENTRY_POINT_GROUP, builtin_apps, list_apps
from deepzero_apps.checkpoint import load_checkpoint
from deepzero_apps.cli import main
from deepzero_apps.errors import ConfigError

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
        list_apps()
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("epochz=3", "epochz"),
        ("epochs=three", "epochs='three': expected an integer"),
        ("model=resnet21", "resnet21"),
        ("sparsity.sparsity=1.5", "sparsity.sparsity=1.5"),
        ("data=imagefolder", "data.root"),
        ("data=imagefolder data.root=/no/such/dir", "/no/such/dir"),
        ("estimator.mu=-1", "mu must be > 0, got -1"),
        ("model.name=vgg", "unknown model 'vgg'"),
        ("mode=so", "mode='so'"),
        ("optimizer.lr=abc", "optimizer.lr='abc': expected a float"),  # issue #23 item 5
        ("estimator.mu=abc", "estimator.mu='abc': expected a float"),
        ("estimator=rge estimator.q=1.5", "estimator.q=1.5: expected an integer"),
        ("data=0", "Got int"),
        # issue #13 item 9: each of these was a traceback
        ("model.channels=0", "model.channels=0 must be >= 1"),
        ("seed=-1", "seed=-1"),
        ("seed=99999999999999999999999", "seed=99999999999999999999999"),
        ("device=cuda:abc", "device='cuda:abc'"),
        ("sparsity=zo_grasp sparsity.samples_per_class=0", "sparsity.samples_per_class=0"),
        ("sparsity=zo_grasp sparsity.q=0", "sparsity.q=0"),
        ("sparsity=zo_grasp data.train_limit=64", "fewer than samples_per_class=25"),
        ("estimator=rge estimator.q=100000000000", "estimator.q=100000000000 exceeds"),
        ("threads=1000", "threads=1000"),
        ("+chekpoint_every=1", "did you mean checkpoint_every"),
        ("+data.rooot=x", "did you mean data.root"),
    ],
)
def test_bad_configuration_is_one_line_exit_2(tmp_path, capsys, override, needle):
    assert run(tmp_path, *override.split()) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_config_file_that_does_not_parse_is_one_line_exit_2(tmp_path, capsys):
    """An unquoted interpolation in a flow list of a user's --config-dir file (issue #23 item 5)."""
    mine = tmp_path / "conf" / "optimizer" / "mine.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("_target_: torch.optim.SGD\n_partial_: true\nlr: 0.1\nbetas: [0.9, ${oc.env:B2,0.99}]\n")
    assert main(["classify", "--config-dir", str(tmp_path / "conf"), f"hydra.run.dir={tmp_path / 'run'}", "optimizer=mine"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"config file {mine}, line 4, column 15:" in err and "quote" in err and len(err.splitlines()) == 1, err


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


@pytest.mark.parametrize("sparsity", ["random", "dense"])
def test_first_order_with_a_sparse_setting_says_its_gradient_is_masked(tmp_path, capsys, sparsity):
    """mode=fo keeps the sparse coordinate sets (an ablation): said at start, and only those weights move;
    sparsity=dense moves every weight. Issue #29's first FO reference was masked without a word."""
    init = tmp_path / "init"
    assert run(init, "mode=fo", "optimizer.lr=0") == 0  # the starting weights of the same seed
    capsys.readouterr()
    assert run(tmp_path / "run", "mode=fo", f"sparsity={sparsity}", "sparsity.sparsity=0.9", "optimizer.weight_decay=0") == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "masked-gradient ablation" in line]
    start, end = (load_checkpoint(d / "checkpoint.pt")["model"] for d in (init, tmp_path / "run"))
    moved = sum(int((start[k] != end[k]).sum()) for k in start if start[k].is_floating_point())
    total = sum(start[k].numel() for k in start if start[k].is_floating_point())
    if sparsity == "dense":
        assert not said and moved > 0.9 * total
    else:
        assert len(said) == 1 and "sparsity=dense for plain first-order training" in said[0]
        assert 0 < moved < 0.2 * total


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line_exit_2(tmp_path, capsys):
    assert run(tmp_path, "device=cuda") == 2
    err = capsys.readouterr().err.strip()
    assert "device='cuda' is not available" in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    ("app", "override", "needle"),
    [
        ("pde", "data.cache_dir=/proc/nope", "data.cache_dir='/proc/nope'"),
        ("certify", "data.train_limit=40 classifier=callable classifier.target=os.getcwd", "os.getcwd returned str, not a callable"),
        ("certify", "sparsity=grasp", "gradients through the black box"),
    ],
)
def test_bad_configuration_of_other_apps_is_one_line_exit_2(tmp_path, capsys, app, override, needle):
    assert main([app, f"hydra.run.dir={tmp_path}", "progress=false", *override.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_debug_flag_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # --debug sets it to 1 (for Hydra too); undone at teardown
    with pytest.raises(ConfigError, match="seed=-1"):
        main(["classify", "--debug", f"hydra.run.dir={tmp_path}", "seed=-1"])


def test_builtin_apps_are_discovered():
    assert set(builtin_apps()) == {"classify", "certify", "export", "pde", "serve"}


@pytest.mark.parametrize(
    ("app", "groups", "foreign"),
    [
        ("classify", {"data": set(), "model": set(), "sparsity": set(), "logger": set(), "experiment": {"cge_vs_rge"}},
         {"denoiser", "solver"}),
        ("certify", {"denoiser": {"dncnn"}, "experiment": {"certify_budget_curve", "certify_cifar10"},
                     "classifier": {"callable", "http", "run", "torchscript", "train"}}, {"solver"}),
        ("pde", {"solver": {"burgers", "external", "phiflow_wake", "wake"},
                 "experiment": {"pde_burgers", "pde_phiflow_wake", "pde_wake"}}, {"data", "denoiser", "model", "classifier"}),
        ("serve", {"classifier": {"callable", "http", "run", "torchscript", "train"}}, {"data", "estimator", "solver", "denoiser"}),
        ("export", {}, {"classifier", "data", "model", "solver"}),
    ],
)  # fmt: skip
def test_help_shows_only_the_apps_groups(capsys, app, groups, foreign):
    """Options are checked as subsets: plug-ins registered by other tests may add choices."""
    assert main([app, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"deepzero-task {app}: "), out[:200]
    listing = out.split("== Config groups ==")[1].split("== Config ==")[0]
    shown = {}
    for line in listing.splitlines()[1:]:
        if ":" in line:
            group, options = line.split(":", 1)
            shown[group.strip()] = {o.strip() for o in options.split(",")}
    assert all(g in shown and options <= shown[g] for g, options in groups.items()), listing
    assert not foreign & shown.keys(), listing
    assert "cge_vs_rge" not in listing or app == "classify", listing


def test_certify_honours_the_sparsity_group(capsys):
    for choice, method in (("dense", "method: dense"), ("random", "method: random")):
        assert main(["certify", f"sparsity={choice}", "--cfg", "job", "--package", "sparsity"]) == 0
        assert method in capsys.readouterr().out


def _write_dist(root: Path, dist: str, entry_points: dict[str, str]) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def test_third_party_app_registers_by_entry_point_and_runs(tmp_path, capsys, monkeypatch):
    """A toy app under tests/ (one module plus its configs) is listed, helped and run by deepzero-task."""
    site = tmp_path / "site"
    _write_dist(site, "dz_toy_app", {"toy": "dz_toy_app:APP", "broken": "dz_no_such_module_xyz:APP"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "toy_app"))
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "toy       a toy app from the tests" in out and "broken" in out and "cannot be loaded" in out
    assert main(["toy", f"hydra.run.dir={tmp_path / 'run'}", "target=2.0", "optimizer.lr=0.1"]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["w"] == pytest.approx(2.0, abs=1e-3)
    assert "toy done" in (tmp_path / "run" / "toy.log").read_text()
    assert main(["toy", f"hydra.run.dir={tmp_path / 'bad'}", "steps=0.5"]) == 2
    assert main(["broken"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err


def test_tensorboard_logger_and_app_log(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run(tmp_path, "mode=fo", "logger=tensorboard", "log_every=1") == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "epoch/eval/test_acc", "epoch/queries"} <= set(tags), tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in rows])
    log = (tmp_path / "classify.log").read_text()
    assert "classify done: test_acc=" in log


def test_missing_logger_package_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda n, *a: (_ for _ in ()).throw(ImportError(n))
                        if n == "mlflow" else real(n, *a))
    assert run(tmp_path, "mode=fo", "logger=mlflow") == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'deepzero-apps[mlflow]'" in err and len(err.splitlines()) == 1, err


def test_certify_mode_is_a_deprecated_alias_of_method(capsys):
    assert main(["certify", "mode=mse", "--cfg", "job"]) == 0
    out, err = capsys.readouterr()
    assert "method: mse" in out and "mode=mse runs method=mse" in err and len(err.splitlines()) == 1


def test_help_does_not_show_a_deprecated_alias_beside_its_key(capsys):
    assert main(["certify", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "method: deepzero" in lines and "mode: null" not in lines
    assert main(["classify", "--help"]) == 0  # classify's own `mode` stays
    assert "mode: zo" in capsys.readouterr().out.splitlines()
