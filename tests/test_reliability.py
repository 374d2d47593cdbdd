"""Crash safety of `deepzero-task classify`: SIGKILL and exact resume, interrupted checkpoint writes,
non-finite and failing models, and configuration errors caught before any work starts."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import deepzero_apps.trainer.loop as trainer_module
from deepzero_apps.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from deepzero_apps.cli import main
from deepzero_apps.models import create_model

TESTS = Path(__file__).parent
TINY = ["data.train_limit=96", "data.test_limit=60", "batch_size=32", "progress=false", "threads=1"]
RANDOMIZED = [
    "estimator=rge",
    "estimator.q=4",
    "sparsity=random",
    "sparsity.sparsity=0.5",
    "sparsity.mask_interval=1",
]
FAULTY = [
    "model._target_=test_reliability.faulty_model",
    "estimator=rge",
    "estimator.q=4",
    "checkpoint_every=1",
]


class Fault(nn.Module):
    """Identity stage that, after `after` training-mode calls, returns NaN (or raises if `fail`)."""

    def __init__(self, after: int, fail: bool):
        super().__init__()
        self.after, self.fail, self.calls = after, fail, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                if self.fail:
                    raise RuntimeError("black box failed")
                return x * float("nan")
        return x


def faulty_model(
    in_channels: int, num_classes: int, name: str = "small_cnn", after: int = 0, fail: bool = False, **kwargs
) -> nn.Sequential:
    """`model._target_` for these tests: a registry model whose queries turn NaN (or fail) after `after` calls."""
    model = create_model(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    model.append(Fault(after, fail))
    return model


def run(run_dir, *overrides):
    return main(["classify", f"hydra.run.dir={run_dir}", *TINY, *overrides])


def temp_files(run_dir: Path) -> list[Path]:
    return list(run_dir.glob(".*.tmp"))


def assert_same_model(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert sa["global_step"] == sb["global_step"]
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["queries"] == sb["queries"]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if r["kind"] == "train"]


# ---- SIGKILL mid-epoch, then resume ----------------------------------------------------------------


def kill_at_step(run_dir: Path, target: int, overrides: list[str]) -> int:
    """Run the CLI in a subprocess, SIGKILL it once its checkpoint reaches `target` steps; return that step."""
    cmd = [
        sys.executable,
        "-m",
        "deepzero_apps.cli",
        "classify",
        f"hydra.run.dir={run_dir}",
        *TINY,
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, step = time.monotonic() + 300, -1
    try:
        while step < target:
            assert proc.poll() is None, (
                f"run ended (rc={proc.returncode}) before step {target}: {proc.stderr.read()}"
            )
            assert time.monotonic() < deadline, "run made no progress"
            try:  # every checkpoint seen mid-run must load safely: a write is all-or-nothing
                step = load_checkpoint(run_dir / "checkpoint.pt")["global_step"]
            except FileNotFoundError:
                pass
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return load_checkpoint(run_dir / "checkpoint.pt")["global_step"]


def test_sigkill_twice_then_resume_matches_uninterrupted_run(tmp_path):
    epochs, steps_per_epoch = 8, 3
    common = [*RANDOMIZED, f"epochs={epochs}", "checkpoint_every=1", "log_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(straight, *common) == 0

    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    first = kill_at_step(split, rng.randint(1, 8), common)
    second = kill_at_step(split, rng.randint(first + 1, first + 8), [*common, "resume=true"])
    assert second < epochs * steps_per_epoch, f"seed {seed}: the second run was not interrupted"
    (split / ".checkpoint.pt.stale.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves it
    assert run(split, *common, "resume=true") == 0

    assert_same_model(straight, split)
    assert train_losses(straight) == train_losses(split), f"seed {seed}"
    assert temp_files(split) == []


# ---- interrupted checkpoint writes -----------------------------------------------------------------


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.arange(4.0)}, "global_step": 1})

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 torn")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "global_step": 2})
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 1 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert temp_files(tmp_path) == []


def test_failed_checkpoint_write_during_training_keeps_the_last_one(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(obj["global_step"])
        if len(calls) == 3:
            real_save(obj, f, *args, **kwargs)
            raise OSError("I/O error")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    assert run(tmp_path, *RANDOMIZED, "epochs=2", "checkpoint_every=1") != 0
    assert load_checkpoint(tmp_path / "checkpoint.pt")["global_step"] == calls[1] == 2
    assert temp_files(tmp_path) == []


# ---- non-finite and failing models -----------------------------------------------------------------


@pytest.fixture
def importable_tests(monkeypatch):
    """Let Hydra import this module's `faulty_model` by name."""
    monkeypatch.syspath_prepend(str(TESTS))


def test_nan_stops_with_one_line_naming_the_step(tmp_path, capsys, importable_tests):
    assert run(tmp_path, *FAULTY, "+model.after=22", "epochs=2") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite" in err, err
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 0 < state["global_step"] < 6 and f"at step {state['global_step']} " in err
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert temp_files(tmp_path) == []


def test_nan_steps_are_skipped_with_on_nonfinite_skip(tmp_path, capsys, importable_tests):
    assert run(tmp_path, *FAULTY, "+model.after=22", "epochs=2", "on_nonfinite=skip",
               "max_skipped_fraction=0.5") == 0
    assert "skipping step" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"] == "epochs" and summary["steps"] == 6
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r["kind"] == "skipped"]
    assert skipped and skipped == list(range(skipped[0], 6))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_failing_model_leaves_the_earlier_checkpoint_intact(tmp_path, importable_tests):
    assert run(tmp_path, *FAULTY, "+model.after=22", "+model.fail=true", "epochs=2") not in (0, 2)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert 0 < state["global_step"] < 6
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert temp_files(tmp_path) == []


# ---- configuration errors: exit 2, one line, before any work ---------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("epochs=-1", "epochs=-1 must be >= 1"),
        ("epochs=0", "epochs=0"),
        ("batch_size=0", "batch_size=0"),
        ("log_every=0", "log_every=0"),
        ("eval_batch_size=0", "eval_batch_size=0"),
        ("checkpoint_every=-1", "checkpoint_every=-1"),
        ("dist_timeout=0", "dist_timeout=0"),
        ("query_budget=0", "query_budget=0"),
        ("threads=0", "threads=0"),
        ("on_nonfinite=ignore", "on_nonfinite='ignore'"),
        ("warmup_epochs=4 epochs=2", "warmup_epochs=4"),
        ("resume=maybe", "resume"),
        ("device=tpu", "device='tpu'"),
        ("seed=1,2", "seed=1,2"),
        ("sparsity.mask_interval=abc", "sparsity.mask_interval"),
        ("sparsity.mask_interval=0", "mask_interval=0"),
        ("sparsity=random sparsity.sparsity=-0.1", "sparsity.sparsity=-0.1"),
        ("sparsity=random sparsity.sparsity=1.0", "sparsity.sparsity=1.0"),
        ("sparsity.mu=0", "sparsity.mu=0"),
        ("sparsity.method=magic", "magic"),
        ("sparsity.ratios=/no/such/ratios.json", "/no/such/ratios.json"),
        ("data.name=mnist", "mnist"),
        ("data.train_limit=0", "train_limit=0"),
        ("data.augment=sometimes", "data.augment"),
        ("estimator=spsa", "spsa"),
        ("estimator=rge estimator.mu=0", "mu"),
        ("estimator._target_=no.such.Estimator", "no.such.Estimator"),
        ("optimizer=lbfgs", "lbfgs"),
        ("optimizer._target_=torch.optim.Nope", "torch.optim.Nope"),
        ("+optimizer.lrr=0.1", "lrr"),
        ("model._target_=no.such.model", "no.such.model"),
        ("scheduler._target_=torch.optim.lr_scheduler.Nope", "Nope"),
        ("data.trian_limit=3", "trian_limit"),
    ],
)
def test_bad_configuration_exits_2_before_any_work(tmp_path, capsys, override, needle):
    assert run(tmp_path, "epochs=1", *override.split()) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    left = {p.name for p in tmp_path.iterdir()} if tmp_path.exists() else set()
    assert all(name in (".hydra", ".lock", "run_config.yaml") or name.endswith(".log") for name in left), left


def test_nan_in_the_first_query_is_reported_at_step_0(tmp_path, capsys, importable_tests):
    assert run(tmp_path, *FAULTY, "+model.after=0", "epochs=1") == 1
    err = capsys.readouterr().err
    assert "at step 0 " in err and not (tmp_path / "checkpoint.pt").exists()


# ---- one writer per run directory ------------------------------------------------------------------


def start_cli(run_dir: Path, *overrides: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepzero_apps.cli", "classify", f"hydra.run.dir={run_dir}", *TINY, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"run ended (rc={proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, "run made no progress"
        try:
            if load_checkpoint(run_dir / "checkpoint.pt")["global_step"] >= step:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.01)


def test_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    common = [*RANDOMIZED, "epochs=200", "checkpoint_every=1", "log_every=1"]
    proc = start_cli(tmp_path, *common)
    try:
        wait_for_checkpoint(proc, tmp_path, 1)
        hydra_config = (tmp_path / ".hydra" / "config.yaml").read_bytes()
        for extra in ([], ["resume=true"]):
            assert run(tmp_path, *common, *extra) == 1
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and f"PID {proc.pid}" in err, err
        assert (tmp_path / ".hydra" / "config.yaml").read_bytes() == hydra_config
        wait_for_checkpoint(proc, tmp_path, 4)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    steps = [step for step, _ in train_losses(tmp_path)]
    assert steps == list(range(1, len(steps) + 1))
    assert run(tmp_path, *common, "epochs=200", "resume=true", "query_budget=60") == 0  # the lock died with it


# ---- Ctrl-C and a file size limit: one line, the last checkpoint intact ----------------------------


@pytest.fixture
def sigint_as_in_a_shell():
    """SIGINT handled as in a command started from a shell (Python's KeyboardInterrupt handler here, the
    default disposition in a child): pytest-xdist workers ignore SIGINT, and a child inherits an ignored
    signal, so without this a Ctrl-C test passes or fails with the worker it lands on."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("sigint_as_in_a_shell")
def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    common = [*RANDOMIZED, "epochs=200", "checkpoint_every=1"]
    proc = start_cli(tmp_path, *common)
    try:
        wait_for_checkpoint(proc, tmp_path, 2)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
        err = proc.stderr.read().strip()
        assert code == 130, err
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "last checkpoint on disk" in err, err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["global_step"] >= 2
    assert temp_files(tmp_path) == []


class InterruptingFile:
    """A file whose third write gets a real SIGINT, i.e. Ctrl-C pressed while torch.save is writing."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            signal.raise_signal(signal.SIGINT)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


@pytest.mark.usefixtures("sigint_as_in_a_shell")
def test_ctrl_c_inside_a_checkpoint_write_lands_after_it(tmp_path, capsys, monkeypatch):
    """torch.save turns a KeyboardInterrupt raised inside its writer into a RuntimeError (a traceback,
    exit 1): the interrupt waits for the write, then stops the run naming the checkpoint just written."""

    def save_interrupted(path, state):
        atomic_write(path, lambda f: torch.save(state, InterruptingFile(f)))

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_interrupted)
    assert run(tmp_path, *RANDOMIZED, "epochs=2", "checkpoint_every=1") == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "(step 1)" in err, err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["global_step"] == 1
    assert temp_files(tmp_path) == []


def test_file_size_limit_is_one_line_exit_1(tmp_path):
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # hydra files fit, a checkpoint does not

    proc = start_cli(tmp_path, *RANDOMIZED, "epochs=1", preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and len(err.strip().splitlines()) == 1, err
    assert "File too large" in err and "no checkpoint written" in err, err
    assert temp_files(tmp_path) == []


# ---- damaged or foreign files in the run directory: one line, exit 2 -------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished small run to damage copies of."""
    d = tmp_path_factory.mktemp("finished")
    assert run(d, *RANDOMIZED, "epochs=1", "log_every=1") == 0
    return d


def damaged_copy(finished: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "run"
    shutil.copytree(finished, d)
    return d


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "directory"])
def test_unreadable_checkpoint_is_one_line_exit_2(finished, tmp_path, capsys, damage):
    d = damaged_copy(finished, tmp_path)
    ckpt = d / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.unlink()
    if damage == "directory":
        ckpt.mkdir()
    else:
        ckpt.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    assert run(d, *RANDOMIZED, "epochs=1", "log_every=1", "resume=true") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint {ckpt} cannot be read" in err, err


@pytest.mark.parametrize("other", ["model=mlp", "optimizer=adam"])
def test_checkpoint_of_another_model_or_optimizer_is_one_line_exit_2(finished, tmp_path, capsys, other):
    foreign = tmp_path / "foreign"
    assert run(foreign, *RANDOMIZED, "epochs=1", other) == 0
    d = damaged_copy(finished, tmp_path)
    (d / "checkpoint.pt").write_bytes((foreign / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    assert run(d, *RANDOMIZED, "epochs=1", "log_every=1", "resume=true") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not belong to this run" in err, err


@pytest.mark.parametrize("line", [b"42", b'{"foo":1}', b'{"step":"abc"}', b"\xff\xfe not utf-8"])
def test_damaged_metrics_line_is_one_line_exit_2(finished, tmp_path, capsys, line):
    d = damaged_copy(finished, tmp_path)
    metrics = d / "metrics.jsonl"
    metrics.write_bytes(line + b"\n" + metrics.read_bytes().split(b"\n", 1)[1])
    assert run(d, *RANDOMIZED, "epochs=1", "log_every=1", "resume=true") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(metrics) in err, err
    assert "line 1" in err or "UTF-8" in err, err


def test_run_dir_under_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert run(tmp_path / "file" / "run", "epochs=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be created" in err, err


def test_read_only_run_dir_is_one_line_exit_1(capsys):
    target = Path("/sys/kernel")  # read-only even for root (chmod does not stop root)
    try:
        target.joinpath(".deepzero-probe").touch()
    except OSError:
        pass
    else:
        pytest.skip("no read-only directory on this machine")
    assert run(target, "epochs=1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not writable" in err, err


def test_disk_full_is_one_line_exit_1_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    import errno

    real_save, calls = torch.save, []

    def fill_disk(obj, f, *args, **kwargs):
        calls.append(obj["global_step"])
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_disk)
    assert run(tmp_path, *RANDOMIZED, "epochs=2", "checkpoint_every=1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert f"(step {calls[0]})" in err and load_checkpoint(tmp_path / "checkpoint.pt")["global_step"] == calls[0]
    assert temp_files(tmp_path) == []
